"""Retention, compaction and vacuum of every table nettel writes.

Each table has a :class:`TableRule` (:data:`TABLE_RULES`): how old rows go (whole
``date`` partitions, metadata-only; rows older than a column's cut-off; or never, for
``detect_state``, one row per partition), its Delta log and tombstone retention, and
how long vacuum keeps removed files. One pass per table: make sure the table's log
settings are set, delete what expired, compact small files with the table's writer
properties, and vacuum files no longer referenced, keeping a retention window so
that readers on an older snapshot never lose a file under them. A pass with nothing to
do commits nothing (an idle service's tables stay at their version). The window
tables' partitions (on local disk and on S3) are compacted by a rewrite into one file
each, in time order with hour-sized row groups and the rollups' partial rows merged
(:func:`rewrite_partitions`): what keeps queries fast. None of it changes what a reader
sees: compaction and rewrites are ``dataChange=false`` (invisible to readers and to the
change data feed the rollups read), retention removes only expired days.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import polars as pl
from deltalake import DeltaTable, WriterProperties
from deltalake._internal import DeltaFileSystemHandler
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction

from nettel.config import is_remote
from nettel.store.alerts import alerts_schema
from nettel.store.bands import (
    BANDS_RETENTION_DAYS,
    STATE_TABLE_CONFIGURATION,
    state_writer_properties,
)
from nettel.store.directory import DIRECTORY_RETENTION_DAYS
from nettel.store.minute import round_rates, writer_properties
from nettel.store.resources import RESOURCE_ROLLUP
from nettel.store.rollup import DAY_MS, HOUR_MS, NETWORK_ROLLUP, RollupSpec, rollup_frame
from nettel.store.vacuum import ensure_properties, vacuum

#: Window tables whose partitions maintenance rewrites into one ordered file, and the
#: period their partial rows are merged to (None: rows kept as they are).
LAYOUT_TABLES: Mapping[str, int | None] = {
    "minute": None, "hour": HOUR_MS, "day": DAY_MS,
    "resource_minute": None, "resource_hour": HOUR_MS, "resource_day": DAY_MS,
}  # fmt: skip
#: The columns of each window table and how its rows add up (the network tables' else).
WINDOW_SPECS: Mapping[str, RollupSpec] = dict.fromkeys(
    ("resource_minute", "resource_hour", "resource_day"), RESOURCE_ROLLUP
)
#: File-name prefix of a partition's rewritten file (one per partition after a rewrite).
LAYOUT_PREFIX = "sorted-"
#: Folder-name prefix of a rewrite's staging table (beside the table's files).
STAGING_PREFIX = "_nettel_rewrite_"
#: Rows are ordered by (hour, container, ts): row groups of about this many rows then
#: cover a few hours each, so a range's edges read a row group, not the whole day.
ROW_GROUP_ROWS = 32_768

#: Default retention per table in days (None: forever), as in the issue.
DEFAULT_RETENTION_DAYS: Mapping[str, int | None] = {
    "samples": 2, "minute": 14, "hour": 400, "day": None, "alerts": 90, "alert_feedback": 90,
    "reports_table": 400, "bands": BANDS_RETENTION_DAYS, "detect_state": None,
    "directory": DIRECTORY_RETENTION_DAYS,
    "resource_minute": 14, "resource_hour": 400, "resource_day": None,
}  # fmt: skip

#: Log settings of the data tables: a checkpoint every 100 commits, logs kept two days,
#: removed files six hours (what a slow reader's snapshot may still list).
DATA_TABLE_PROPERTIES: Mapping[str, str] = {
    "delta.checkpointInterval": "100",
    "delta.logRetentionDuration": "interval 2 days",
    "delta.deletedFileRetentionDuration": "interval 6 hours",
}


@dataclass(frozen=True)
class TableRule:
    """How maintenance keeps one table bounded.

    ``retention``: ``"partition"`` deletes whole ``date`` partitions before the cut-off;
    ``"column"`` deletes the rows whose ``column`` (a timestamp or a ``YYYY-MM-DD``
    string) is before it, or with ``group``, every row of a ``group`` value (e.g. a
    container) none of whose rows is newer; ``"none"``: the table replaces its rows
    itself (state). ``vacuum_retention_hours``: how long removed files are kept (None:
    the table's own ``delta.deletedFileRetentionDuration``, minutes for state tables).
    """

    retention: Literal["partition", "column", "none"]
    column: str = ""
    vacuum_retention_hours: int | None = 6
    properties: Mapping[str, str] = field(default_factory=lambda: dict(DATA_TABLE_PROPERTIES))
    group: str = ""


#: Every table nettel writes and how it is kept bounded. State tables (``detect_state``,
#: ``bands``, ``directory``) hold only what a restart or a reader needs now: their old
#: files are vacuumed after the minutes of their ``delta.deletedFileRetentionDuration``
#: (a reader's snapshot lives for seconds), their logs after an hour
#: (:data:`~nettel.store.bands.STATE_TABLE_CONFIGURATION`).
TABLE_RULES: Mapping[str, TableRule] = {
    "samples": TableRule("partition"),
    "minute": TableRule("partition"),
    "hour": TableRule("partition"),
    "day": TableRule("partition"),
    "alerts": TableRule("partition"),
    "alert_feedback": TableRule("column", "ts"),
    "reports_table": TableRule("column", "date"),
    # a container's constant slots never change: only a container gone as a whole goes
    "bands": TableRule("column", "updated", None, STATE_TABLE_CONFIGURATION, group="container"),
    "detect_state": TableRule("none", "", None, STATE_TABLE_CONFIGURATION),
    # one row per container, merged: a container unseen for the retention goes
    "directory": TableRule("column", "last_seen", None, STATE_TABLE_CONFIGURATION),
    "resource_minute": TableRule("partition"),
    "resource_hour": TableRule("partition"),
    "resource_day": TableRule("partition"),
    "health": TableRule("partition"),
}


@dataclass
class MaintenanceReport:
    """What one pass did to one table."""

    table: str
    partitions_deleted: int = 0
    files_before: int = 0
    files_after: int = 0
    files_vacuumed: int = 0
    partitions_rewritten: int = 0
    rows_deleted: int = 0


def maintain_table(
    uri: str,
    name: str,
    *,
    retention_days: int | None,
    today: dt.date | None = None,
    vacuum_retention_hours: int | None = None,
    storage_options: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    writer_props: WriterProperties | None = None,
    rule: TableRule | None = None,
) -> MaintenanceReport:
    """Apply retention, compaction and vacuum to the table at ``uri``.

    ``rule``: default :data:`TABLE_RULES` of ``name`` (else whole ``date`` partitions);
    ``vacuum_retention_hours`` overrides the rule's. ``writer_props``: the table's own
    (compaction rewrites files with them); default: the window tables' (``minute``,
    ``hour``, ``day``).
    """
    report = MaintenanceReport(table=name)
    say = progress or (lambda _msg: None)
    rule = rule or TABLE_RULES.get(name, TableRule("partition"))
    try:
        table = DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        return report
    report.files_before = len(table.file_uris())
    ensure_properties(table, rule.properties)
    if retention_days is not None and rule.retention != "none":
        today = today or dt.datetime.now(dt.UTC).date()
        cutoff = (today - dt.timedelta(days=retention_days)).isoformat()
        if rule.retention == "partition":
            expired = sorted({
                p["date"] for p in table.partitions() if p.get("date") and p["date"] < cutoff
            })  # fmt: skip
            for date in expired:
                say(f"{name}: deleting {date}")
                table.delete(f"date = '{date}'")
            report.partitions_deleted = len(expired)
        else:
            say(f"{name}: deleting rows before {cutoff}")
            report.rows_deleted = _delete_before(table, rule.column, cutoff, rule.group)
    say(f"{name}: compacting")
    if name in LAYOUT_TABLES:
        remove_stale_staging(uri.removeprefix("file://"))
        report.partitions_rewritten = rewrite_partitions(
            table, uri.removeprefix("file://"), name, storage_options
        )
    table.optimize.compact(writer_properties=writer_props or _writer_props(name))
    say(f"{name}: vacuuming")
    hours = vacuum_retention_hours
    report.files_vacuumed = vacuum(
        table, uri, rule.vacuum_retention_hours if hours is None else hours
    )
    table.cleanup_metadata()  # expired log files (no commit)
    report.files_after = len(DeltaTable(uri, storage_options=storage_options).file_uris())
    return report


def _writer_props(name: str) -> WriterProperties:
    """The writer properties compaction rewrites ``name``'s files with."""
    if name in ("bands", "detect_state", "directory"):
        return state_writer_properties()
    if name == "alerts":
        return writer_properties(alerts_schema())
    return writer_properties(WINDOW_SPECS.get(name, NETWORK_ROLLUP).schema())


