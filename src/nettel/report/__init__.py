"""Daily reports: figures from the store's queries, charts, forecasts, three formats.

- :func:`build_daily_report` (:mod:`nettel.report.daily`): the figures of one day;
- :func:`forecast_hourly` (:mod:`nettel.report.forecast`): River Holt-Winters forecasts;
- :func:`render_markdown`, :func:`render_html` (:mod:`nettel.report.render`), JSON with
  :func:`encode_report`;
- :func:`daily_report` (:mod:`nettel.report.publish`): build, write the files under
  ``<data dir>/reports/`` and the ``reports`` table row (what ``nettel report`` runs);
  :func:`report_on_schedule`: yesterday's report once the stream has passed midnight, and
  any recent day's rebuilt when late data for it lands (``nettel up``; one pass:
  :func:`refresh_reports`; :func:`report_is_current`: whether a report is as new as its data);
  :func:`load_report`: a stored report; :func:`forecast_container`: one container's
  forecast from the store (MCP ``forecast_traffic``).
"""

from nettel.report.daily import (
    DailyReport,
    Prices,
    build_daily_report,
    decode_report,
    encode_report,
)
from nettel.report.forecast import HourlyForecast, forecast_container, forecast_hourly
from nettel.report.publish import (
    FORMATS,
    Published,
    daily_report,
    load_report,
    refresh_reports,
    report_is_current,
    report_on_schedule,
    write_report_files,
    yesterday,
)
from nettel.report.render import render_html, render_markdown

__all__ = [
    "FORMATS",
    "DailyReport",
    "HourlyForecast",
    "Prices",
    "Published",
    "build_daily_report",
    "daily_report",
    "decode_report",
    "encode_report",
    "forecast_container",
    "forecast_hourly",
    "load_report",
    "refresh_reports",
    "render_html",
    "render_markdown",
    "report_is_current",
    "report_on_schedule",
    "write_report_files",
    "yesterday",
]
