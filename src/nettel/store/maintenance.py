"""Retention, compaction and vacuum of the store's tables (``samples`` and the windows).

One pass per table: delete whole ``date`` partitions older than the table's retention
(metadata-only), compact the small files of the remaining partitions with the table's
writer properties, and vacuum files no longer referenced, keeping a retention window so
that readers on an older snapshot never lose a file under them. None of it changes what
a reader sees: compaction is ``dataChange=false`` (invisible to readers and to the
change data feed the rollups read), retention removes only expired days.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deltalake import DeltaTable, WriterProperties
from deltalake.exceptions import TableNotFoundError

from nettel.store.minute import minute_schema, writer_properties

#: Default retention per table in days (None: forever), as in the issue.
DEFAULT_RETENTION_DAYS: Mapping[str, int | None] = {
    "samples": 2, "minute": 14, "hour": 400, "day": None,
}  # fmt: skip


@dataclass
class MaintenanceReport:
    """What one pass did to one table."""

    table: str
    partitions_deleted: int = 0
    files_before: int = 0
    files_after: int = 0
    files_vacuumed: int = 0


def maintain_table(
    uri: str,
    name: str,
    *,
    retention_days: int | None,
    today: dt.date | None = None,
    vacuum_retention_hours: int = 6,
    storage_options: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    writer_props: WriterProperties | None = None,
) -> MaintenanceReport:
    """Apply retention, compaction and vacuum to the table at ``uri``.

    ``writer_props``: the table's own (compaction rewrites files with them); default:
    the window tables' (``minute``, ``hour``, ``day``).
    """
    report = MaintenanceReport(table=name)
    say = progress or (lambda _msg: None)
    try:
        table = DeltaTable(uri, storage_options=storage_options)
    except TableNotFoundError:
        return report
    report.files_before = len(table.file_uris())
    if retention_days is not None:
        today = today or dt.datetime.now(dt.UTC).date()
        cutoff = (today - dt.timedelta(days=retention_days)).isoformat()
        expired = sorted({
            p["date"] for p in table.partitions() if p.get("date") and p["date"] < cutoff
        })  # fmt: skip
        for date in expired:
            say(f"{name}: deleting {date}")
            table.delete(f"date = '{date}'")
        report.partitions_deleted = len(expired)
    say(f"{name}: compacting")
    table.optimize.compact(writer_properties=writer_props or writer_properties(minute_schema()))
    say(f"{name}: vacuuming")
    removed = table.vacuum(
        retention_hours=vacuum_retention_hours, dry_run=False, enforce_retention_duration=False
    )
    report.files_vacuumed = len(removed)
    report.files_after = len(DeltaTable(uri, storage_options=storage_options).file_uris())
    return report
