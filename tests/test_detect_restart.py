"""Killing the detector mid-run (no final checkpoint) and restarting it neither loses
its baselines nor duplicates an alert, on the topic or in the table."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from conftest import consume_all, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.detect.alerts import Alert, decode_alert
from nettel.detect.fleet import FleetDetector
from nettel.ingest.simulate import TrafficSimulator
from nettel.models import decode_stat_event
from nettel.store.alerts import AlertTable
from nettel.stream.detector import DetectWorker
from test_stream_worker import publish

pytestmark = pytest.mark.broker

HOUR = 3_600_000
PARTITIONS = 3


async def kill(worker: DetectWorker, task: asyncio.Task[None]) -> None:
    """Stop the worker wherever it is and write nothing more, like SIGKILL."""

    async def nothing(*_: object) -> None:
        return None

    worker._checkpoint = nothing  # type: ignore[method-assign,assignment]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_killed_detector_resumes_without_losing_or_duplicating(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, {"nettel.stats": PARTITIONS, "nettel.alerts": PARTITIONS})
    start = (time.time_ns() // 1_000_000 - 30 * HOUR) // HOUR * HOUR
    sim = TrafficSimulator(6, seed=5, interval_ms=20_000)
    spikes = sim.spikes(8, start + 6 * HOUR, 22 * HOUR, factor=30.0)
    events = list(sim.events(start, 28 * HOUR, spikes))
    await publish(bootstrap, events)
    data = str(tmp_path)
    for kills, fraction in enumerate((0.25, 0.5, 0.75)):
        worker = DetectWorker(bootstrap, data, checkpoint_interval_s=0.3)
        task = asyncio.create_task(worker.run(asyncio.Event()))
        target = int(len(events) * fraction) // PARTITIONS
        await wait_for(lambda: worker.stats.consumed >= target, 120, "some progress")  # noqa: B023
        await asyncio.sleep(0.05 * kills)
        await kill(worker, task)
    last = DetectWorker(bootstrap, data, checkpoint_interval_s=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(last.run(stop))
    await wait_for(lambda: len(last.assigned) == PARTITIONS, 60, "the last run's partitions")
    deadline = time.monotonic() + 120
    while not await last.drained():  # read to the end of every partition, checkpointed
        assert time.monotonic() < deadline, "the last run did not catch up"
        await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 60)
    # what one uninterrupted detector per partition gives on the same records
    records = await consume_all(bootstrap, "nettel.stats")
    replayed: dict[str, Alert] = {}
    versions: list[tuple[str, str, int]] = []
    for p in range(PARTITIONS):
        fleet = FleetDetector()
        mine = sorted((r for r in records if r.partition == p), key=lambda r: r.offset)
        for a in fleet.process_batch([decode_stat_event(r.value) for r in mine]):
            replayed[a.id] = a
            versions.append((a.id, a.status, a.updated_ms))
    assert replayed, "the spikes raised no alert"
    raw = await consume_all(bootstrap, "nettel.alerts")
    on_topic = [decode_alert(r.value) for r in raw]
    published = Counter((a.id, a.status, a.updated_ms) for a in on_topic)
    assert [k for k, n in published.items() if n > 1] == [], "an alert version published twice"
    assert set(published) == set(versions)
    rows = pl.read_delta(f"{data}/alerts")
    written = Counter(zip(rows["id"], rows["status"], rows["updated"].dt.epoch("ms"), strict=True))
    assert [k for k, n in written.items() if n > 1] == [], "an alert version written twice"
    assert set(written) == set(versions)
    table = AlertTable(f"{data}/alerts")
    latest = table.latest()
    assert {r["id"]: r["status"] for r in latest.iter_rows(named=True)} == {
        i: a.status for i, a in replayed.items()}  # fmt: skip
