"""The detector's tables: ``alerts`` (every alert version), ``alert_feedback`` and
``detect_state`` (each partition's models, as a typed checkpoint blob, with the offset
they have consumed).

``alerts`` gets one row per published alert version (open, update, resolved), written
with each source partition's next offset as a Delta app transaction in the same commit,
so a detector that restarts from an older checkpoint and regenerates the same alerts
(same ids) writes none of them twice. Readers take the latest version per id
(:meth:`AlertTable.latest`). An alert is an incident: ``metric``, ``peak`` and the band
columns are those of the metric that named it; ``metrics`` (a list of structs, see
:func:`metric_evidence_schema`) holds every metric of the incident with its own peak
and band, so the per-metric evidence stays queryable (``explode("metrics")``).
``direction``, ``metrics`` and ``time_to_limit_s`` (a memory leak's forecast) were
added to the schema later: rows written before are read with them null.
``detect_state`` holds one row per partition, replaced in one commit at each checkpoint
that changed it. ``alert_feedback`` is the one table the MCP server
writes (``mark_alert``); the detector reads it to widen bands.

Rows are plain mappings (the :class:`~nettel.detect.alerts.Alert` record's fields): the
store does not import the detector.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import TableNotFoundError

from nettel.store.bands import STATE_TABLE_CONFIGURATION, state_writer_properties
from nettel.store.minute import writer_properties
from nettel.store.vacuum import ensure_properties, vacuum

_TS = pl.Datetime("us", "UTC")


def alerts_schema() -> dict[str, pl.DataType]:
    """Columns of the ``alerts`` table, in order.

    Examples
    --------
    >>> list(alerts_schema())[:5]
    ['date', 'id', 'status', 'container', 'metric']
    """
    return {
        "date": pl.String(), "id": pl.String(), "status": pl.String(),
        "container": pl.String(), "metric": pl.String(), "rule": pl.String(),
        "host": pl.String(), "container_id": pl.String(), "started": _TS, "updated": _TS,
        "resolved": _TS, "observed": pl.Float64(), "peak": pl.Float64(),
        "expected": pl.Float64(), "band_low": pl.Float64(), "band_high": pl.Float64(),
        "band_basis": pl.String(), "score": pl.Float64(), "severity": pl.String(),
        "related": pl.String(), "restarts": pl.Int64(), "explanation": pl.String(),
        "partition": pl.Int64(), "offset": pl.Int64(),
        "direction": pl.String(), "metrics": pl.List(pl.Struct(metric_evidence_schema())),
        "time_to_limit_s": pl.Float64(),
    }  # fmt: skip


def metric_evidence_schema() -> dict[str, pl.DataType]:
    """Fields of each entry of ``metrics``: one metric of an incident, with its own
    direction, first anomalous sample, peak (at ``peak_at``) and the band it broke.

    Examples
    --------
    >>> list(metric_evidence_schema())[:4]
    ['metric', 'direction', 'started', 'peak_at']
    """
    return {
        "metric": pl.String(), "direction": pl.String(), "started": _TS, "peak_at": _TS,
        "peak": pl.Float64(), "expected": pl.Float64(), "band_low": pl.Float64(),
        "band_high": pl.Float64(), "band_basis": pl.String(), "observed": pl.Float64(),
        "score": pl.Float64(),
    }  # fmt: skip


def _ms(ts: dt.datetime) -> int:
    return round(ts.timestamp() * 1000)


def _ts(ms: int | None) -> dt.datetime | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def alert_rows_frame(rows: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """An ``alerts`` frame from alert fields plus ``partition`` and ``offset``."""
    schema = alerts_schema()
    cols: dict[str, list[Any]] = {k: [] for k in schema}
    for r in rows:
        updated = _ts(r["updated_ms"])
        assert updated is not None
        cols["date"].append(updated.strftime("%Y-%m-%d"))
        cols["container"].append(r["identity"])
        cols["started"].append(_ts(r["started_ms"]))
        cols["updated"].append(updated)
        cols["resolved"].append(_ts(r.get("resolved_ms")))
        cols["related"].append(json.dumps(r.get("related") or {}, sort_keys=True))
        cols["metrics"].append([_evidence_row(m) for m in r.get("metrics") or ()])
        for k in ("id", "status", "metric", "rule", "host", "container_id", "observed", "peak",
                  "expected", "band_low", "band_high", "band_basis", "score", "severity",
                  "restarts", "explanation", "partition", "offset", "direction",
                  "time_to_limit_s"):  # fmt: skip
            cols[k].append(r.get(k))
    return pl.DataFrame(cols, schema=schema)


def _evidence_row(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in metric_evidence_schema() if k not in ("started", "peak_at")} | {
        "started": _ts(m["started_ms"]), "peak_at": _ts(m["peak_ms"])}  # fmt: skip


class AlertTable:
    """The ``alerts`` Delta table under ``uri``."""

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self._props = writer_properties(alerts_schema())
        self._schema_current = False

    @staticmethod
    def app_id(writer: str, topic: str, partition: int, epoch: int) -> str:
        """The app transaction id holding a partition's next offset.

        Examples
        --------
        >>> AlertTable.app_id("nettel-detect", "nettel.stats", 2, 1)
        'nettel-detect/nettel.stats/2/e1/alerts_next_offset'
        """
        return f"{writer}/{topic}/{partition}/e{epoch}/alerts_next_offset"

    def written_through(self, writer: str, topic: str, partition: int, epoch: int) -> int:
        """The next source offset of ``partition`` whose alerts are not written (0: none)."""
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return 0
        v = table.transaction_version(self.app_id(writer, topic, partition, epoch))
        return 0 if v is None else int(v)

    def append(self, rows: Sequence[Mapping[str, Any]], points: Mapping[int, int], *,
               writer: str, topic: str, epoch: int) -> None:  # fmt: skip
        """Append ``rows`` and each partition's next offset in one commit."""
        txns = [Transaction(self.app_id(writer, topic, p, epoch), o) for p, o in points.items()]
        # a table written before incidents lacks direction and metrics: add them once
        merge = {} if self._has_current_schema() else {"schema_mode": "merge"}
        alert_rows_frame(rows).write_delta(
            self.uri, mode="append", storage_options=self.storage_options,
            delta_write_options={
                "partition_by": ["date"], "writer_properties": self._props,
                "commit_properties": CommitProperties(app_transactions=txns),
            } | merge,
        )  # fmt: skip

    def append_unwritten(
        self, cut: Mapping[int, tuple[Sequence[Mapping[str, Any]], int]], *, writer: str,
        topic: str, epoch: int,
    ) -> int:  # fmt: skip
        """Append the rows of ``cut`` (per source partition: its alert rows, each with
        the ``offset`` of its event, and the partition's next offset) that the table does
        not hold yet (an event at or past the partition's stored next offset), with the
        next offsets, in one commit; none when there is no such row. How many it wrote."""
        rows: list[Mapping[str, Any]] = []
        for p, (pending, _) in cut.items():
            through = self.written_through(writer, topic, p, epoch)
            rows += [r for r in pending if r["offset"] >= through]
        if rows:
            points = {p: next_offset for p, (_, next_offset) in cut.items()}
            self.append(rows, points, writer=writer, topic=topic, epoch=epoch)
        return len(rows)

    def still_open(self, rules: Collection[str], partitions: Collection[int],
                   since_ms: int) -> list[dict[str, Any]]:  # fmt: skip
        """The latest versions, not resolved, of the alerts of ``rules`` raised from
        ``partitions`` and updated since ``since_ms``, as alert fields (``*_ms`` times;
        without ``metrics``) with their ``partition`` and ``offset``."""
        rows = self.latest(since_ms).filter(
            pl.col("rule").is_in(list(rules)) & pl.col("partition").is_in(list(partitions))
            & (pl.col("status") != "resolved")
        )  # fmt: skip
        out = []
        for r in rows.iter_rows(named=True):
            fields = {k: v for k, v in r.items() if k not in ("date", "container", "started",
                      "updated", "resolved", "related", "metrics")}  # fmt: skip
            out.append(fields | {
                "identity": r["container"], "related": json.loads(r["related"] or "{}"),
                "started_ms": _ms(r["started"]), "updated_ms": _ms(r["updated"]),
                "direction": r["direction"] or "spike",
            })  # fmt: skip
        return out

    def _has_current_schema(self) -> bool:
        if not self._schema_current:
            try:
                table = DeltaTable(self.uri, storage_options=self.storage_options)
            except TableNotFoundError:
                return True  # the first write creates it with every column
            names = {f.name for f in table.schema().fields}
            self._schema_current = set(alerts_schema()) <= names
        return self._schema_current

    def latest(self, since_ms: int | None = None) -> pl.DataFrame:
        """The latest version of every alert (updated at or after ``since_ms``), newest first."""
        try:
            snapshot = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return pl.DataFrame(schema=alerts_schema())
        frame = pl.scan_delta(snapshot)
        if since_ms is not None:
            lo = _ts(since_ms - 7 * 86_400_000)  # an alert updated since started before
            frame = frame.filter(pl.col("started") >= pl.lit(lo))
        rank = pl.col("status").replace_strict({"open": 0, "update": 1, "resolved": 2},
                                               default=1, return_dtype=pl.Int64)  # fmt: skip
        out = (
            frame.with_columns(_rank=rank)
            .sort("id", "updated", "_rank")
            .group_by("id", maintain_order=True)
            .last()
            .drop("_rank")
        )
        if since_ms is not None:
            out = out.filter(pl.col("updated") >= pl.lit(_ts(since_ms)))
        return out.sort("updated", "id", descending=[True, False]).collect()


