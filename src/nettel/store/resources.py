"""The resource window tables: ``resource_minute``, ``resource_hour``, ``resource_day``.

Siblings of ``minute``/``hour``/``day`` with the same rules, through the same code:
:class:`ResourceMinuteTable` is a :class:`~nettel.store.minute.MinuteTable` (one commit
holds the rows and every partition's replay point: exactly once) with its own columns,
and the rollups are :class:`~nettel.store.rollup.RollupTable` s with
:data:`RESOURCE_ROLLUP` (sums add, maxes max, mins min, lasts the latest). Layout,
writer properties, retention and maintenance are the network tables' (see
:data:`~nettel.store.maintenance.TABLE_RULES`).

Examples
--------
>>> cols = resource_minute_schema()
>>> cols["cpu_usage_us"], cols["memory_bytes_max"], cols["cpu_peak_millicores"]
(Int64, Int64, Int64)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import polars as pl

from nettel.models import (
    RESOURCE_COUNTERS,
    RESOURCE_GAUGE_PEAKS,
    RESOURCE_GAUGE_STATS,
    RESOURCE_LIMITS,
    ResourceAggregate,
)
from nettel.store.minute import MinuteTable
from nettel.store.rollup import IDENTITY, RollupSpec

#: The resource tables and what each is rolled from (None: written by the stream).
RESOURCE_TABLES = {"resource_minute": None, "resource_hour": "resource_minute",
                   "resource_day": "resource_hour"}  # fmt: skip


def resource_minute_schema() -> dict[str, pl.DataType]:
    """Columns of the resource window tables, in order."""
    schema: dict[str, pl.DataType] = {
        "date": pl.String(),
        "container": pl.String(),
        "partition": pl.Int64(),
        "ts": pl.Datetime("us", "UTC"),
        "window_ms": pl.Int64(),
        **{k: pl.String() for k in IDENTITY},
        "source": pl.String(),
        "samples": pl.Int64(),
        "interval_ms": pl.Int64(),
        "resets": pl.Int64(),
    }
    schema.update((c, pl.Int64()) for c in RESOURCE_COUNTERS)
    schema["cpu_peak_millicores"] = pl.Int64()  # the busiest sample, 1000 = one core
    for g in RESOURCE_GAUGE_STATS:
        for stat in ("last", "max", "min", "sum"):
            schema[f"{g}_{stat}"] = pl.Int64()
    for g in RESOURCE_GAUGE_PEAKS:
        schema[f"{g}_last"] = pl.Int64()
        schema[f"{g}_max"] = pl.Int64()
    for g in RESOURCE_LIMITS:
        schema[f"{g}_last"] = pl.Int64()
    return schema


#: How resource rows add up over hours and days.
RESOURCE_ROLLUP = RollupSpec(
    resource_minute_schema,
    sums=("samples", "interval_ms", "resets", *RESOURCE_COUNTERS,
          *(f"{g}_sum" for g in RESOURCE_GAUGE_STATS)),
    mins=tuple(f"{g}_min" for g in RESOURCE_GAUGE_STATS),
    maxes=("cpu_peak_millicores",
           *(f"{g}_max" for g in (*RESOURCE_GAUGE_STATS, *RESOURCE_GAUGE_PEAKS))),
    lasts=(*IDENTITY, "source",
           *(f"{g}_last" for g in (*RESOURCE_GAUGE_STATS, *RESOURCE_GAUGE_PEAKS,
                                   *RESOURCE_LIMITS))),
)  # fmt: skip


def resource_rows_frame(rows: Sequence[ResourceAggregate]) -> pl.DataFrame:
    """A ``resource_minute`` frame from window aggregates, sorted by (container, ts).

    Examples
    --------
    >>> from nettel.models import ResourceEvent
    >>> ev = ResourceEvent(ts_ms=61_000, host="h", container_id="c", identity="web",
    ...                    name="web", interval_ms=5000, cpu_usage_us=9, memory_bytes=7)
    >>> agg = ResourceAggregate.first(ev); agg.add(ev)
    >>> resource_rows_frame([agg]).select("container", "cpu_usage_us", "memory_bytes_max").row(0)
    ('web', 9, 7)
    """
    schema = resource_minute_schema()
    cols: dict[str, list[Any]] = {k: [] for k in schema}
    for r in rows:
        start = dt.datetime.fromtimestamp(r.window_start_ms / 1000, tz=dt.UTC)
        cols["date"].append(start.strftime("%Y-%m-%d"))
        cols["container"].append(r.identity)
        cols["ts"].append(start)
        for k in ("partition", "window_ms", *IDENTITY, "source", "samples", "interval_ms",
                  "resets", "cpu_peak_millicores"):  # fmt: skip
            cols[k].append(getattr(r, k))
        for c in RESOURCE_COUNTERS:
            cols[c].append(r.sums[c])
        for g in (*RESOURCE_GAUGE_STATS, *RESOURCE_GAUGE_PEAKS, *RESOURCE_LIMITS):
            cols[f"{g}_last"].append(r.gauge_last.get(g))
        for g in (*RESOURCE_GAUGE_STATS, *RESOURCE_GAUGE_PEAKS):
            cols[f"{g}_max"].append(r.gauge_max.get(g))
        for g in RESOURCE_GAUGE_STATS:
            cols[f"{g}_min"].append(r.gauge_min.get(g))
            cols[f"{g}_sum"].append(r.gauge_sum.get(g))
    return pl.DataFrame(cols, schema=schema).sort("container", "ts")


class ResourceMinuteTable(MinuteTable):
    """The ``resource_minute`` Delta table: a minute table with the resource columns."""

    def columns(self) -> dict[str, pl.DataType]:
        return resource_minute_schema()

    def frame(self, rows: Sequence[Any]) -> pl.DataFrame:
        return resource_rows_frame(rows)
