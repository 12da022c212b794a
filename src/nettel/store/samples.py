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
from typing import Any, Final

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
    event_row,
)
from nettel.store.minute import MinuteTable, lacks_columns, writer_properties

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


#: Columns of a batch of decoded events (:func:`events_frame`), in order: what the stream
#: worker folds into windows and buffers for this table.
EVENT_COLUMNS: Final[dict[str, pl.DataType]] = {
    "partition": pl.Int64(), "offset": pl.Int64(), "ts_ms": pl.Int64(), "host": pl.String(),
    "container_id": pl.String(), "container": pl.String(), "name": pl.String(),
    "image": pl.String(), "compose_project": pl.String(), "compose_service": pl.String(),
    "interval_ms": pl.Int64(), **dict.fromkeys(COUNTERS, pl.Int64()),
    "connections": pl.Int64(), **{f"tcp_{s}": pl.Int64() for s in TCP_STATES},
    "counter_reset": pl.Boolean(), "source": pl.String(),
    **{f"reading_{c}": pl.Int64() for c in COUNTERS}, "netns": pl.Int64(),
    "boot_id": pl.String(), "catch_up": pl.Boolean(),
}  # fmt: skip

_NO_TCP: Final = (None,) * len(TCP_STATES)
_NO_COUNTERS: Final = (None,) * len(COUNTERS)
_NO_READING: Final = (_NO_COUNTERS, None, None)


def events_frame(rows: Sequence[tuple[Any, ...]], partitions: Sequence[int],
                 offsets: Sequence[int]) -> pl.DataFrame:  # fmt: skip
    """A frame of :data:`EVENT_COLUMNS` from rows of the compact format
    (:func:`~nettel.models.decode_stat_batch`, :func:`~nettel.models.event_row`) and the
    partition and offset each was read at: columns built once per batch, no object
    per event.

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1_795_651_200_000, host="h", container_id="c", identity="web",
    ...                name="web", interval_ms=5000, rx_bytes=7)
    >>> events_frame([event_row(ev)], [3], [41]).select("partition", "offset", "container",
    ...                                                 "rx_bytes", "tcp_listen").row(0)
    (3, 41, 'web', 7, None)
    """
    if not rows:
        return pl.DataFrame(schema=EVENT_COLUMNS)
    (_, ts, host, container_id, identity, name, image, project, service, interval,
     rxb, txb, rxp, txp, rxe, txe, rxd, txd, conns, tcp, reset, source, reading,
     catch_up) = zip(*rows, strict=True)  # fmt: skip
    tcp_columns = zip(*[t or _NO_TCP for t in tcp], strict=True)
    counters, netns, boot_id = zip(*[r or _NO_READING for r in reading], strict=True)
    reading_columns = zip(*[c or _NO_COUNTERS for c in counters], strict=True)
    values = (partitions, offsets, ts, host, container_id, identity, name, image, project,
              service, interval, rxb, txb, rxp, txp, rxe, txe, rxd, txd, conns,
              *tcp_columns, reset, source, *reading_columns, netns, boot_id, catch_up)  # fmt: skip
    return pl.DataFrame([pl.Series(name, column, dtype=dtype)
                         for (name, dtype), column in zip(EVENT_COLUMNS.items(), values,
                                                          strict=True)])  # fmt: skip


def samples_of_events(frame: pl.DataFrame, epoch: int) -> pl.DataFrame:
    """The ``samples`` rows of an :func:`events_frame` read from log ``epoch``, sorted by
    (container, ts)."""
    ts = pl.col("ts_ms").mul(1000).cast(pl.Datetime("us", "UTC"))
    return (
        frame.lazy()
        .with_columns(ts=ts, epoch=pl.lit(epoch, pl.Int64()))
        .with_columns(date=pl.col("ts").dt.date().cast(pl.String()))
        .select(list(samples_schema()))
        .sort("container", "ts")
        .collect()
    )


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
    frame = events_frame([event_row(ev) for _, _, ev in events], [p for p, _, _ in events],
                         [o for _, o, _ in events])  # fmt: skip
    return samples_of_events(frame, epoch)


def frame_events(frame: pl.DataFrame) -> list[StatEvent]:
    """The events of an :func:`events_frame`, in its order (for the rare paths that fold
    one event at a time).

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1_795_651_200_000, host="h", container_id="c", identity="web",
    ...                name="web", interval_ms=5000, rx_bytes=7, tcp=TcpStates(listen=2),
    ...                reading=CounterReading(counters=(1, 2, 3, 4, 5, 6, 7, 8), netns=9))
    >>> frame_events(events_frame([event_row(ev)], [0], [0])) == [ev]
    True
    """
    out = []
    for row in frame.iter_rows(named=True):
        tcp = [row[f"tcp_{state}"] for state in TCP_STATES]
        counters = tuple(row[f"reading_{c}"] for c in COUNTERS)
        reading = (
            None
            if row["netns"] is None
            else CounterReading(counters=counters, netns=row["netns"], boot_id=row["boot_id"])
        )
        out.append(StatEvent(
            ts_ms=row["ts_ms"], identity=row["container"], reading=reading,
            tcp=None if tcp[0] is None else TcpStates(**dict(zip(TCP_STATES, tcp,
                                                                 strict=True))),
            **{k: row[k] for k in _EVENT_FIELDS},
        ))  # fmt: skip
    return out


