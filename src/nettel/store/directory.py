"""``directory``: every container the stream worker has seen, one small row each.

The MCP tools resolve a name (container name, compose service or project, identity, id
prefix) and list containers from this table instead of scanning every window row of
all time. One row per container: its identity, ``name``, ``container_id``, ``image``,
``compose_project``, ``compose_service``, ``host``, the Kafka ``partition`` its events
come from, and ``first_seen``/``last_seen`` (start of its first window, end of its last).

The stream worker feeds it at every flush with the windows it has just written
(:meth:`ContainerDirectory.record`) and writes only what changed: a new container, a
new name or id (a re-created container), a ``last_seen`` that moved by
:data:`REFRESH_MS` (an hour) since written, or a container gone quiet (no window for
:data:`QUIET_MS`, by the newest window or the wall clock, whichever is later) whose
last window is not written yet.
So the table gets a commit when the set of containers or their names change, and at
most one an hour per partition otherwise; ``last_seen`` is exact for a container that
went quiet and at most an hour old for one still sending (the query's own recent rows
say more). Rows are merged (upserted) on ``(partition, container)``: the earliest
``first_seen`` and the latest ``last_seen`` win, and the identity fields of the latest
observation, so two workers (or one after a restart) never move a row backwards. The
table is partitioned by ``partition``: each worker rewrites only the partitions it owns.
Maintenance drops the rows of containers not seen for :data:`DIRECTORY_RETENTION_DAYS`.

Readers (:meth:`ContainerDirectory.entries`) keep the rows in memory and reload them
when the table has a new version, checking at most every ``max_age_s``.

Examples
--------
>>> import tempfile
>>> directory = ContainerDirectory(tempfile.mkdtemp() + "/directory")
>>> web = DirectoryEntry(partition=0, container="shop/web", name="shop-web-1", container_id="ab12",
...                image="nginx", compose_project="shop", compose_service="web", host="h",
...                first_seen_ms=0, last_seen_ms=60_000)
>>> directory.observe([web])
>>> directory.write()
1
>>> directory.observe([web._replace(first_seen_ms=60_000, last_seen_ms=120_000)])
>>> directory.write()  # last_seen moved by a minute only: nothing to write
0
>>> [(e.container, e.name, e.first_seen_ms) for e in directory.entries(max_age_s=0)]
[('shop/web', 'shop-web-1', 0)]
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import polars as pl
import structlog
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from nettel.store.bands import STATE_TABLE_CONFIGURATION, state_writer_properties

if TYPE_CHECKING:
    from nettel.models import WindowAggregate

log = structlog.get_logger(__name__)

#: A container still sending gets its ``last_seen`` written at most this often.
REFRESH_MS: Final = 3_600_000
#: A container without a window for this long (event time) has gone quiet: its last
#: window's end is written then.
QUIET_MS: Final = 5 * 60_000
#: Rows of containers not seen for this many days are dropped by maintenance.
DIRECTORY_RETENTION_DAYS: Final = 400
#: The identity fields a row carries (besides the container's identity itself).
IDENTITY_FIELDS: Final = ("name", "container_id", "image", "compose_project",
                          "compose_service", "host")  # fmt: skip
_TS = pl.Datetime("us", "UTC")


def directory_schema() -> dict[str, pl.DataType]:
    """Columns of the ``directory`` table.

    Examples
    --------
    >>> list(directory_schema())[:3]
    ['partition', 'container', 'name']
    """
    return {"partition": pl.Int64(), "container": pl.String(),
            **{f: pl.String() for f in IDENTITY_FIELDS},
            "first_seen": _TS, "last_seen": _TS}  # fmt: skip


class DirectoryEntry(NamedTuple):
    """One container: its identity fields, the Kafka partition its events come from, and
    the span it was seen (start of its first window, end of its last; ms since the epoch).
    Also what a batch of windows says of a container (:func:`sightings`)."""

    partition: int
    container: str
    name: str
    container_id: str
    image: str
    compose_project: str
    compose_service: str
    host: str
    first_seen_ms: int
    last_seen_ms: int


def sightings(rows: Iterable[WindowAggregate]) -> list[DirectoryEntry]:
    """One entry per container of ``rows`` (window aggregates), the identity
    fields of its latest window.

    Examples
    --------
    >>> from nettel.models import WindowAggregate
    >>> old = WindowAggregate("web", 0, 60_000, "h", "id1", "web-1", "img", "", "", partition=2)
    >>> new = WindowAggregate("web", 120_000, 60_000, "h", "id2", "web-1", "img", "", "",
    ...                       partition=2)
    >>> s = sightings([new, old])[0]
    >>> s.container_id, s.first_seen_ms, s.last_seen_ms
    ('id2', 0, 180000)
    """
    seen: dict[str, DirectoryEntry] = {}
    for r in rows:
        end = r.window_start_ms + r.window_ms
        old = seen.get(r.identity)
        if old is None or end >= old.last_seen_ms:  # the latest window names the container
            first = r.window_start_ms if old is None else min(old.first_seen_ms, r.window_start_ms)
            seen[r.identity] = DirectoryEntry(
                r.partition, r.identity, r.name, r.container_id, r.image, r.compose_project,
                r.compose_service, r.host, first, end,
            )  # fmt: skip
        elif r.window_start_ms < old.first_seen_ms:
            seen[r.identity] = old._replace(first_seen_ms=r.window_start_ms)
    return list(seen.values())


def frame_sightings(frame: pl.DataFrame) -> list[DirectoryEntry]:
    """One entry per container of a window frame (the ``minute`` schema)."""
    if not frame.height:
        return []
    grouped = (
        frame.sort("ts")
        .group_by("container")
        .agg(pl.col("partition").last(), *(pl.col(f).last() for f in IDENTITY_FIELDS),
             pl.col("ts").min().dt.epoch("ms").alias("first_seen_ms"),
             (pl.col("ts").dt.epoch("ms") + pl.col("window_ms")).max().alias("last_seen_ms"))
    )  # fmt: skip
    return [
        _entry(r, r["first_seen_ms"], r["last_seen_ms"])
        for r in grouped.iter_rows(named=True)
    ]  # fmt: skip


def _entry(row: dict[str, Any], first_ms: int, last_ms: int) -> DirectoryEntry:
    """A directory entry from a row with the identity columns."""
    return DirectoryEntry(partition=row["partition"], container=row["container"],
                          first_seen_ms=first_ms, last_seen_ms=last_ms,
                          **{f: row[f] or "" for f in IDENTITY_FIELDS})  # fmt: skip


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


class ContainerDirectory:
    """The ``directory`` Delta table under ``uri``: written by the stream worker
    (:meth:`record`), read by the MCP tools (:meth:`entries`)."""

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None,
                 refresh_ms: int = REFRESH_MS, quiet_ms: int = QUIET_MS) -> None:  # fmt: skip
        self.uri = uri
        self.storage_options = storage_options
        self.refresh_ms = refresh_ms
        self.quiet_ms = quiet_ms
        self._seen: dict[str, DirectoryEntry] = {}  # what this writer observed
        self._written: dict[str, DirectoryEntry] = {}  # what it last wrote
        self._clock_ms = 0  # the newest window end observed (event time)
        self._snapshot: DeltaTable | None = None
        self._entries: list[DirectoryEntry] = []
        self._loaded_version = -1
        self._checked = 0.0
        self._reading = threading.Lock()

    # -- writer --------------------------------------------------------------------

    def observe(self, seen: Iterable[DirectoryEntry]) -> None:
        """Fold sightings into what this writer knows (memory only)."""
        for s in seen:
            old = self._seen.get(s.container)
            if old is not None:
                newer = s if s.last_seen_ms >= old.last_seen_ms else old
                s = newer._replace(first_seen_ms=min(s.first_seen_ms, old.first_seen_ms),
                                   last_seen_ms=max(s.last_seen_ms, old.last_seen_ms))  # fmt: skip
            self._seen[s.container] = s
            self._clock_ms = max(self._clock_ms, s.last_seen_ms)

    def pending(self, now_ms: int = 0) -> list[DirectoryEntry]:
        """The sightings the table lacks (see the module docstring); ``now_ms``: the wall
        clock, when it is ahead of the newest window (a container gone quiet)."""
        clock = max(self._clock_ms, now_ms)
        out = []
        for c, s in self._seen.items():
            w = self._written.get(c)
            if (
                w is None
                or s[:8] != w[:8]
                or s.first_seen_ms < w.first_seen_ms
                or s.last_seen_ms - w.last_seen_ms >= self.refresh_ms
                or (s.last_seen_ms != w.last_seen_ms and clock - s.last_seen_ms >= self.quiet_ms)
            ):
                out.append(s)
        return out

    def write(self, now_ms: int = 0) -> int:
        """Upsert the pending rows in one commit; how many (0: nothing committed)."""
        rows = self.pending(now_ms)
        if not rows:
            return 0
        frame = pl.DataFrame(
            [(*s[:8], dt.datetime.fromtimestamp(s.first_seen_ms / 1000, dt.UTC),
              dt.datetime.fromtimestamp(s.last_seen_ms / 1000, dt.UTC)) for s in rows],
            schema=directory_schema(), orient="row",
        )  # fmt: skip
        self._upsert(frame)
        self._written.update((s.container, s) for s in rows)
        return len(rows)

    def record(self, rows: Sequence[WindowAggregate]) -> int:
        """Observe a flush's windows and write what changed; a failure is logged (the
        rows stay pending for the next flush) and never fails the flush."""
        try:
            self.observe(sightings(rows))
            return self.write(time.time_ns() // 1_000_000)
        except Exception as e:  # the directory is derived data: the windows are written
            log.warning("directory_write_failed", table=self.uri, error=repr(e)[:300])
            return 0

    def _upsert(self, frame: pl.DataFrame) -> None:
        props = state_writer_properties()
        newer = "s.last_seen >= t.last_seen"
        updates = {f: f"CASE WHEN {newer} THEN s.{f} ELSE t.{f} END" for f in IDENTITY_FIELDS}
        updates["first_seen"] = (
            "CASE WHEN s.first_seen < t.first_seen THEN s.first_seen ELSE t.first_seen END"
        )
        updates["last_seen"] = f"CASE WHEN {newer} THEN s.last_seen ELSE t.last_seen END"
        parts = ", ".join(str(p) for p in sorted(set(frame["partition"].to_list())))
        for attempt in range(5):
            try:
                if self._table() is None:
                    frame.write_delta(self.uri, mode="append",
                                      storage_options=self.storage_options,
                                      delta_write_options={
                                          "partition_by": ["partition"],
                                          "configuration": STATE_TABLE_CONFIGURATION,
                                          "writer_properties": props})  # fmt: skip
                    return
                frame.write_delta(
                    self.uri, mode="merge", storage_options=self.storage_options,
                    delta_merge_options={
                        "predicate": f"t.partition IN ({parts}) AND t.partition = s.partition "
                        "AND t.container = s.container",
                        "source_alias": "s", "target_alias": "t", "writer_properties": props,
                    },
                ).when_matched_update(updates).when_not_matched_insert_all().execute()  # fmt: skip
                return
            except CommitFailedError:  # a concurrent change (maintenance): again
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _table(self) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return None

    # -- reader --------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the table has been written."""
        return self._snapshot is not None or self._table() is not None

    def entries(self, *, max_age_s: float = 2.0) -> list[DirectoryEntry]:
        """Every container of the table, by identity (kept in memory; reloaded when the
        table has a new version, checked at most every ``max_age_s``). Empty when there
        is no table."""
        with self._reading:  # the server's tool calls run in several threads
            return self._entries_locked(max_age_s)

    def _entries_locked(self, max_age_s: float) -> list[DirectoryEntry]:
        now = time.monotonic()
        if now - self._checked < max_age_s and self._loaded_version >= 0:
            return self._entries
        self._checked = now
        try:
            if self._snapshot is None:
                self._snapshot = DeltaTable(self.uri, storage_options=self.storage_options)
            else:
                self._snapshot.update_incremental()
        except (TableNotFoundError, FileNotFoundError, OSError):
            self._snapshot = None
            return []
        version = self._snapshot.version()
        if version != self._loaded_version:
            rows = pl.scan_delta(self._snapshot).sort("container").collect()
            self._entries = [
                _entry(r, _ms(r["first_seen"]), _ms(r["last_seen"]))
                for r in rows.iter_rows(named=True)
            ]  # fmt: skip
            self._loaded_version = version
        return self._entries
