"""The ``samples`` table: every valid event as it arrived, exactly once, kept briefly.

The stream worker buffers each partition's events with their offsets and, at every
flush, appends the ones past the partition's stored point together with the new point
(the next offset to write) as Delta app transactions in the same commit — its own
points, apart from the ``minute`` table's, since the two tables are separate commits.
A restart reads the points back and skips every event at or below them: a replay of
the same events adds nothing, a crash between the two tables' commits loses nothing.

Each row also keeps the broker log ``epoch`` and the ``offset`` it was read at. The
embedded broker's log dies with a killed nettel, and with it the events of windows not
yet written; those events are still here, so the stream worker rebuilds the windows
from them (:meth:`SamplesTable.unwritten`). Tables written before these two columns
existed gain them (null in the old rows) at the next append.

Layout as ``minute`` (DESIGN.md, Delta notes): partitioned by ``date``; rows sorted by
(container, ts); zstd 3; integers and timestamps DELTA_BINARY_PACKED without
dictionary; ids as strings; timestamps timezone-aware UTC. Retention is short
(``NETTEL_RETENTION_SAMPLES_DAYS``, default 2): the windows keep the long history.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
from deltalake import DeltaTable, Transaction
from deltalake.exceptions import TableNotFoundError

from nettel.models import (
    COUNTERS,
    TCP_STATES,
    CounterReading,
    DurableReading,
    StatEvent,
    TcpStates,
)
from nettel.store.minute import MinuteTable, writer_properties

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

#: The one field of a partition's point in this table.
NEXT_OFFSET = "samples_next_offset"


def samples_schema() -> dict[str, pl.DataType]:
    """Columns of the ``samples`` table, in order.

    Examples
    --------
    >>> list(samples_schema())[:4]
    ['date', 'container', 'partition', 'ts']
    """
    schema: dict[str, pl.DataType] = {
        "date": pl.String(),
        "container": pl.String(),
        "partition": pl.Int64(),
        "ts": pl.Datetime("us", "UTC"),  # Delta stores microseconds
        "host": pl.String(),
        "container_id": pl.String(),
        "name": pl.String(),
        "image": pl.String(),
        "compose_project": pl.String(),
        "compose_service": pl.String(),
        "interval_ms": pl.Int64(),
        "counter_reset": pl.Boolean(),
        "source": pl.String(),
    }
    for c in COUNTERS:
        schema[c] = pl.Int64()
    schema["connections"] = pl.Int64()
    for state in TCP_STATES:
        schema[f"tcp_{state}"] = pl.Int64()
    schema["epoch"] = pl.Int64()
    schema["offset"] = pl.Int64()
    # added later (null in older rows): the cumulative reading behind the sample, what
    # proves its interface, and whether it catches up a gap (see StatEvent)
    schema["catch_up"] = pl.Boolean()
    schema["netns"] = pl.Int64()
    schema["boot_id"] = pl.String()
    for c in COUNTERS:
        schema[f"reading_{c}"] = pl.Int64()
    return schema


@dataclass(frozen=True, slots=True)
class PartitionSamples:
    """One partition's events to append, and the offset the table then holds them up to.

    ``events`` are (offset, event) pairs; the table writes those at or past its stored
    point and stores ``next_offset``.
    """

    topic: str
    partition: int
    events: Sequence[tuple[int, StatEvent]]
    next_offset: int


def samples_frame(events: Sequence[tuple[int, int, StatEvent]], epoch: int) -> pl.DataFrame:
    """A ``samples`` frame from (partition, offset, event) triples of one log ``epoch``,
    sorted by (container, ts).

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1_795_651_200_000, host="h", container_id="c", identity="web",
    ...                name="web", interval_ms=5000, rx_bytes=7)
    >>> samples_frame([(3, 41, ev)], 2).select("date", "container", "partition", "rx_bytes",
    ...                                        "epoch", "offset").row(0)
    ('2026-11-26', 'web', 3, 7, 2, 41)
    """
    schema = samples_schema()
    evs = [ev for _, _, ev in events]
    cols: dict[str, list[Any]] = {
        "date": [None] * len(evs),
        "container": [ev.identity for ev in evs],
        "partition": [p for p, _, _ in events],
        "ts": [ev.ts_ms * 1000 for ev in evs],
        "epoch": [epoch] * len(evs),
        "offset": [o for _, o, _ in events],
    }
    for k in ("host", "container_id", "name", "image", "compose_project", "compose_service",
              "interval_ms", "counter_reset", "source", *COUNTERS, "connections"):  # fmt: skip
        cols[k] = [getattr(ev, k) for ev in evs]
    for state in TCP_STATES:
        cols[f"tcp_{state}"] = [None if ev.tcp is None else getattr(ev.tcp, state) for ev in evs]
    cols["catch_up"] = [ev.catch_up for ev in evs]
    readings = [ev.reading for ev in evs]
    cols["netns"] = [None if r is None else r.netns for r in readings]
    cols["boot_id"] = [None if r is None else r.boot_id for r in readings]
    for i, c in enumerate(COUNTERS):
        cols[f"reading_{c}"] = [None if r is None else r.counters[i] for r in readings]
    raw = {**schema, "ts": pl.Int64()}
    return (
        pl.DataFrame(cols, schema=raw)
        .with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        .with_columns(date=pl.col("ts").dt.strftime("%Y-%m-%d"))
        .sort("container", "ts")
    )


class SamplesTable(MinuteTable):
    """The ``samples`` Delta table under ``uri`` (a path or an ``s3://`` URI).

    Tables written before a column was added get it on the next append (schema merge).
    """

    schema_mode = "merge"

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        super().__init__(uri, storage_options=storage_options)
        self._schema = samples_schema()
        self._props = writer_properties(self._schema)

    def stored_offsets(self, writer: str, topic: str, partitions: Sequence[int], *,
                       epoch: int) -> dict[int, int]:  # fmt: skip
        """The next offset to write of each partition that has one."""
        offsets = self.stored_offsets_of_epochs(writer, topic, partitions, [epoch])
        return {p: offset for (_, p), offset in offsets.items()}

    def stored_offsets_of_epochs(
        self, writer: str, topic: str, partitions: Sequence[int], epochs: Sequence[int]
    ) -> dict[tuple[int, int], int]:
        """The next offset to write of each (epoch, partition) that has one."""
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return {}
        out: dict[tuple[int, int], int] = {}
        for epoch in epochs:
            for p in partitions:
                app = self.app_id(writer, topic, p, epoch, NEXT_OFFSET)
                v = table.transaction_version(app)
                if v is not None:
                    out[(epoch, p)] = int(v)
        return out

    def append_samples(self, parts: Sequence[PartitionSamples], *, writer: str, epoch: int,
                       known: Mapping[int, int] | None = None) -> int:  # fmt: skip
        """Append each partition's events past its stored point, and the new points, in
        one commit; returns the rows written. Parts whose point would not move are left
        out, and nothing is committed when no point moves.

        ``known``: points to use instead of the stored ones, for partitions whose
        stored point the caller knows to be stale (an earlier log's).
        """
        stored = self.stored_offsets(writer, parts[0].topic if parts else "",
                                     [p.partition for p in parts], epoch=epoch)  # fmt: skip
        stored.update(known or {})
        rows: list[tuple[int, int, StatEvent]] = []
        txns = []
        for part in parts:
            done = stored.get(part.partition, 0)
            if part.next_offset <= done:
                continue  # already written (a replay): nothing to add
            rows.extend((part.partition, off, ev) for off, ev in part.events if off >= done)
            app = self.app_id(writer, part.topic, part.partition, epoch, NEXT_OFFSET)
            txns.append(Transaction(app, part.next_offset))
        if not txns:
            return 0
        self.append_frame(samples_frame(rows, epoch), txns, merge_schema=True)
        return len(rows)

    def unwritten(self, epoch: int, partition: int, start: int, end: int
                  ) -> list[tuple[int, StatEvent]]:  # fmt: skip
        """The (offset, event) pairs read from ``partition`` of log ``epoch`` at offsets in
        [start, end), in offset order: what rebuilds windows a lost log still had open.
        """
        try:
            frame = (
                self.scan()
                .filter(
                    (pl.col("partition") == partition)
                    & (pl.col("epoch") == epoch)
                    & pl.col("offset").is_between(start, end, closed="left")
                )
                .sort("offset")
                .collect()
            )
        except (TableNotFoundError, pl.exceptions.ColumnNotFoundError):
            return []  # no table, or one written before rows kept their offsets
        return [(row["offset"], sample_event(row)) for row in frame.iter_rows(named=True)]

    def latest_readings(self, *, max_age_ms: int = 86_400_000) -> dict[str, DurableReading]:
        """The newest sample of each container with a cumulative reading, from the last
        ``max_age_ms`` (by the table's own newest time): where a restart counts from.

        Rows of older versions carry no reading and are left out.
        """
        if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
            return {}  # nothing written yet
        scan = self.scan()
        if "reading_rx_bytes" not in scan.collect_schema().names():
            return {}
        newest = scan.select(pl.col("ts").max()).collect().item()
        if newest is None:
            return {}
        since = newest - dt.timedelta(milliseconds=max_age_ms)
        columns = ["container_id", "ts", "netns", "boot_id", *(f"reading_{c}" for c in COUNTERS)]
        rows = (
            scan.filter(pl.col("date") >= since.strftime("%Y-%m-%d"), pl.col("ts") >= since,
                        pl.col("reading_rx_bytes").is_not_null())
            .group_by("container")
            .agg(pl.col(columns).sort_by("ts").last())
            .with_columns(ts_ms=pl.col("ts").dt.epoch("ms"))
            .collect()
        )  # fmt: skip
        out: dict[str, DurableReading] = {}
        for row in rows.iter_rows(named=True):
            values = tuple(row[f"reading_{c}"] for c in COUNTERS)
            reading = CounterReading(counters=values, netns=row["netns"],
                                     boot_id=row["boot_id"] or "")  # fmt: skip
            out[row["container"]] = DurableReading(row["container"], row["container_id"],
                                                   row["ts_ms"], reading)  # fmt: skip
        return out


def sample_event(row: Mapping[str, Any]) -> StatEvent:
    """The event a ``samples`` row holds (a row as ``iter_rows(named=True)`` gives it).

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1_795_651_200_000, host="h", container_id="c", identity="web",
    ...                name="web", interval_ms=5000, rx_bytes=7, connections=2,
    ...                tcp=TcpStates(established=2))
    >>> sample_event(samples_frame([(0, 0, ev)], 1).row(0, named=True)) == ev
    True
    """
    fields = {k: row[k] for k in ("host", "container_id", "name", "image", "compose_project",
                                  "compose_service", "interval_ms", "counter_reset", "source",
                                  *COUNTERS, "connections")}  # fmt: skip
    tcp = [row[f"tcp_{state}"] for state in TCP_STATES]
    return StatEvent(
        ts_ms=(row["ts"] - _EPOCH) // dt.timedelta(milliseconds=1),
        identity=row["container"], **fields,
        tcp=None if all(n is None for n in tcp) else TcpStates(**dict(zip(TCP_STATES, tcp,
                                                                          strict=True))),
    )  # fmt: skip
