"""Where reports go: files under ``<data dir>/reports/`` and the ``reports`` table.

:func:`daily_report` is what ``nettel report`` and ``nettel up``'s report job call:
build the day's report from the settings' store, write ``<date>.json``, ``.md`` and
``.html`` under ``<data dir>/reports/`` (each written aside, then renamed) and the
``reports`` table row, and return the report and its rendering in the format asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import structlog

from nettel import metrics
from nettel.config import Settings
from nettel.errors import QueryError
from nettel.models import WINDOW_MS
from nettel.report.daily import (
    DEFAULT_PRICES,
    AlertRecord,
    DailyReport,
    Prices,
    build_daily_report,
    day_bounds_ms,
    decode_report,
    encode_report,
    time_zone,
)
from nettel.report.render import render_html, render_markdown
from nettel.store.alerts import AlertTable
from nettel.store.health import HealthTable
from nettel.store.query import TrafficQuery
from nettel.store.reports import ReportsTable
from nettel.store.resource_query import ResourceQuery

log = structlog.get_logger(__name__)

#: Alert records for [start_ms, end_ms) (the report keeps those open during it); None:
#: no anomaly detection data.
AlertSource = Callable[[int, int], Sequence[AlertRecord] | None]


@dataclass(frozen=True, slots=True)
class StoredAlert:
    """An alert's latest version as the ``alerts`` table holds it (an :class:`AlertRecord`)."""

    id: str
    status: str
    identity: str
    metric: str
    started_ms: int
    updated_ms: int
    resolved_ms: int | None
    severity: str
    explanation: str
    rule: str = ""


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def stored_alerts(data_dir: str, storage_options: dict[str, str] | None = None) -> AlertSource:
    """An alert source reading the detector's ``alerts`` table under ``data_dir``.

    A local data dir without that table (no detector ever ran) gives None: the report
    then says it has no anomaly detection data, not that there were no anomalies.
    """
    table = AlertTable(f"{data_dir.rstrip('/')}/alerts", storage_options=storage_options)

    def source(start_ms: int, end_ms: int) -> list[StoredAlert] | None:
        if "://" not in table.uri and not (Path(table.uri) / "_delta_log").is_dir():
            return None
        out = []
        for r in table.latest().iter_rows(named=True):
            started = _ms(r["started"])
            resolved = None if r["resolved"] is None else _ms(r["resolved"])
            if started < end_ms and (resolved is None or resolved >= start_ms):
                out.append(StoredAlert(
                    id=r["id"], status=r["status"], identity=r["container"], metric=r["metric"],
                    started_ms=started, updated_ms=_ms(r["updated"]), resolved_ms=resolved,
                    severity=r["severity"], explanation=r["explanation"], rule=r["rule"] or "",
                ))  # fmt: skip
        return out

    return source


Format = Literal["md", "html", "json"]
FORMATS: Final[tuple[Format, ...]] = ("md", "html", "json")


