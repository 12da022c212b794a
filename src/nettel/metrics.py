"""nettel's own health, in Prometheus exposition (prometheus-client): one module, every role.

Every metric nettel exports is defined here, in the process-wide default registry (which
also carries the client's ``process_*`` metrics: nettel's own RSS, CPU, open files); the
workers update them and the MCP HTTP endpoint serves them at ``/metrics`` (see
:mod:`nettel.mcp.server`). Names follow Prometheus conventions: counters end in
``_total``, times are seconds, sizes bytes.

- ``nettel_events_published_total``: events ingest (or ``simulate``) handed to the broker;
- ``nettel_events_consumed_total{group}``: records a consumer group read;
- ``nettel_rows_written_total{table}``: rows committed (``samples``, ``minute``, ``alerts``);
- ``nettel_late_events_total``: samples that came after their window closed (written as
  a partial row of their window, never dropped);
- ``nettel_dead_lettered_total``: invalid events sent to the dead-letter topic;
- ``nettel_duplicates_dropped_total{worker}``: events a consumer (``stream``, ``detect``,
  ``resources``) dropped as a second copy of one it already folded (a publisher's resend
  after a send timeout);
- ``nettel_partition_lag{group,partition}``: records the broker holds past the group's
  position (from the fetch responses' high watermark);
- ``nettel_alerts_open``: alerts open now in the detector;
  ``nettel_alerts_published_total``: alert versions sent to ``nettel.alerts``;
- ``nettel_last_run_timestamp_seconds{job}`` and ``nettel_last_run_age_seconds{job}``:
  when a periodic job (``stream_flush``, ``detect_checkpoint``, ``maintenance``,
  ``report``) last finished, and how long ago;
- ``nettel_table_bytes{table}``, ``nettel_table_files{table}``,
  ``nettel_table_log_files{table}``: every table under the data dir, measured at scrape;
- ``nettel_broker_rss_bytes``: the embedded broker's resident memory.

Examples
--------
>>> jobs = JobClock(clock=lambda: 100.0)
>>> jobs.done("stream_flush", every_s=30)
>>> jobs.ages()
{'stream_flush': 0.0}
>>> jobs.clock = lambda: 200.0
>>> jobs.late()  # 100 s since a 30 s job ran: more than 3 periods + 60 s of slack? no
[]
>>> jobs.clock = lambda: 300.0
>>> jobs.late()
['stream_flush']
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

EVENTS_PUBLISHED = Counter(
    "nettel_events_published", "Events handed to the broker by ingest or simulate"
)
EVENTS_CONSUMED = Counter(
    "nettel_events_consumed", "Records read from the stats topic by a consumer group", ["group"]
)
ROWS_WRITTEN = Counter("nettel_rows_written", "Rows committed to a table", ["table"])
LATE_EVENTS = Counter(
    "nettel_late_events", "Samples that came after their window closed (written as partial rows)"
)
DEAD_LETTERED = Counter(
    "nettel_dead_lettered", "Invalid events sent to the dead-letter topic, with the reason"
)
DUPLICATES_DROPPED = Counter(
    "nettel_duplicates_dropped",
    "Events dropped as a copy of one already folded (identity and time not newer)",
    ["worker"],
)
PARTITION_LAG = Gauge(
    "nettel_partition_lag",
    "Records the broker holds past a consumer group's position",
    ["group", "partition"],
)
ALERTS_OPEN = Gauge("nettel_alerts_open", "Alerts open now in the detector")
ALERTS_PUBLISHED = Counter(
    "nettel_alerts_published", "Alert versions (open, update, resolved) sent to the alerts topic"
)
BROKER_RSS = Gauge("nettel_broker_rss_bytes", "Resident memory of the embedded broker (0: none)")

#: A job is late past this many of its periods, plus :data:`LATE_SLACK_S`.
LATE_PERIODS = 3
LATE_SLACK_S = 60.0


@dataclass(eq=False)
class JobClock:
    """When each periodic job last finished and how often it should (for ages and health)."""

    clock: Callable[[], float] = time.time
    _last: dict[str, tuple[float, float]] = field(default_factory=dict)

    def done(self, job: str, every_s: float) -> None:
        """``job`` just finished; it runs every ``every_s`` seconds."""
        self._last[job] = (self.clock(), every_s)

    def ages(self) -> dict[str, float]:
        """Seconds since each job last finished."""
        now = self.clock()
        return {job: round(now - at, 3) for job, (at, _) in sorted(self._last.items())}

    def late(self) -> list[str]:
        """Jobs that have not finished for more than :data:`LATE_PERIODS` periods + slack."""
        now = self.clock()
        return [job for job, (at, every) in sorted(self._last.items())
                if now - at > LATE_PERIODS * every + LATE_SLACK_S]  # fmt: skip

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The jobs as Prometheus gauges (a collector's ``collect``)."""
        stamp = GaugeMetricFamily(
            "nettel_last_run_timestamp_seconds", "When a periodic job last finished", labels=["job"]
        )
        age = GaugeMetricFamily(
            "nettel_last_run_age_seconds", "Seconds since a periodic job last ran", labels=["job"]
        )
        now = self.clock()
        for job, (at, _) in sorted(self._last.items()):
            stamp.add_metric([job], at)
            age.add_metric([job], now - at)
        yield stamp
        yield age