def feedback_schema() -> dict[str, pl.DataType]:
    """Columns of ``alert_feedback``."""
    return {"id": pl.String(), "verdict": pl.String(), "note": pl.String(), "ts": _TS,
            "container": pl.String(), "metric": pl.String(), "started": _TS,
            "peak": pl.Float64()}  # fmt: skip


class FeedbackTable:
    """``alert_feedback``: verdicts on alerts, appended by ``mark_alert``."""

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options

    def append(self, alert_id: str, verdict: str, note: str, *, container: str, metric: str,
               started_ms: int, peak: float, now_ms: int) -> None:  # fmt: skip
        """Record one verdict."""
        pl.DataFrame(
            {"id": [alert_id], "verdict": [verdict], "note": [note], "ts": [_ts(now_ms)],
             "container": [container], "metric": [metric], "started": [_ts(started_ms)],
             "peak": [peak]},
            schema=feedback_schema(),
        ).write_delta(self.uri, mode="append", storage_options=self.storage_options)  # fmt: skip

    def version(self) -> int:
        """The table's latest version (-1: no table)."""
        try:
            return DeltaTable(self.uri, storage_options=self.storage_options).version()
        except TableNotFoundError:
            return -1

    def rows(self) -> pl.DataFrame:
        """Every verdict, oldest first."""
        try:
            return pl.read_delta(self.uri, storage_options=self.storage_options).sort("ts")
        except (TableNotFoundError, FileNotFoundError, OSError):
            return pl.DataFrame(schema=feedback_schema())


