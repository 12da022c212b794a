"""Event-time tumbling windows per container: pure functions of time, no broker.

A window ``[start, start + size)`` holds the samples whose ``ts_ms`` falls in it. A
partition's windows close when the partition's event time (the largest ``ts_ms`` seen
on it) passes ``end + grace``. A sample for a window that has already closed is late:
counted, and written as a separate partial row of its window.

A partition that receives nothing would keep its windows open forever (its event time
only moves with its events), so the worker also advances an idle partition's event time
to the wall clock (:meth:`PartitionWindows.advance`: a processing-time watermark, as
Flink and Kafka Streams do for idle sources). An advance moves the event time exactly as
an event would, and the replay point stores it, so replays stay exact.

Replays are exact: with the rows it writes, a worker stores the partition's
:class:`ReplayPoint`; a worker restarted from it reads again from the resume offset,
skips what was written and rebuilds the rest, sample for sample.

One row covers at most :data:`MAX_ROW_COVER_MS` of sample intervals (each counted as
at least a second): with the per-second ceilings of :mod:`nettel.stream.validation`, no
row's sum can come near an Int64 column's limit. A sample that would push its row past
it is refused (:meth:`PartitionWindows.add` says why).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import polars as pl

from nettel.models import (
    COUNTERS,
    RATE_METRICS,
    TCP_STATES,
    TOTALS,
    WINDOW_MS,
    ReplayPoint,
    StatEvent,
    WindowAggregate,
    window_start,
)
from nettel.store.samples import frame_events

__all__ = ["MAX_ROW_COVER_MS", "WINDOW_MS", "PartitionWindows", "ReplayPoint",
           "WindowAggregate", "fold_events", "window_start"]  # fmt: skip

#: The most sample time one row may cover: a window's own minute, one catch-up sample
#: of up to a day (after a restart of nettel), and room for duplicates.
MAX_ROW_COVER_MS = 2 * 86_400_000


@dataclass(slots=True)
class _Open:
    agg: WindowAggregate
    first_offset: int
    time_before_ms: int


def _overfull(agg: WindowAggregate, ev: StatEvent) -> bool:
    """Whether ``ev`` would make ``agg`` cover more than :data:`MAX_ROW_COVER_MS` (each
    sample counted as its interval plus a second: at least what the validation allows)."""
    covered = agg.interval_ms + 1000 * agg.samples + ev.interval_ms + 1000
    return covered > MAX_ROW_COVER_MS


def _overfull_reason(key: tuple[str, int]) -> str:
    return (f"its window row {key[0]}@{key[1]} would cover more than {MAX_ROW_COVER_MS} ms "
            "of samples")  # fmt: skip


class PartitionWindows:
    """The windows of one partition, closed by the partition's event time.

    Closing is a function of the event sequence alone: a window closes the moment the
    partition's event time passes its end plus grace, whenever flushes happen. A
    sample for a closed window is late: counted, and kept in a separate partial row of
    that window (``late`` rows; readers add rows of the same window up). Every
    :meth:`close_ready` drains the closed windows and the late partials; the
    :meth:`replay_point` taken right after it, stored with them, lets a restart skip
    what was written and rebuild the rest.
    """

    def __init__(self, grace_ms: int, *, size_ms: int = WINDOW_MS,
                 replay: ReplayPoint | None = None) -> None:  # fmt: skip
        self.grace_ms = grace_ms
        self.size_ms = size_ms
        self.replay = replay
        self.event_time_ms = -1 if replay is None else replay.event_time_ms
        self.late = 0
        self.replayed = 0
        self._open: dict[tuple[str, int], _Open] = {}
        self._late: dict[tuple[str, int], _Open] = {}
        self._ready: list[WindowAggregate] = []
        self._earliest_start: int | None = None
        self._next_offset: int | None = None if replay is None else replay.resume_offset

    def _closed_by(self, start_ms: int, event_time_ms: int) -> bool:
        return start_ms + self.size_ms + self.grace_ms <= event_time_ms

    def add(self, ev: StatEvent, offset: int) -> str | None:
        """Fold one sample (at ``offset`` of the partition) into its window.

        Returns why it was refused (its row would cover more than
        :data:`MAX_ROW_COVER_MS`), or None; a refused sample changes nothing but the
        event time, the same way on every replay.

        Examples
        --------
        >>> pw = PartitionWindows(grace_ms=30_000)
        >>> ev = lambda ts: StatEvent(ts_ms=ts, host="h", container_id="c", identity="web",
        ...                           name="web", interval_ms=5000, rx_bytes=1)
        >>> pw.add(ev(10_000), 0); pw.add(ev(95_000), 1); pw.add(ev(20_000), 2)
        >>> [(w.window_start_ms, w.samples) for w in pw.close_ready()], pw.late
        ([(0, 1), (0, 1)], 1)
        >>> import msgspec
        >>> day = msgspec.structs.replace(ev(100_000), interval_ms=86_400_000)
        >>> pw.add(day, 3), pw.add(day, 4)
        (None, 'its window row web@60000 would cover more than 172800000 ms of samples')
        """
        # the logic of _closed_by inlined (this runs once per event): a window starting
        # at ``start`` is closed by event time ``t`` when ``start + span <= t``
        before = self.event_time_ms
        self._next_offset = offset + 1
        span = self.size_ms + self.grace_ms
        ts_ms = ev.ts_ms
        start = ts_ms - ts_ms % self.size_ms  # window_start
        replay = self.replay
        replaying = replay is not None and offset < replay.next_offset
        if start + span <= before:
            if replaying:  # late partials are written at every write: this one was
                self.replayed += 1
                return None
            key = (ev.identity, start)
            entry = self._late.get(key)
            if entry is None:
                agg = WindowAggregate.first(ev, self.size_ms)
                entry = self._late[key] = _Open(agg, offset, before)
            elif _overfull(entry.agg, ev):
                return _overfull_reason(key)
            self.late += 1
            entry.agg.add(ev)
            return None
        if ts_ms > before:
            self.event_time_ms = ts_ms
        reason: str | None = None
        if replaying and replay is not None and start + span <= replay.written_through_ms:
            self.replayed += 1  # its window closed before the write: it was written
        else:
            key = (ev.identity, start)
            entry = self._open.get(key)
            if entry is None:
                agg = WindowAggregate.first(ev, self.size_ms)
                entry = self._open[key] = _Open(agg, offset, before)
                if self._earliest_start is None or start < self._earliest_start:
                    self._earliest_start = start
                entry.agg.add(ev)
            elif _overfull(entry.agg, ev):
                reason = _overfull_reason(key)
            else:
                entry.agg.add(ev)
                reason = None
        earliest = self._earliest_start
        if earliest is not None and earliest + span <= self.event_time_ms:
            self._close_due()
        return reason

    def passed(self, offset: int) -> None:
        """The record at ``offset`` was read and changes nothing here (a copy dropped
        before folding, :mod:`nettel.stream.dedupe`): a replay need not read it again.

        Examples
        --------
        >>> pw = PartitionWindows(grace_ms=30_000)
        >>> pw.passed(7); pw.replay_point().next_offset
        8
        """
        if self._next_offset is None or self._next_offset <= offset:
            self._next_offset = offset + 1

    def _fold(self, row: tuple[Any, ...], size_ms: int) -> None:
        """Merge one batch aggregate of :func:`fold_events` into its window."""
        key = (row[1], row[2])
        entry = self._open.get(key)
        if entry is None:
            agg = WindowAggregate(
                identity=row[1], window_start_ms=row[2], window_ms=size_ms, host=row[3],
                container_id="", name="", image="", compose_project=row[4],
                compose_service=row[5],
            )  # fmt: skip
            entry = self._open[key] = _Open(agg, row[6], row[7])
            if self._earliest_start is None or row[2] < self._earliest_start:
                self._earliest_start = row[2]
        _merge(entry.agg, row)

    def _folded(self, last_offset: int, newest_ms: int) -> None:
        """After :meth:`_fold` of a batch up to ``last_offset``: move the event time and
        close what it passed, as the batch's last :meth:`add` would have."""
        self._next_offset = last_offset + 1
        if newest_ms > self.event_time_ms:
            self.event_time_ms = newest_ms
        earliest = self._earliest_start
        if earliest is not None and earliest + self.size_ms + self.grace_ms <= self.event_time_ms:
            self._close_due()

    def advance(self, now_ms: int) -> bool:
        """The idle watermark: if ``now_ms`` (the wall clock) closes an open window, move
        the event time there and close what is due; returns whether it did. For a
        partition that has received nothing for a while; nothing changes otherwise.

        Examples
        --------
        >>> pw = PartitionWindows(grace_ms=30_000)
        >>> pw.add(StatEvent(ts_ms=10_000, host="h", container_id="c", identity="web",
        ...                  name="web", interval_ms=5000, rx_bytes=1), 0)
        >>> pw.advance(89_999), pw.open_windows(), pw.event_time_ms
        (False, 1, 10000)
        >>> pw.advance(90_000), [w.samples for w in pw.close_ready()], pw.event_time_ms
        (True, [1], 90000)
        """
        earliest = self._earliest_start
        if earliest is None or earliest + self.size_ms + self.grace_ms > now_ms:
            return False
        self.event_time_ms = max(self.event_time_ms, now_ms)
        self._close_due()
        return True

    def _close_due(self) -> None:
        due = [k for k in self._open if self._closed_by(k[1], self.event_time_ms)]
        for k in sorted(due, key=lambda k: (k[1], k[0])):
            self._ready.append(self._open.pop(k).agg)
        self._earliest_start = min((k[1] for k in self._open), default=None)

    def seal(self) -> None:
        """Close every open window now, as a partial row, whatever the event time.

        Before the log the windows were read from goes away (the embedded broker's
        rotation or shutdown), what they hold must be written: the rows are partial
        (later samples of the same window make another row, and readers add rows of a
        window up), and the :meth:`replay_point` taken after :meth:`close_ready` then
        has nothing pending, so its ``resume_offset`` is the next offset.

        Examples
        --------
        >>> pw = PartitionWindows(grace_ms=30_000)
        >>> ev = lambda ts: StatEvent(ts_ms=ts, host="h", container_id="c", identity="web",
        ...                           name="web", interval_ms=5000, rx_bytes=1)
        >>> pw.add(ev(10_000), 0); pw.seal(); pw.add(ev(20_000), 1); pw.seal()
        >>> [(w.window_start_ms, w.samples) for w in pw.close_ready()]
        [(0, 1), (0, 1)]
        >>> pw.replay_point().resume_offset, pw.open_windows()
        (2, 0)
        """
        for k in sorted(self._open, key=lambda k: (k[1], k[0])):
            self._ready.append(self._open.pop(k).agg)
        self._earliest_start = None

    def close_ready(self) -> list[WindowAggregate]:
        """Remove and return the closed windows, then the late partials."""
        out, self._ready = self._ready, []
        out.extend(e.agg for e in self._late.values())
        self._late = {}
        return out

    def replay_point(self) -> ReplayPoint | None:
        """Where a restart must begin to rebuild what is not yet written (None: nothing seen).

        Take it right after :meth:`close_ready`, and store it with what that returned.
        """
        if self._next_offset is None:
            return None
        pending = [*self._open.values(), *self._late.values()]
        if self._ready:
            raise RuntimeError("replay_point() before close_ready(): closed windows unwritten")
        first = min(pending, key=lambda e: e.first_offset, default=None)
        return ReplayPoint(
            resume_offset=self._next_offset if first is None else first.first_offset,
            event_time_ms=self.event_time_ms if first is None else first.time_before_ms,
            next_offset=self._next_offset,
            written_through_ms=self.event_time_ms,
        )

    def open_windows(self) -> int:
        """How many windows are open."""
        return len(self._open)