def render(report: DailyReport, fmt: Format) -> bytes:
    """The report in ``fmt`` (``md``, ``html`` or ``json``) as UTF-8 bytes."""
    if fmt == "json":
        return encode_report(report)
    if fmt == "md":
        return render_markdown(report).encode()
    if fmt == "html":
        return render_html(report).encode()
    raise QueryError("format", fmt, FORMATS)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report_files(report: DailyReport, data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``<data_dir>/reports/<date>.{json,md,html}``; returns the paths by format.

    Examples
    --------
    >>> import tempfile
    >>> from nettel.report.daily import decode_report
    >>> d = tempfile.mkdtemp()
    >>> paths = write_report_files(EXAMPLE, d)
    >>> sorted(paths), paths["json"].name
    (['html', 'json', 'md'], '2026-11-25.json')
    >>> decode_report(paths["json"].read_bytes()) == EXAMPLE
    True
    >>> import shutil; shutil.rmtree(d)
    """
    folder = Path(data_dir) / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for fmt in FORMATS:
        path = folder / f"{report.date}.{fmt}"
        _write_atomic(path, render(report, fmt))
        out[fmt] = path
    return out


def reports_table(data_dir: str, storage_options: dict[str, str] | None = None) -> ReportsTable:
    """The ``reports`` table under ``data_dir`` (beside the ``reports/`` folder of files)."""
    return ReportsTable(f"{data_dir.rstrip('/')}/reports_table", storage_options=storage_options)


def load_report(data_dir: str, day: dt.date) -> DailyReport | None:
    """``day``'s stored report (``reports`` table), or None when none was written.

    What ``get_daily_report(date)`` and ``nettel://reports/daily/{date}`` serve.
    """
    data = reports_table(data_dir).read(day.isoformat())
    return None if data is None else decode_report(data)


def write_report_table(
    report: DailyReport, data_dir: str, storage_options: dict[str, str] | None = None
) -> None:
    """Store the report as its day's row of the ``reports`` table under ``data_dir``."""
    table = reports_table(data_dir, storage_options)
    table.write(
        report.date,
        report.timezone,
        report.generated_ms,
        report.status,
        encode_report(report),
        render_markdown(report),
    )


def yesterday(tz: str = "UTC", now: dt.datetime | None = None) -> dt.date:
    """The calendar day before today in ``tz``.

    Examples
    --------
    >>> yesterday("UTC", dt.datetime(2026, 11, 26, 0, 5, tzinfo=dt.UTC))
    datetime.date(2026, 11, 25)
    """
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(time_zone(tz)).date() - dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Published:
    """A built report, its rendering in the format asked, and the files written."""

    report: DailyReport
    rendered: bytes
    files: dict[str, Path]


def daily_report(
    settings: Settings,
    day: dt.date | None = None,
    *,
    fmt: Format = "md",
    out: str | os.PathLike[str] | None = None,
    tz: str = "UTC",
    prices: Prices = DEFAULT_PRICES,
    budget_bytes_per_day: float | None = None,
    budgets: Mapping[str, float] | None = None,
    alert_source: AlertSource | None = None,
    write: bool = True,
) -> Published:
    """Build ``day``'s report (default: yesterday in ``tz``) from ``settings``' store.

    ``alert_source(start_ms, end_ms)`` gives the alert records of the day; by default
    they are read from the detector's ``alerts`` table (:func:`stored_alerts`).

    With ``write``, the three files and the table row are written under the data dir
    (a local path; an ``s3://`` data dir gets the table row only). ``out``: also write
    the ``fmt`` rendering there.
    """
    if fmt not in FORMATS:
        raise QueryError("format", fmt, FORMATS)
    day = day or yesterday(tz)
    source = stored_alerts(settings.data_dir) if alert_source is None else alert_source
    alerts = source(*day_bounds_ms(day, tz))
    query = TrafficQuery(
        settings.data_dir, partitions=settings.partitions, topic=settings.topic_stats
    )
    report = build_daily_report(
        query,
        day,
        tz=tz,
        prices=prices,
        alerts=alerts,
        budget_bytes_per_day=budget_bytes_per_day,
        budgets=budgets,
        resources=ResourceQuery(settings.data_dir),
        health=HealthTable(f"{settings.data_dir.rstrip('/')}/health"),
    )
    files: dict[str, Path] = {}
    if write:
        if "://" not in settings.data_dir:
            files = write_report_files(report, settings.data_dir)
        write_report_table(report, settings.data_dir)
    rendered = render(report, fmt)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, rendered)
        files["out"] = path
    return Published(report, rendered, files)


def report_is_current(query: TrafficQuery, report: DailyReport) -> bool:
    """Whether the store holds no more data for the report's day than the report was built
    from (its ``totals.samples``): False once late data for that day landed."""
    held = sum(s.samples for s in query.stats(report.start_ms, report.end_ms))
    return held <= report.totals.samples


def stream_passed(newest_ms: int | None, end_ms: int) -> bool:
    """Whether the stream has written a window reaching ``end_ms`` (``newest_ms``: the
    start of the minute table's newest window).

    Examples
    --------
    >>> end = 86_400_000
    >>> stream_passed(None, end), stream_passed(end - 120_000, end)
    (False, False)
    >>> stream_passed(end - 60_000, end)  # the day's last window is written
    True
    """
    return newest_ms is not None and newest_ms + WINDOW_MS >= end_ms


