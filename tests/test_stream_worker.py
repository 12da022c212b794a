"""The stream worker end to end: a real broker, the worker, a real Delta table on disk."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import msgspec
import polars as pl
import pytest

from conftest import consume_all, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.ingest.publisher import EventPublisher
from nettel.ingest.simulate import TrafficSimulator
from nettel.models import COUNTERS, StatEvent, encode_stat_event, window_start
from nettel.store.minute import MinuteTable
from nettel.store.rollup import DAY_MS, HOUR_MS, RollupTable
from nettel.stream.validation import MAX_BYTES_PER_S
from nettel.stream.worker import StreamWorker

pytestmark = pytest.mark.broker

TOPICS = {"nettel.stats": 4, "nettel.stats.dlq": 1}
INTERVAL_MS = 5000


def simulated(
    containers: int, hours: float, start_ms: int, seed: int = 1, interval_ms: int = 5_000
) -> list[StatEvent]:
    """`nettel simulate`'s traffic: daily shape, noise, bursts, restarts."""
    sim = TrafficSimulator(containers, seed=seed, restart_probability=0.001,
                           interval_ms=interval_ms)  # fmt: skip
    return list(sim.events(start_ms, round(hours * 3_600_000)))


async def publish(bootstrap: str, events: list[StatEvent], extra: tuple[bytes, ...] = ()) -> None:
    publisher = EventPublisher(bootstrap, "nettel.stats")  # the compact format, as ingest
    async with publisher:
        for ev in events:
            publisher.publish_event(ev)
        for raw in extra:
            publisher.publish(b"bad", raw)
        await wait_for(lambda: publisher.sent >= len(events) + len(extra), 120, "all sent")


def expected_windows(
    events: list[StatEvent], before_ms: int, period_ms: int = 60_000
) -> dict[tuple[str, int], list[int]]:
    acc: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0] * (len(COUNTERS) + 1))
    for ev in events:
        start = window_start(ev.ts_ms, period_ms)
        if start < before_ms:
            a = acc[(ev.identity, start)]
            for i, c in enumerate(COUNTERS):
                a[i] += getattr(ev, c)
            a[-1] += 1
    return dict(acc)


