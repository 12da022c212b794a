"""The ``minute`` table: one row per container per closed window, exactly once.

Rows are written with the stream's :class:`~nettel.stream.windows.ReplayPoint` of every
partition they came from, as Delta app transactions in the same commit: the store and
the consumed position cannot disagree, whatever crashes. A restart reads the points
back (:meth:`MinuteTable.replay_points`) and resumes from them, not from Kafka's
committed offsets.

Layout (DESIGN.md, Delta notes): partitioned by ``date``; rows sorted by (container,
time); zstd 3; integer and timestamp columns DELTA_BINARY_PACKED without dictionary;
float (rate) columns BYTE_STREAM_SPLIT, rounded to :data:`RATE_MANTISSA_BITS` bits of
mantissa; ids as strings; timestamps timezone-aware UTC.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import structlog
from deltalake import (
    ColumnProperties,
    CommitProperties,
    DeltaTable,
    Transaction,
    WriterProperties,
)
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from nettel.models import COUNTERS, TCP_STATES, TOTALS, ReplayPoint, WindowAggregate

log = structlog.get_logger(__name__)

#: The replay point's fields, each stored as one app transaction per partition.
POINT_FIELDS = ("resume_offset", "event_time_ms", "next_offset", "written_through_ms")

TABLE_CONFIGURATION = {
    "delta.checkpointInterval": "100",
    "delta.logRetentionDuration": "interval 2 days",
    "delta.deletedFileRetentionDuration": "interval 6 hours",
    "delta.dataSkippingStatsColumns": "container,ts,date,partition",
    "delta.enableChangeDataFeed": "true",
}


def minute_schema() -> dict[str, pl.DataType]:
    """Columns of the ``minute`` table, in order."""
    schema: dict[str, pl.DataType] = {
        "date": pl.String(),
        "container": pl.String(),
        "partition": pl.Int64(),
        "ts": pl.Datetime("us", "UTC"),  # Delta stores timestamps in microseconds
        "window_ms": pl.Int64(),
        "host": pl.String(),
        "container_id": pl.String(),
        "name": pl.String(),
        "image": pl.String(),
        "compose_project": pl.String(),
        "compose_service": pl.String(),
        "samples": pl.Int64(),
        "interval_ms": pl.Int64(),
        "resets": pl.Int64(),
    }
    for c in COUNTERS:
        schema[c] = pl.Int64()
        schema[f"{c}_rate_min"] = pl.Float64()
        schema[f"{c}_rate_max"] = pl.Float64()
    for t in TOTALS:
        schema[f"{t}_rate_min"] = pl.Float64()
        schema[f"{t}_rate_max"] = pl.Float64()
    schema["connections_last"] = pl.Int64()
    schema["connections_max"] = pl.Int64()
    schema["connections_min"] = pl.Int64()
    schema["connections_sum"] = pl.Int64()
    schema["connections_samples"] = pl.Int64()
    for state in TCP_STATES:
        schema[f"tcp_{state}_max"] = pl.Int64()
    return schema


#: Mantissa bits a stored rate keeps (of a float64's 52): a relative error under
#: 2**-17 (7.6e-6), five significant digits, past the four every answer shows and the
#: jitter of the sample interval the rates are divided by. With the bits below them zero,
#: BYTE_STREAM_SPLIT and zstd keep a rate in about 2 bytes instead of 7.
RATE_MANTISSA_BITS = 16


def round_rates(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with every float64 column rounded to :data:`RATE_MANTISSA_BITS` bits of
    mantissa (to nearest; nulls stay null; rounding twice changes nothing).

    Examples
    --------
    >>> f = round_rates(pl.DataFrame({"r": [1234.56789, None, 0.2], "n": [1, 2, 3]}))
    >>> f["r"].to_list(), f["n"].to_list()
    ([1234.5625, None, 0.20000076293945312], [1, 2, 3])
    >>> round_rates(f).equals(f)
    True
    """
    drop = 52 - RATE_MANTISSA_BITS
    half, keep = np.uint64(1 << (drop - 1)), ~np.uint64((1 << drop) - 1)
    rounded = []
    for name, dtype in frame.schema.items():
        if dtype != pl.Float64 or not frame.height:
            continue
        column = frame[name]
        bits = column.fill_null(0.0).to_numpy().view(np.uint64)
        values = pl.Series(name, ((bits + half) & keep).view(np.float64))
        rounded.append(values if not column.has_nulls()
                       else pl.select(pl.when(column.is_null()).then(None)
                                      .otherwise(values)).to_series().alias(name))  # fmt: skip
    return frame.with_columns(rounded) if rounded else frame