def _rate(metric: str) -> pl.Expr:
    parts = TOTALS.get(metric)
    value = pl.col(metric) if parts is None else pl.col(parts[0]) + pl.col(parts[1])
    rate = value / (pl.col("interval_ms") / 1000)  # as WindowAggregate.add divides
    return pl.when(pl.col("interval_ms") > 0).then(rate).alias(f"rate_{metric}")


_KEYS: Final = ("partition", "container", "start")
_NEWEST: Final = pl.col("ts_ms").cum_max().shift(1).over(_KEYS)
#: per row, before the group-by: whether folding one at a time would take its newest
#: fields (its time is at least every earlier one's), and each metric's rate
_PER_ROW: Final = (
    (pl.col("ts_ms") >= _NEWEST).fill_null(value=True).alias("newest"),
    *(_rate(m) for m in RATE_METRICS),
)
_CONN_NEWEST: Final = pl.col("newest") & pl.col("connections").is_not_null()
_AGGREGATES: Final = (
    pl.col("host").first(), pl.col("compose_project").first(),
    pl.col("compose_service").first(), pl.col("offset").first().alias("first_offset"),
    pl.col("before").first(), pl.len().alias("samples"), pl.col("interval_ms").sum(),
    pl.col("counter_reset").sum().alias("resets"),
    pl.col("ts_ms").max().alias("newest_ts"),
    pl.col("container_id").filter("newest").last(),
    pl.col("name").filter("newest").last(), pl.col("image").filter("newest").last(),
    pl.col("connections").filter(_CONN_NEWEST).last().alias("conn_last"),
    pl.col("ts_ms").filter(_CONN_NEWEST).last().alias("conn_last_ts"),
    pl.col("connections").max().alias("conn_max"),
    pl.col("connections").min().alias("conn_min"),
    pl.col("connections").sum().alias("conn_sum"),
    pl.col("connections").count().alias("conn_count"),
    *(pl.col(c).sum() for c in COUNTERS),
    *(pl.col(f"rate_{m}").min().alias(f"{m}_min") for m in RATE_METRICS),
    *(pl.col(f"rate_{m}").max().alias(f"{m}_max") for m in RATE_METRICS),
    *(pl.col(f"tcp_{s}").max() for s in TCP_STATES),
)  # fmt: skip
_N_HEAD: Final = 20  # fields before the counter sums in an aggregate row
_N_RATES: Final = len(RATE_METRICS)


