"""Answers from the coarsest tables equal the events' sums, even while rollups lag."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import struct
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from conftest import wait_for
from nettel.broker import EmbeddedBroker
from nettel.errors import QueryError
from nettel.models import COUNTERS, TOTALS, StatEvent, window_start
from nettel.store.maintenance import maintain_table, rewrite_partitions
from nettel.store.minute import RATE_MANTISSA_BITS, MinuteTable, round_rates
from nettel.store.query import (
    AGGREGATIONS,
    RESOLUTIONS,
    Aggregation,
    TrafficQuery,
    bucket_start,
    split_range,
)
from nettel.store.rollup import RollupTable
from nettel.stream.worker import StreamWorker
from test_store_minute import window
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


def metric_value(e: StatEvent, metric: str) -> int | None:
    if metric == "connections":
        return e.connections
    return sum(int(getattr(e, c)) for c in TOTALS.get(metric, (metric,)))


Expected = dict[tuple[str, int], float | int | None]


def stored_rate(rate: float) -> float:
    """A rate as the tables keep it (``RATE_MANTISSA_BITS`` of mantissa), computed on the
    float's bits here (``round_rates`` per value cost minutes); equal to ``round_rates``
    (checked by :func:`test_stored_rate_is_what_round_rates_keeps`)."""
    drop = 52 - RATE_MANTISSA_BITS
    (bits,) = struct.unpack("<Q", struct.pack("<d", float(rate)))
    bits = ((bits + (1 << (drop - 1))) & ~((1 << drop) - 1)) & 0xFFFF_FFFF_FFFF_FFFF
    return float(struct.unpack("<d", struct.pack("<Q", bits))[0])


def test_stored_rate_is_what_round_rates_keeps() -> None:
    rng = random.Random(4)
    rates = [
        0.0,
        1.0,
        0.1,
        1e-9,
        123456.789,
        2.0**40 + 1,
        *(rng.lognormvariate(8, 4) for _ in range(500)),
    ]
    kept = round_rates(pl.DataFrame({"r": rates}))["r"].to_list()
    assert [stored_rate(r) for r in rates] == kept


def expected_series(events: list[StatEvent], start: int, end: int, bucket: Callable[[int], int],
                    metric: str, agg: Aggregation) -> Expected:  # fmt: skip
    """Each container's value per bucket, computed from the events alone."""
    acc: dict[tuple[str, int], list[StatEvent]] = defaultdict(list)
    for e in events:
        if start <= window_start(e.ts_ms) < end:
            acc[(e.identity, bucket(window_start(e.ts_ms)))].append(e)
    out: Expected = {}
    for key, evs in acc.items():
        vals = [(metric_value(e, metric), e.interval_ms) for e in evs]
        if metric == "connections":
            have = [v for v, _ in vals if v is not None]
            if agg in ("sum", "avg"):
                out[key] = sum(have) / len(have) if have else None
            else:
                out[key] = (max if agg == "max" else min)(have) if have else None
        elif agg == "sum":
            out[key] = sum(v or 0 for v, _ in vals)
        elif agg == "avg":
            out[key] = sum(v or 0 for v, _ in vals) / (sum(i for _, i in vals) / 1000)
        else:
            rates = [(v or 0) / (i / 1000) for v, i in vals if i > 0]
            out[key] = stored_rate((max if agg == "max" else min)(rates))
    return out


def month_start(ms: int) -> int:
    d = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return int(dt.datetime(d.year, d.month, 1, tzinfo=dt.UTC).timestamp() * 1000)


BUCKETS: dict[str, Callable[[int], int]] = {
    "minute": lambda t: t,
    "hour": lambda t: bucket_start(t, HOUR),
    "day": lambda t: bucket_start(t, 24 * HOUR),
    "week": lambda t: bucket_start(t, 7 * 24 * HOUR),
    "month": month_start,
}


