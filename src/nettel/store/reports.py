"""The ``reports`` table: one row per report day, its JSON and Markdown.

A day written again replaces its row (overwrite with a ``date`` predicate), so a
re-run of the same day leaves one row. Readers get the latest row of a day.

Examples
--------
>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> t = ReportsTable(d + "/reports")
>>> t.read("2026-11-25") is None
True
>>> t.write("2026-11-25", "UTC", 1, "ok", b'{"a": 1}', "# r")
>>> t.write("2026-11-25", "UTC", 2, "ok", b'{"a": 2}', "# r")
>>> t.read("2026-11-25")
b'{"a": 2}'
>>> t.dates(), t.read_many(["2026-11-25", "2026-11-26"])
(['2026-11-25'], {'2026-11-25': b'{"a": 2}'})
>>> import shutil; shutil.rmtree(d)
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import polars as pl
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError


def reports_schema() -> dict[str, pl.DataType]:
    """Columns of the ``reports`` table, in order."""
    return {
        "date": pl.String(),
        "timezone": pl.String(),
        "generated": pl.Datetime("us", "UTC"),
        "status": pl.String(),
        "json": pl.String(),
        "markdown": pl.String(),
    }


class ReportsTable:
    """Daily reports under ``uri`` (a Delta table, created on first write)."""

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options

    def write(
        self,
        date: str,
        timezone: str,
        generated_ms: int,
        status: str,
        report_json: bytes,
        markdown: str,
    ) -> None:
        """Store the report of ``date`` (``YYYY-MM-DD``), replacing an earlier one."""
        dt.date.fromisoformat(date)  # a date, nothing else, goes into the predicate
        frame = pl.DataFrame(
            {
                "date": [date],
                "timezone": [timezone],
                "generated": [dt.datetime.fromtimestamp(generated_ms / 1000, dt.UTC)],
                "status": [status],
                "json": [report_json.decode()],
                "markdown": [markdown],
            },
            schema=reports_schema(),
        )
        exists = self._table() is not None
        frame.write_delta(
            self.uri,
            mode="overwrite" if exists else "error",
            storage_options=self.storage_options,
            delta_write_options={"predicate": f"date = '{date}'"} if exists else None,
        )

    def _table(self) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri, storage_options=self.storage_options)
        except (TableNotFoundError, FileNotFoundError):
            return None

    def _frame(self) -> pl.DataFrame:
        table = self._table()
        if table is None:
            return pl.DataFrame(schema=reports_schema())
        return pl.read_delta(table)

    def read(self, date: str) -> bytes | None:
        """The JSON of ``date``'s report, or None when there is none."""
        rows = self._frame().filter(pl.col("date") == date).sort("generated")
        return rows["json"][-1].encode() if rows.height else None

    def read_many(self, dates: list[str]) -> dict[str, bytes]:
        """The JSON of each of ``dates`` that has a report (one read of the table)."""
        rows = self._frame().filter(pl.col("date").is_in(dates)).sort("generated")
        return {d: j.encode() for d, j in zip(rows["date"], rows["json"], strict=True)}

    def dates(self) -> list[str]:
        """Days that have a report, oldest first."""
        return sorted(self._frame()["date"].unique().to_list())


def prune_report_files(folder: str | os.PathLike[str], keep_days: int,
                       today: dt.date | None = None) -> int:  # fmt: skip
    """Delete the report files (``<date>.json``, ``.md``, ``.html``) in ``folder`` of
    days more than ``keep_days`` before ``today`` (0: keep all), as the ``reports``
    table's retention drops their rows; how many went.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("2024-01-01.md", "2024-01-01.json", "2026-11-30.md", "notes.txt"):
    ...     _ = (d / name).write_text("r")
    >>> prune_report_files(d, 400, dt.date(2026, 12, 1))
    2
    >>> sorted(p.name for p in d.iterdir())
    ['2026-11-30.md', 'notes.txt']
    """
    if not keep_days or not os.path.isdir(folder):
        return 0
    cutoff = (today or dt.datetime.now(dt.UTC).date()) - dt.timedelta(days=keep_days)
    removed = 0
    for path in Path(folder).iterdir():
        try:
            day = dt.date.fromisoformat(path.name.partition(".")[0])
        except ValueError:
            continue  # not a report's file
        if day < cutoff and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
