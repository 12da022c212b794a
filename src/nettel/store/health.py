"""The ``health`` table: container health events and per-minute dependency edges.

One row per :class:`~nettel.models.HealthRecord` read off the health topic, written
with each source partition's next offset as a Delta app transaction in the same commit
(the rule of ``alerts``): a worker that restarts resumes where the table ends, so no
record is lost or written twice. Partitioned by ``date`` and kept for
``NETTEL_RETENTION_HEALTH_DAYS`` by the maintenance pass (whole partitions), so it is
bounded. Events, edges (``edge``) and the edges' changes (``edge_new``,
``edge_gone``) share the table; readers filter on ``kind``.

Examples
--------
>>> from nettel.models import HealthRecord
>>> r = HealthRecord(ts_ms=60_000, host="h", kind="die", container="db", exit_code=137)
>>> health_rows_frame([(r, 0, 7)]).select("date", "kind", "container", "exit_code", "offset").row(0)
('1970-01-01', 'die', 'db', 137, 7)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import TableNotFoundError

from nettel.models import HealthRecord
from nettel.store.minute import writer_properties

_TS = pl.Datetime("us", "UTC")
#: The kinds of the dependency map's rows: its minutes and its changes.
EDGE_KINDS = ("edge", "edge_new", "edge_gone")


def health_schema() -> dict[str, pl.DataType]:
    """Columns of the ``health`` table, in order."""
    return {
        "date": pl.String(), "ts": _TS, "kind": pl.String(), "container": pl.String(),
        "container_id": pl.String(), "host": pl.String(), "status": pl.String(),
        "health": pl.String(), "restarts": pl.Int64(), "exit_code": pl.Int64(),
        "oom_killed": pl.Boolean(), "output": pl.String(), "server": pl.String(),
        "port": pl.Int64(), "connections": pl.Int64(), "samples": pl.Int64(),
        "first_seen": _TS, "last_seen": _TS, "partition": pl.Int64(), "offset": pl.Int64(),
    }  # fmt: skip


def _ts(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def health_rows_frame(rows: Sequence[tuple[HealthRecord, int, int]]) -> pl.DataFrame:
    """A ``health`` frame from (record, partition, offset) triples."""
    schema = health_schema()
    cols: dict[str, list[Any]] = {k: [] for k in schema}
    for r, partition, offset in rows:
        ts = _ts(r.ts_ms)
        cols["date"].append(ts.strftime("%Y-%m-%d"))
        cols["ts"].append(ts)
        edge = r.kind == "edge"
        cols["first_seen"].append(_ts(r.first_seen_ms) if edge else None)
        cols["last_seen"].append(_ts(r.last_seen_ms) if edge else None)
        cols["partition"].append(partition)
        cols["offset"].append(offset)
        for k in ("kind", "container", "container_id", "host", "status", "health", "restarts",
                  "exit_code", "oom_killed", "output"):  # fmt: skip
            cols[k].append(getattr(r, k))
        for k in ("server", "port", "connections", "samples"):
            cols[k].append(getattr(r, k) if r.kind in EDGE_KINDS else None)
    return pl.DataFrame(cols, schema=schema)


class HealthTable:
    """The ``health`` Delta table under ``uri``."""

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self._props = writer_properties(health_schema())

    @staticmethod
    def app_id(writer: str, topic: str, partition: int, epoch: int) -> str:
        """The app transaction id holding a partition's next offset.

        Examples
        --------
        >>> HealthTable.app_id("nettel-health", "nettel.health", 2, 1)
        'nettel-health/nettel.health/2/e1/health_next_offset'
        """
        return f"{writer}/{topic}/{partition}/e{epoch}/health_next_offset"

    def written_through(self, writer: str, topic: str, partitions: Sequence[int],
                        epoch: int) -> dict[int, int]:  # fmt: skip
        """Each partition's next offset not in the table (absent: none written)."""
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return {}
        out = {}
        for p in partitions:
            v = table.transaction_version(self.app_id(writer, topic, p, epoch))
            if v is not None:
                out[p] = int(v)
        return out

    def append(self, rows: Sequence[tuple[HealthRecord, int, int]], points: Mapping[int, int],
               *, writer: str, topic: str, epoch: int) -> None:  # fmt: skip
        """Append ``rows`` and each partition's next offset in one commit."""
        txns = [Transaction(self.app_id(writer, topic, p, epoch), o) for p, o in points.items()]
        health_rows_frame(rows).sort("container", "ts").write_delta(
            self.uri, mode="append", storage_options=self.storage_options,
            delta_write_options={
                "partition_by": ["date"], "writer_properties": self._props,
                "commit_properties": CommitProperties(app_transactions=txns),
            },
        )  # fmt: skip

    def _scan(self, since_ms: int, kinds: Sequence[str] | None, edges: bool) -> pl.DataFrame:
        try:
            snapshot = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return pl.DataFrame(schema=health_schema())
        since = _ts(since_ms)
        frame = pl.scan_delta(snapshot).filter(
            (pl.col("date") >= since.strftime("%Y-%m-%d")) & (pl.col("ts") >= since)
        )
        kind = pl.col("kind")
        if kinds is not None:  # these kinds only
            return frame.filter(kind.is_in(list(kinds))).collect()
        return frame.filter(kind == "edge" if edges else ~kind.is_in(EDGE_KINDS)).collect()

    def events(self, since_ms: int, kinds: Sequence[str] | None = None) -> pl.DataFrame:
        """Health events (no edge kinds) at or after ``since_ms``, oldest first."""
        return self._scan(since_ms, kinds, edges=False).sort("ts", "container", "offset")

    def dependency_changes(self, since_ms: int) -> pl.DataFrame:
        """Edges that appeared (``edge_new``) or vanished (``edge_gone``) at or after
        ``since_ms``, oldest first: ``kind``, ``ts``, ``container`` (the client),
        ``server``, ``port``."""
        changes = self._scan(since_ms, ["edge_new", "edge_gone"], edges=False)
        return changes.sort("ts", "container", "offset").select("kind", "ts", "container",
                                                                "server", "port")  # fmt: skip

    def edges(self, since_ms: int) -> pl.DataFrame:
        """Dependency edges seen since ``since_ms``, one row per (client, server, port):
        ``connections`` (the most at once in a minute), ``minutes`` seen, ``first_seen``,
        ``last_seen``; busiest first."""
        frame = self._scan(since_ms, None, edges=True)
        return (
            frame.group_by("container", "server", "port")
            .agg(pl.col("connections").max(), pl.col("ts").n_unique().alias("minutes"),
                 pl.col("first_seen").min(), pl.col("last_seen").max())
            .rename({"container": "client"})
            .sort(["connections", "client", "server", "port"],
                  descending=[True, False, False, False])
        )  # fmt: skip

    def summary(self, since_ms: int) -> pl.DataFrame:
        """Each container's health from its events since ``since_ms``: ``state`` and
        ``health`` of its latest event, ``since`` (when that pair began), ``restarts``
        (the engine's count), ``starts`` seen, the last healthcheck ``output`` and its
        last exit (``exit_code``, ``exited``, ``oom_killed``).

        Examples
        --------
        >>> import tempfile
        >>> from nettel.models import HealthRecord as R
        >>> t = HealthTable(tempfile.mkdtemp() + "/health")
        >>> rows = [R(ts_ms=1000, host="h", kind="start", container="db", status="running"),
        ...         R(ts_ms=5000, host="h", kind="die", container="db", status="exited",
        ...           exit_code=137),
        ...         R(ts_ms=9000, host="h", kind="start", container="db", status="running",
        ...           restarts=1)]
        >>> t.append([(r, 0, i) for i, r in enumerate(rows)], {0: 3}, writer="w",
        ...          topic="t", epoch=0)
        >>> s = t.summary(0).row(0, named=True)
        >>> s["state"], s["since"].second, s["restarts"], s["starts"], s["exit_code"]
        ('running', 9, 1, 2, 137)
        """
        events = self.events(since_ms)
        pair = pl.concat_str("status", "health", separator="/")
        changed = (pair != pair.shift(1).over("container")).fill_null(True)
        ranked = events.with_columns(run=changed.cast(pl.Int64).cum_sum().over("container"))
        exits = (
            ranked.filter(kind="die").group_by("container")
            .agg(pl.col("exit_code").last(), pl.col("ts").last().alias("exited"),
                 pl.col("oom_killed").last())
        )  # fmt: skip
        last = ranked.group_by("container", maintain_order=True).agg(
            pl.col("container_id").last(), pl.col("status").last().alias("state"),
            pl.col("health").last(),
            pl.col("ts").filter(pl.col("run") == pl.col("run").max()).min().alias("since"),
            pl.col("restarts").last(), (pl.col("kind") == "start").sum().alias("starts"),
            pl.col("output").filter(pl.col("output") != "").last(),
            pl.col("kind").last().alias("last_event"), pl.col("ts").last().alias("updated"),
        )  # fmt: skip
        return last.join(exits, on="container", how="left").sort("container")

    def newest_ms(self, since_ms: int) -> int | None:
        """When the newest record at or after ``since_ms`` was observed (None: none)."""
        frame = self._scan(since_ms, None, edges=False)
        edges = self._scan(since_ms, None, edges=True)
        stamps = [*frame["ts"].to_list(), *edges["last_seen"].to_list()]
        newest = max((t for t in stamps if t is not None), default=None)
        return None if newest is None else int(newest.timestamp() * 1000)