def _delete_before(table: DeltaTable, column: str, cutoff: str, group: str = "") -> int:
    """Delete the rows whose ``column`` is before ``cutoff`` (a date) or, with ``group``,
    the rows of each ``group`` value whose newest ``column`` is; no commit when none."""
    frame = pl.scan_delta(table)
    is_text = frame.collect_schema()[column] == pl.String()
    start = dt.datetime.fromisoformat(cutoff).replace(tzinfo=dt.UTC)
    bound = pl.lit(cutoff) if is_text else pl.lit(start)
    literal = f"'{cutoff}'" if is_text else f"'{cutoff}T00:00:00Z'"
    if group:
        gone = (
            frame.group_by(group).agg(pl.col(column).max().alias("newest"))
            .filter(pl.col("newest") < bound).select(group).collect()[group].to_list()
        )  # fmt: skip
        if not gone:
            return 0
        names = ", ".join("'" + str(g).replace("'", "''") + "'" for g in gone)
        expired = frame.filter(pl.col(group).is_in(gone)).select(pl.len()).collect().item()
        table.delete(f"{group} IN ({names}) AND {column} < {literal}")
        return int(expired)
    expired = frame.filter(pl.col(column) < bound).select(pl.len()).collect().item()
    if not expired:
        return 0
    table.delete(f"{column} < {literal}")
    return int(expired)


