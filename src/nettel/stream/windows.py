"""Event-time tumbling windows per container: pure functions of time, no broker.

A window ``[start, start + size)`` holds the samples whose ``ts_ms`` falls in it. A
partition's windows close when the partition's event time (the largest ``ts_ms`` seen
on it) passes ``end + grace``. A sample for a window that has already closed is late:
counted, and written as a separate partial row of its window.

Replays are exact: with the rows it writes, a worker stores the partition's
:class:`ReplayPoint`; a worker restarted from it reads again from the resume offset,
skips what was written and rebuilds the rest, sample for sample.

"""

from __future__ import annotations

from dataclasses import dataclass

from nettel.models import WINDOW_MS, ReplayPoint, StatEvent, WindowAggregate, window_start

__all__ = ["WINDOW_MS", "PartitionWindows", "ReplayPoint", "WindowAggregate", "window_start"]


@dataclass(slots=True)
class _Open:
    agg: WindowAggregate
    first_offset: int
    time_before_ms: int


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

    def add(self, ev: StatEvent, offset: int) -> None:
        """Fold one sample (at ``offset`` of the partition) into its window.

        Examples
        --------
        >>> pw = PartitionWindows(grace_ms=30_000)
        >>> ev = lambda ts: StatEvent(ts_ms=ts, host="h", container_id="c", identity="web",
        ...                           name="web", interval_ms=5000, rx_bytes=1)
        >>> pw.add(ev(10_000), 0); pw.add(ev(95_000), 1); pw.add(ev(20_000), 2)
        >>> [(w.window_start_ms, w.samples) for w in pw.close_ready()], pw.late
        ([(0, 1), (0, 1)], 1)
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
                return
            self.late += 1
            key = (ev.identity, start)
            entry = self._late.get(key)
            if entry is None:
                agg = WindowAggregate.first(ev, self.size_ms)
                entry = self._late[key] = _Open(agg, offset, before)
            entry.agg.add(ev)
            return
        if ts_ms > before:
            self.event_time_ms = ts_ms
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
        earliest = self._earliest_start
        if earliest is not None and earliest + span <= self.event_time_ms:
            self._close_due()

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
