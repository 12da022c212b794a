"""The report's charts as PNG images (matplotlib's Agg canvas, no pyplot global state).

Each function takes the report and returns PNG bytes, or ``None`` when the report has
nothing to draw (the HTML then says so in words). matplotlib is imported at the first
chart: Markdown reports and the MCP server never load it (~1 s of imports).

Examples
--------
>>> png = bar_png(["a", "b"], [3.0, 1.0], "Top")
>>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
True
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from nettel.report.daily import DailyReport
from nettel.report.forecast import HOUR_MS

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def human_bytes(value: float) -> str:
    """Bytes the way a person reads them (decimal units).

    Examples
    --------
    >>> human_bytes(0), human_bytes(1_500), human_bytes(2_345_000_000)
    ('0 B', '1.5 KB', '2.35 GB')
    """
    for factor, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.0f} B"


def _axis_bytes(value: float, _pos: object) -> str:
    return human_bytes(value)


def _figure(figsize: tuple[float, float]) -> Figure:
    """A new figure on the Agg canvas (imports matplotlib the first time)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bytes_formatter() -> FuncFormatter:
    """Axis labels in human bytes."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(_axis_bytes)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def bar_png(
    labels: Sequence[str], values: Sequence[float], title: str, notes: Sequence[str] | None = None
) -> bytes:
    """A horizontal bar chart, largest on top, bytes on the x axis."""
    fig = _figure((8, 0.45 * len(labels) + 1.4))
    ax = fig.add_subplot()
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=_COLORS[0])
    ax.set_yticks(y, labels)
    ax.xaxis.set_major_formatter(_bytes_formatter())
    ax.set_title(title)
    for yi, v, note in zip(y, values, notes or [""] * len(labels), strict=True):
        ax.text(v, yi, f" {note}", va="center", fontsize=8)
    ax.margins(x=0.15)
    return _png(fig)


def day_traffic_png(report: DailyReport) -> bytes | None:
    """All containers' bytes in and out per hour of the day (stacked bars)."""
    if not report.hourly:
        return None
    fig = _figure((8, 3.2))
    ax = fig.add_subplot()
    x = list(range(len(report.hourly)))
    ins = [h.bytes_in for h in report.hourly]
    outs = [h.bytes_out for h in report.hourly]
    ax.bar(x, ins, color=_COLORS[0], label="in (rx)")
    ax.bar(x, outs, bottom=ins, color=_COLORS[1], label="out (tx)")
    ax.set_xticks(x[::2], [h.hour[:2] for h in report.hourly][::2])
    ax.set_xlabel(f"hour ({report.timezone})")
    ax.yaxis.set_major_formatter(_bytes_formatter())
    ax.set_title(f"Traffic over {report.date}, per hour")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def top_png(report: DailyReport) -> bytes | None:
    """The day's top consumers by bytes, with their shares."""
    if not report.top:
        return None
    return bar_png(
        [t.container for t in report.top],
        [t.bytes for t in report.top],
        f"Top consumers on {report.date} (bytes in + out)",
        [f"{t.share:.1%}" if t.share is not None else "" for t in report.top],
    )


def trend_png(report: DailyReport, lines: int = 5) -> bytes | None:
    """Bytes per day over the last 30 days for the top containers."""
    if not report.trend:
        return None
    fig = _figure((8, 3.2))
    ax = fig.add_subplot()
    days: Any = [dt.date.fromisoformat(d) for d in report.trend[0].days]
    for i, t in enumerate(report.trend[:lines]):
        ax.plot(days, t.bytes, marker=".", color=_COLORS[i % len(_COLORS)], label=t.container)
    seen = [v for t in report.trend[:lines] for v in t.bytes if v > 0]
    if seen and max(seen) > 50 * min(seen):
        ax.set_yscale("log")  # containers far apart: each line stays readable
    ax.yaxis.set_major_formatter(_bytes_formatter())
    ax.set_title("Bytes per day, last 30 days")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)


def forecast_png(report: DailyReport, lines: int = 3) -> bytes | None:
    """The forecast per hour (with its interval) for the busiest forecast containers."""
    shown = [f for f in report.forecast.containers if f.hourly][:lines]
    if not shown:
        return None
    zone = ZoneInfo(report.timezone)
    fig = _figure((8, 3.2))
    ax = fig.add_subplot()
    for i, f in enumerate(shown):
        when: Any = [
            dt.datetime.fromtimestamp((f.hourly_start_ms + k * HOUR_MS) / 1000, zone)
            for k in range(len(f.hourly))
        ]
        color = _COLORS[i % len(_COLORS)]
        ax.plot(when, f.hourly, color=color, label=f"{f.container} ({f.model})")
        ratio_lo = [d.low / d.bytes if d.bytes else 1.0 for d in f.days]
        ratio_hi = [d.high / d.bytes if d.bytes else 1.0 for d in f.days]
        lo, hi = min(ratio_lo, default=1.0), max(ratio_hi, default=1.0)
        ax.fill_between(
            when, [v * lo for v in f.hourly], [v * hi for v in f.hourly], color=color, alpha=0.2
        )
    ax.yaxis.set_major_formatter(_bytes_formatter())
    level = f"{report.forecast.level:.0%}"
    ax.set_title(
        f"Forecast bytes per hour, next {report.forecast.horizon_days} days ({level} interval)"
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    return _png(fig)