def writer_properties(schema: Mapping[str, pl.DataType]) -> WriterProperties:
    """zstd 3; integers and timestamps DELTA_BINARY_PACKED without dictionary; floats
    BYTE_STREAM_SPLIT (their exponent bytes then compress well)."""
    delta = ColumnProperties(dictionary_enabled=False, encoding="DELTA_BINARY_PACKED")
    split = ColumnProperties(dictionary_enabled=False, encoding="BYTE_STREAM_SPLIT")
    props: dict[str, ColumnProperties] = {}
    for name, t in schema.items():
        if t.is_integer() or t == pl.Datetime:
            props[name] = delta
        elif t.is_float():
            props[name] = split
    return WriterProperties(compression="ZSTD", compression_level=3, column_properties=props)


def rows_frame(rows: Sequence[WindowAggregate]) -> pl.DataFrame:
    """A ``minute`` frame from window aggregates, sorted by (container, ts) (built a
    column at a time).

    Examples
    --------
    >>> w = WindowAggregate(identity="web", window_start_ms=1_795_651_260_000, window_ms=60_000,
    ...                     host="h", container_id="c", name="web", image="", compose_project="",
    ...                     compose_service="", samples=2, rate_min={"rx_bytes": 1.5})
    >>> rows_frame([w]).select("date", "container", "ts", "samples", "rx_bytes_rate_min",
    ...                        "tx_bytes_rate_min").row(0)[:2]
    ('2026-11-26', 'web')
    """
    schema = minute_schema()
    cols: dict[str, list[Any]] = {
        "date": [None] * len(rows),
        "container": [r.identity for r in rows],
        "ts": [r.window_start_ms * 1000 for r in rows],
    }
    for k in ("partition", "window_ms", "host", "container_id", "name", "image",
              "compose_project", "compose_service", "samples", "interval_ms", "resets",
              "connections_last", "connections_max", "connections_min",
              "connections_sum", "connections_samples"):  # fmt: skip
        cols[k] = [getattr(r, k) for r in rows]
    for c in COUNTERS:
        cols[c] = [r.sums[c] for r in rows]
    for m in (*COUNTERS, *TOTALS):
        cols[f"{m}_rate_min"] = [r.rate_min.get(m) for r in rows]
        cols[f"{m}_rate_max"] = [r.rate_max.get(m) for r in rows]
    for state in TCP_STATES:
        cols[f"tcp_{state}_max"] = [r.tcp_max.get(state) for r in rows]
    return (
        pl.DataFrame(cols, schema={**schema, "ts": pl.Int64()})
        .with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        .with_columns(date=pl.col("ts").dt.date().cast(pl.String()))
        .select(list(schema))
        .sort("container", "ts")
    )


def lacks_columns(uri: str, columns: Iterable[str], *,
                  storage_options: dict[str, str] | None = None) -> bool:  # fmt: skip
    """Whether the Delta table at ``uri`` exists without one of ``columns`` (a table not
    yet written lacks nothing: its first write creates it with every column)."""
    if not DeltaTable.is_deltatable(uri, storage_options=storage_options):
        return False
    names = {f.name for f in DeltaTable(uri, storage_options=storage_options).schema().fields}
    return not names.issuperset(columns)


@dataclass(frozen=True, slots=True)
class PartitionPoint:
    """A partition and the point to store for it."""

    topic: str
    partition: int
    point: ReplayPoint


