"""`nettel simulate`: realistic, reproducible traffic with a ground truth of spikes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import consume_events
from nettel.broker import EmbeddedBroker
from nettel.ingest.simulate import DAY_MS, HOUR_MS, TrafficSimulator

START = 1_795_651_200_000  # Thursday 2026-11-26 00:00 UTC


def test_daily_cycle_weekends_and_injected_spikes() -> None:
    sim = TrafficSimulator(containers=4, seed=5, noise=0.0, burst_probability=0.0)
    ident = sim.identities()[0]
    rates = [sim.expected_rx_rate(ident, START + h * HOUR_MS) for h in range(24)]
    assert max(rates) / min(rates) > 5, "a daily cycle: peak well above trough"
    saturday = [sim.expected_rx_rate(ident, START + 2 * DAY_MS + h * HOUR_MS) for h in range(24)]
    assert sum(saturday) < sum(rates), "quieter weekends"
    spikes = sim.spikes(3, START, 6 * HOUR_MS, factor=20.0)
    events = list(sim.events(START, 6 * HOUR_MS, spikes))
    for s in spikes:
        inside = [
            e for e in events if e.identity == s.identity and s.start_ms <= e.ts_ms < s.end_ms
        ]
        assert inside
        for e in inside:
            expected = sim.expected_rx_rate(e.identity, e.ts_ms) * 5
            if s.metric == "rx_bytes":
                assert e.rx_bytes >= 19 * expected
    assert all(e.rx_bytes >= 0 and e.tx_bytes >= 0 for e in events)


@pytest.mark.broker
async def test_the_command_writes_the_truth(broker: EmbeddedBroker, tmp_path: Path) -> None:
    truth = tmp_path / "truth.jsonl"
    # no KAFKA_BOOTSTRAP_SERVERS: simulate finds the embedded broker on NETTEL_BROKER_PORT
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(NETTEL_BROKER_PORT=broker.bootstrap_servers.rsplit(":", 1)[1],
               NETTEL_PARTITIONS="3", NETTEL_LOG_FORMAT="json")  # fmt: skip
    # the embedded broker's front runs in this event loop: never block it
    out = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).with_name("nettel")), "simulate", "--containers", "5",
         "--hours", "0.5", "--spikes", "2", "--truth", str(truth), "--start-ms", str(START)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    spikes = [json.loads(line) for line in truth.read_text().splitlines()]
    assert len(spikes) == 2
    assert '"simulate_to_embedded_broker"' in out.stderr
    assert {"identity", "metric", "start_ms", "end_ms", "factor"} <= set(spikes[0])


@pytest.mark.broker
async def test_published_events_match_the_generator(broker: EmbeddedBroker) -> None:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
               NETTEL_PARTITIONS="3", NETTEL_LOG_FORMAT="json")  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("nettel")), "simulate", "--containers", "5",
        "--hours", "0.25", "--spikes", "0", "--start-ms", str(START), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    got = await consume_events(broker.bootstrap_servers)
    want = list(TrafficSimulator(5, seed=1).events(START, HOUR_MS // 4))
    key = lambda e: (e.identity, e.ts_ms)  # noqa: E731
    assert sorted(got, key=key) == sorted(want, key=key)