JOBS = JobClock()
REGISTRY.register(JOBS)


@dataclass(frozen=True, slots=True)
class TableSize:
    """One table's footprint on disk: data files and bytes, Delta log files."""

    files: int
    bytes: int
    log_files: int


def table_sizes(data_dir: str) -> dict[str, TableSize]:
    """Every Delta table directly under a local ``data_dir`` (none for ``s3://``).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "minute" / "_delta_log").mkdir(parents=True)
    >>> _ = (d / "minute" / "_delta_log" / "0.json").write_text("{}")
    >>> _ = (d / "minute" / "part-0.parquet").write_bytes(b"x" * 10)
    >>> table_sizes(str(d))
    {'minute': TableSize(files=1, bytes=12, log_files=1)}
    >>> import shutil; shutil.rmtree(d)
    """
    if not data_dir or "://" in data_dir or not os.path.isdir(data_dir):
        return {}
    out = {}
    with os.scandir(data_dir) as entries:
        tables = sorted(
            e.path for e in entries if os.path.isdir(os.path.join(e.path, "_delta_log"))
        )
    for path in tables:
        files = size = log_files = 0
        for root, _, names in os.walk(path):
            in_log = os.path.basename(root) == "_delta_log" or "_delta_log" in root
            for name in names:
                try:
                    size += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    continue  # vacuumed meanwhile
                if in_log:
                    log_files += 1
                elif name.endswith(".parquet"):
                    files += 1
        out[os.path.basename(path)] = TableSize(files, size, log_files)
    return out


class TableSizes(Collector):
    """Collector: the tables under ``data_dir``, measured at every scrape."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """``nettel_table_bytes``, ``nettel_table_files``, ``nettel_table_log_files``."""
        sizes = table_sizes(self.data_dir)
        families = [
            (GaugeMetricFamily("nettel_table_bytes", "Bytes of a table on disk (data and log)",
                               labels=["table"]), "bytes"),
            (GaugeMetricFamily("nettel_table_files", "Data files of a table", labels=["table"]),
             "files"),
            (GaugeMetricFamily("nettel_table_log_files", "Files in a table's Delta log",
                               labels=["table"]), "log_files"),
        ]  # fmt: skip
        for family, attr in families:
            for name, size in sizes.items():
                family.add_metric([name], getattr(size, attr))
            yield family


TABLES = TableSizes("")
REGISTRY.register(TABLES)


def watch_tables(data_dir: str) -> None:
    """Export the sizes of the tables under ``data_dir`` (the process's one data dir)."""
    TABLES.data_dir = data_dir


def watch_broker(rss_bytes: Callable[[], int]) -> None:
    """Export the embedded broker's RSS, read from ``rss_bytes()`` at each scrape."""
    BROKER_RSS.set_function(lambda: float(rss_bytes()))


def set_lag(group: str, partition: int, lag: int | None) -> None:
    """Set a partition's lag; None forgets it (the partition is no longer this group's)."""
    if lag is None:
        with contextlib.suppress(KeyError):
            PARTITION_LAG.remove(group, str(partition))
        return
    PARTITION_LAG.labels(group, str(partition)).set(max(lag, 0))