_EVENT_FIELDS: Final = ("host", "container_id", "name", "image", "compose_project",
                        "compose_service", "interval_ms", *COUNTERS, "connections",
                        "counter_reset", "source", "catch_up")  # fmt: skip


class SamplesTable(MinuteTable):
    """The ``samples`` Delta table under ``uri`` (a path or an ``s3://`` URI).

    Tables written before a column was added get it on the next append (a schema merge,
    only when the table lacks a column: merging costs every append a schema check).
    """

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        super().__init__(uri, storage_options=storage_options)
        self._schema = samples_schema()
        self._props = writer_properties(self._schema)
        self._schema_current = False

    def _lacks_columns(self) -> bool:
        """Whether the table exists without every column of :func:`samples_schema`."""
        if not self._schema_current:
            self._schema_current = not lacks_columns(
                self.uri, self._schema, storage_options=self.storage_options
            )
        return not self._schema_current

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
        one commit; returns the rows written (see :meth:`append_events`)."""
        rows = [(part.partition, off, ev) for part in parts for off, ev in part.events]
        frame = events_frame([event_row(ev) for _, _, ev in rows], [p for p, _, _ in rows],
                             [o for _, o, _ in rows])  # fmt: skip
        return self.append_events(
            frame, {part.partition: part.next_offset for part in parts},
            topic=parts[0].topic if parts else "", writer=writer, epoch=epoch, known=known,
        )  # fmt: skip

    def append_events(self, frame: pl.DataFrame, next_offsets: Mapping[int, int], *,
                      topic: str, writer: str, epoch: int,
                      known: Mapping[int, int] | None = None) -> int:  # fmt: skip
        """Append the events of ``frame`` (an :func:`events_frame`) past each partition's
        stored point, and the new points (``next_offsets``: partition -> the next offset
        the table then holds), in one commit; returns the rows written. Partitions whose
        point would not move are left out, and nothing is committed when no point moves.

        ``known``: points to use instead of the stored ones, for partitions whose
        stored point the caller knows to be stale (an earlier log's).
        """
        stored = self.stored_offsets(writer, topic, list(next_offsets), epoch=epoch)
        stored.update(known or {})
        moving = {p: o for p, o in next_offsets.items() if o > stored.get(p, 0)}
        if not moving:
            return 0
        done = {p: stored.get(p, 0) for p in moving}
        keep = pl.col("partition").is_in(list(moving))
        if any(done.values()):  # drop what an earlier write holds
            first = pl.col("partition").replace_strict(done, default=0, return_dtype=pl.Int64)
            keep &= pl.col("offset") >= first
        rows = frame.filter(keep)
        txns = [Transaction(self.app_id(writer, topic, p, epoch, NEXT_OFFSET), o)
                for p, o in moving.items()]  # fmt: skip
        self.append_frame(samples_of_events(rows, epoch), txns,
                          merge_schema=self._lacks_columns())  # fmt: skip
        self._schema_current = True
        return rows.height

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

    def newest_times(self, epoch: int, resumes: Mapping[int, int], *, since_ms: int,
                     horizon_ms: int) -> dict[int, dict[str, int]]:  # fmt: skip
        """Per partition, each container's newest sample time of those read before the
        partition's resume point (``resumes``: partition -> the offset of log ``epoch`` it
        resumes from; samples of earlier logs all count), from ``since_ms`` on, and of
        those only the containers within ``horizon_ms`` of the partition's newest: what a
        restarted stream worker drops copies against (:mod:`nettel.stream.dedupe`).
        """
        if not resumes or not DeltaTable.is_deltatable(
            self.uri, storage_options=self.storage_options
        ):
            return {}
        scan = self.scan()
        if "epoch" not in scan.collect_schema().names():
            return {}
        day = (_EPOCH + dt.timedelta(milliseconds=since_ms)).strftime("%Y-%m-%d")
        ts_ms = pl.col("ts").dt.epoch("ms")
        older = pl.col("epoch").fill_null(-1) < epoch
        wanted = pl.any_horizontal(
            (pl.col("partition") == p) & (older | (pl.col("offset") < resume))
            for p, resume in resumes.items()
        )
        rows = (
            scan.filter(pl.col("date") >= day, wanted, ts_ms >= since_ms)
            .group_by("partition", "container")
            .agg(ts_ms.max())
            .filter(pl.col("ts") >= pl.col("ts").max().over("partition") - horizon_ms)
            .collect()
        )
        out: dict[int, dict[str, int]] = {}
        for p, container, ts in rows.iter_rows():
            out.setdefault(p, {})[container] = ts
        return out

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
