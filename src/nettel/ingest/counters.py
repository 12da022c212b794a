"""Turn cumulative counters into deltas, flagging resets instead of emitting negatives.

A unit's counters only go up while its network namespace lives. When any counter goes
down, or the namespace is re-created (restart), it is a reset: the delta is then what
was counted since the reset (the kernel counts from zero), flagged ``counter_reset``.

Examples
--------
>>> t = CounterTracker()
>>> t.update("web", netns=1, counters=InterfaceCounters(rx_bytes=100), ts_ms=1000) is None
True
>>> d = t.update("web", netns=1, counters=InterfaceCounters(rx_bytes=160), ts_ms=6000)
>>> d.counters.rx_bytes, d.reset, d.interval_ms
(60, False, 5000)
>>> d = t.update("web", netns=2, counters=InterfaceCounters(rx_bytes=30), ts_ms=11000)
>>> d.counters.rx_bytes, d.reset
(30, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nettel.ingest.procfs import COUNTER_NAMES, InterfaceCounters


def counter_deltas(new: Sequence[int], old: Sequence[int]) -> list[int] | None:
    """``new - old`` per counter, or None when any counter went down (a reset).

    The one reset rule every cumulative counter nettel reads follows (network
    interfaces here, cgroup CPU/IO counters in :mod:`nettel.ingest.cgroups`).

    Examples
    --------
    >>> counter_deltas([5, 9], [2, 9]), counter_deltas([5, 1], [2, 9])
    ([3, 0], None)
    """
    diffs = [a - b for a, b in zip(new, old, strict=True)]
    return None if any(d < 0 for d in diffs) else diffs


@dataclass(frozen=True, slots=True)
class CounterDelta:
    """Deltas of one unit over ``interval_ms``; ``reset`` when counters restarted;
    ``catch_up`` when they count from a reading :meth:`CounterTracker.seed` gave."""

    counters: InterfaceCounters
    interval_ms: int
    reset: bool
    catch_up: bool = False


@dataclass(slots=True)
class _Last:
    netns: int
    counters: InterfaceCounters
    ts_ms: int


class CounterTracker:
    """Keeps each unit's last reading and computes deltas.

    ``update`` returns ``None`` for a unit's first reading (the baseline) unless a
    ``since_ms`` is given: a unit known to have started at ``since_ms`` (after nettel
    started watching) counts everything from zero, so its first traffic is not lost.
    """

    def __init__(self) -> None:
        self._last: dict[str, _Last] = {}
        self._seeded: set[str] = set()

    def seed(self, key: str, *, netns: int, counters: InterfaceCounters, ts_ms: int) -> None:
        """Start ``key`` from a reading taken earlier (the last one that reached the store),
        so its next update counts everything since then; that delta is flagged
        ``catch_up`` (or ``reset`` if the namespace changed meanwhile: it then counts
        from the namespace's start, which came after ``ts_ms``).

        Examples
        --------
        >>> t = CounterTracker()
        >>> t.seed("web", netns=1, counters=InterfaceCounters(rx_bytes=100), ts_ms=1000)
        >>> d = t.update("web", netns=1, counters=InterfaceCounters(rx_bytes=900), ts_ms=61000)
        >>> d.counters.rx_bytes, d.interval_ms, d.catch_up, d.reset
        (800, 60000, True, False)
        >>> t.update("web", netns=1, counters=InterfaceCounters(rx_bytes=950),
        ...          ts_ms=62000).catch_up
        False
        """
        self._last[key] = _Last(netns, counters, ts_ms)
        self._seeded.add(key)

    def update(
        self,
        key: str,
        *,
        netns: int,
        counters: InterfaceCounters,
        ts_ms: int,
        since_ms: int | None = None,
    ) -> CounterDelta | None:
        """Record a reading of ``key`` and return its delta from the previous one.

        Examples
        --------
        >>> t = CounterTracker()
        >>> d = t.update("a", netns=1, counters=InterfaceCounters(tx_bytes=7), ts_ms=900,
        ...              since_ms=0)
        >>> d.counters.tx_bytes, d.interval_ms, d.reset
        (7, 900, False)
        >>> t.update("a", netns=1, counters=InterfaceCounters(tx_bytes=3), ts_ms=1900).reset
        True
        """
        last = self._last.get(key)
        self._last[key] = _Last(netns, counters, ts_ms)
        if last is None:
            if since_ms is None:
                return None
            return CounterDelta(counters, max(0, ts_ms - since_ms), reset=False)
        interval = max(0, ts_ms - last.ts_ms)
        if netns != last.netns:
            self._seeded.discard(key)
            return CounterDelta(counters, interval, reset=True)
        diffs = counter_deltas(
            [getattr(counters, n) for n in COUNTER_NAMES],
            [getattr(last.counters, n) for n in COUNTER_NAMES],
        )
        if diffs is None:
            self._seeded.discard(key)
            return CounterDelta(counters, interval, reset=True)
        catch_up = key in self._seeded
        self._seeded.discard(key)
        return CounterDelta(InterfaceCounters(*diffs), interval, reset=False, catch_up=catch_up)

    def last(self, key: str) -> tuple[int, InterfaceCounters, int] | None:
        """(netns, counters, ts_ms) of ``key``'s last reading, or None."""
        last = self._last.get(key)
        return None if last is None else (last.netns, last.counters, last.ts_ms)

    def forget(self, key: str) -> None:
        """Drop a unit that is gone, so a new unit of the same key starts fresh."""
        self._last.pop(key, None)
        self._seeded.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._last

    def keys(self) -> list[str]:
        """Units with a baseline."""
        return list(self._last)
