"""Dropping the second copy of an event: what makes a publisher's resend count once.

The ingest publisher delivers at least once: a batch whose send timed out (or whose
producer closed) is sent again, and a broker that had accepted it before the timeout then
holds the same events twice. Offsets cannot tell the copies apart (each has its own), the
events can: one container's events are sampled in time order, keyed by its identity (one
partition, in order), and the publisher sends them oldest first, a resend ahead of
anything newer (:mod:`nettel.ingest.publisher`). So an event whose ``ts_ms`` is not newer
than the last one folded for its identity on its partition is a copy, and is dropped.

A *late but new* event is not a copy: none is older than what was folded for its identity,
because nothing newer of that identity reaches the topic before it. The catch-up event
after a lost log is newer than every durable sample of its container (it starts where the
oldest unsent event starts), so it passes too.

:class:`LastFolded` keeps, per partition, each identity's newest folded time; identities
whose newest time is more than :data:`DEDUPE_HORIZON_MS` behind the newest event folded
on the partition are forgotten (:meth:`LastFolded.forget_gone`), so the state stays as
small as the set of live containers. The clock is folded event time, not the wall clock:
while a broker is away nothing is forgotten, and the copies it resends first are still
recognised when it returns.

Examples
--------
>>> seen = LastFolded()
>>> [seen.admit("web", ts) for ts in (1000, 2000, 1000, 2000, 3000)]
[True, True, False, False, True]
>>> seen.last("web"), seen.last("db")
(3000, None)
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

#: How long an identity is remembered after its last event (folded event time): a copy
#: sent again later than this after its original is not recognised.
DEDUPE_HORIZON_MS = 15 * 60_000


class LastFolded:
    """Each identity's newest folded ``ts_ms`` on one partition.

    ``last``: the state to start from (a restore). ``horizon_ms``: how far behind the
    partition's newest folded event an identity may fall before it is forgotten.

    Examples
    --------
    >>> seen = LastFolded({"old": 0, "web": 900_000})
    >>> seen.admit("web", 1_000_000), seen.forget_gone(), len(seen)
    (True, 1, 1)
    """

    def __init__(
        self, last: Mapping[str, int] | None = None, *, horizon_ms: int = DEDUPE_HORIZON_MS
    ) -> None:
        self.horizon_ms = horizon_ms
        self._last: dict[str, int] = dict(last or {})
        self._newest = max(self._last.values(), default=-1)

    def __len__(self) -> int:
        return len(self._last)

    def last(self, identity: str) -> int | None:
        """The newest time folded for ``identity`` (None: none remembered)."""
        return self._last.get(identity)

    def admit(self, identity: str, ts_ms: int) -> bool:
        """Whether the event of ``identity`` at ``ts_ms`` is new (then it is noted as
        folded) rather than a copy of one already folded."""
        last = self._last.get(identity)
        if last is not None and ts_ms <= last:
            return False
        self._last[identity] = ts_ms
        if ts_ms > self._newest:
            self._newest = ts_ms
        return True

    def note(self, newest: Mapping[str, int]) -> None:
        """Note each identity's newest folded time of a batch (keeps the larger)."""
        last = self._last
        for identity, ts_ms in newest.items():
            if ts_ms > last.get(identity, -1):
                last[identity] = ts_ms
                if ts_ms > self._newest:
                    self._newest = ts_ms

    def forget_gone(self) -> int:
        """Forget the identities gone for longer than the horizon; returns how many."""
        cutoff = self._newest - self.horizon_ms
        gone = [i for i, ts in self._last.items() if ts < cutoff]
        for identity in gone:
            del self._last[identity]
        return len(gone)


def copies(frame: pl.DataFrame, seen: Mapping[int, LastFolded]) -> pl.Series:
    """Which rows of ``frame`` (``partition``, ``container``, ``ts_ms`` columns, each
    partition's rows in offset order) are copies: not newer than the newest earlier row
    of their partition and container, nor than what ``seen`` folded for them.

    Examples
    --------
    >>> frame = pl.DataFrame({"partition": [0, 0, 0, 0], "container": ["a", "a", "b", "a"],
    ...                       "ts_ms": [5, 6, 1, 6]})
    >>> copies(frame, {0: LastFolded({"a": 5})}).to_list()
    [True, False, False, True]
    """
    keys = frame.select("partition", "container").unique()
    known = [(p, c, seen[p].last(c)) for p, c in keys.iter_rows() if p in seen]
    stored = pl.DataFrame(
        [(p, c, ts) for p, c, ts in known if ts is not None],
        schema={"partition": pl.Int64(), "container": pl.String(), "last_ts": pl.Int64()},
        orient="row",
    )
    before = pl.col("ts_ms").cum_max().shift(1).over("partition", "container")
    return (
        frame.lazy()
        .select("partition", "container", "ts_ms")
        .join(stored.lazy(), on=["partition", "container"], how="left", maintain_order="left")
        .select((pl.col("ts_ms") <= pl.max_horizontal(before, "last_ts")).fill_null(False))
        .collect()
        .to_series()
    )


def note_frame(frame: pl.DataFrame, seen: Mapping[int, LastFolded]) -> None:
    """Note the newest time of each (partition, container) of ``frame`` as folded (in
    the partitions ``seen`` holds).

    Examples
    --------
    >>> seen = {0: LastFolded({"a": 9})}
    >>> note_frame(pl.DataFrame({"partition": [0, 0, 1], "container": ["a", "b", "c"],
    ...                          "ts_ms": [5, 6, 7]}), seen)
    >>> seen[0].last("a"), seen[0].last("b"), 1 in seen
    (9, 6, False)
    """
    newest = frame.group_by("partition", "container").agg(pl.col("ts_ms").max())
    per_partition: dict[int, dict[str, int]] = {}
    for p, c, ts in newest.iter_rows():
        per_partition.setdefault(p, {})[c] = ts
    for p, last in per_partition.items():
        if p in seen:
            seen[p].note(last)
