"""``bands``: what the detector expects of each container's metrics, hour by hour.

The detector writes it at its checkpoints (only the rows that changed), so that the MCP
server and the reports answer "what is normal for this container" from a table and
never load detector state. One row per container, metric and hour of the week
(``slot`` 0 = Monday 00:00-01:00 UTC): ``low``, ``expected``, ``high`` and what the band
was learned from (``basis``: week, day, recent, or empty), with the container's learned
samples when the row was written. Rows are merged (upserted), never appended, so the
table holds at most containers x metrics x 168 rows; maintenance drops the rows of
containers whose bands have not changed for :data:`BANDS_RETENTION_DAYS` (gone).

The table is partitioned by the source (Kafka) ``partition``: each detector worker
writes only the partitions it owns, so two workers never rewrite the same file.

Examples
--------
>>> import tempfile
>>> table = BandTable(tempfile.mkdtemp() + "/bands")
>>> row = {"container": "shop/web", "metric": "rx_bytes", "partition": 0, "slot": 3,
...        "low": 1.0, "expected": 2.0, "high": 3.0, "basis": "day", "learned_samples": 40}
>>> table.upsert([row], now_ms=0)
>>> table.upsert([row | {"expected": 2.5}], now_ms=1000)
>>> week = table.weekly("shop/web", "rx_bytes")
>>> len(week.slots), week.slots[3], week.learned_samples
(168, (1.0, 2.5, 3.0, 'day'), 40)
>>> table.weekly("shop/web", "tx_bytes") is None
True
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import polars as pl
from deltalake import ColumnProperties, DeltaTable, WriterProperties
from deltalake.exceptions import CommitFailedError, TableNotFoundError

#: Hours in a week: the slots of each container's metric.
WEEK_SLOTS: Final = 168
#: Rows of a container not rewritten for this long are dropped by maintenance (each
#: live slot changes at least once a week, when its hour comes round).
BANDS_RETENTION_DAYS: Final = 35
#: Delta settings of the state tables (``bands``, ``detect_state``, ``directory``): a
#: restart needs only the latest version, and a reader's snapshot lives for seconds, so
#: removed files go after minutes (vacuum honours it) and logs after an hour.
STATE_TABLE_CONFIGURATION: Final = {
    "delta.checkpointInterval": "100",
    "delta.logRetentionDuration": "interval 1 hours",
    "delta.deletedFileRetentionDuration": "interval 10 minutes",
}
_TS = pl.Datetime("us", "UTC")


def bands_schema() -> dict[str, pl.DataType]:
    """Columns of the ``bands`` table.

    Examples
    --------
    >>> list(bands_schema())[:4]
    ['partition', 'container', 'metric', 'slot']
    """
    return {
        "partition": pl.Int64(), "container": pl.String(), "metric": pl.String(),
        "slot": pl.Int64(), "low": pl.Float64(), "expected": pl.Float64(),
        "high": pl.Float64(), "basis": pl.String(), "learned_samples": pl.Int64(),
        "updated": _TS,
    }  # fmt: skip


def state_writer_properties() -> WriterProperties:
    """zstd for the state tables (``bands``, ``detect_state``); no statistics or dictionary
    for ``detect_state``'s ``blob`` (Parquet would copy each blob into its min and max
    statistics, tripling the file)."""
    blob = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")
    return WriterProperties(compression="ZSTD", compression_level=3, statistics_truncate_length=64,
                            column_properties={"blob": blob})  # fmt: skip


@dataclass(frozen=True, slots=True)
class WeeklyBands:
    """One container's metric over the 168 hours of a week: ``(low, expected, high,
    basis)`` per slot (zeros and an empty basis where nothing was learned)."""

    container: str
    metric: str
    learned_samples: int
    slots: list[tuple[float, float, float, str]]


class BandTable:
    """The ``bands`` Delta table under ``uri``."""

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options

    def _table(self) -> DeltaTable | None:
        try:
            return DeltaTable(self.uri, storage_options=self.storage_options)
        except TableNotFoundError:
            return None

    def version(self) -> int:
        """The table's latest version (-1: no table)."""
        table = self._table()
        return -1 if table is None else table.version()

    def upsert(self, rows: Sequence[Mapping[str, Any]], *, partition: int | None = None,
               now_ms: int | None = None) -> None:  # fmt: skip
        """Insert or replace ``rows`` (keyed by partition, container, metric, slot), one
        merge and commit per source partition; nothing is written when ``rows`` is empty.
        ``partition``: every row's, when the rows do not say it. A concurrent change
        (e.g. maintenance compacting) is retried.

        Per partition, because a merge holds its source and the target files it joins in
        memory: at 200 containers, one merge of ~266k changed rows of every partition
        peaked at ~+200 MB of RSS (most of it kept by the allocator afterwards), one merge
        per partition at ~+40 MB."""
        if not rows:
            return
        now = dt.datetime.fromtimestamp((now_ms or time.time_ns() // 1_000_000) / 1000, dt.UTC)
        schema = bands_schema()
        given: dict[str, list[Any]] = {"updated": [now] * len(rows)}
        if partition is not None:
            given["partition"] = [partition] * len(rows)
        frame = pl.DataFrame(
            {k: given[k] if k in given else [r.get(k) for r in rows] for k in schema},
            schema=schema,
        )
        for (partition,), part in frame.group_by("partition", maintain_order=True):
            self._upsert_partition(int(partition), part)

    def _upsert_partition(self, partition: int, frame: pl.DataFrame) -> None:
        """Merge ``frame``, the rows of one source ``partition``, in one commit."""
        for attempt in range(5):
            if self._table() is None:
                try:
                    frame.write_delta(
                        self.uri, mode="append", storage_options=self.storage_options,
                        delta_write_options={
                            "partition_by": ["partition"],
                            "configuration": STATE_TABLE_CONFIGURATION,
                            "writer_properties": state_writer_properties(),
                        },
                    )  # fmt: skip
                    return
                except Exception:
                    if self._table() is None:
                        raise
                    continue  # another worker created it meanwhile: merge into it
            try:
                frame.write_delta(
                    self.uri, mode="merge", storage_options=self.storage_options,
                    delta_merge_options={
                        "predicate": f"t.partition = {partition} AND t.partition = s.partition "
                        "AND t.container = s.container AND t.metric = s.metric "
                        "AND t.slot = s.slot",
                        "source_alias": "s", "target_alias": "t",
                        "writer_properties": state_writer_properties(),
                    },
                ).when_matched_update_all().when_not_matched_insert_all().execute()  # fmt: skip
                return
            except CommitFailedError:
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def weekly(self, container: str, metric: str) -> WeeklyBands | None:
        """The 168 hourly bands of ``container``'s ``metric`` (None: never written)."""
        table = self._table()
        if table is None:
            return None
        rows = (
            pl.scan_delta(table)
            .filter((pl.col("container") == container) & (pl.col("metric") == metric))
            .select("slot", "low", "expected", "high", "basis", "learned_samples")
            .collect()
        )
        if not rows.height:
            return None
        slots = [(0.0, 0.0, 0.0, "")] * WEEK_SLOTS
        for slot, low, expected, high, basis, _ in rows.iter_rows():
            if 0 <= slot < WEEK_SLOTS:
                slots[slot] = (low, expected, high, basis or "")
        learned = int(rows["learned_samples"].max() or 0)  # type: ignore[arg-type]
        return WeeklyBands(container, metric, learned, slots)