def _merge(agg: WindowAggregate, row: tuple[Any, ...]) -> None:
    """Fold one batch aggregate (a row of ``_AGGREGATES`` after the keys) into ``agg``:
    the same result as adding the batch's events one at a time."""
    (
        _,
        _,
        _,
        _,
        _,
        samples,
        interval_ms,
        resets,
        newest_ts,
        container_id,
        name,
        image,
        conn_last,
        conn_last_ts,
        conn_max,
        conn_min,
        conn_sum,
        conn_count,
    ) = row[3 : _N_HEAD + 1]
    agg.samples += samples
    agg.interval_ms += interval_ms
    agg.resets += resets
    sums = agg.sums
    at = _N_HEAD + 1
    for c, v in zip(COUNTERS, row[at : at + len(COUNTERS)], strict=True):
        sums[c] += v
    at += len(COUNTERS)
    rmin, rmax = agg.rate_min, agg.rate_max
    for m, lo, hi in zip(RATE_METRICS, row[at:at + _N_RATES],
                         row[at + _N_RATES:at + 2 * _N_RATES], strict=True):  # fmt: skip
        if lo is not None:
            if m not in rmin or lo < rmin[m]:
                rmin[m] = lo
            if m not in rmax or hi > rmax[m]:
                rmax[m] = hi
    at += 2 * _N_RATES
    tcp_max = agg.tcp_max
    for state, v in zip(TCP_STATES, row[at:], strict=True):
        if v is not None and v >= tcp_max.get(state, 0):
            tcp_max[state] = v
    if conn_count:
        if conn_last_ts is not None and conn_last_ts >= agg._last_ts_ms:
            agg.connections_last = conn_last
        agg.connections_max = max(agg.connections_max or 0, conn_max)
        if agg.connections_min is None or conn_min < agg.connections_min:
            agg.connections_min = conn_min
        agg.connections_sum += conn_sum
        agg.connections_samples += conn_count
    if newest_ts >= agg._last_ts_ms:
        agg._last_ts_ms = newest_ts
        agg.container_id, agg.name, agg.image = container_id, name, image