def table_windows(
    table: MinuteTable, before_ms: int, period_ms: int = 60_000
) -> dict[tuple[str, int], list[int]]:
    """Rows of a window table added up per (container, period), as readers do."""
    import polars as pl

    frame = (
        table.scan()
        .with_columns(start=pl.col("ts").dt.epoch("ms") // period_ms * period_ms)
        .filter(pl.col("start") < before_ms)
        .group_by("container", "start")
        .agg([pl.col(c).sum() for c in COUNTERS] + [pl.col("samples").sum()])
        .collect()
    )
    return {(r[0], r[1]): list(r[2:]) for r in frame.iter_rows()}


def rollups(table: MinuteTable) -> tuple[RollupTable, RollupTable]:
    base = table.uri.rsplit("/", 1)[0]
    hour = RollupTable(f"{base}/hour", table, HOUR_MS)
    return hour, RollupTable(f"{base}/day", hour, DAY_MS)


async def run_worker(
    bootstrap: str, table: MinuteTable, until: Callable[[StreamWorker], bool]
) -> StreamWorker:
    worker = StreamWorker(bootstrap, table, flush_interval_s=1.0, rollups=rollups(table))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_for(lambda: until(worker), 120, "the worker to catch up")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    return worker


async def scenario(
    bootstrap: str, containers: int, hours: int, seed: int, interval_ms: int = 5_000
) -> tuple[list[StatEvent], int, int]:
    """Simulated traffic starting on an hour, hours ago, plus 2 minutes so that every
    partition's event time passes the last hour's end + grace; topics created.
    Returns (events, start, cutoff): every window before the cutoff is closed."""
    start = (time.time_ns() // 1_000_000 - (hours + 1) * HOUR_MS) // HOUR_MS * HOUR_MS
    events = simulated(containers, hours + 2 / 60, start, seed=seed, interval_ms=interval_ms)
    await ensure_topics(bootstrap, TOPICS)
    return events, start, start + hours * HOUR_MS


def assert_exact(table: MinuteTable, events: list[StatEvent], cutoff: int) -> None:
    """minute and hour equal the events before the cutoff; day equals minute so far."""
    assert table_windows(table, cutoff) == expected_windows(events, cutoff)
    hour, day = rollups(table)
    assert table_windows(hour, cutoff, HOUR_MS) == expected_windows(events, cutoff, HOUR_MS)
    # the day is not over: the day table holds exactly what the minute table holds so far
    assert table_windows(day, 2**62, DAY_MS) == table_windows(table, 2**62, DAY_MS)


async def test_minute_sums_equal_the_produced_events_exactly(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events, start, cutoff = await scenario(broker.bootstrap_servers, 20, 3, seed=1)
    bad = (b"{not json", b'{"ts_ms": "soon"}', encode_stat_event(StatEvent(
        ts_ms=start, host="h", container_id="x", identity="x", name="x", interval_ms=5000,
        rx_bytes=-5)))  # fmt: skip
    await publish(broker.bootstrap_servers, events, bad)
    table = MinuteTable(str(tmp_path / "minute"))
    worker = await run_worker(
        broker.bootstrap_servers, table,
        lambda w: w.stats.consumed >= len(events) + len(bad) and w.stats.flushes >= 2,
    )  # fmt: skip
    assert_exact(table, events, cutoff)
    assert worker.stats.dead_lettered == 3
    dlq = await consume_all(broker.bootstrap_servers, "nettel.stats.dlq")
    reasons = sorted(dict(m.headers)["nettel-error"].decode()[:20] for m in dlq)
    assert len(reasons) == 3
    assert any("negative" in r for r in reasons)


async def test_a_restarted_worker_resumes_from_the_store_and_counts_nothing_twice(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events, _, cutoff = await scenario(broker.bootstrap_servers, 8, 1, seed=2)
    half = len(events) // 2
    await publish(broker.bootstrap_servers, events[:half])
    table = MinuteTable(str(tmp_path / "minute"))
    await run_worker(broker.bootstrap_servers, table,
                     lambda w: w.stats.consumed >= half and w.stats.flushes >= 1)  # fmt: skip
    await publish(broker.bootstrap_servers, events[half:])
    # a new worker in the same group: resumes from the table's replay points
    await run_worker(
        broker.bootstrap_servers, table,
        lambda w: w.stats.flushes >= 2 and w.stats.consumed >= len(events) - half,
    )  # fmt: skip
    assert_exact(table, events, cutoff)


async def test_two_workers_split_the_partitions_and_one_takes_over_when_the_other_dies(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events, _, cutoff = await scenario(broker.bootstrap_servers, 12, 1, seed=4)
    table = MinuteTable(str(tmp_path / "minute"))
    # each worker rolls the partitions it owns into the shared hour and day tables
    first = StreamWorker(broker.bootstrap_servers, table, flush_interval_s=0.5,
                         rollups=rollups(table))  # fmt: skip
    second = StreamWorker(broker.bootstrap_servers, table, flush_interval_s=0.5,
                          rollups=rollups(table))  # fmt: skip
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(first.run(stop_first)),
             asyncio.create_task(second.run(stop_second))]  # fmt: skip
    try:
        await wait_for(lambda: first.assigned and second.assigned, 60, "both workers assigned")
        assert sorted(first.assigned + second.assigned) == [0, 1, 2, 3]
        assert not set(first.assigned) & set(second.assigned)
        await publish(broker.bootstrap_servers, events[: len(events) // 2])
        await wait_for(lambda: first.stats.flushes >= 2 and second.stats.flushes >= 2, 60,
                       "both writing")  # fmt: skip
        tasks[0].cancel()  # cancelled mid-batch; hard deaths: test_stream_crash.py
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[0]
        await publish(broker.bootstrap_servers, events[len(events) // 2 :])
        await wait_for(lambda: second.assigned == [0, 1, 2, 3], 90, "the takeover")
        await wait_for(lambda: table_windows(table, cutoff) == expected_windows(events, cutoff),
                       90, "the table to match")  # fmt: skip
    finally:
        stop_second.set()
        await asyncio.gather(*tasks[1:], return_exceptions=True)
    assert_exact(table, events, cutoff)


async def test_hostile_events_go_to_the_dlq_and_every_other_window_is_written_across_restarts(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events, start, cutoff = await scenario(broker.bootstrap_servers, 4, 1, seed=5)

    def hostile(identity: str, rx_bytes: int = 0, tx_bytes: int = 0) -> StatEvent:
        return StatEvent(ts_ms=start + 600_000, host="h", container_id=identity,
                         identity=identity, name=identity, interval_ms=5000,
                         rx_bytes=rx_bytes, tx_bytes=tx_bytes)  # fmt: skip

    near_max = [hostile("huge", tx_bytes=2**63 - 10), hostile("huge", tx_bytes=2**63 - 20)]
    missing = encode_stat_event(hostile("nocount")).replace(b'"rx_bytes":0,', b"")
    oversized = encode_stat_event(msgspec.structs.replace(hostile("big"), name="n" * 300_000))
    day = 86_400_000
    # a second day in the same window (5 s later: the same time would be a copy, dropped)
    bulk = [msgspec.structs.replace(hostile("bulk", rx_bytes=MAX_BYTES_PER_S * 86_400),
                                    interval_ms=day, ts_ms=start + 600_000 + 5000 * i)
            for i in range(2)]  # fmt: skip
    refused = (  # JSON, as older versions wrote, among compact events: both are read
        encode_stat_event(near_max[0]),
        encode_stat_event(near_max[1], "msgpack"),
        missing,
        oversized,
        encode_stat_event(bulk[1]),
    )  # the 2nd would make its row cover > 2 days
    half = len(events) // 2
    first = [*events[:half], bulk[0]]
    await publish(broker.bootstrap_servers, events[:half], refused[:4])
    await publish(broker.bootstrap_servers, bulk)  # keyed by identity: one partition
    table = MinuteTable(str(tmp_path / "minute"))
    worker = await run_worker(
        broker.bootstrap_servers, table,
        lambda w: w.stats.consumed >= len(first) + len(refused) and w.stats.flushes >= 1,
    )  # fmt: skip
    assert worker.stats.dead_lettered == len(refused)
    # a new worker replays from the stored point (the bad events again among them)
    await publish(broker.bootstrap_servers, events[half:])
    # the last windows of each partition close by the idle watermark (nothing newer comes)
    await run_worker(
        broker.bootstrap_servers, table,
        lambda w: w.stats.flushes >= 2 and w.stats.consumed >= len(events) - half
        and w.assigned == [0, 1, 2, 3] and w.open_windows() == 0,
    )  # fmt: skip
    assert_exact(table, [*events, bulk[0]], cutoff)
    dlq = await consume_all(broker.bootstrap_servers, "nettel.stats.dlq")
    by_source = {dict(m.headers)["nettel-source"]: m for m in dlq}
    assert len(by_source) == len(refused), "each refused event dead-lettered (replays repeat)"
    reasons = sorted(dict(m.headers)["nettel-error"].decode() for m in by_source.values())
    assert sum("more than an interface carries" in r for r in reasons) == 2, reasons
    assert sum("missing required field `rx_bytes`" in r for r in reasons) == 1, reasons
    assert sum("larger than 16384" in r for r in reasons) == 1, reasons
    assert sum("would cover more than" in r for r in reasons) == 1, reasons
    assert max(len(m.value) for m in dlq) <= 16384, "an oversized event is cut in the DLQ"
    names = table.scan().select(pl.col("name").str.len_bytes().max()).collect().item()
    assert names < 100, "nothing of the oversized event reached the table"