def refresh_reports(
    settings: Settings,
    now_s: float,
    *,
    tz: str = "UTC",
    after_midnight_s: float = 600.0,
    max_wait_s: float = 6 * 3600.0,
    lookback_days: int = 7,
    prices: Prices = DEFAULT_PRICES,
    budget_bytes_per_day: float | None = None,
    alert_source: AlertSource | None = None,
) -> list[tuple[Published, str]]:
    """One pass of the reports' schedule at ``now_s``: the reports it wrote, with why.

    - Yesterday's report (in ``tz``), when none is stored yet, is built once the
      stream has written a window that reaches the day's end (``day_passed``), or
      ``max_wait_s`` after the day's end at the latest (``waited``: nothing reached
      it, e.g. no container ran), never before ``after_midnight_s`` past midnight.
    - The stored report of any of the last ``lookback_days`` days is rebuilt when the
      store now holds more samples of that day than it was built from (``late_data``:
      a backlog, a late partial window).
    """
    query = TrafficQuery(settings.data_dir, partitions=settings.partitions,
                         topic=settings.topic_stats)  # fmt: skip
    yday = yesterday(tz, dt.datetime.fromtimestamp(now_s, dt.UTC))
    days = [yday - dt.timedelta(days=k) for k in range(lookback_days)]
    table = reports_table(settings.data_dir)
    stored = table.read_many([d.isoformat() for d in days])
    now_ms = int(now_s * 1000)
    newest: int | None = None
    written = []
    for day in days:
        _, end = day_bounds_ms(day, tz)
        data = stored.get(day.isoformat())
        if data is None:
            if day != yday or now_ms < end + after_midnight_s * 1000:
                continue
            newest = query.newest_ms() if newest is None else newest
            passed = stream_passed(newest, end)
            if not passed and now_ms < end + max_wait_s * 1000:
                continue
            why = "day_passed" if passed else "waited"
        else:
            if report_is_current(query, decode_report(data)):
                continue
            why = "late_data"
        done = daily_report(settings, day, tz=tz, prices=prices,
                            budget_bytes_per_day=budget_bytes_per_day,
                            alert_source=alert_source)  # fmt: skip
        written.append((done, why))
    return written


async def report_on_schedule(
    settings: Settings,
    stop: asyncio.Event,
    *,
    tz: str = "UTC",
    after_midnight_s: float = 600.0,
    check_s: float = 300.0,
    max_wait_s: float = 6 * 3600.0,
    retry_s: float = 300.0,
    clock: Callable[[], float] = time.time,
    prices: Prices = DEFAULT_PRICES,
    budget_bytes_per_day: float | None = None,
    alert_source: AlertSource | None = None,
) -> None:
    """Keep the daily reports as fresh as the data, until ``stop``: every ``check_s``, a
    :func:`refresh_reports` pass (yesterday's report once the stream has passed the
    day's end; a stored one rebuilt when late data for its day landed).

    The pass runs in a thread, so the event loop keeps going; a failure is logged and
    tried again ``retry_s`` later.
    """
    while not stop.is_set():
        wait = check_s
        started = time.monotonic()
        try:
            written = await asyncio.to_thread(
                refresh_reports, settings, clock(), tz=tz, after_midnight_s=after_midnight_s,
                max_wait_s=max_wait_s, prices=prices, budget_bytes_per_day=budget_bytes_per_day,
                alert_source=alert_source,
            )  # fmt: skip
        except Exception as e:
            log.error("report_failed", error=repr(e), retry_in_s=retry_s)
            wait = min(wait, retry_s)
        else:
            metrics.JOBS.done("report", check_s)
            for done, why in written:
                log.info(
                    "report_written", date=done.report.date, reason=why,
                    status=done.report.status, containers=done.report.totals.containers,
                    samples=done.report.totals.samples,
                    files=[str(p) for p in done.files.values()],
                    seconds=round(time.monotonic() - started, 2),
                )  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(wait, 0.0))


def _example() -> DailyReport:
    """A small fixed report for doctests."""
    from nettel.report.daily import Anomalies, Cost, Forecast, Totals

    return DailyReport(
        date="2026-11-25",
        timezone="UTC",
        start_ms=0,
        end_ms=1,
        generated_ms=0,
        status="no_data",
        notes=["no traffic"],
        definitions={},
        totals=Totals(
            containers=0, bytes_in=0, bytes_out=0, bytes=0, packets=0, errors=0, drops=0, cost=0.0
        ),
        top=[],
        containers=[],
        new_containers=[],
        disappeared_containers=[],
        hot_spots=[],
        hourly=[],
        peak_hours=[],
        trend=[],
        cost=Cost(currency="USD", egress_per_gb=0.09, ingress_per_gb=0.0, total=0.0),
        anomalies=Anomalies(available=False, note="no anomaly detection data", items=[]),
        forecast=Forecast(
            horizon_days=7,
            level=0.95,
            containers=[],
            not_forecast=[],
            budget_bytes_per_day=None,
            budgets={},
            breaches=[],
            capacity="no traffic budget set: no capacity check",
        ),
    )


EXAMPLE: Final = _example()