def check_answers(query: TrafficQuery, events: list[StatEvent], start: int, end: int) -> None:
    """Series at every resolution, stats, top-N and a bounded series equal the events'."""
    metrics = ["bytes", "rx_bytes", "tx_packets", "errors", "connections"]
    for res in RESOLUTIONS:
        for agg in AGGREGATIONS:
            frame = query.series(start, end, resolution=res, aggregation=agg, metrics=metrics)
            for m in metrics:
                got = {(r["container"], r["ts_ms"]): r[m] for r in frame.iter_rows(named=True)}
                assert got == expected_series(events, start, end, BUCKETS[res], m, agg), (
                    res,
                    agg,
                    m,
                )
    whole = lambda t: 0  # noqa: E731
    for agg in AGGREGATIONS:
        want = expected_series(events, start, end, whole, "bytes", agg)
        got_stats = {
            s.container: s.values["bytes"] for s in query.stats(start, end, aggregation=agg)
        }
        assert got_stats == {c: v for (c, _), v in want.items()}, agg
        # the lean question (a few metrics, their columns only) gives the same values
        full = query.stats(start, end, aggregation=agg)
        lean = query.stats(start, end, aggregation=agg, metrics=["bytes", "errors"])
        assert [(s.container, s.through_ms, s.first_ms, {m: s.values[m] for m in s.values})
                for s in lean] == [(s.container, s.through_ms, s.first_ms,
                                    {m: s.values[m] for m in ("bytes", "errors")})
                                   for s in full], agg  # fmt: skip
    sums = {
        c: v for (c, _), v in expected_series(events, start, end, whole, "tx_bytes", "sum").items()
    }
    top = query.top(start, end, metric="tx_bytes", n=2)
    order = sorted(sums, key=lambda c: (-(sums[c] or 0), c))[:2]
    assert [t.container for t in top] == order
    assert [t.value for t in top] == [sums[c] for c in order]
    assert [t.share for t in top] == [
        (sums[c] or 0) / sum(v or 0 for v in sums.values()) for c in order
    ]
    container = order[0]
    series = query.timeseries(container, start, end, metric="bytes", max_points=10)
    assert 0 < len(series.ts_ms) <= 10
    assert series.bucket_ms is not None
    size = series.bucket_ms
    want = expected_series(events, start, end, lambda t: bucket_start(t, size), "bytes", "sum")
    assert dict(zip(series.ts_ms, series.values, strict=True)) == {
        t: v for (c, t), v in want.items() if c == container
    }


def test_bad_questions_name_the_valid_choices(tmp_path: Path) -> None:
    query = TrafficQuery(str(tmp_path), partitions=1)
    with pytest.raises(QueryError, match="expected one of minute, hour, day, week, month"):
        query.series(0, HOUR, resolution="year")  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="unknown metric 'bytez': expected one of rx_bytes"):
        query.top(0, HOUR, metric="bytez")
    with pytest.raises(QueryError, match="expected one of sum, avg, max, min"):
        query.stats(0, HOUR, aggregation="p99")  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="TCP states 'sum': expected one of max"):
        query.top(0, HOUR, metric="tcp_syn_recv")
    with pytest.raises(QueryError, match="a start before the end"):
        query.stats(HOUR, 0)
    with pytest.raises(QueryError, match="at least 25 for this range"):
        query.timeseries("web", 0, 2 * 366 * 24 * HOUR, max_points=3)
    assert query.stats(0, HOUR) == []  # no table yet: nothing, not an error
    assert query.top(0, HOUR, metric="tcp_syn_recv", aggregation="max") == []


