"""Answers over the resource tables: each container's CPU, memory, disk I/O and pids.

The last hour, day or week is read from ``resource_minute`` (exact: every closed
minute); longer ranges from ``resource_hour``, which trails the minute table by up to
one roll interval (``NETTEL_ROLLUP_INTERVAL_S``): the answer's ``through_ms`` says how
far it reaches.

Per aggregation (the network tools' convention: ``sum`` totals, the others rates):

=================  =================  ============  ===========  ===========
value              sum                avg           max          min
=================  =================  ============  ===========  ===========
cpu_percent        mean over range    mean          peak sample  lowest window
memory_bytes       last               mean          max          min
disk_*_bytes       total bytes        bytes/s       peak window  lowest window
pids               last               mean          max          min
=================  =================  ============  ===========  ===========

``cpu_percent`` is percent of one core (200 = two cores busy).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from nettel.errors import QueryError
from nettel.store.rollup import IDENTITY

#: Ranges up to this long are read from ``resource_minute``, longer from ``resource_hour``.
MINUTE_TABLE_MAX_MS = 7 * 86_400_000
#: What a value of :class:`ResourceStats` can be.
RESOURCE_VALUES = ("cpu_percent", "cpu_seconds", "memory_bytes", "memory_limit_bytes",
                   "disk_read_bytes", "disk_write_bytes", "pids", "oom_kills",
                   "cpu_throttled_percent")  # fmt: skip


@dataclass(frozen=True, slots=True)
class ResourceStats:
    """One container's resources over a range under one aggregation (see the module)."""

    container: str
    name: str
    image: str
    container_id: str
    compose_project: str
    compose_service: str
    host: str
    samples: int
    first_ms: int
    through_ms: int
    values: dict[str, float | int | None]


def _rate(column: str) -> pl.Expr:
    """A row's ``column`` per second of sample time."""
    return pl.col(column) / (pl.col("interval_ms") / 1000)


def _aggregated(rows: pl.LazyFrame) -> pl.LazyFrame:
    per_row = rows.filter(pl.col("interval_ms") > 0).with_columns(
        _cpu_pct=100 * pl.col("cpu_usage_us") / (pl.col("interval_ms") * 1000),
        _read_rate=_rate("io_read_bytes"),
        _write_rate=_rate("io_write_bytes"),
    )
    last = [
        pl.col(c).drop_nulls().last()
        for c in (*IDENTITY, "memory_bytes_last", "pids_last", "memory_limit_bytes_last")
    ]
    return (
        per_row.sort("ts")
        .group_by("container")
        .agg(
            [
                pl.col(c).sum()
                for c in (
                    "samples",
                    "interval_ms",
                    "cpu_usage_us",
                    "io_read_bytes",
                    "io_write_bytes",
                    "oom_kills",
                    "cpu_periods",
                    "cpu_throttled_periods",
                    "memory_bytes_sum",
                    "pids_sum",
                )
            ]
            + last
            + [
                pl.col("cpu_peak_millicores").max(),
                pl.col("_cpu_pct").min().alias("cpu_pct_min"),
                pl.col("memory_bytes_max").max(),
                pl.col("memory_bytes_min").min(),
                pl.col("pids_max").max(),
                pl.col("pids_min").min(),
                pl.col("_read_rate").max().alias("read_max"),
                pl.col("_read_rate").min().alias("read_min"),
                pl.col("_write_rate").max().alias("write_max"),
                pl.col("_write_rate").min().alias("write_min"),
                pl.col("ts").min().dt.epoch("ms").alias("first_ms"),
                (pl.col("ts").max().dt.epoch("ms") + pl.col("window_ms").last()).alias(
                    "through_ms"
                ),
            ]
        )
    )