def _stats(frame: pl.DataFrame) -> str:
    """Delta file statistics for the columns queries skip files by."""
    cols = ("container", "partition", "ts")

    def value(v: object) -> object:
        if isinstance(v, dt.datetime):
            return v.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        return v

    return json.dumps({
        "numRecords": frame.height,
        "minValues": {c: value(frame[c].min()) for c in cols},
        "maxValues": {c: value(frame[c].max()) for c in cols},
        "nullCount": {c: frame[c].null_count() for c in cols},
    })  # fmt: skip


#: A rewrite's staging folder older than this was left by a pass that died (a pass takes
#: seconds; vacuum skips ``_``-prefixed folders, so nothing else deletes it).
STALE_STAGING_S = 3600


def remove_stale_staging(path: str, *, older_than_s: float = STALE_STAGING_S) -> int:
    """Delete the ``_nettel_rewrite_*`` staging folders of a local table that were left
    by a rewrite that died (older than ``older_than_s``); how many. A remote table's
    are left (its store has no cheap listing here).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "_nettel_rewrite_0" / "date=x").mkdir(parents=True)
    >>> remove_stale_staging(str(root), older_than_s=0), list(root.iterdir())
    (1, [])
    """
    if is_remote(path):
        return 0
    cutoff = time.time() - older_than_s
    stale = [d for d in Path(path).glob(f"{STAGING_PREFIX}*")
             if d.is_dir() and d.stat().st_mtime <= cutoff]  # fmt: skip
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def rewrite_partitions(table: DeltaTable, path: str, name: str,
                       storage_options: dict[str, str] | None = None) -> int:  # fmt: skip
    """Rewrite each ``date`` partition of a window table (a local path or an ``s3://``
    URI) into one ordered file; returns the partitions rewritten.

    Rows go in (hour, container, ts) order with row groups of :data:`ROW_GROUP_ROWS`:
    sorted by container within each hour (runs that compress as well as the DESIGN's
    (container, ts) order) while a time range reads only the row groups of its hours;
    rates rounded as every writer stores them (:func:`~nettel.store.minute.round_rates`).
    Rollup tables (``hour``, ``day``) also merge the partial rows their rolls leave
    (one per roll: a day holds 288 per container) into one row per container,
    partition and period: readers add them up, so no answer changes.

    The new file is written beside the table (a staging table under it), moved into the
    partition and replaces the old ones in one ``dataChange=false`` commit, like
    compaction: invisible to the change data feed that rollups and queries read, and
    to readers (vacuum keeps the old files for snapshots that still list them). Files
    appended meanwhile are not in the commit and stay. A partition that already is
    one rewritten file is left alone.
    """
    period_ms = LAYOUT_TABLES[name]
    files = pl.DataFrame(table.get_add_actions(flatten=True))
    if not files.height:
        return 0
    spec = WINDOW_SPECS.get(name, NETWORK_ROLLUP)
    schema = spec.schema()
    props = writer_properties(schema)
    props.max_row_group_size = ROW_GROUP_ROWS
    store = DeltaFileSystemHandler(path, storage_options)
    done = 0
    for (date,), group in files.group_by("partition.date", maintain_order=True):
        paths = group["path"].to_list()
        if date is None or (
            len(paths) == 1 and paths[0].rsplit("/", 1)[-1].startswith(LAYOUT_PREFIX)
        ):
            continue  # fmt: skip
        # exactly the files the commit removes (not the newest snapshot: it may hold more)
        rows = (
            pl.scan_parquet([f"{path}/{unquote(p)}" for p in paths], hive_partitioning=True,
                            hive_schema={"date": pl.String()}, storage_options=storage_options)
            .select(list(schema)).collect()
        )  # fmt: skip
        if period_ms is not None:
            rows = rollup_frame(rows, period_ms, spec)
        hour = pl.col("ts").dt.truncate("1h")
        rows = round_rates(rows.sort(hour, "container", "ts"))
        staging = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        rel = f"date={date}/{LAYOUT_PREFIX}{uuid.uuid4().hex}.parquet"
        try:
            rows.write_delta(f"{path}/{staging}", mode="overwrite",
                             storage_options=storage_options, delta_write_options={
                                 "partition_by": ["date"], "writer_properties": props})  # fmt: skip
            written = pl.DataFrame(DeltaTable(f"{path}/{staging}", storage_options=storage_options)
                                   .get_add_actions(flatten=True))  # fmt: skip
            if written.height != 1:
                continue
            new_size = int(written["size_bytes"][0])
            store.move_file(f"{staging}/{unquote(written['path'][0])}", rel)
        finally:
            store.delete_dir(staging)
            if not is_remote(path):
                shutil.rmtree(f"{path}/{staging}", ignore_errors=True)  # empty folders stay
        now_ms = time.time_ns() // 1_000_000
        add = AddAction(rel, new_size, {"date": date}, now_ms, False, _stats(rows))
        removes = [RemoveAction(p, False, now_ms, size, {"date": date})
                   for p, size in group.select("path", "size_bytes").iter_rows()]  # fmt: skip
        try:
            table.create_write_transaction(
                [add, *removes], mode="append", schema=table.schema(), partition_by=["date"]
            )
        except CommitFailedError:
            store.delete_file(rel)  # a concurrent change: tried again next pass
            continue
        except BaseException:
            store.delete_file(rel)
            raise
        table.update_incremental()
        done += 1
    return done