def fold_events(windows: Mapping[int, PartitionWindows],
                frame: pl.DataFrame) -> list[tuple[int, int, str]]:  # fmt: skip
    """Fold a batch of valid events into their partitions' windows, columnar: the same
    windows, event times, late counts and replay points as :meth:`PartitionWindows.add`
    of each event in order; returns (partition, offset, reason) of the refused ones.

    ``frame`` is an :func:`~nettel.store.samples.events_frame`, each partition's rows in
    offset order. Per (partition, container, window) the batch is aggregated in one
    group-by and merged into the open window. A partition whose batch holds a late
    event, one a replay skips, or a row that would grow too large is folded one event
    at a time instead (rare: their rules are sequential).

    Examples
    --------
    >>> from nettel.models import event_row
    >>> from nettel.store.samples import events_frame
    >>> evs = [StatEvent(ts_ms=ts, host="h", container_id="c", identity="web", name="web",
    ...                  interval_ms=5000, rx_bytes=ts // 1000) for ts in (10_000, 20_000, 95_000)]
    >>> batch, one_by_one = PartitionWindows(30_000), PartitionWindows(30_000)
    >>> fold_events({0: batch}, events_frame([event_row(e) for e in evs], [0] * 3, [0, 1, 2]))
    []
    >>> for offset, ev in enumerate(evs):
    ...     _ = one_by_one.add(ev, offset)
    >>> batch.close_ready() == one_by_one.close_ready()
    True
    >>> batch.replay_point() == one_by_one.replay_point()
    True
    """
    refused: list[tuple[int, int, str]] = []
    owned = [p for p in frame["partition"].unique().to_list() if p in windows]
    if not owned:
        return refused
    shapes = {(windows[p].size_ms, windows[p].grace_ms) for p in owned}
    slow: set[int] = set() if len(shapes) == 1 else set(owned)
    size_ms, grace_ms = next(iter(shapes))
    span = size_ms + grace_ms
    times = {p: windows[p].event_time_ms for p in owned}
    events = (
        frame.lazy()
        .filter(pl.col("partition").is_in(owned))
        .with_columns(
            start=pl.col("ts_ms") - pl.col("ts_ms") % size_ms,
            before=pl.max_horizontal(
                pl.col("ts_ms").cum_max().shift(1).over("partition"),
                pl.col("partition").replace_strict(times, return_dtype=pl.Int64),
            ),
        )
        .collect()
    )
    per_partition = events.group_by("partition").agg(
        pl.col("offset").min().alias("first"), pl.col("offset").max().alias("last"),
        pl.col("ts_ms").max().alias("newest"),
        (pl.col("start") + span <= pl.col("before")).any().alias("late"),
    )  # fmt: skip
    ends: dict[int, tuple[int, int]] = {}
    for p, first, last, newest, late in per_partition.iter_rows():
        replay = windows[p].replay
        if late or (replay is not None and first < replay.next_offset):
            slow.add(p)
        ends[p] = (last, newest)
    fast = [p for p in owned if p not in slow]
    if fast:
        rows = (events.lazy().filter(pl.col("partition").is_in(fast))
                .with_columns(*_PER_ROW).group_by(*_KEYS).agg(*_AGGREGATES)
                .collect().rows())  # fmt: skip
        for row in rows:  # a row too large is refused one event at a time, in order
            entry = windows[row[0]]._open.get((row[1], row[2]))
            covered = 0 if entry is None else entry.agg.interval_ms + 1000 * entry.agg.samples
            if covered + row[9] + 1000 * row[8] > MAX_ROW_COVER_MS:
                slow.add(row[0])
        for row in rows:
            if row[0] not in slow:
                windows[row[0]]._fold(row, size_ms)
        for p in fast:
            if p not in slow:
                windows[p]._folded(*ends[p])
    for p in sorted(slow):
        pw = windows[p]
        mine = events.filter(pl.col("partition") == p)
        for offset, ev in zip(mine["offset"].to_list(), frame_events(mine), strict=True):
            reason = pw.add(ev, offset)
            if reason is not None:
                refused.append((p, offset, reason))
    return refused
