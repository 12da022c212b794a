"""Answers over the window tables: stats per container over a time range, exactly.

A range is cut into whole days (read from ``day``), whole hours (``hour``) and the
minutes at its edges (``minute``), so a month reads ~30 rows per container instead of
~43,000. Rollups lag the minute table by up to a roll interval, so a coarse table is
completed with the finer rows it has not consumed yet (read from the finer table's
change data feed since the version the coarse table recorded per partition): answers
are exact at any moment, equal to adding up every minute row in the range.

Examples
--------
>>> for part in split_range(90 * 60_000, 2 * 86_400_000 + 30 * 60_000):
...     print(part)
('minute', 5400000, 7200000)
('hour', 7200000, 86400000)
('day', 86400000, 172800000)
('minute', 172800000, 174600000)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from nettel.models import COUNTERS, TCP_STATES
from nettel.store.minute import MinuteTable, minute_schema
from nettel.store.rollup import DAY_MS, HOUR_MS, RollupTable, inserted_rows

MINUTE_MS = 60_000
Table = Literal["minute", "hour", "day"]


def split_range(start_ms: int, end_ms: int) -> list[tuple[Table, int, int]]:
    """Cut [start, end) into minute edges, whole hours and whole days, in time order."""
    start_ms -= start_ms % MINUTE_MS
    end_ms -= end_ms % MINUTE_MS
    if end_ms <= start_ms:
        return []
    h0 = -(-start_ms // HOUR_MS) * HOUR_MS
    h1 = end_ms // HOUR_MS * HOUR_MS
    if h1 <= h0:
        return [("minute", start_ms, end_ms)]
    d0 = -(-h0 // DAY_MS) * DAY_MS
    d1 = h1 // DAY_MS * DAY_MS
    parts: list[tuple[Table, int, int]] = [("minute", start_ms, h0)]
    if d1 > d0:
        parts += [("hour", h0, d0), ("day", d0, d1), ("hour", d1, h1)]
    else:
        parts.append(("hour", h0, h1))
    parts.append(("minute", h1, end_ms))
    return [(t, s, e) for t, s, e in parts if e > s]


@dataclass(frozen=True, slots=True)
class ContainerTotals:
    """One container's traffic over a range: counter sums and gauge extremes."""

    container: str
    samples: int
    interval_ms: int
    sums: dict[str, int]
    rate_max: dict[str, float | None]
    connections_max: int | None
    tcp_max: dict[str, int | None]


class TrafficQuery:
    """Reads ``minute``, ``hour`` and ``day`` under ``data_dir`` (never writes)."""

    def __init__(self, data_dir: str, *, partitions: int, writer: str = "nettel-stream",
                 topic: str = "nettel.stats", epoch: int = 0,
                 storage_options: dict[str, str] | None = None) -> None:  # fmt: skip
        base = data_dir.rstrip("/")
        self.minute = MinuteTable(f"{base}/minute", storage_options=storage_options)
        self.hour = RollupTable(
            f"{base}/hour", self.minute, HOUR_MS, storage_options=storage_options
        )
        self.day = RollupTable(f"{base}/day", self.hour, DAY_MS, storage_options=storage_options)
        self.partitions = partitions
        self.writer = writer
        self.topic = topic
        self.epoch = epoch

    def _scan(self, table: MinuteTable, start_ms: int, end_ms: int) -> pl.DataFrame:
        try:
            frame = table.scan()
        except (TableNotFoundError, FileNotFoundError, OSError):
            return pl.DataFrame(schema=minute_schema())
        lo = pl.lit(start_ms * 1000).cast(pl.Datetime("us", "UTC"))
        hi = pl.lit(end_ms * 1000).cast(pl.Datetime("us", "UTC"))
        return frame.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi)).collect()

    def _unrolled(self, coarse: RollupTable, start_ms: int, end_ms: int) -> pl.DataFrame:
        """Rows the finer table gained since ``coarse`` last consumed it, in the range."""
        try:
            src = DeltaTable(coarse.source.uri, storage_options=coarse.source.storage_options)
        except TableNotFoundError:
            return pl.DataFrame(schema=minute_schema())
        latest = src.version()
        frames = []
        for p in range(self.partitions):
            done = coarse.consumed_version(self.writer, self.topic, p)
            if done >= latest:
                continue
            changes = inserted_rows(src, done + 1, latest, p)
            ts_us = pl.col("ts").dt.epoch("us")
            frames.append(changes.filter((ts_us >= start_ms * 1000) & (ts_us < end_ms * 1000)))
        return pl.concat(frames) if frames else pl.DataFrame(schema=minute_schema())

    def rows(self, start_ms: int, end_ms: int) -> pl.DataFrame:
        """Every row needed to answer [start, end) exactly, from the coarsest tables."""
        parts = []
        for table, s, e in split_range(start_ms, end_ms):
            if table == "minute":
                parts.append(self._scan(self.minute, s, e))
            elif table == "hour":
                parts += [self._scan(self.hour, s, e), self._unrolled(self.hour, s, e)]
            else:
                parts += [self._scan(self.day, s, e), self._unrolled(self.day, s, e),
                          self._unrolled(self.hour, s, e)]  # fmt: skip
        return pl.concat(parts) if parts else pl.DataFrame(schema=minute_schema())

    def totals(self, start_ms: int, end_ms: int,
               containers: Sequence[str] | None = None) -> list[ContainerTotals]:  # fmt: skip
        """Per container over [start, end) (whole minutes), sorted by container."""
        frame = self.rows(start_ms, end_ms)
        if containers is not None:
            frame = frame.filter(pl.col("container").is_in(list(containers)))
        agg = (
            frame.group_by("container")
            .agg(
                [pl.col("samples").sum(), pl.col("interval_ms").sum()]
                + [pl.col(c).sum() for c in COUNTERS]
                + [pl.col(f"{c}_rate_max").max() for c in COUNTERS]
                + [pl.col("connections_max").max()]
                + [pl.col(f"tcp_{s}_max").max() for s in TCP_STATES]
            )
            .sort("container")
        )
        out = []
        for r in agg.iter_rows(named=True):
            out.append(ContainerTotals(
                container=r["container"], samples=r["samples"], interval_ms=r["interval_ms"],
                sums={c: r[c] for c in COUNTERS},
                rate_max={c: r[f"{c}_rate_max"] for c in COUNTERS},
                connections_max=r["connections_max"],
                tcp_max={s: r[f"tcp_{s}_max"] for s in TCP_STATES},
            ))  # fmt: skip
        return out
