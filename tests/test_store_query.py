"""Answers from the coarsest tables equal the events' sums, even while rollups lag."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conftest import wait_for
from nettel.broker import EmbeddedBroker
from nettel.models import COUNTERS, StatEvent, window_start
from nettel.store.minute import MinuteTable
from nettel.store.query import TrafficQuery, split_range
from nettel.stream.worker import StreamWorker
from test_stream_worker import publish, rollups, scenario

pytestmark = pytest.mark.broker

HOUR = 3_600_000


def expected(events: list[StatEvent], start: int, end: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for e in events:
        if start <= window_start(e.ts_ms) < end:
            acc = out.setdefault(e.identity, dict.fromkeys(COUNTERS, 0))
            for c in COUNTERS:
                acc[c] += getattr(e, c)
    return out


async def run(bootstrap: str, table: MinuteTable, consumed: int, rollup_interval_s: float) -> None:
    worker = StreamWorker(bootstrap, table, flush_interval_s=0.5, rollups=rollups(table),
                          rollup_interval_s=rollup_interval_s)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_for(lambda: worker.stats.consumed >= consumed and worker.stats.flushes >= 3,
                       120, "the worker to catch up")  # fmt: skip
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_totals_are_exact_from_coarse_tables_even_when_rollups_lag(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events, start, cutoff = await scenario(broker.bootstrap_servers, 3, 50, seed=6)
    table = MinuteTable(str(tmp_path / "minute"))
    half = len(events) // 2
    await publish(broker.bootstrap_servers, events[:half])
    await run(broker.bootstrap_servers, table, half, rollup_interval_s=0)
    await publish(broker.bootstrap_servers, events[half:])
    # rolls once at its first flush, then not again: hour and day lag behind minute
    await run(broker.bootstrap_servers, table, len(events) - half, rollup_interval_s=10**6)
    query = TrafficQuery(str(tmp_path), partitions=4)
    ranges = [
        (start + 7 * 60_000, cutoff - 13 * 60_000),  # ragged edges, whole days inside
        (start, cutoff),
        (start + 25 * HOUR + 60_000, start + 27 * HOUR),
        (cutoff - 90 * 60_000, cutoff),  # the lagging end only
    ]
    for s, e in ranges:
        assert any(t == "day" for t, _, _ in split_range(s, e)) or e - s < 48 * HOUR
        got = {t.container: t.sums for t in query.totals(s, e)}
        assert got == expected(events, s, e), (s - start, e - start)
    lagging = query.rows(start, cutoff).height
    # once the rollups catch up, a long range reads far fewer rows than minute holds
    hour, day = rollups(table)
    for p in range(4):
        hour.roll(p, writer="nettel-stream", topic="nettel.stats")
        day.roll(p, writer="nettel-stream", topic="nettel.stats")
    caught_up = query.rows(start, cutoff).height
    assert caught_up < lagging
    assert caught_up < table.scan().collect().height / 10
    got = {t.container: t.sums for t in query.totals(start, cutoff)}
    assert got == expected(events, start, cutoff)
