"""The report as Markdown (for agents and chat) and as one self-contained HTML page.

The HTML embeds its charts as PNG data URIs (``<img class="chart" id="chart-...">``):
traffic over the day, top consumers, the 30-day trend and the forecast. A chart with
nothing to draw is replaced by a sentence saying why.

Examples
--------
>>> sparkline([0, 1, 2, 4, 8])
'▁▂▃▅█'
>>> sparkline([]), sparkline([0, 0])
('', '▁▁')
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Callable, Sequence
from zoneinfo import ZoneInfo

from nettel.report.charts import day_traffic_png, forecast_png, human_bytes, top_png, trend_png
from nettel.report.daily import DailyReport

_BLOCKS = "▁▂▃▄▅▆▇█"
#: Rows of the containers table in Markdown and HTML (the JSON lists every container).
MAX_ROWS = 25


def sparkline(values: Sequence[float]) -> str:
    """Values as a line of Unicode blocks, scaled to the largest."""
    top = max(values, default=0)
    if top <= 0:
        return _BLOCKS[0] * len(values)
    return "".join(_BLOCKS[min(7, int(v / top * 7 + 0.5))] for v in values)


def _pct(v: float | None) -> str:
    """A change in percent, signed; ``n/a`` without a base.

    Examples
    --------
    >>> _pct(12.345), _pct(-3.0), _pct(None)
    ('+12.3%', '-3.0%', 'n/a')
    """
    return "n/a" if v is None else f"{v:+.1f}%"


def _share(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _money(v: float, currency: str) -> str:
    return f"{v:,.2f} {currency}"


def _when(ts_ms: int | None, tz: str) -> str:
    if ts_ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ts_ms / 1000, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")


Table = tuple[list[str], list[list[str]]]


def _tables(r: DailyReport) -> dict[str, Table]:
    """Every table of the report as (header, rows) of strings, shared by both formats."""
    cur = r.cost.currency
    by_name = {c.container: c for c in r.containers}
    t = r.totals
    out: dict[str, Table] = {
        "totals": (
            ["containers", "in (rx)", "out (tx)", "total", "packets", "errors", "drops", "cost"],
            [
                [
                    str(t.containers),
                    human_bytes(t.bytes_in),
                    human_bytes(t.bytes_out),
                    human_bytes(t.bytes),
                    f"{t.packets:,}",
                    f"{t.errors:,}",
                    f"{t.drops:,}",
                    _money(t.cost, cur),
                ]
            ],
        ),
        "top": (
            ["#", "container", "bytes", "share", "vs day before", "vs week before", "cost"],
            [
                [
                    str(x.rank),
                    x.container,
                    human_bytes(x.bytes),
                    _share(x.share),
                    _pct(by_name[x.container].change_day_pct) if x.container in by_name else "n/a",
                    _pct(by_name[x.container].change_week_pct) if x.container in by_name else "n/a",
                    _money(by_name[x.container].cost, cur) if x.container in by_name else "n/a",
                ]
                for x in r.top
            ],
        ),
        "containers": (
            [
                "container",
                "in",
                "out",
                "share",
                "vs day before",
                "vs week before",
                "peak hour",
                "cost",
            ],
            [
                [
                    c.container + (" (new)" if c.new else ""),
                    human_bytes(c.bytes_in),
                    human_bytes(c.bytes_out),
                    _share(c.share),
                    _pct(c.change_day_pct),
                    _pct(c.change_week_pct),
                    c.peak_hour or "-",
                    _money(c.cost, cur),
                ]
                for c in r.containers[:MAX_ROWS]
            ],
        ),
        "changes": (
            ["container", "what", "when"],
            [[n.container, "new (first seen)", n.at] for n in r.new_containers]
            + [[g.container, "disappeared (last seen)", g.at] for g in r.disappeared_containers],
        ),
        "anomalies": (
            ["started", "container", "metric", "severity", "status", "explanation"],
            [
                [
                    _when(a.started_ms, r.timezone),
                    a.container,
                    a.metric,
                    a.severity,
                    a.status,
                    a.explanation,
                ]
                for a in r.anomalies.items
            ],
        ),
        "hot_spots": (
            ["container", "errors", "drops", "per million packets", "worst hour"],
            [
                [
                    h.container,
                    f"{h.errors:,}",
                    f"{h.drops:,}",
                    "n/a" if h.per_million_packets is None else f"{h.per_million_packets:.3g}",
                    f"{h.worst_hour} ({h.worst_hour_count})",
                ]
                for h in r.hot_spots
            ],
        ),
        "peak_hours": (
            ["hour", "in", "out", "total"],
            [
                [p.hour, human_bytes(p.bytes_in), human_bytes(p.bytes_out), human_bytes(p.bytes)]
                for p in r.peak_hours
            ],
        ),
        "trend": (
            ["container", "30 days", "min/day seen", "max/day", "on the day"],
            [
                [
                    x.container,
                    sparkline(x.bytes),
                    human_bytes(min((v for v in x.bytes if v), default=0)),
                    human_bytes(max(x.bytes)),
                    human_bytes(x.bytes[-1]),
                ]
                for x in r.trend
            ],
        ),
    }
    out |= _resource_tables(r)
    out |= _availability_tables(r)
    if len(r.containers) > MAX_ROWS:
        more = len(r.containers) - MAX_ROWS
        out["containers"][1].append([f"... and {more} more (in the JSON report)"] + [""] * 7)
    days = [d.date for f in r.forecast.containers for d in f.days][: r.forecast.horizon_days]
    out["forecast"] = (
        ["container", "model", *days],
        [
            [
                f.container,
                f.model or f.note,
                *(
                    [
                        f"{human_bytes(d.bytes)} ({human_bytes(d.low)}-{human_bytes(d.high)})"
                        for d in f.days
                    ]
                    or ["-"] * len(days)
                ),
            ]
            for f in r.forecast.containers
        ],
    )
    return out


def _resource_tables(r: DailyReport) -> dict[str, Table]:
    """The resources section: the containers in any of its top lists (most CPU first),
    and its alerts."""
    res = r.resources
    if res is None:
        return {"resources": ([], []), "resource_alerts": ([], [])}
    listed = {u.container: u for u in (*res.top_cpu, *res.top_memory, *res.top_io,
                                       *res.throttled)}  # fmt: skip
    uses = sorted(listed.values(), key=lambda u: (-u.cpu_seconds, u.container))
    return {
        "resources": (
            ["container", "CPU s", "CPU % (mean)", "memory peak", "limit", "disk read",
             "disk written", "throttled", "OOM kills"],
            [[u.container, f"{u.cpu_seconds:,.1f}",
              "n/a" if u.cpu_percent is None else f"{u.cpu_percent:.3g}",
              human_bytes(u.memory_peak_bytes),
              "-" if u.memory_limit_bytes is None else human_bytes(u.memory_limit_bytes),
              human_bytes(u.disk_read_bytes), human_bytes(u.disk_write_bytes),
              "-" if u.cpu_throttled_percent is None else f"{u.cpu_throttled_percent:.3g}%",
              f"{u.oom_kills:,}"] for u in uses],
        ),
        "resource_alerts": (
            ["container", "signal", "status", "severity", "since", "explanation"],
            [[a.container, a.metric, a.status, a.severity, _when(a.started_ms, r.timezone),
              a.explanation] for a in res.alerts],
        ),
    }  # fmt: skip


def _availability_tables(r: DailyReport) -> dict[str, Table]:
    """The availability section: the least available containers, dependency changes."""
    av = r.availability
    if av is None:
        return {"availability": ([], []), "dependency_changes": ([], [])}
    return {
        "availability": (
            ["container", "healthy", "observed", "restarts (engine)", "restarts (nettel)"],
            [[c.container, f"{c.healthy_share:.2%}", f"{c.observed_s / 3600:.1f} h",
              f"{c.restarts:,}", f"{c.restarted_by_nettel:,}"] for c in av.least_available],
        ),
        "dependency_changes": (
            ["at", "change", "client", "server:port"],
            [[_when(d.at_ms, r.timezone), d.change, d.client, f"{d.server}:{d.port}"]
             for d in av.dependency_changes],
        ),
    }  # fmt: skip


def _md_table(table: Table, empty: str) -> str:
    header, rows = table
    if not rows:
        return f"_{empty}_\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_SECTIONS: list[tuple[str, str, str]] = [
    ("Totals", "totals", "no traffic"),
    ("Top consumers", "top", "no traffic on this day"),
    ("Containers", "containers", "no container was seen on this day"),
    ("New and disappeared containers", "changes", "none: the same containers as the day before"),
    ("Anomalies", "anomalies", ""),
    ("Resources: top CPU, memory and disk I/O", "resources", "no resource data for the day"),
    (
        "Resource alerts: leaks, OOM kills, throttling",
        "resource_alerts",
        "no leak, OOM-kill or throttling alert during the day",
    ),
    (
        "Availability: least healthy containers and restarts",
        "availability",
        "every container observed was healthy all day, with no restart",
    ),
    ("Dependency changes", "dependency_changes", "no edge appeared or vanished"),
    ("Error and drop hot spots", "hot_spots", "no errors or drops"),
    ("Peak hours", "peak_hours", "no traffic on this day"),
    ("Trend, last 30 days (top containers)", "trend", "no traffic on this day"),
    ("Forecast", "forecast", "no container to forecast"),
]


def _intro(r: DailyReport) -> list[str]:
    lines = [f"Day {r.date} ({r.timezone}), generated {_when(r.generated_ms, 'UTC')} UTC.", ""]
    lines += [f"- {n}" for n in r.notes]
    return lines


def _cost_line(r: DailyReport) -> str:
    c = r.cost
    prices = f"{c.egress_per_gb} {c.currency}/GB out, {c.ingress_per_gb} {c.currency}/GB in"
    return f"Estimated data-transfer cost: {_money(c.total, c.currency)} ({prices})."


def _forecast_line(r: DailyReport) -> str:
    f = r.forecast
    return (
        f"Next {f.horizon_days} days, bytes per day with a {f.level:.0%} interval. "
        f"Capacity: {f.capacity}."
    )


def render_markdown(r: DailyReport) -> str:
    """The report as Markdown: notes, then one table per section."""
    tables = _tables(r)
    parts = [f"# nettel daily report: {r.date}", "", *_intro(r), ""]
    for title, key, empty in _SECTIONS:
        parts += [f"## {title}", ""]
        if key == "anomalies":
            parts += [f"_{r.anomalies.note}_", ""]
            if not r.anomalies.items:
                continue
        if key == "resources" and r.resources is not None:
            parts += [f"_{r.resources.note}_", ""]
        if key == "availability" and r.availability is not None:
            parts += [f"_{r.availability.note}_", ""]
        if key == "totals":
            parts += [_cost_line(r), ""]
        if key == "forecast":
            parts += [_forecast_line(r), ""]
        parts.append(_md_table(tables[key], empty))
    return "\n".join(parts)


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1000px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } td:not(:first-child) { font-variant-numeric: tabular-nums; }
.notes li { color: #8a4b00; } .empty { color: #777; font-style: italic; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
img.chart { width: 100%; border: 1px solid #eee; }
"""