class MinuteTable:
    """The ``minute`` Delta table under ``uri`` (a path or an ``s3://`` URI).

    ``hour`` and ``day`` (:mod:`nettel.store.rollup`) share its layout and schema.
    """

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self._schema = self.columns()
        self._props = writer_properties(self._schema)
        #: app transactions this object last committed: a flush with no rows and the
        #: same points is not committed again (an idle service makes no commits)
        self._committed: dict[str, int] = {}

    def columns(self) -> dict[str, pl.DataType]:
        """The table's columns, in order (a sibling window table gives its own)."""
        return minute_schema()

    def frame(self, rows: Sequence[Any]) -> pl.DataFrame:
        """The frame of window ``rows`` (:class:`~nettel.models.WindowAggregate` here)."""
        return rows_frame(rows)

    @staticmethod
    def app_id(writer: str, topic: str, partition: int, epoch: int, field: str) -> str:
        """The app transaction id of one field of one partition's point.

        Examples
        --------
        >>> MinuteTable.app_id("nettel-stream", "nettel.stats", 3, 1, "next_offset")
        'nettel-stream/nettel.stats/3/e1/next_offset'
        """
        return f"{writer}/{topic}/{partition}/e{epoch}/{field}"

    def append(self, rows: Sequence[Any], points: Sequence[PartitionPoint], *,
               writer: str, epoch: int) -> None:  # fmt: skip
        """Append ``rows`` and record ``points`` in one commit (rows may be empty; with
        no rows and the points this table last committed, nothing is committed)."""
        txns = [
            Transaction(self.app_id(writer, p.topic, p.partition, epoch, f), getattr(p.point, f))
            for p in points
            for f in POINT_FIELDS
        ]
        if not rows and all(self._committed.get(t.app_id) == t.version for t in txns):
            return
        self.append_frame(self.frame(rows), txns)
        self._committed.update((t.app_id, t.version) for t in txns)

    def append_frame(self, frame: pl.DataFrame, txns: Sequence[Transaction], *,
                     attempts: int = 5, merge_schema: bool = False) -> None:  # fmt: skip
        """Append ``frame`` (this table's schema) with ``txns`` in one commit.

        A retention delete committing meanwhile makes the commit fail (nothing is
        written then): the whole write is tried again, up to ``attempts`` times.
        ``merge_schema``: columns the table lacks are added (null in its older rows).
        """
        merge: dict[str, Any] = {"schema_mode": "merge"} if merge_schema else {}
        for attempt in range(1, attempts + 1):
            try:
                round_rates(frame).write_delta(
                    self.uri,
                    mode="append",
                    storage_options=self.storage_options,
                    delta_write_options={
                        "partition_by": ["date"],
                        "configuration": TABLE_CONFIGURATION,
                        "writer_properties": self._props,
                        "commit_properties": CommitProperties(app_transactions=list(txns)),
                        **merge,
                    },
                )
                return
            except CommitFailedError as e:
                if attempt == attempts:
                    raise
                log.warning("table_commit_conflict", table=self.uri, attempt=attempt,
                            error=str(e)[:200])  # fmt: skip
                time.sleep(0.05 * attempt)

    def replay_points(self, writer: str, topic: str, partitions: Sequence[int], *,
                      epoch: int) -> dict[int, ReplayPoint]:  # fmt: skip
        """The stored point of each partition that has one."""
        points = self.replay_points_of_epochs(writer, topic, partitions, [epoch])
        return {p: point for (_, p), point in points.items()}

    def replay_points_of_epochs(
        self, writer: str, topic: str, partitions: Sequence[int], epochs: Sequence[int]
    ) -> dict[tuple[int, int], ReplayPoint]:
        """The stored point of each (epoch, partition) that has one (one table load)."""
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return {}
        out: dict[tuple[int, int], ReplayPoint] = {}
        for epoch in epochs:
            for p in partitions:
                values = [
                    table.transaction_version(self.app_id(writer, topic, p, epoch, f))
                    for f in POINT_FIELDS
                ]
                if all(v is not None for v in values):
                    out[(epoch, p)] = ReplayPoint(*(int(v) for v in values if v is not None))
        return out

    def scan(self) -> pl.LazyFrame:
        """A fresh lazy scan of the table (build one per query: it does not see later commits)."""
        return pl.scan_delta(self.uri, storage_options=self.storage_options)
