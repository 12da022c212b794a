"""The embedded broker rotated twice mid-run under the stream worker: nothing lost or doubled.

A rotation replaces the broker's log with an empty one, while the worker's open windows
hold events only the old log has. The barrier (the worker's ``drained``) must write
them first; after ``rotated`` the worker reads the new log from offset 0 under the new
epoch. The tables must then equal the published events exactly: minute, hour and day
sums per window, and the samples table row for row.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for
from nettel.broker import BrokerRotation, EmbeddedBroker
from nettel.ingest.publisher import EventPublisher
from nettel.models import StatEvent, encode_stat_event
from nettel.store.minute import MinuteTable
from nettel.store.rollup import DAY_MS, HOUR_MS
from nettel.store.samples import SamplesTable
from nettel.stream.worker import StreamWorker
from test_store_samples import sample_rows, table_sample_rows
from test_stream_worker import expected_windows, publish, rollups, simulated, table_windows

pytestmark = pytest.mark.broker

TOPICS = {"nettel.stats": 4, "nettel.stats.dlq": 1}
ALL = 2**62


async def test_rotations_mid_run_lose_nothing_and_double_nothing(tmp_path: Path) -> None:
    start = (time.time_ns() // 1_000_000 - 3 * HOUR_MS) // HOUR_MS * HOUR_MS
    events = simulated(10, 1.0, start, seed=7)
    broker = EmbeddedBroker(free_port(), epoch_path=tmp_path / "broker-epoch")
    await broker.start(topics=TOPICS)
    table = MinuteTable(str(tmp_path / "minute"))
    samples = SamplesTable(str(tmp_path / "samples"))
    worker = StreamWorker(
        broker.bootstrap_servers, table, flush_interval_s=1.0, rollups=rollups(table),
        epoch=broker.epoch, samples=samples, seal_on_stop=True,
    )  # fmt: skip
    publisher = EventPublisher(broker.bootstrap_servers, "nettel.stats")
    rotation = BrokerRotation(
        broker, TOPICS, [publisher], max_rss_bytes=1 << 40, drained=worker.drained,
        on_rotated=[worker.rotated], drain_timeout_s=60,
    )  # fmt: skip
    first_epoch = broker.epoch
    stop = asyncio.Event()
    worker_task = asyncio.create_task(worker.run(stop))

    # the feeder never runs ahead of the next rotation: each one comes mid-stream, with
    # events still being published (and buffered while producers are paused)
    limit = [len(events) // 2]

    async def publish_slowly() -> None:
        # chunks end at 20 + 40k events, never on a minute's end (10 containers every 5 s
        # make 120 events a minute): a pause between chunks leaves windows half full
        i = 0
        while i < len(events):
            if i >= limit[0]:
                await asyncio.sleep(0.05)
                continue
            end = i + 20 if i == 0 else i + 40
            for ev in events[i:end]:
                publisher.publish(ev.identity.encode(), encode_stat_event(ev))
            i = end
            await asyncio.sleep(0.1)

    results = []
    try:
        await publisher.start()
        await wait_for(lambda: worker.assigned == [0, 1, 2, 3], 60, "the worker's assignment")
        feeder = asyncio.create_task(publish_slowly())
        for target, next_limit in ((len(events) // 3, len(events) * 5 // 6),
                                   (len(events) * 2 // 3, len(events))):  # fmt: skip
            await wait_for(lambda t=target: worker.stats.consumed >= t, 60, "the worker to read")
            assert any(pw.open_windows() for pw in worker._windows.values())
            results.append(await rotation.rotate_when_drained())
            limit[0] = next_limit
        await feeder
        await wait_for(lambda: publisher.buffered == 0, 60, "everything sent")
        await wait_for(lambda: worker.stats.consumed >= len(events), 60, "everything read")
    finally:
        stop.set()
        await asyncio.wait_for(worker_task, 60)  # seal_on_stop: open windows written too
        await publisher.stop()
        await broker.stop()
    assert results == [True, True], "each rotation must wait for the barrier, never force"
    assert broker.epoch == first_epoch + 2 == worker.epoch
    assert worker.stats.seals >= 3, "two rotations and the stop each seal the open windows"
    assert publisher.dropped == 0
    # every window, open ones included: the sums equal the events exactly
    assert table_windows(table, ALL) == expected_windows(events, ALL)
    hour, day = rollups(table)
    assert table_windows(hour, ALL, HOUR_MS) == expected_windows(events, ALL, HOUR_MS)
    assert table_windows(day, ALL, DAY_MS) == expected_windows(events, ALL, DAY_MS)
    rows = table.scan().select("container", "ts").collect()
    assert rows.height > rows.unique().height, "the seals wrote partial rows of open windows"
    assert table_sample_rows(samples) == sample_rows(events)
    assert worker.stats.samples_written == len(events)


async def run_up_like(tmp_path: Path, events: list[StatEvent]) -> StreamWorker:
    """One `nettel up` life on the embedded broker without an epoch file (as on S3):
    a fresh broker (epoch 1 again), the events published, read, and sealed at the stop."""
    broker = EmbeddedBroker(free_port())
    await broker.start(topics=TOPICS)
    table = MinuteTable(str(tmp_path / "minute"))
    worker = StreamWorker(
        broker.bootstrap_servers, table, flush_interval_s=1.0, rollups=rollups(table),
        epoch=broker.epoch, samples=SamplesTable(str(tmp_path / "samples")),
        seal_on_stop=True, fresh_log=True,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await publish(broker.bootstrap_servers, events)
        await wait_for(lambda: worker.stats.consumed >= len(events), 60, "the worker to read")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await broker.stop()
    assert broker.epoch == 1
    return worker


async def test_a_reused_epoch_number_does_not_skip_the_new_logs_events(tmp_path: Path) -> None:
    """Points an earlier life stored under the same epoch number mean nothing in a new log."""
    start = (time.time_ns() // 1_000_000 - 3 * HOUR_MS) // HOUR_MS * HOUR_MS
    events = simulated(6, 0.5, start, seed=9)
    first, second = events[: len(events) * 2 // 3], events[len(events) * 2 // 3 :]
    await run_up_like(tmp_path, first)
    worker = await run_up_like(tmp_path, second)  # offsets from 0 again, below the old points
    assert worker.stats.samples_written == len(second)
    table = MinuteTable(str(tmp_path / "minute"))
    assert table_windows(table, ALL) == expected_windows(events, ALL)
    hour, _ = rollups(table)
    assert table_windows(hour, ALL, HOUR_MS) == expected_windows(events, ALL, HOUR_MS)
    assert table_sample_rows(SamplesTable(str(tmp_path / "samples"))) == sample_rows(events)
