"""The detector end to end: real Podman containers and traffic, ingest, the real broker,
the detect worker, alerts read back with a plain consumer: one burst is one incident for
the sender and one for the server it hammers; then a restart that neither forgets the
baselines nor duplicates an alert."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from conftest import Engine, consume_events, start_ingest, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.detect.alerts import Alert, decode_alert
from nettel.detect.container import make_detector
from nettel.detect.fleet import FleetDetector
from nettel.ingest.sources import EngineSource
from nettel.store.alerts import AlertTable
from nettel.stream.detector import DetectWorker

pytestmark = [pytest.mark.engine, pytest.mark.broker]

INTERVAL_S = 1.0
STEADY = 20_000  # bytes sent every 0.25 s
BURST = 600_000  # 30x


def quick_fleet() -> FleetDetector:
    """The service's detector (`make_detector()`), warm after 40 samples."""
    return FleetDetector(make_detector(warmup=40))


def sender(engine: Engine, peer_ip: str) -> Any:
    """Sends /tmp/rate bytes every 0.25 s over one TCP connection to ``peer_ip``:9000."""
    return engine.run(
        f"echo {STEADY} > /tmp/rate; sleep 1; while true; do "
        "dd if=/dev/zero bs=$(cat /tmp/rate) count=1 2>/dev/null; sleep 0.25; done "
        f"| nc {peer_ip} 9000"
    )


class AlertReader:
    """A plain consumer on nettel.alerts, noting when each alert arrived."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.got: list[tuple[int, Alert]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        consumer = AIOKafkaConsumer("nettel.alerts", bootstrap_servers=self.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    metadata_max_age_ms=1000)  # fmt: skip
        await consumer.start()
        try:
            while True:
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time_ns() // 1_000_000
                for records in batch.values():
                    self.got += [(now, decode_alert(r.value)) for r in records]
        finally:
            await consumer.stop()

    def __enter__(self) -> AlertReader:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def set_rate(container: Any, rate: int) -> None:
    await asyncio.to_thread(container.exec_run, ["sh", "-c", f"echo {rate} > /tmp/rate"])


async def test_a_burst_is_one_incident_per_container_within_two_samples_and_survives_a_restart(
    engine: Engine, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, {"nettel.stats": 3, "nettel.alerts": 3})
    sink = engine.run("sleep 3600 | nc -l -p 9000 > /dev/null")
    quiet_sink = engine.run("sleep 3600 | nc -l -p 9000 > /dev/null")
    await asyncio.sleep(0.5)
    burster = sender(engine, engine.ip(sink))
    neighbour = sender(engine, engine.ip(quiet_sink))
    ingest = await start_ingest(EngineSource(engine.url, inventory_interval_s=2.0), bootstrap,
                                INTERVAL_S, partitions=3)  # fmt: skip
    data = str(tmp_path / "data")
    stop = asyncio.Event()
    worker = DetectWorker(bootstrap, data, fleet_factory=quick_fleet, checkpoint_interval_s=2)
    task = asyncio.create_task(worker.run(stop))
    try:
        with AlertReader(bootstrap) as reader:
            await asyncio.sleep(60)  # steady traffic: the baselines warm up
            await set_rate(burster, BURST)
            burst_at = time.time_ns() // 1_000_000

            def of(name: str) -> list[tuple[int, Alert]]:
                return [(t, a) for t, a in reader.got if a.identity == name]

            def resolved(name: str) -> bool:
                return any(a.status == "resolved" for _, a in of(name))

            await wait_for(lambda: of(burster.name) and of(sink.name), 20,
                           "an incident for the burst and for the server it hammers")  # fmt: skip
            await asyncio.sleep(8)
            await set_rate(burster, STEADY)
            await wait_for(lambda: resolved(burster.name) and resolved(sink.name), 90,
                           "both incidents to resolve")  # fmt: skip
            # a restart from the checkpoint: no alert again, baselines kept
            stop.set()
            await asyncio.wait_for(task, 30)
            learned = worker.fleet(worker.assigned[0]) if worker.assigned else None
            before = len(reader.got)
            stop = asyncio.Event()
            worker = DetectWorker(bootstrap, data, fleet_factory=quick_fleet,
                                  checkpoint_interval_s=2)  # fmt: skip
            task = asyncio.create_task(worker.run(stop))
            await wait_for(lambda: worker.stats.consumed > 10, 60, "the restarted detector")
            await asyncio.sleep(5)
            after = reader.got[before:]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await ingest.finish()
    events = await consume_events(bootstrap)
    ids = []
    for container, metric in ((burster, "tx_bytes"), (sink, "rx_bytes")):
        # the burst's first sample: the first after the rate change well above steady
        steady_max = max(getattr(e, metric) for e in events
                         if e.identity == container.name and e.ts_ms < burst_at)  # fmt: skip
        first = min(e.ts_ms for e in events
                    if e.identity == container.name and e.ts_ms >= burst_at
                    and getattr(e, metric) > 5 * steady_max)  # fmt: skip
        versions = of(container.name)
        # exactly one incident, opened once, resolved once
        assert len({a.id for _, a in versions}) == 1, [a for _, a in versions]
        assert [a.status for _, a in versions].count("open") == 1
        assert [a.status for _, a in versions].count("resolved") == 1
        arrived, opened = versions[0]
        assert opened.status == "open"
        assert arrived <= first + 2 * INTERVAL_S * 1000, (container.name, arrived - first)
        burst = next(m for m in versions[-1][1].metrics if m.metric == metric)
        assert burst.direction == "spike"
        assert burst.peak > 5 * burst.band_high
        assert f"{metric}/s up to" in versions[-1][1].explanation
        ids.append(opened.id)
    quiet = [a for _, a in reader.got if a.identity in (neighbour.name, quiet_sink.name)]
    assert not quiet, "a neighbour alerted"
    assert not [a for _, a in after if a.identity in (burster.name, neighbour.name, sink.name)]
    assert learned is not None
    # the table holds each incident, resolved
    table = AlertTable(f"{data}/alerts").latest()
    assert set(table["id"].to_list()) >= set(ids)
    for i in ids:
        assert table.filter(table["id"] == i)["status"].to_list() == ["resolved"]