@dataclass(frozen=True, slots=True)
class DetectState:
    """One partition's checkpoint: models (a :mod:`nettel.detect.checkpoint` blob), where
    to resume, and where alerts were."""

    partition: int
    epoch: int
    next_offset: int
    alerts_offset: int
    feedback_version: int
    blob: bytes


def detect_state_schema() -> dict[str, pl.DataType]:
    """Columns of ``detect_state``."""
    return {"partition": pl.Int64(), "epoch": pl.Int64(), "next_offset": pl.Int64(),
            "alerts_offset": pl.Int64(), "feedback_version": pl.Int64(),
            "blob": pl.Binary()}  # fmt: skip


class DetectStateTable:
    """``detect_state``: one row per partition, replaced when that partition's state
    changed (what a restart needs, nothing more).

    Partitioned by ``partition``: a checkpoint rewrites only the files of the partitions
    it saves, and two workers (owning different partitions) never rewrite the same
    file. Its replaced files go at a vacuum (:meth:`vacuum`: the detector's, every few
    checkpoints, and maintenance's) once older than the table's
    ``delta.deletedFileRetentionDuration``, minutes
    (:data:`~nettel.store.bands.STATE_TABLE_CONFIGURATION`). A table of the earlier
    layout (one file for every partition) is replaced whole at the first save.
    """

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options

    def vacuum(self) -> int:
        """Delete the files replaced more than the table's retention ago, and its expired
        logs; how many files went. A table with none to delete commits nothing; one with
        the log settings of an earlier version gets the current ones (one commit)."""
        try:
            table = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return 0
        ensure_properties(table, STATE_TABLE_CONFIGURATION)
        removed = vacuum(table, self.uri, None)
        table.cleanup_metadata()
        return removed

    def save(self, states: Sequence[DetectState]) -> None:
        """Replace the rows of ``states``' partitions in one commit (none: no commit)."""
        if not states:
            return
        frame = pl.DataFrame(
            {k: [getattr(s, k) for s in states] for k in detect_state_schema()},
            schema=detect_state_schema(),
        )
        parts = ", ".join(str(s.partition) for s in states)
        try:
            table: DeltaTable | None = DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            table = None
        options: dict[str, Any] = {"partition_by": ["partition"],
                                   "writer_properties": state_writer_properties()}  # fmt: skip
        if table is None:
            options["configuration"] = STATE_TABLE_CONFIGURATION
        elif table.metadata().partition_columns != ["partition"]:
            options["schema_mode"] = "overwrite"  # the earlier layout: replaced whole
            options["configuration"] = STATE_TABLE_CONFIGURATION
        else:
            options["predicate"] = f"partition IN ({parts})"
        frame.write_delta(self.uri, mode="append" if table is None else "overwrite",
                          storage_options=self.storage_options,
                          delta_write_options=options)  # fmt: skip

    def version(self) -> int:
        """The table's latest version (-1: no table)."""
        try:
            return DeltaTable(self.uri, storage_options=self.storage_options).version()
        except TableNotFoundError:
            return -1

    def load(self, partitions: Sequence[int]) -> dict[int, DetectState]:
        """The stored state of each partition that has one."""
        try:
            frame = pl.read_delta(self.uri, storage_options=self.storage_options)
        except (TableNotFoundError, FileNotFoundError, OSError):
            return {}
        wanted = set(partitions)
        return {r["partition"]: DetectState(**r) for r in frame.iter_rows(named=True)
                if r["partition"] in wanted}  # fmt: skip
