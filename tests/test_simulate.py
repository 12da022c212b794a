"""`nettel simulate`: realistic, reproducible traffic with a ground truth of spikes."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from conftest import consume_events
from nettel.broker import EmbeddedBroker
from nettel.ingest.simulate import (
    ANOMALY_KINDS,
    DAY_MS,
    HOUR_MS,
    NORMAL_KINDS,
    TrafficSimulator,
)
from nettel.models import StatEvent

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


def test_a_mixed_scenario_injects_every_kind_as_its_truth_says() -> None:
    def quiet(weekly_peaks: float) -> TrafficSimulator:
        return TrafficSimulator(12, seed=4, interval_ms=60_000, noise=0.0, burst_probability=0.0,
                                restart_probability=0.0, weekly_peaks=weekly_peaks)  # fmt: skip

    sim = quiet(0.3)
    truth = sim.mixed(START, 4 * DAY_MS, warmup_ms=DAY_MS, seed=9)
    assert {a.kind for a in truth} == set(ANOMALY_KINDS + NORMAL_KINDS)
    assert all(a.start_ms >= START + DAY_MS for a in truth if a.kind != "weekly_peak")
    span_ms = 4 * DAY_MS

    def by_key(events: Iterable[StatEvent]) -> dict[tuple[str, int], StatEvent]:
        return {(e.identity, e.ts_ms): e for e in events}

    deploys = [a for a in truth if a.kind == "deploy"]
    events = by_key(sim.events(START, span_ms, truth))
    base_of = by_key(quiet(0.0).events(START, span_ms, deploys))  # no weekly job, no anomaly
    level_of = by_key(quiet(0.0).events(START, span_ms))  # no deploy either
    for a in truth:
        times = range(a.start_ms, a.end_ms, 60_000)
        span = [events[(a.identity, t)] for t in times]
        base = [base_of[(a.identity, t)] for t in times]
        if a.kind in ("spike", "level_shift"):
            assert all(getattr(e, a.metric) >= int(getattr(b, a.metric) * a.factor) - 1
                       for e, b in zip(span, base, strict=True))  # fmt: skip
        elif a.kind == "ramp":
            ratios = [e.tx_bytes / max(b.tx_bytes, 1) for e, b in zip(span, base, strict=True)]
            assert ratios == sorted(ratios)
            assert ratios[-1] == pytest.approx(a.factor, rel=0.01)
        elif a.kind == "outage":
            assert all(e.rx_bytes == e.tx_bytes == e.connections == 0 for e in span)
        elif a.kind == "syn_flood":
            assert all(e.tcp is not None and e.tcp.syn_recv >= a.factor for e in span)
        elif a.kind == "error_burst":
            assert all(e.rx_errors >= round(a.factor * 60) for e in span)
        elif a.kind in ("restart", "deploy"):
            assert span[0].counter_reset
        if a.kind == "deploy":  # the level changes for good, with a new container id
            before = events[(a.identity, a.start_ms - 60_000)]
            after = events[(a.identity, a.end_ms)]
            assert after.container_id != before.container_id
            ratio = after.rx_bytes / max(level_of[(a.identity, a.end_ms)].rx_bytes, 1)
            level = math.prod(d.factor for d in deploys
                              if d.identity == a.identity and d.start_ms <= a.start_ms)  # fmt: skip
            assert ratio == pytest.approx(level, rel=0.2) or after.rx_bytes < 1000
        if a.kind == "weekly_peak":
            assert all(e.tx_bytes > 3 * b.tx_bytes for e, b in zip(span, base, strict=True)
                       if b.tx_bytes > 100)  # fmt: skip
    # SYN_RECV now and then in normal traffic too
    assert any(e.tcp and e.tcp.syn_recv for e in level_of.values())


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
    mixed = tmp_path / "mixed.jsonl"
    out = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).with_name("nettel")), "simulate", "--containers", "5",
         "--hours", "48", "--scenario", "mixed", "--warmup-hours", "0", "--truth", str(mixed),
         "--start-ms", str(START)],
        env=env | {"NETTEL_SAMPLE_INTERVAL_S": "300"}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    kinds = {json.loads(line)["kind"] for line in mixed.read_text().splitlines()}
    assert kinds >= set(ANOMALY_KINDS)


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
