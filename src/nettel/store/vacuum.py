"""Vacuum and log settings of a Delta table, shared by maintenance passes and by the
tables that bound themselves (``detect_state`` vacuums itself every few checkpoints).

Examples
--------
>>> import tempfile
>>> import polars as pl
>>> from deltalake import DeltaTable
>>> uri = tempfile.mkdtemp() + "/t"
>>> pl.DataFrame({"a": [1]}).write_delta(uri)
>>> table = DeltaTable(uri)
>>> ensure_properties(table, {"delta.deletedFileRetentionDuration": "interval 0 seconds"})
>>> pl.DataFrame({"a": [2]}).write_delta(uri, mode="overwrite")
>>> table = DeltaTable(uri)
>>> vacuum(table, uri, None), vacuum(table, uri, None)  # the second finds nothing
(1, 0)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from deltalake import DeltaTable

#: Per table URI, the files a vacuum of a remote table last deleted (a remote store
#: has no cheap existence check; they are listed again until their tombstones expire).
_VACUUMED: dict[str, frozenset[str]] = {}
_VACUUMED_LOCK = threading.Lock()


def ensure_properties(table: DeltaTable, wanted: Mapping[str, str]) -> None:
    """Set the table's log settings where they differ (one commit, the first time only)."""
    have = table.metadata().configuration
    missing = {k: v for k, v in wanted.items() if have.get(k) != v}
    if missing:
        table.alter.set_table_properties(missing)


def vacuum(table: DeltaTable, uri: str, retention_hours: int | None) -> int:
    """Delete files removed more than ``retention_hours`` ago (None: the table's own
    ``delta.deletedFileRetentionDuration``, which can be minutes); returns how many.

    Vacuum commits (start and end) even when the files it lists are long gone (it lists
    them until their tombstones expire), so it runs only when one of them still exists:
    a table with nothing to delete keeps its version.
    """
    listed = table.vacuum(retention_hours=retention_hours, dry_run=True,
                          enforce_retention_duration=False)  # fmt: skip
    if "://" not in uri or uri.startswith("file://"):
        root = uri.removeprefix("file://").rstrip("/")
        present = [f for f in listed if os.path.exists(f if f.startswith("/") else f"{root}/{f}")]
    else:
        with _VACUUMED_LOCK:
            present = [f for f in listed if f not in _VACUUMED.get(uri, frozenset())]
    if not present:
        return 0
    removed = table.vacuum(retention_hours=retention_hours, dry_run=False,
                           enforce_retention_duration=False)  # fmt: skip
    with _VACUUMED_LOCK:
        _VACUUMED[uri] = frozenset(listed) | frozenset(removed)
    return len(present)