def values_of(row: dict[str, Any], aggregation: str) -> dict[str, float | int | None]:
    """A container's values under ``aggregation`` from its aggregated row.

    Examples
    --------
    >>> row = {"interval_ms": 10_000, "samples": 2, "cpu_usage_us": 5_000_000,
    ...        "io_read_bytes": 0, "io_write_bytes": 4000, "oom_kills": 0, "cpu_periods": 10,
    ...        "cpu_throttled_periods": 5, "memory_bytes_sum": 300, "pids_sum": 4,
    ...        "memory_bytes_last": 100, "pids_last": 2, "memory_limit_bytes_last": 0}
    >>> v = values_of(row, "sum")
    >>> v["cpu_percent"], v["cpu_seconds"], v["disk_write_bytes"], v["memory_limit_bytes"]
    (50.0, 5.0, 4000, None)
    >>> values_of(row, "avg")["disk_write_bytes"], values_of(row, "avg")["memory_bytes"]
    (400.0, 150.0)
    """
    seconds = row["interval_ms"] / 1000
    samples = row["samples"] or 0
    mean_cpu = 100 * row["cpu_usage_us"] / (seconds * 1e6) if seconds else None
    out: dict[str, float | int | None] = {
        "memory_limit_bytes": row.get("memory_limit_bytes_last") or None,
        "oom_kills": row["oom_kills"],
        "cpu_throttled_percent": (
            100 * row["cpu_throttled_periods"] / row["cpu_periods"] if row["cpu_periods"] else None
        ),
        "cpu_seconds": row["cpu_usage_us"] / 1e6,
    }
    if aggregation == "sum":
        out |= {
            "cpu_percent": mean_cpu,
            "memory_bytes": row["memory_bytes_last"],
            "disk_read_bytes": row["io_read_bytes"],
            "disk_write_bytes": row["io_write_bytes"],
            "pids": row["pids_last"],
        }
    elif aggregation == "avg":
        out |= {
            "cpu_percent": mean_cpu,
            "memory_bytes": row["memory_bytes_sum"] / samples if samples else None,
            "disk_read_bytes": row["io_read_bytes"] / seconds if seconds else None,
            "disk_write_bytes": row["io_write_bytes"] / seconds if seconds else None,
            "pids": row["pids_sum"] / samples if samples else None,
        }
    elif aggregation == "max":
        out |= {
            "cpu_percent": None
            if row["cpu_peak_millicores"] is None
            else row["cpu_peak_millicores"] / 10,
            "memory_bytes": row["memory_bytes_max"],
            "disk_read_bytes": row["read_max"],
            "disk_write_bytes": row["write_max"],
            "pids": row["pids_max"],
        }
    else:
        out |= {
            "cpu_percent": row["cpu_pct_min"],
            "memory_bytes": row["memory_bytes_min"],
            "disk_read_bytes": row["read_min"],
            "disk_write_bytes": row["write_min"],
            "pids": row["pids_min"],
        }
    return out


