"""``hour`` and ``day`` tables rolled from the finer table's change data feed.

A roll of one partition reads every row the finer table (``minute`` for ``hour``,
``hour`` for ``day``) gained since the version consumed last time, aggregates them per
container and period, and appends the result with the newly consumed version as an
app transaction in the same commit. So every finer row — a late partial included —
reaches the coarser table exactly once, whatever crashes: rows of one period may come
in several partial rows, which readers add up (sums and counts add, mins take the
min, maxes the max, ``connections_last`` the latest). Compaction may merge them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
from deltalake import DeltaTable, Transaction
from deltalake.exceptions import TableNotFoundError

from nettel.models import COUNTERS, RATE_METRICS, TCP_STATES
from nettel.store.minute import MinuteTable, minute_schema

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
IDENTITY = ("host", "container_id", "name", "image", "compose_project", "compose_service")


@dataclass(frozen=True)
class RollupSpec:
    """How a window table's rows add up: its schema and, per column, the aggregation
    (``sums`` add, ``mins``/``maxes`` take the extreme, ``lasts`` the latest non-null).
    Columns in none of them but ``ts``, ``window_ms``, ``date`` and the keys are nulls."""

    schema: Callable[[], dict[str, pl.DataType]]
    sums: tuple[str, ...]
    mins: tuple[str, ...]
    maxes: tuple[str, ...]
    lasts: tuple[str, ...]


#: The network window tables (``minute``, ``hour``, ``day``).
NETWORK_ROLLUP = RollupSpec(
    minute_schema,
    sums=("samples", "interval_ms", "resets", *COUNTERS, "connections_sum",
          "connections_samples"),
    mins=(*(f"{c}_rate_min" for c in RATE_METRICS), "connections_min"),
    maxes=(*(f"{c}_rate_max" for c in RATE_METRICS), "connections_max",
           *(f"tcp_{s}_max" for s in TCP_STATES)),
    lasts=("connections_last", *IDENTITY),
)  # fmt: skip


def rollup_frame(frame: pl.DataFrame, period_ms: int,
                 spec: RollupSpec = NETWORK_ROLLUP) -> pl.DataFrame:  # fmt: skip
    """Rows of ``frame`` (``spec``'s schema) aggregated per container, partition, period.

    Examples
    --------
    >>> import datetime as dt
    >>> schema = minute_schema()
    >>> t = [dt.datetime(2026, 11, 26, 10, m, tzinfo=dt.UTC) for m in (0, 1, 59)]
    >>> rows = pl.DataFrame({"container": ["a"] * 3, "partition": [0] * 3, "ts": t,
    ...                      "rx_bytes": [1, 2, 3], "rx_bytes_rate_max": [1.0, 9.0, 2.0],
    ...                      "connections_last": [5, 6, 7]}).with_columns(
    ...     [pl.lit(None).cast(d).alias(c) for c, d in schema.items()
    ...      if c not in ("container", "partition", "ts", "rx_bytes", "rx_bytes_rate_max",
    ...                   "connections_last")]).select(list(schema))
    >>> out = rollup_frame(rows, 3_600_000)
    >>> out.select("ts", "rx_bytes", "rx_bytes_rate_max", "connections_last").row(0)[1:]
    (6, 9.0, 7)
    """
    schema = spec.schema()
    period = (pl.col("ts").dt.epoch("ms") // period_ms) * period_ms
    out = (
        frame.sort("ts")
        .with_columns(_period=period)
        .group_by("container", "partition", "_period", maintain_order=True)
        .agg(
            [pl.col(c).sum() for c in spec.sums]
            + [pl.col(c).min() for c in spec.mins]
            + [pl.col(c).max() for c in spec.maxes]
            + [pl.col(c).drop_nulls().last() for c in spec.lasts]
        )
        .with_columns(
            ts=pl.from_epoch("_period", time_unit="ms").dt.replace_time_zone("UTC"),
            window_ms=pl.lit(period_ms, dtype=pl.Int64),
        )
        .with_columns(date=pl.col("ts").dt.strftime("%Y-%m-%d"))
    )
    return out.select([pl.col(c).cast(t) for c, t in schema.items()])


def inserted_rows(
    table: DeltaTable,
    first_version: int,
    last_version: int,
    partition: int,
    spec: RollupSpec = NETWORK_ROLLUP,
) -> pl.DataFrame:
    """Rows inserted into ``table`` for ``partition`` in versions [first, last] (its CDF).

    Compaction (no data change) and retention deletes add no inserted rows.
    """
    cdf = table.load_cdf(starting_version=first_version, ending_version=last_version,
                         predicate=f"partition = {partition}")  # fmt: skip
    changes = pl.DataFrame(pl.from_arrow(cdf))
    if changes.width == 1 and changes.dtypes[0] == pl.Struct:
        changes = changes.unnest(changes.columns[0])
    schema = spec.schema()
    if not changes.height:
        return pl.DataFrame(schema=schema)
    return changes.filter(pl.col("_change_type") == "insert").select(
        [pl.col(c).cast(t) for c, t in schema.items()]
    )


class RollupTable(MinuteTable):
    """A coarser table (``hour``, ``day``) rolled from ``source``'s change data feed;
    ``spec``: the source's columns and how they add up (the network tables' by default)."""

    def __init__(self, uri: str, source: MinuteTable, period_ms: int, *,
                 storage_options: dict[str, str] | None = None,
                 spec: RollupSpec = NETWORK_ROLLUP) -> None:  # fmt: skip
        self.spec = spec
        super().__init__(uri, storage_options=storage_options)
        self.source = source
        self.period_ms = period_ms

    def columns(self) -> dict[str, pl.DataType]:
        """The rolled table's columns: its source's."""
        return self.spec.schema()

    def consumed_version(self, writer: str, topic: str, partition: int) -> int:
        """The source version this table has rolled through for ``partition`` (-1: none).

        It counts versions of the source table, not broker offsets: it does not change
        with the broker's epoch (a rotation must not roll the source again from 0).
        """
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return -1
        v = table.transaction_version(self.app_id(writer, topic, partition, 0, "source"))
        return -1 if v is None else int(v)

    def roll(self, partition: int, *, writer: str, topic: str) -> int:
        """Roll what ``source`` gained for ``partition``; returns the rows appended."""
        try:
            src = DeltaTable(self.source.uri, storage_options=self.source.storage_options)
        except TableNotFoundError:
            return 0
        latest = src.version()
        done = self.consumed_version(writer, topic, partition)
        if latest <= done:
            return 0
        changes = inserted_rows(src, done + 1, latest, partition, self.spec)
        rows = (
            rollup_frame(changes, self.period_ms, self.spec)
            if changes.height
            else pl.DataFrame(schema=self.columns())
        )
        txn = Transaction(self.app_id(writer, topic, partition, 0, "source"), latest)
        self.append_frame(rows.sort("container", "ts"), [txn])
        return rows.height
