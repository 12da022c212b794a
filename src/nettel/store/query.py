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

import datetime as dt
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from nettel.errors import QueryError
from nettel.models import COUNTERS, RATE_METRICS, TCP_STATES, TOTALS
from nettel.store.minute import MinuteTable, minute_schema
from nettel.store.rollup import DAY_MS, HOUR_MS, IDENTITY, RollupTable
from nettel.store.samples import SamplesTable

MINUTE_MS = 60_000
Table = Literal["minute", "hour", "day"]


def split_range(
    start_ms: int, end_ms: int, coarsest: Table = "day"
) -> list[tuple[Table, int, int]]:
    """Cut [start, end) into minute edges, whole hours and whole days, in time order.

    ``coarsest`` caps the tables used (``hour``: no days; ``minute``: minutes only).
    """
    start_ms -= start_ms % MINUTE_MS
    end_ms -= end_ms % MINUTE_MS
    if end_ms <= start_ms:
        return []
    if coarsest == "minute":
        return [("minute", start_ms, end_ms)]
    h0 = -(-start_ms // HOUR_MS) * HOUR_MS
    h1 = end_ms // HOUR_MS * HOUR_MS
    if h1 <= h0:
        return [("minute", start_ms, end_ms)]
    d0 = -(-h0 // DAY_MS) * DAY_MS
    d1 = h1 // DAY_MS * DAY_MS
    parts: list[tuple[Table, int, int]] = [("minute", start_ms, h0)]
    if d1 > d0 and coarsest == "day":
        parts += [("hour", h0, d0), ("day", d0, d1), ("hour", d1, h1)]
    else:
        parts.append(("hour", h0, h1))
    parts.append(("minute", h1, end_ms))
    return [(t, s, e) for t, s, e in parts if e > s]


#: Files of at most this many rows are kept in memory once read (see ``_small_files``),
#: the most recently used up to this many rows in all (~600 bytes a row).
SMALL_FILE_ROWS = 20_000
SMALL_CACHE_ROWS = 300_000

Resolution = Literal["minute", "hour", "day", "week", "month"]
Aggregation = Literal["sum", "avg", "max", "min"]
RESOLUTIONS: tuple[Resolution, ...] = ("minute", "hour", "day", "week", "month")
AGGREGATIONS: tuple[Aggregation, ...] = ("sum", "avg", "max", "min")
#: What a series, a stat or a top-N can be about: counters and both-direction totals
#: (sum: bytes/packets/...; avg, max, min: per second), then connections (a gauge: sum
#: and avg give its mean), then TCP states (kept as maxima only).
METRICS: tuple[str, ...] = (*RATE_METRICS, "connections", *(f"tcp_{s}" for s in TCP_STATES))
WEEK_MS = 7 * DAY_MS
_MONDAY_MS = 4 * DAY_MS  # 1970-01-01 was a Thursday
_FIXED_MS: dict[str, int] = {"minute": MINUTE_MS, "hour": HOUR_MS, "day": DAY_MS, "week": WEEK_MS}
#: Buckets a downsampled series may use, finest first (month buckets are calendar months).
SERIES_BUCKETS_MS = (MINUTE_MS, 5 * MINUTE_MS, 15 * MINUTE_MS, HOUR_MS, 6 * HOUR_MS, DAY_MS,
                     WEEK_MS)  # fmt: skip


def check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    """Raise :class:`QueryError` naming the valid choices unless ``value`` is one.

    Examples
    --------
    >>> check_choice("aggregation", "sum", AGGREGATIONS)
    >>> check_choice("aggregation", "median", AGGREGATIONS)
    Traceback (most recent call last):
    ...
    nettel.errors.QueryError: unknown aggregation 'median': expected one of sum, avg, max, min
    """
    if value not in choices:
        raise QueryError(what, value, tuple(choices))


def bucket_start(ts_ms: int, bucket_ms: int) -> int:
    """Start of the bucket holding ``ts_ms``; weeks start on Monday 00:00 UTC.

    Examples
    --------
    >>> bucket_start(HOUR_MS + 5, HOUR_MS)
    3600000
    >>> import datetime as dt
    >>> t = int(dt.datetime(2026, 11, 26, 15, tzinfo=dt.UTC).timestamp() * 1000)  # Thursday
    >>> dt.datetime.fromtimestamp(bucket_start(t, WEEK_MS) / 1000, dt.UTC).strftime("%a %d")
    'Mon 23'
    """
    offset = _MONDAY_MS if bucket_ms % WEEK_MS == 0 else 0
    return (ts_ms - offset) // bucket_ms * bucket_ms + offset


def _source_table(bucket_ms: int | None) -> Table:
    """The coarsest table whose rows each fall in one bucket."""
    if bucket_ms is None or bucket_ms % DAY_MS == 0:
        return "day"
    return "hour" if bucket_ms % HOUR_MS == 0 else "minute"


#: Columns that add up across rows of one container and period.
_SUMS = ("samples", "interval_ms", *COUNTERS, "connections_sum", "connections_samples")


def _aggregations(needed: Sequence[str] | None) -> list[pl.Expr]:
    """How rows of one group combine, for the ``needed`` columns (None: all of them)."""
    aggs: dict[str, pl.Expr] = {c: pl.col(c).sum() for c in _SUMS}
    aggs |= {f"{m}_rate_min": pl.col(f"{m}_rate_min").min() for m in RATE_METRICS}
    aggs |= {f"{m}_rate_max": pl.col(f"{m}_rate_max").max() for m in RATE_METRICS}
    aggs |= {"connections_min": pl.col("connections_min").min(),
             "connections_max": pl.col("connections_max").max()}  # fmt: skip
    aggs |= {f"tcp_{s}_max": pl.col(f"tcp_{s}_max").max() for s in TCP_STATES}
    span = {"_first": pl.col("ts").min().alias("_first"),
            "_through_ms": (pl.col("ts").dt.epoch("ms")
                            + pl.col("window_ms")).max().alias("_through_ms")}  # fmt: skip
    if needed is None:
        return [
            *aggs.values(), *span.values(),
            *(pl.col(c).sort_by("ts").drop_nulls().last() for c in IDENTITY),
        ]  # fmt: skip
    return [{**aggs, **span}[c] for c in dict.fromkeys(needed)]


def _grouped(frame: pl.LazyFrame, keys: Sequence[str],
             needed: Sequence[str] | None = None) -> pl.LazyFrame:  # fmt: skip
    """Add up window rows per ``keys``: sums add, extremes take extremes.

    ``needed``: only these value columns (None: every one, the identity and the span).
    """
    return frame.group_by(list(keys)).agg(_aggregations(needed))


def _needed(exprs: Sequence[pl.Expr]) -> list[str]:
    """The table columns ``exprs`` (over grouped rows) read."""
    return [c for e in exprs for c in e.meta.root_names()]


def metric_expr(metric: str, aggregation: Aggregation) -> pl.Expr:
    """The value of ``metric`` under ``aggregation`` over grouped rows (see :data:`METRICS`)."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("metric", metric, METRICS)
    if metric.startswith("tcp_"):
        if aggregation != "max":
            raise QueryError("aggregation for TCP states", aggregation, ["max"])
        return pl.col(f"{metric}_max")
    if metric == "connections":
        if aggregation in ("max", "min"):
            return pl.col(f"connections_{aggregation}")
        n = pl.col("connections_samples")
        return pl.when(n > 0).then(pl.col("connections_sum") / n).otherwise(None)
    if aggregation in ("max", "min"):
        return pl.col(f"{metric}_rate_{aggregation}")
    parts = TOTALS.get(metric, (metric,))
    total = pl.sum_horizontal([pl.col(c) for c in parts])
    if aggregation == "sum":
        return total
    seconds = pl.col("interval_ms") / 1000
    return pl.when(seconds > 0).then(total / seconds).otherwise(None)


def _in_ranges(ranges: Sequence[tuple[int, int]]) -> pl.Expr:
    """Rows whose ``ts`` falls in one of the [start, end) ranges (ms)."""
    ts = pl.col("ts")
    out = pl.lit(False)
    for s, e in ranges:
        lo, hi = (pl.lit(t * 1000).cast(pl.Datetime("us", "UTC")) for t in (s, e))
        out = out | ((ts >= lo) & (ts < hi))
    return out


def _dates_in(ranges: Sequence[tuple[int, int]]) -> pl.Expr:
    """Rows of the ``date`` partitions the ranges touch (prunes whole partitions)."""
    out = pl.lit(False)
    for s, e in ranges:
        d0, d1 = (dt.datetime.fromtimestamp(t / 1000, dt.UTC).strftime("%Y-%m-%d")
                  for t in (s, e - 1))  # fmt: skip
        out = out | pl.col("date").is_between(pl.lit(d0), pl.lit(d1))
    return out


def _may_have_moved(uri: str, version: int) -> bool:
    """Whether the table may have commits after ``version``.

    On a local path, commit ``version + 1`` exists exactly when there is one (a cheap
    check instead of listing the log); elsewhere the log is asked.
    """
    if "://" in uri and not uri.startswith("file://"):
        return True
    path = uri.removeprefix("file://")
    return os.path.exists(f"{path}/_delta_log/{version + 1:020d}.json")


def _empty_changes() -> pl.DataFrame:
    return pl.DataFrame(schema={**minute_schema(), "_commit_version": pl.Int64()})


def inserted_changes(table: DeltaTable, first_version: int, last_version: int) -> pl.DataFrame:
    """Rows inserted into ``table`` in versions [first, last], with ``_commit_version``.

    Every partition at once; compaction and merges (no data change) add none.
    """
    cdf = table.load_cdf(starting_version=first_version, ending_version=last_version)
    changes = pl.DataFrame(pl.from_arrow(cdf))
    if changes.width == 1 and changes.dtypes[0] == pl.Struct:
        changes = changes.unnest(changes.columns[0])
    if not changes.height:
        return _empty_changes()
    return changes.filter(pl.col("_change_type") == "insert").select(
        [pl.col(c).cast(t) for c, t in _empty_changes().schema.items()]
    )


@dataclass(frozen=True, slots=True)
class _Pending:
    """Inserted rows of a source table's versions (low, high], kept between queries."""

    low: int
    high: int
    rows: pl.DataFrame


@dataclass(frozen=True, slots=True)
class ContainerStats:
    """One container over a range: every metric under one aggregation.

    ``values`` maps every metric of :data:`METRICS` but the TCP states to its value
    (``None``: no sample had it); ``tcp_max`` holds the TCP states' maxima.
    ``through_ms`` is the end of the last window with data.
    """

    container: str
    name: str
    image: str
    container_id: str
    compose_project: str
    compose_service: str
    host: str
    aggregation: Aggregation
    samples: int
    seconds: float
    first_ms: int
    through_ms: int
    values: dict[str, float | int | None]
    tcp_max: dict[str, int | None]


@dataclass(frozen=True, slots=True)
class TopEntry:
    """One container's place in a top-N: its value and its share of all containers' total."""

    container: str
    value: float | int
    share: float | None


@dataclass(frozen=True, slots=True)
class Series:
    """One container's downsampled series: bucket starts and values, with a summary."""

    container: str
    metric: str
    aggregation: Aggregation
    bucket_ms: int | None  # None: calendar months
    ts_ms: list[int]
    values: list[float | int | None]

    def summary(self) -> dict[str, float | None]:
        """min, max, avg and p95 (nearest rank) of the points that have a value.

        Examples
        --------
        >>> Series("web", "bytes", "sum", 60_000, [0, 60_000, 120_000], [1, None, 3]).summary()
        {'min': 1.0, 'max': 3.0, 'avg': 2.0, 'p95': 3.0}
        """
        return summarize(self.values)


def summarize(values: Iterable[float | int | None]) -> dict[str, float | None]:
    """min, max, avg and p95 (nearest rank) of the values that are not None (all None
    when none is).

    Examples
    --------
    >>> summarize([1, None, 3, 2]), summarize([None])["p95"]
    ({'min': 1.0, 'max': 3.0, 'avg': 2.0, 'p95': 3.0}, None)
    """
    xs = sorted(float(v) for v in values if v is not None)
    if not xs:
        return {"min": None, "max": None, "avg": None, "p95": None}
    rank = max(1, -(-95 * len(xs) // 100))
    return {"min": xs[0], "max": xs[-1], "avg": sum(xs) / len(xs), "p95": xs[rank - 1]}


@dataclass(frozen=True, slots=True)
class OpenTraffic:
    """One container's raw samples past its last closed minute: provisional counter sums.

    ``from_ms``: where they start (the end of its last closed minute in the range, or the
    range's start); ``through_ms``: the newest sample's time.
    """

    container: str
    samples: int
    from_ms: int
    through_ms: int
    sums: dict[str, int]


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
    """Reads ``minute``, ``hour`` and ``day`` under ``data_dir`` (never writes).

    Every answer is exact: equal to adding up every window row of the range, whatever
    the rollups' lag. Ranges are cut at whole minutes.
    """

    def __init__(self, data_dir: str, *, partitions: int, writer: str = "nettel-stream",
                 topic: str = "nettel.stats",
                 storage_options: dict[str, str] | None = None) -> None:  # fmt: skip
        base = data_dir.rstrip("/")
        self.minute = MinuteTable(f"{base}/minute", storage_options=storage_options)
        self.hour = RollupTable(
            f"{base}/hour", self.minute, HOUR_MS, storage_options=storage_options
        )
        self.day = RollupTable(f"{base}/day", self.hour, DAY_MS, storage_options=storage_options)
        self.samples = SamplesTable(f"{base}/samples", storage_options=storage_options)
        self.partitions = partitions
        self.writer = writer
        self.topic = topic
        self._tables: dict[str, DeltaTable] = {}
        self._consumed: dict[str, tuple[int, dict[int, int]]] = {}
        self._pending: dict[str, _Pending] = {}
        self._files: dict[str, tuple[int, pl.DataFrame]] = {}
        self._small: dict[str, pl.DataFrame] = {}
        #: guards ``_small`` (the MCP server asks from several threads: its warm-up and
        #: the tool calls, and over HTTP several clients at once)
        self._small_lock = threading.Lock()

    def _table(self, table: MinuteTable) -> DeltaTable | None:
        """The table's latest snapshot (loaded once, then updated incrementally)."""
        cached = self._tables.get(table.uri)
        try:
            if cached is None:
                cached = DeltaTable(table.uri, storage_options=table.storage_options)
                self._tables[table.uri] = cached
            elif _may_have_moved(table.uri, cached.version()):
                cached.update_incremental()
        except (TableNotFoundError, FileNotFoundError, OSError):
            self._tables.pop(table.uri, None)
            return None
        return cached

    def _scan(self, table: MinuteTable, snap: DeltaTable,
              ranges: Sequence[tuple[int, int]]) -> pl.LazyFrame:  # fmt: skip
        """The snapshot's rows in ``ranges``, reading only the files that can hold some.

        The snapshot's file list and ``ts`` statistics (its add actions, read once per
        version) pick the files, as ``pl.scan_delta`` does, but without building the
        statistics of every file at every query; Polars then skips row groups by ``ts``.
        """
        rows = _in_ranges(ranges)
        files = self._file_list(table, snap)
        if files is None:  # a table feature the plain file list cannot express
            return pl.scan_delta(snap).filter(_dates_in(ranges)).filter(rows)
        keep = pl.lit(False)
        for s, e in ranges:
            lo, hi = (pl.lit(t * 1000).cast(pl.Datetime("us", "UTC")) for t in (s - 1, e))
            keep = keep | ((pl.col("ts_min") < hi) & (pl.col("ts_max") >= lo))
        keep = (keep | pl.col("ts_min").is_null() | pl.col("ts_max").is_null()) & _dates_in(ranges)
        chosen = files.filter(keep)
        small = pl.col("records").is_not_null() & (pl.col("records") <= SMALL_FILE_ROWS)
        big = chosen.filter(~small)["path"].to_list()
        parts = [self._small_files(table, chosen.filter(small)["path"].to_list()).lazy()]
        if big:
            parts.append(self._read(table, big).lazy())
        return pl.concat(parts).filter(rows)

    def _read(self, table: MinuteTable, paths: list[str]) -> pl.LazyFrame:
        """Parquet files of the table, in its schema (``date`` from the path)."""
        scan = pl.scan_parquet(paths, hive_partitioning=True, hive_schema={"date": pl.String()},
                               storage_options=table.storage_options)  # fmt: skip
        return scan.select(list(table._schema))

    def _small_files(self, table: MinuteTable, paths: list[str]) -> pl.DataFrame:
        """The rows of small files (the last flushes and rolls), kept in memory.

        Data files never change, and the worker adds a few small ones every minute
        until maintenance rewrites them: opening each at every query would cost more
        than reading the rest. Files gone from the table are dropped from the cache.
        """
        with self._small_lock:
            return self._small_files_locked(table, paths)

    def _small_files_locked(self, table: MinuteTable, paths: list[str]) -> pl.DataFrame:
        missing = [p for p in paths if p not in self._small]
        if missing:
            fresh = (pl.scan_parquet(missing, hive_partitioning=True,
                                     hive_schema={"date": pl.String()},
                                     storage_options=table.storage_options,
                                     include_file_paths="_path")
                     .select([*table._schema, "_path"]).collect())  # fmt: skip
            for (path,), rows in fresh.partition_by("_path", as_dict=True).items():
                self._small[str(path)] = rows.drop("_path")
            for p in missing:  # a file without rows, or a path spelled otherwise
                if p not in self._small:
                    self._small[p] = self._read(table, [p]).collect()
        frames = [self._small.pop(p) for p in paths]
        self._small.update(zip(paths, frames, strict=True))  # most recently used last
        held = sum(rows.height for rows in self._small.values())
        for p in list(self._small):
            if held <= SMALL_CACHE_ROWS:
                break
            held -= self._small.pop(p).height
        return pl.concat(frames) if frames else pl.DataFrame(schema=table._schema)

    def _file_list(self, table: MinuteTable, snap: DeltaTable) -> pl.DataFrame | None:
        """The snapshot's data files: ``path``, ``date``, ``ts_min``, ``ts_max`` (cached)."""
        cached = self._files.get(table.uri)
        if cached is not None and cached[0] == snap.version():
            return cached[1]
        protocol = snap.protocol()
        if protocol.min_reader_version > 1 or protocol.reader_features:
            return None
        root = snap.table_uri.removeprefix("file://").rstrip("/")
        actions = pl.DataFrame(snap.get_add_actions(flatten=True))
        files = actions.select(
            path=pl.lit(root + "/") + pl.col("path").map_elements(unquote, return_dtype=pl.String),
            date=pl.col("partition.date"),
            ts_min=pl.col("min.ts"),
            ts_max=pl.col("max.ts"),
            records=pl.col("num_records"),
        ) if actions.height else pl.DataFrame(schema={"path": pl.String(), "date": pl.String(),
               "ts_min": pl.Datetime("us", "UTC"), "ts_max": pl.Datetime("us", "UTC"),
               "records": pl.Int64()})  # fmt: skip
        self._files[table.uri] = (snap.version(), files)
        live = {p for _, f in self._files.values() for p in f["path"]}
        with self._small_lock:
            self._small = {p: rows for p, rows in self._small.items() if p in live}
        return files

    def newest_ms(self) -> int | None:
        """Start of the newest window in ``minute`` (ms; None: no rows): how far the
        stream has written. Read from the files' ``ts`` statistics, not their rows."""
        snap = self._table(self.minute)
        if snap is None:
            return None
        files = self._file_list(self.minute, snap)
        if files is None or files["ts_max"].null_count():
            newest = pl.scan_delta(snap).select(pl.col("ts").max()).collect().item()
        else:
            newest = files["ts_max"].max()
        if not isinstance(newest, dt.datetime):
            return None
        return int(newest.timestamp() * 1000)

    def _snapshots(self) -> dict[str, DeltaTable | None]:
        """Every table's latest snapshot, coarsest first.

        In that order, what a coarse snapshot records as consumed never runs ahead of
        the finer snapshot read after it: the finer table's change feed up to its
        snapshot holds every row the coarse one has not rolled.
        """
        return {t.uri: self._table(t) for t in (self.day, self.hour, self.minute)}

    def _consumed_versions(self, coarse: RollupTable, snapshot: DeltaTable) -> dict[int, int]:
        """The source version ``coarse`` has rolled through, per partition (-1: none)."""
        version = snapshot.version()
        cached = self._consumed.get(coarse.uri)
        if cached is not None and cached[0] == version:
            return cached[1]
        out = {}
        for p in range(self.partitions):
            v = snapshot.transaction_version(coarse.app_id(self.writer, self.topic, p, 0,
                                                           "source"))  # fmt: skip
            out[p] = -1 if v is None else int(v)
        self._consumed[coarse.uri] = (version, out)
        return out

    def _unrolled(self, coarse: RollupTable, snaps: dict[str, DeltaTable | None]) -> pl.DataFrame:
        """Rows the finer table gained since ``coarse`` last consumed them (every partition).

        The finer table's change feed is read once for every partition (from the
        least consumed version on) and kept: the next query reads only newer versions.
        """
        src = snaps[coarse.source.uri]
        if src is None:
            return pl.DataFrame(schema=minute_schema())
        done = snaps[coarse.uri]
        consumed = (dict.fromkeys(range(self.partitions), -1) if done is None
                    else self._consumed_versions(coarse, done))  # fmt: skip
        latest = src.version()
        low = min(consumed.values(), default=latest)
        if low >= latest:
            return pl.DataFrame(schema=minute_schema())
        pending = self._pending.get(coarse.uri)
        if pending is None or pending.low > low or pending.high > latest:
            pending = _Pending(low, low, _empty_changes())
        if pending.high < latest:
            fresh = inserted_changes(src, pending.high + 1, latest)
            pending = _Pending(pending.low, latest, pl.concat([pending.rows, fresh]))
        if pending.low < low:
            pending = _Pending(low, pending.high,
                               pending.rows.filter(pl.col("_commit_version") > low))  # fmt: skip
        self._pending[coarse.uri] = pending
        # partitions beyond ``self.partitions`` are not read (as the rollups do not roll them)
        done_at = pl.col("partition").replace_strict(consumed, default=latest,
                                                     return_dtype=pl.Int64)  # fmt: skip
        return pending.rows.filter(pl.col("_commit_version") > done_at).drop("_commit_version")

    def _lazy_rows(self, start_ms: int, end_ms: int, coarsest: Table = "day",
                   containers: Sequence[str] | None = None,
                   columns: Sequence[str] | None = None) -> pl.LazyFrame:  # fmt: skip
        """Every row needed to answer [start, end) exactly, as one lazy frame.

        One scan per table (its parts' ranges together), so Polars reads only
        ``columns`` of the files and row groups the ranges and dates can touch.
        """
        cols = list(minute_schema()) if columns is None else list(dict.fromkeys(columns))
        ranges: dict[Table, list[tuple[int, int]]] = {"minute": [], "hour": [], "day": []}
        for name, s, e in split_range(start_ms, end_ms, coarsest):
            ranges[name].append((s, e))
        snaps = self._snapshots()
        parts: list[pl.LazyFrame] = []
        unrolled: list[tuple[RollupTable, list[tuple[int, int]]]] = []
        if ranges["hour"] or ranges["day"]:
            unrolled.append((self.hour, ranges["hour"] + ranges["day"]))
        if ranges["day"]:
            unrolled.append((self.day, ranges["day"]))
        tables: list[tuple[MinuteTable, Table]] = [(self.minute, "minute"), (self.hour, "hour"),
                                                   (self.day, "day")]  # fmt: skip
        for table, name in tables:
            snap = snaps[table.uri]
            if snap is not None and ranges[name]:
                parts.append(self._scan(table, snap, ranges[name]).select(cols))
        for coarse, spans in unrolled:
            rows = self._unrolled(coarse, snaps)
            if rows.height:
                parts.append(rows.lazy().filter(_in_ranges(spans)).select(cols))
        if not parts:
            return pl.LazyFrame(schema={c: minute_schema()[c] for c in cols})
        frame = pl.concat(parts)
        if containers is not None:
            frame = frame.filter(pl.col("container").is_in(list(containers)))
        return frame

    def rows(self, start_ms: int, end_ms: int, coarsest: Table = "day") -> pl.DataFrame:
        """Every row needed to answer [start, end) exactly, from tables up to ``coarsest``."""
        return self._lazy_rows(start_ms, end_ms, coarsest).collect()

    def _rows_of(self, start_ms: int, end_ms: int, containers: Sequence[str] | None,
                 coarsest: Table = "day",
                 columns: Sequence[str] | None = None) -> pl.LazyFrame:  # fmt: skip
        if end_ms <= start_ms:
            raise QueryError("range", f"[{start_ms}, {end_ms})", ["a start before the end"])
        return self._lazy_rows(start_ms, end_ms, coarsest, containers, columns)

    def stats(self, start_ms: int, end_ms: int, *, aggregation: Aggregation = "sum",
              containers: Sequence[str] | None = None,
              metrics: Sequence[str] | None = None) -> list[ContainerStats]:  # fmt: skip
        """Every container (or those named) over [start, end), sorted by container.

        ``metrics``: only these (of :data:`METRICS` but the TCP states) are computed and
        their columns read, the identity columns are not (empty strings) and ``tcp_max``
        is empty: a lighter question when the caller needs a few values.
        """
        full = metrics is None
        wanted = [m for m in (METRICS if metrics is None else metrics) if not m.startswith("tcp_")]
        exprs = [metric_expr(m, aggregation).alias(f"v_{m}") for m in wanted]
        if full:
            grouped = _grouped(self._rows_of(start_ms, end_ms, containers), ["container"])
        else:
            needed = ["samples", "interval_ms", *_needed(exprs)]
            rows = self._rows_of(start_ms, end_ms, containers,
                                 columns=["container", "ts", "window_ms", *needed])  # fmt: skip
            grouped = _grouped(rows, ["container"], [*needed, "_first", "_through_ms"])
        out = []
        text = ("name", "image", "container_id", "compose_project", "compose_service", "host")
        for r in grouped.with_columns(exprs).sort("container").collect().iter_rows(named=True):
            out.append(ContainerStats(
                container=r["container"], **{k: (r[k] or "") if full else "" for k in text},
                aggregation=aggregation, samples=r["samples"], seconds=r["interval_ms"] / 1000,
                first_ms=int(r["_first"].timestamp() * 1000), through_ms=r["_through_ms"],
                values={m: r[f"v_{m}"] for m in wanted},
                tcp_max={s: r[f"tcp_{s}_max"] for s in TCP_STATES} if full else {},
            ))  # fmt: skip
        return out

    def top(self, start_ms: int, end_ms: int, *, metric: str = "bytes", n: int = 10,
            aggregation: Aggregation = "sum", largest: bool = True) -> list[TopEntry]:  # fmt: skip
        """The ``n`` containers with the largest (or smallest) ``metric`` over the range.

        ``share`` is the container's part of all containers' total for sums and mean
        rates (they add up across containers), ``None`` for maxima and minima.
        """
        if n < 1:
            raise QueryError("n", n, ["a whole number >= 1"])
        expr = metric_expr(metric, aggregation)
        needed = _needed([expr])
        rows = self._rows_of(start_ms, end_ms, None, columns=["container", "ts", *needed])
        grouped = _grouped(rows, ["container"], needed)
        ranked = grouped.select("container", expr.alias("value")).drop_nulls("value").collect()
        total = ranked["value"].sum() if aggregation in ("sum", "avg") else None
        ranked = ranked.sort(["value", "container"], descending=[largest, False]).head(n)
        return [
            TopEntry(r["container"], r["value"], None if not total else r["value"] / total)
            for r in ranked.iter_rows(named=True)
        ]

    def series(self, start_ms: int, end_ms: int, *, resolution: Resolution,
               aggregation: Aggregation = "sum", metrics: Sequence[str] = ("bytes",),
               containers: Sequence[str] | None = None) -> pl.DataFrame:  # fmt: skip
        """Per container and bucket of ``resolution``: ``container``, ``ts_ms``, metrics.

        Buckets are minutes, hours, days, weeks (from Monday 00:00 UTC) or calendar
        months, UTC; the first and last may be cut by the range.
        """
        check_choice("resolution", resolution, RESOLUTIONS)
        return self._bucketed(start_ms, end_ms, _FIXED_MS.get(resolution), aggregation,
                              metrics, containers)  # fmt: skip

    def _bucketed(self, start_ms: int, end_ms: int, bucket_ms: int | None,
                  aggregation: Aggregation, metrics: Sequence[str],
                  containers: Sequence[str] | None) -> pl.DataFrame:  # fmt: skip
        exprs = [metric_expr(m, aggregation).alias(m) for m in metrics]
        needed = _needed(exprs)
        frame = self._rows_of(start_ms, end_ms, containers, _source_table(bucket_ms),
                              ["container", "ts", *needed])  # fmt: skip
        if bucket_ms is None:
            bucket = pl.col("ts").dt.truncate("1mo").dt.epoch("ms")
        else:
            offset = _MONDAY_MS if bucket_ms % WEEK_MS == 0 else 0
            t = pl.col("ts").dt.epoch("ms") - offset
            bucket = t // bucket_ms * bucket_ms + offset
        grouped = _grouped(frame.with_columns(ts_ms=bucket), ["container", "ts_ms"], needed)
        return grouped.select("container", "ts_ms", *exprs).sort("container", "ts_ms").collect()

    def timeseries(self, container: str, start_ms: int, end_ms: int, *, metric: str = "bytes",
                   aggregation: Aggregation = "sum", max_points: int = 60) -> Series:  # fmt: skip
        """``container``'s series over the range in at most ``max_points`` buckets.

        The bucket is the finest of :data:`SERIES_BUCKETS_MS`, then calendar months,
        that fits; buckets without data are left out.
        """
        if max_points < 1:
            raise QueryError("max_points", max_points, ["a whole number >= 1"])
        bucket_ms: int | None = None
        for b in SERIES_BUCKETS_MS:
            if (bucket_start(end_ms - 1, b) - bucket_start(start_ms, b)) // b + 1 <= max_points:
                bucket_ms = b
                break
        else:
            first, last = (dt.datetime.fromtimestamp(t / 1000, dt.UTC) for t in (start_ms, end_ms))
            months = (last.year - first.year) * 12 + last.month - first.month + 1
            if months > max_points:
                raise QueryError("max_points", max_points, [f"at least {months} for this range"])
        frame = self._bucketed(start_ms, end_ms, bucket_ms, aggregation, [metric], [container])
        return Series(container, metric, aggregation, bucket_ms, frame["ts_ms"].to_list(),
                      frame[metric].to_list())  # fmt: skip

    def totals(self, start_ms: int, end_ms: int,
               containers: Sequence[str] | None = None) -> list[ContainerTotals]:  # fmt: skip
        """Per container over [start, end) (whole minutes), sorted by container."""
        grouped = _grouped(self._rows_of(start_ms, end_ms, containers), ["container"])
        return [
            ContainerTotals(
                container=r["container"],
                samples=r["samples"],
                interval_ms=r["interval_ms"],
                sums={c: r[c] for c in COUNTERS},
                rate_max={c: r[f"{c}_rate_max"] for c in COUNTERS},
                connections_max=r["connections_max"],
                tcp_max={s: r[f"tcp_{s}_max"] for s in TCP_STATES},
            )
            for r in grouped.sort("container").collect().iter_rows(named=True)
        ]

    def newest_end_ms(self) -> int | None:
        """The end of the newest minute window in the store (None: no table yet).

        Read from the minute table's file statistics (cached per version): no data read.
        """
        snap = self._table(self.minute)
        if snap is None:
            return None
        files = self._file_list(self.minute, snap)
        if files is None or not files.height:
            return None
        newest = files["ts_max"].max()
        if not isinstance(newest, dt.datetime):
            return None
        return int(newest.timestamp() * 1000) + MINUTE_MS

    def open_traffic(
        self, start_ms: int, now_ms: int, closed_through: dict[str, int],
        containers: Sequence[str] | None = None,
    ) -> dict[str, OpenTraffic]:  # fmt: skip
        """Traffic the windows do not hold yet, from the ``samples`` table (provisional).

        For each container (or those named), the samples in [start, now) whose minute is
        past ``closed_through[container]`` (the end of its last minute row in the
        range; ``start`` when it has none): the open minute, and any closed minute not
        yet flushed. Added to the rows of the same range, nothing is counted twice.
        Empty when there is no ``samples`` table.
        """
        snap = self._table(self.samples)
        if snap is None or now_ms <= start_ms:
            return {}
        newest_closed = max(closed_through.values(), default=start_ms)
        lo = min([start_ms, *closed_through.values()]) if containers else start_ms
        lo = max(lo, start_ms, min(newest_closed, now_ms) - 10 * MINUTE_MS)
        frame = self._scan(self.samples, snap, [(lo, now_ms)])
        if containers is not None:
            frame = frame.filter(pl.col("container").is_in(list(containers)))
        after = pl.col("container").replace_strict(
            closed_through, default=start_ms, return_dtype=pl.Int64
        )
        window = pl.col("ts").dt.epoch("ms") - pl.col("ts").dt.epoch("ms") % MINUTE_MS
        rows = (frame.filter(window >= after).group_by("container")
                .agg(pl.len().alias("_n"), pl.col("ts").min().alias("_first"),
                     pl.col("ts").max().alias("_last"), *(pl.col(c).sum() for c in COUNTERS))
                .collect())  # fmt: skip
        return {
            r["container"]: OpenTraffic(
                container=r["container"],
                samples=r["_n"],
                from_ms=max(start_ms, closed_through.get(r["container"], start_ms)),
                through_ms=int(r["_last"].timestamp() * 1000),
                sums={c: int(r[c] or 0) for c in COUNTERS},
            )
            for r in rows.iter_rows(named=True)
        }