class ResourceQuery:
    """Queries over the resource tables under ``base`` (a data dir)."""

    def __init__(self, base: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.base = base.rstrip("/")
        self.storage_options = storage_options

    def _scan(self, table: str) -> pl.LazyFrame | None:
        try:
            snap = DeltaTable(f"{self.base}/{table}", storage_options=self.storage_options)
        except (TableNotFoundError, FileNotFoundError, OSError):
            return None
        return pl.scan_delta(snap)

    def table_for(self, start_ms: int, end_ms: int) -> str:
        """The table a range is read from (see the module docstring)."""
        return "resource_minute" if end_ms - start_ms <= MINUTE_TABLE_MAX_MS else "resource_hour"

    def rows(self, start_ms: int, end_ms: int,
             containers: Sequence[str] | None = None) -> pl.LazyFrame | None:  # fmt: skip
        """The rows of [start, end) from the table the range is read from (None: no table)."""
        frame = self._scan(self.table_for(start_ms, end_ms))
        if frame is None:
            return None
        lo = pl.lit(start_ms).cast(pl.Datetime("ms", "UTC"))
        hi = pl.lit(end_ms).cast(pl.Datetime("ms", "UTC"))
        first_date = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC).strftime("%Y-%m-%d")
        frame = frame.filter(pl.col("date") >= first_date)  # prunes whole partitions
        frame = frame.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi))
        if containers is not None:
            frame = frame.filter(pl.col("container").is_in(list(containers)))
        return frame

    def stats(self, start_ms: int, end_ms: int, *, aggregation: str = "sum",
              containers: Sequence[str] | None = None) -> list[ResourceStats]:  # fmt: skip
        """Every container's (or the named ones') resources over [start, end)."""
        if aggregation not in ("sum", "avg", "max", "min"):
            raise QueryError("aggregation", aggregation, ["sum", "avg", "max", "min"])
        rows = self.rows(start_ms, end_ms, containers)
        if rows is None:
            return []
        out = []
        for row in _aggregated(rows).collect().iter_rows(named=True):
            out.append(ResourceStats(
                container=row["container"], name=row["name"] or "", image=row["image"] or "",
                container_id=row["container_id"] or "",
                compose_project=row["compose_project"] or "",
                compose_service=row["compose_service"] or "", host=row["host"] or "",
                samples=row["samples"], first_ms=row["first_ms"], through_ms=row["through_ms"],
                values=values_of(row, aggregation)))  # fmt: skip
        return out

    def series(self, container: str, start_ms: int, end_ms: int, metric: str,
               max_points: int) -> tuple[int, list[tuple[int, float | None]]]:  # fmt: skip
        """(bucket ms, [(bucket start ms, value)]) of one container's ``metric`` over
        [start, end) in at most ``max_points`` buckets (empty ones left out)."""
        return _series_of(self, container, start_ms, end_ms, metric, max_points)

    def newest_end_ms(self) -> int | None:
        """The end of the newest window in ``resource_minute`` (None: none yet)."""
        frame = self._scan("resource_minute")
        if frame is None:
            return None
        newest = frame.select(pl.col("ts").max().dt.epoch("ms")).collect().item()
        return None if newest is None else int(newest) + 60_000


#: What a resource series can show, and how a bucket's value is made from its rows.
SERIES_METRICS = ("cpu_percent", "memory_bytes", "disk_read_bytes", "disk_write_bytes", "pids")


def _bucket_value(metric: str) -> pl.Expr:
    """A bucket's value: mean CPU (percent of a core), peak memory and pids, disk bytes."""
    if metric == "cpu_percent":
        return 100 * pl.col("cpu_usage_us").sum() / (pl.col("interval_ms").sum() * 1000)
    if metric == "memory_bytes":
        return pl.col("memory_bytes_max").max().cast(pl.Float64)
    if metric == "pids":
        return pl.col("pids_max").max().cast(pl.Float64)
    column = "io_read_bytes" if metric == "disk_read_bytes" else "io_write_bytes"
    return pl.col(column).sum().cast(pl.Float64)


def bucket_ms_for(start_ms: int, end_ms: int, max_points: int, window_ms: int) -> int:
    """The bucket size: the span over ``max_points``, a whole number of windows.

    Examples
    --------
    >>> bucket_ms_for(0, 3_600_000, 60, 60_000), bucket_ms_for(0, 3_600_000, 7, 60_000)
    (60000, 540000)
    """
    per = -(-(end_ms - start_ms) // max_points)
    return max(window_ms, -(-per // window_ms) * window_ms)


def _series_of(query: ResourceQuery, container: str, start_ms: int, end_ms: int, metric: str,
               max_points: int) -> tuple[int, list[tuple[int, float | None]]]:  # fmt: skip
    if metric not in SERIES_METRICS:
        raise QueryError("metric", metric, SERIES_METRICS)
    window_ms = 60_000 if query.table_for(start_ms, end_ms) == "resource_minute" else 3_600_000
    bucket_ms = bucket_ms_for(start_ms, end_ms, max_points, window_ms)
    rows = query.rows(start_ms, end_ms, [container])
    if rows is None:
        return bucket_ms, []
    bucket = (pl.col("ts").dt.epoch("ms") - start_ms) // bucket_ms * bucket_ms + start_ms
    out = (
        rows.filter(pl.col("interval_ms") > 0)
        .group_by(bucket.alias("bucket"))
        .agg(_bucket_value(metric).alias("value"))
        .sort("bucket")
        .collect()
    )
    return bucket_ms, [(int(b), v) for b, v in out.iter_rows()]