def _html_table(table: Table, empty: str) -> str:
    header, rows = table
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(name: str, title: str, draw: Callable[[DailyReport], bytes | None], r: DailyReport) -> str:
    png = draw(r)
    if png is None:
        return f'<p class="empty" id="chart-{name}">{html.escape(title)}: nothing to draw</p>'
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<img class="chart" id="chart-{name}" alt="{html.escape(title)}" '
        f'src="data:image/png;base64,{data}">'
    )


def render_html(r: DailyReport) -> str:
    """The report as one HTML page with its charts embedded."""
    tables = _tables(r)
    esc = html.escape
    notes = "".join(f"<li>{esc(n)}</li>" for n in r.notes)
    charts = "".join(
        [
            _img("day", "Traffic over the day", day_traffic_png, r),
            _img("top", "Top consumers", top_png, r),
            _img("trend", "30-day trend", trend_png, r),
            _img("forecast", "Forecast", forecast_png, r),
        ]
    )
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>nettel daily report {esc(r.date)}</title><style>{_CSS}</style></head><body>",
        f"<h1>nettel daily report: {esc(r.date)}</h1>",
        f"<p>{esc(_intro(r)[0])}</p>",
        f'<ul class="notes">{notes}</ul>' if notes else "",
        f'<div class="charts">{charts}</div>',
    ]
    for title, key, empty in _SECTIONS:
        parts.append(f"<h2>{esc(title)}</h2>")
        if key == "anomalies":
            parts.append(f'<p class="empty">{esc(r.anomalies.note)}</p>')
            if not r.anomalies.items:
                continue
        if key == "resources" and r.resources is not None:
            parts.append(f"<p>{esc(r.resources.note)}</p>")
        if key == "availability" and r.availability is not None:
            parts.append(f"<p>{esc(r.availability.note)}</p>")
        if key == "totals":
            parts.append(f"<p>{esc(_cost_line(r))}</p>")
        if key == "forecast":
            parts.append(f"<p>{esc(_forecast_line(r))}</p>")
        parts.append(_html_table(tables[key], empty))
    parts.append("</body></html>")
    return "\n".join(parts)