async def run(bootstrap: str, table: MinuteTable, consumed: int,
              rollup_interval_s: float | None) -> None:  # fmt: skip
    """A stream worker until it consumed ``consumed`` and flushed three times; with no
    ``rollup_interval_s``, one without rollups (``hour`` and ``day`` then lag)."""
    worker = StreamWorker(bootstrap, table, flush_interval_s=0.5,
                          rollups=() if rollup_interval_s is None else rollups(table),
                          rollup_interval_s=rollup_interval_s or 0.0)  # fmt: skip
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
    # 50 hours (whole days inside) at 30-s samples: two a minute, the ragged edges intact
    events, start, cutoff = await scenario(broker.bootstrap_servers, 3, 50, seed=6,
                                           interval_ms=30_000)  # fmt: skip
    table = MinuteTable(str(tmp_path / "minute"))
    half = len(events) // 2
    await publish(broker.bootstrap_servers, events[:half])
    await run(broker.bootstrap_servers, table, half, rollup_interval_s=0)
    await publish(broker.bootstrap_servers, events[half:])
    # no rollups: hour and day lag behind minute by the whole second half (a worker that
    # rolls at its first flush rolls everything when one fetch brings it all, as under load)
    await run(broker.bootstrap_servers, table, len(events) - half, rollup_interval_s=None)
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
    check_answers(query, events, start + 7 * 60_000, cutoff)
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
    check_answers(query, events, start, cutoff - 60_000)
    # maintenance rewrites every partition (rollups' partial rows merged): a long-lived
    # query (its caches) and a fresh one still answer exactly, from fewer rows
    for name in ("minute", "hour", "day"):
        report = maintain_table(str(tmp_path / name), name, retention_days=None)
        assert report.partitions_rewritten > 0, name
    for q in (query, TrafficQuery(str(tmp_path), partitions=4)):
        assert {t.container: t.sums for t in q.totals(start, cutoff)} == expected(
            events, start, cutoff
        )
        check_answers(q, events, start + 7 * 60_000, cutoff - 60_000)
    assert query.rows(start, cutoff).height < caught_up


def test_a_rewrite_keeps_rows_appended_meanwhile_and_a_warm_query_stays_exact(
    tmp_path: Path,
) -> None:
    """Maintenance's rewrite replaces exactly the files it read; a long-lived query
    (snapshot, file-list and small-file caches) follows appends, rolls and rewrites."""
    day = 1_795_651_200_000  # 2026-11-26T00:00Z
    minute = MinuteTable(str(tmp_path / "minute"))
    hour = RollupTable(str(tmp_path / "hour"), minute, HOUR)
    daily = RollupTable(str(tmp_path / "day"), hour, 24 * HOUR)
    want: dict[str, int] = defaultdict(int)

    def append(first_minute: int, minutes: int) -> None:
        rows = []
        for m in range(first_minute, first_minute + minutes):
            for c in ("web", "api"):
                rows.append(window(c, day + m * 60_000, 10 * m + len(c)))
                want[c] += 10 * m + len(c)
        for r in rows:
            r.partition = 0
        minute.append(rows, [], writer="w", epoch=0)

    def roll() -> None:
        for t in (hour, daily):
            t.roll(0, writer="nettel-stream", topic="nettel.stats")

    query = TrafficQuery(str(tmp_path), partitions=1)

    def check() -> None:
        for q in (query, TrafficQuery(str(tmp_path), partitions=1)):
            got = {t.container: t.sums["rx_bytes"] for t in q.totals(day, day + 48 * HOUR)}
            assert got == want

    for k in range(6):  # minutes 0..179 in 30-minute commits, rolled after every other
        append(30 * k, 30)
        if k % 2:
            roll()
        check()
    stale = DeltaTable(minute.uri)  # the snapshot a rewrite starts from
    append(180, 5)  # appended after it: not in the rewrite, must stay
    assert rewrite_partitions(stale, minute.uri, "minute") == 1
    check()
    roll()
    for name, table in (("hour", hour), ("day", daily)):
        assert rewrite_partitions(DeltaTable(table.uri), table.uri, name) == 1
    assert pl.scan_delta(daily.uri).select(pl.len()).collect().item() == 2  # merged partials
    append(185, 3)  # unrolled again
    check()
    files = len(DeltaTable(minute.uri).file_uris())
    assert files == 3, files  # the rewritten file, the one appended meanwhile, the last
