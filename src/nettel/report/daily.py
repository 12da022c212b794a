"""The daily report: one calendar day of every container's traffic, from store queries.

Every figure comes from :class:`~nettel.store.query.TrafficQuery` (exact sums over the
window tables): totals in (``rx``) and out (``tx``), top consumers with their share,
change against the day before and the same day a week before, containers that appeared
or disappeared, error and drop hot spots, peak hours, a 30-day daily trend per top
container, data-transfer cost, the day's anomalies (alert records passed in), a
forecast of the next days (:mod:`nettel.report.forecast`), and the resources section:
the top CPU, memory and disk I/O consumers, CPU throttling and OOM kills of the day from
:class:`~nettel.store.resource_query.ResourceQuery` (the ``resource_*`` tables), with the
day's leak, OOM-kill and throttling alerts (:data:`RESOURCE_RULES`).

The day is a calendar day in ``tz`` (UTC by default). Hourly figures use the store's
UTC hours, labelled in local time (exact for zones on whole-hour offsets).

Definitions, also carried in the report's ``definitions``:

- a container is *seen* on a day when the store has a window of it in that day;
- *new*: seen on the day, not on the day before; *disappeared*: the other way round;
- a change is ``100 * (day - before) / before`` in percent, ``None`` when ``before`` is 0;
- cost: ``tx_bytes / 1e9 * egress_per_gb + rx_bytes / 1e9 * ingress_per_gb``.

Examples
--------
>>> change_pct(150, 100), change_pct(5, 0)
(50.0, None)
>>> day_bounds_ms(dt.date(2026, 11, 25), "UTC")
(1795564800000, 1795651200000)
>>> s, e = day_bounds_ms(dt.date(2026, 3, 29), "Europe/Berlin")  # clocks go forward
>>> (e - s) // 3_600_000
23
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import polars as pl

from nettel.detect.resources import KIND_METRICS
from nettel.errors import QueryError
from nettel.report.forecast import HOUR_MS, WEEKLY_MIN_HOURS, forecast_hourly, hourly_values
from nettel.store.health import HealthTable
from nettel.store.query import ContainerStats, TrafficQuery
from nettel.store.resource_query import ResourceQuery, ResourceStats

SCHEMA_VERSION: Final = 1
DAY_MS: Final = 24 * HOUR_MS
BYTES_PER_GB: Final = 1e9

DEFINITIONS: Final = {
    "bytes_in": "bytes received by the containers (rx)",
    "bytes_out": "bytes sent by the containers (tx)",
    "seen": "the store holds at least one minute window of the container in the day",
    "new": "seen on the day and not on the day before",
    "disappeared": "seen on the day before and not on the day",
    "change_pct": "100 * (day - before) / before; null when before is 0",
    "share": "the container's part of all containers' bytes (in + out) of the day",
    "cost": "bytes_out / 1e9 * egress_per_gb + bytes_in / 1e9 * ingress_per_gb",
    "per_million_packets": "(errors + drops) per million packets of the container",
    "cpu_seconds": "CPU time (user + system) the container used in the day",
    "cpu_percent": "mean CPU over the time the container was sampled, percent of one core",
    "memory_peak_bytes": "the most memory (cgroup usage) one sample of the day saw",
    "cpu_throttled_percent": "100 * throttled CFS periods / periods of the day (a --cpus limit)",
}

#: The ``rule`` of the resource alerts (leak, OOM kill, throttling) the resources section
#: lists.
RESOURCE_RULES: Final = tuple(KIND_METRICS)


class AlertRecord(Protocol):
    """What the report reads of an alert (:class:`nettel.detect.alerts.Alert` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def identity(self) -> str: ...
    @property
    def metric(self) -> str: ...
    @property
    def started_ms(self) -> int: ...
    @property
    def updated_ms(self) -> int: ...
    @property
    def resolved_ms(self) -> int | None: ...
    @property
    def severity(self) -> str: ...
    @property
    def rule(self) -> str: ...
    @property
    def explanation(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Prices:
    """Data-transfer prices per GB (10^9 bytes) out of (egress) and into (ingress) containers.

    Examples
    --------
    >>> Prices().cost(bytes_in=2e9, bytes_out=1e9)
    0.09
    """

    egress_per_gb: float = 0.09
    ingress_per_gb: float = 0.0
    currency: str = "USD"

    def cost(self, bytes_in: float, bytes_out: float) -> float:
        """The cost of moving these bytes."""
        return (bytes_out * self.egress_per_gb + bytes_in * self.ingress_per_gb) / BYTES_PER_GB


DEFAULT_PRICES: Final = Prices()


class Totals(msgspec.Struct, frozen=True, kw_only=True):
    """Every container's traffic of the day added up."""

    containers: int
    bytes_in: int
    bytes_out: int
    bytes: int
    packets: int
    errors: int
    drops: int
    cost: float
    #: samples the day's figures add up: what the report was built from (a store that
    #: holds more for the day got late data since; 0 in reports written before this)
    samples: int = 0


class TopConsumer(msgspec.Struct, frozen=True, kw_only=True):
    """One place of the day's top consumers by bytes (in + out)."""

    rank: int
    container: str
    bytes: int
    share: float | None


class ContainerDay(msgspec.Struct, frozen=True, kw_only=True):
    """One container's day, with its changes against the day before and a week before."""

    container: str
    name: str
    bytes_in: int
    bytes_out: int
    bytes: int
    packets: int
    errors: int
    drops: int
    share: float | None
    cost: float
    first_hour_ms: int
    last_hour_ms: int
    previous_day_bytes: int
    change_day_pct: float | None
    last_week_bytes: int
    change_week_pct: float | None
    new: bool
    peak_hour: str | None


class ContainerChange(msgspec.Struct, frozen=True, kw_only=True):
    """A container that appeared (``at``: the start of its first minute window of the day)
    or disappeared (the end of its last minute window of the day before)."""

    container: str
    at_ms: int
    at: str


class HourPoint(msgspec.Struct, frozen=True, kw_only=True):
    """All containers' traffic in one hour of the day (local label ``hour``)."""

    hour: str
    ts_ms: int
    bytes_in: int
    bytes_out: int
    bytes: int
    errors: int
    drops: int


class HotSpot(msgspec.Struct, frozen=True, kw_only=True):
    """A container with errors or drops, and its worst hour."""

    container: str
    errors: int
    drops: int
    packets: int
    per_million_packets: float | None
    worst_hour: str
    worst_hour_count: int


class Trend(msgspec.Struct, frozen=True, kw_only=True):
    """A container's bytes per day over the 30 days ending on the report's day."""

    container: str
    days: list[str]
    bytes: list[int]


class Anomaly(msgspec.Struct, frozen=True, kw_only=True):
    """One alert that was open during the day (its latest record)."""

    id: str
    container: str
    metric: str
    status: str
    severity: str
    started_ms: int
    resolved_ms: int | None
    explanation: str


class ResourceUse(msgspec.Struct, frozen=True, kw_only=True):
    """One container's CPU, memory and disk I/O of the day."""

    container: str
    cpu_seconds: float
    cpu_percent: float | None
    memory_peak_bytes: int
    memory_limit_bytes: int | None
    disk_read_bytes: int
    disk_write_bytes: int
    cpu_throttled_percent: float | None
    oom_kills: int


class ResourceDay(msgspec.Struct, frozen=True, kw_only=True):
    """The day's resources: the top ``top_n`` containers by CPU seconds, peak memory and
    disk bytes (read + written), those throttled (most first) and the resource alerts
    open during the day; ``available`` is False when the store holds no resource data
    for the day."""

    available: bool
    note: str
    containers: int
    cpu_seconds: float
    oom_kills: int
    top_cpu: list[ResourceUse]
    top_memory: list[ResourceUse]
    top_io: list[ResourceUse]
    throttled: list[ResourceUse]
    alerts: list[Anomaly]


class ContainerAvailability(msgspec.Struct, frozen=True, kw_only=True):
    """One container's day: ``healthy_share`` of the time nettel observed it in the day
    (running and not unhealthy), that time, the engine's restarts and nettel's."""

    container: str
    healthy_share: float
    observed_s: int
    restarts: int
    restarted_by_nettel: int


class DependencyChange(msgspec.Struct, frozen=True, kw_only=True):
    """An edge ``client -> server:port`` that appeared (``new``) or vanished (``gone``)."""

    change: Literal["new", "gone"]
    at_ms: int
    client: str
    server: str
    port: int


class AvailabilityDay(msgspec.Struct, frozen=True, kw_only=True):
    """The day's availability from the ``health`` table: the ``top_n`` least available
    containers (lowest healthy share, then most restarts), and the dependency changes
    (at most ``MAX_CHANGES``); ``available`` is False without health data."""

    available: bool
    note: str
    containers: int
    fully_healthy: int
    least_available: list[ContainerAvailability]
    dependency_changes: list[DependencyChange]


#: How far before the day the state it begins in is looked for (the health watcher
#: records each running container's state at least once a day).
AVAILABILITY_LOOKBACK_MS: Final = 2 * 86_400_000
#: The most dependency changes a report lists.
MAX_CHANGES: Final = 50


def availability_day(health: HealthTable | None, alerts: Sequence[AlertRecord] | None,
                     start_ms: int, end_ms: int, now_ms: int,
                     top_n: int = 10) -> AvailabilityDay:  # fmt: skip
    """The availability section of [start, end): see :class:`AvailabilityDay`.

    A container's time counts from its first record (or the day's start, when a record
    before it says how it began) to the day's end (or ``now_ms``); each stretch has the
    state of the record that began it. A container whose last record, before the day,
    says it was not running is left out (stopped or removed). Restarts by nettel are
    the audit rows of ``restart_container`` (the tool or a restart trigger).
    """
    lookback = start_ms - AVAILABILITY_LOOKBACK_MS
    events = pl.DataFrame() if health is None else health.events(lookback)
    stop = min(end_ms, now_ms)
    by_nettel: dict[str, int] = {}
    for a in alerts or ():
        if a.rule == "restart_container" and start_ms <= a.started_ms < end_ms:
            by_nettel[a.identity] = by_nettel.get(a.identity, 0) + 1
    rows: list[ContainerAvailability] = []
    if events.height:
        frame = events.select(
            "container", "kind", "status", "health",
            (pl.col("ts").dt.epoch("ms")).alias("ms"),
        ).filter(pl.col("ms") < stop)  # fmt: skip
        for (name,), part in frame.group_by("container", maintain_order=True):
            marks = part.sort("ms").iter_rows(named=True)
            observed = healthy = 0
            restarts = 0
            state: tuple[int, bool] | None = None  # (since, healthy)
            for r in marks:
                if r["kind"] == "restart" and r["ms"] >= start_ms:
                    restarts += 1
                ok = r["status"] == "running" and r["health"] != "unhealthy"
                if state is not None:
                    lo, hi = max(state[0], start_ms), r["ms"]
                    if hi > lo:
                        observed += hi - lo
                        healthy += (hi - lo) * state[1]
                state = (r["ms"], ok)
            if state is not None and stop > max(state[0], start_ms):
                span = stop - max(state[0], start_ms)
                observed += span
                healthy += span * state[1]
            gone = state is not None and state[0] < start_ms and not state[1]
            if observed <= 0 or gone:  # nothing seen, or stopped before the day and since
                continue
            rows.append(ContainerAvailability(
                container=str(name), healthy_share=round(healthy / observed, 4),
                observed_s=observed // 1000, restarts=restarts,
                restarted_by_nettel=by_nettel.get(str(name), 0)))  # fmt: skip
    changes = [] if health is None else [
        DependencyChange(change="new" if r["kind"] == "edge_new" else "gone",
                         at_ms=int(r["ts"].timestamp() * 1000), client=r["container"],
                         server=r["server"], port=int(r["port"]))
        for r in health.dependency_changes(start_ms).iter_rows(named=True)
        if r["ts"].timestamp() * 1000 < end_ms
    ]  # fmt: skip
    rows.sort(key=lambda c: (c.healthy_share, -c.restarts - c.restarted_by_nettel, c.container))
    whole = sum(c.healthy_share >= 1 for c in rows)
    if not rows:
        note = "no health data for the day (the health roles of nettel up write it)"
    else:
        note = (f"{whole} of {len(rows)} containers healthy all the time observed; "
                f"{sum(c.restarts for c in rows)} restarts by the engine, "
                f"{sum(by_nettel.values())} by nettel; "
                f"{len(changes)} dependency changes")  # fmt: skip
    return AvailabilityDay(
        available=bool(rows), note=note, containers=len(rows), fully_healthy=whole,
        least_available=[c for c in rows if c.healthy_share < 1 or c.restarts
                         or c.restarted_by_nettel][:top_n],
        dependency_changes=changes[:MAX_CHANGES],
    )  # fmt: skip


class Anomalies(msgspec.Struct, frozen=True, kw_only=True):
    """The day's anomalies; ``available`` is False when no detection data was given."""

    available: bool
    note: str
    items: list[Anomaly]


class ForecastDay(msgspec.Struct, frozen=True, kw_only=True):
    """Expected bytes of one day, with the interval's bounds."""

    date: str
    bytes: float
    low: float
    high: float


class ContainerForecast(msgspec.Struct, frozen=True, kw_only=True):
    """A container's forecast for the days after the report's day (empty: see ``note``)."""

    container: str
    model: str
    history_hours: int
    days: list[ForecastDay]
    hourly_start_ms: int
    hourly: list[float]
    note: str


class BudgetBreach(msgspec.Struct, frozen=True, kw_only=True):
    """A forecast day over (``over``) or possibly over (``at_risk``) a container's budget."""

    container: str
    date: str
    bytes: float
    high: float
    budget: float
    kind: Literal["over", "at_risk"]


class Forecast(msgspec.Struct, frozen=True, kw_only=True):
    """Forecasts for the next ``horizon_days`` days and the capacity line."""

    horizon_days: int
    level: float
    containers: list[ContainerForecast]
    not_forecast: list[str]
    budget_bytes_per_day: float | None
    budgets: dict[str, float]
    breaches: list[BudgetBreach]
    capacity: str


class Cost(msgspec.Struct, frozen=True, kw_only=True):
    """Estimated data-transfer cost of the day."""

    currency: str
    egress_per_gb: float
    ingress_per_gb: float
    total: float


class DailyReport(msgspec.Struct, frozen=True, kw_only=True):
    """A day's report. ``status`` is ``no_data`` when no container was seen on the day;
    ``notes`` say in words what is unusual (no data, one container, new ones, ...)."""

    schema_version: int = SCHEMA_VERSION
    date: str
    timezone: str
    start_ms: int
    end_ms: int
    generated_ms: int
    status: Literal["ok", "no_data"]
    notes: list[str]
    definitions: dict[str, str]
    totals: Totals
    top: list[TopConsumer]
    containers: list[ContainerDay]
    new_containers: list[ContainerChange]
    disappeared_containers: list[ContainerChange]
    hot_spots: list[HotSpot]
    hourly: list[HourPoint]
    peak_hours: list[HourPoint]
    trend: list[Trend]
    cost: Cost
    anomalies: Anomalies
    forecast: Forecast
    #: None in reports written before the resources section
    resources: ResourceDay | None = None
    #: None in reports written before the availability section
    availability: AvailabilityDay | None = None


def change_pct(value: float, before: float) -> float | None:
    """Percent change from ``before`` to ``value``; ``None`` when ``before`` is 0."""
    return None if not before else 100.0 * (value - before) / before


def time_zone(tz: str) -> ZoneInfo:
    """The IANA time zone ``tz``; a :class:`QueryError` saying what is valid otherwise.

    Examples
    --------
    >>> time_zone("Europe/Berlin").key
    'Europe/Berlin'
    >>> time_zone("Mars/Olympus")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nettel.errors.QueryError: unknown time zone 'Mars/Olympus': expected one of an IANA name...
    """
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise QueryError("time zone", tz, ["an IANA name such as UTC or Europe/Berlin"]) from None


def day_bounds_ms(day: dt.date, tz: str = "UTC") -> tuple[int, int]:
    """[start, end) of the calendar ``day`` in ``tz``, in UTC epoch milliseconds."""
    zone = time_zone(tz)
    start = dt.datetime.combine(day, dt.time(0), tzinfo=zone)
    end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def _clock(ts_ms: int, zone: ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, zone).strftime("%H:%M")


def _stamp(ts_ms: int, zone: ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, zone).strftime("%Y-%m-%d %H:%M")


def _int(v: float | int | None) -> int:
    return 0 if v is None else int(v)


def _by_container(stats: Sequence[ContainerStats]) -> dict[str, ContainerStats]:
    return {s.container: s for s in stats}


def _minute_span(
    query: TrafficQuery, start_ms: int, end_ms: int, containers: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Each container's first minute window start and last minute window end in the range."""
    if not containers:
        return {}
    frame = query.series(
        start_ms, end_ms, resolution="minute", metrics=("bytes",), containers=containers
    )
    spans = frame.group_by("container").agg(
        pl.col("ts_ms").min().alias("first"), pl.col("ts_ms").max().alias("last")
    )
    return {r[0]: (r[1], r[2] + 60_000) for r in spans.iter_rows()}


def _hour_span(frame: pl.DataFrame) -> dict[str, tuple[int, int]]:
    """Each container's first and last hour (starts) with data in an hourly frame."""
    if not frame.height:
        return {}
    spans = frame.group_by("container").agg(
        pl.col("ts_ms").min().alias("first"), pl.col("ts_ms").max().alias("last")
    )
    return {r[0]: (r[1], r[2]) for r in spans.iter_rows()}


def _open_during(alerts: Sequence[AlertRecord], start_ms: int, end_ms: int) -> list[Anomaly]:
    """The latest version of each alert open during [start, end), oldest first."""
    latest: dict[str, AlertRecord] = {}
    for a in alerts:
        if a.id not in latest or a.updated_ms >= latest[a.id].updated_ms:
            latest[a.id] = a
    items = [
        Anomaly(
            id=a.id,
            container=a.identity,
            metric=a.metric,
            status=a.status,
            severity=a.severity,
            started_ms=a.started_ms,
            resolved_ms=a.resolved_ms,
            explanation=a.explanation,
        )
        for a in latest.values()
        if a.started_ms < end_ms and (a.resolved_ms is None or a.resolved_ms >= start_ms)
    ]
    items.sort(key=lambda a: (a.started_ms, a.container, a.metric))
    return items


def _anomalies(
    alerts: Sequence[AlertRecord] | None, start_ms: int, end_ms: int, zone: ZoneInfo
) -> Anomalies:
    if alerts is None:
        return Anomalies(available=False, note="no anomaly detection data", items=[])
    items = _open_during(alerts, start_ms, end_ms)
    note = f"{len(items)} anomalies open during the day" if items else "no anomalies during the day"
    return Anomalies(available=True, note=note, items=items)


def _resource_use(total: ResourceStats, peak: ResourceStats | None) -> ResourceUse:
    v = total.values
    throttled = v["cpu_throttled_percent"]
    limit = v["memory_limit_bytes"]
    return ResourceUse(
        container=total.container, cpu_seconds=float(v["cpu_seconds"] or 0.0),
        cpu_percent=None if v["cpu_percent"] is None else float(v["cpu_percent"]),
        memory_peak_bytes=_int((peak or total).values["memory_bytes"]),
        memory_limit_bytes=None if limit is None else int(limit),
        disk_read_bytes=_int(v["disk_read_bytes"]), disk_write_bytes=_int(v["disk_write_bytes"]),
        cpu_throttled_percent=None if throttled is None else float(throttled),
        oom_kills=_int(v["oom_kills"]),
    )  # fmt: skip


def resource_day(query: ResourceQuery | None, alerts: Sequence[AlertRecord] | None,
                 start_ms: int, end_ms: int, top_n: int = 10) -> ResourceDay:  # fmt: skip
    """The resources section of [start, end): see :class:`ResourceDay`."""
    rows = [] if query is None else query.stats(start_ms, end_ms)
    peaks = {} if query is None or not rows else {
        s.container: s for s in query.stats(start_ms, end_ms, aggregation="max")}  # fmt: skip
    uses = [_resource_use(s, peaks.get(s.container)) for s in rows]
    mine = [a for a in alerts or () if a.rule in RESOURCE_RULES]
    items = _open_during(mine, start_ms, end_ms)

    def top(key: Callable[[ResourceUse], float]) -> list[ResourceUse]:
        return sorted((u for u in uses if key(u) > 0),
                      key=lambda u: (-key(u), u.container))[:top_n]  # fmt: skip

    cpu_s = sum(u.cpu_seconds for u in uses)
    kills = sum(u.oom_kills for u in uses)
    if not uses:
        note = "no resource data for the day (the resources role of nettel up writes it)"
    else:
        note = (f"{len(uses)} containers used {cpu_s:,.0f} CPU seconds; {kills} OOM kills; "
                f"{len(items)} leak, OOM-kill or throttling alerts")  # fmt: skip
    return ResourceDay(
        available=bool(uses), note=note, containers=len(uses), cpu_seconds=cpu_s,
        oom_kills=kills, top_cpu=top(lambda u: u.cpu_seconds),
        top_memory=top(lambda u: u.memory_peak_bytes),
        top_io=top(lambda u: u.disk_read_bytes + u.disk_write_bytes),
        throttled=top(lambda u: u.cpu_throttled_percent or 0.0), alerts=items,
    )  # fmt: skip


def _hourly_points(frame: pl.DataFrame, zone: ZoneInfo) -> list[HourPoint]:
    """All containers' hourly frame (``ts_ms``, rx/tx bytes, errors, drops) added up."""
    if not frame.height:
        return []
    per_hour = (
        frame.group_by("ts_ms")
        .agg(pl.col("rx_bytes", "tx_bytes", "errors", "drops").fill_null(0).sum())
        .sort("ts_ms")
    )
    return [
        HourPoint(
            hour=_clock(r["ts_ms"], zone),
            ts_ms=r["ts_ms"],
            bytes_in=r["rx_bytes"],
            bytes_out=r["tx_bytes"],
            bytes=r["rx_bytes"] + r["tx_bytes"],
            errors=r["errors"],
            drops=r["drops"],
        )
        for r in per_hour.iter_rows(named=True)
    ]


def _peak_hours(frame: pl.DataFrame, zone: ZoneInfo) -> dict[str, str]:
    """Each container's busiest hour (local label), earliest on ties."""
    if not frame.height:
        return {}
    top = (
        frame.with_columns(b=pl.col("rx_bytes").fill_null(0) + pl.col("tx_bytes").fill_null(0))
        .sort(["container", "b", "ts_ms"], descending=[False, True, False])
        .group_by("container", maintain_order=True)
        .first()
    )
    return {r["container"]: _clock(r["ts_ms"], zone) for r in top.iter_rows(named=True)}


def _hot_spots(
    today: Mapping[str, ContainerStats], frame: pl.DataFrame, zone: ZoneInfo, limit: int
) -> list[HotSpot]:
    out = []
    for c, s in today.items():
        errors, drops = _int(s.values["errors"]), _int(s.values["drops"])
        if errors + drops == 0:
            continue
        packets = _int(s.values["packets"])
        mine = (
            frame.filter(pl.col("container") == c)
            .with_columns(bad=pl.col("errors").fill_null(0) + pl.col("drops").fill_null(0))
            .sort(["bad", "ts_ms"], descending=[True, False])
        )
        worst = mine.row(0, named=True) if mine.height else {"ts_ms": s.first_ms, "bad": 0}
        out.append(
            HotSpot(
                container=c,
                errors=errors,
                drops=drops,
                packets=packets,
                per_million_packets=(errors + drops) * 1e6 / packets if packets else None,
                worst_hour=_clock(worst["ts_ms"], zone),
                worst_hour_count=int(worst["bad"]),
            )
        )
    out.sort(key=lambda h: (-(h.errors + h.drops), h.container))
    return out[:limit]


def _daily_totals(frame: pl.DataFrame, tz: str) -> pl.DataFrame:
    """Hourly ``bytes`` per container summed per local date (``date`` as YYYY-MM-DD)."""
    return (
        frame.with_columns(
            date=pl.from_epoch("ts_ms", time_unit="ms")
            .dt.replace_time_zone("UTC")
            .dt.convert_time_zone(tz)
            .dt.strftime("%Y-%m-%d")
        )
        .group_by("container", "date")
        .agg(pl.col("bytes").fill_null(0).sum())
    )


def _forecasts(
    history: pl.DataFrame,
    containers: Sequence[str],
    day: dt.date,
    tz: str,
    end_ms: int,
    horizon_days: int,
    level: float,
) -> list[ContainerForecast]:
    """Forecast each container's next days from its hourly history ending at ``end_ms``."""
    horizon_end = day_bounds_ms(day + dt.timedelta(days=horizon_days), tz)[1]
    horizon_hours = -(-(horizon_end - end_ms) // HOUR_MS)
    zone = time_zone(tz)
    out = []
    for c in containers:
        first, values = hourly_values(history.filter(pl.col("container") == c), "bytes", end_ms)
        if not values:
            out.append(
                ContainerForecast(
                    container=c,
                    model="",
                    history_hours=0,
                    days=[],
                    hourly_start_ms=end_ms,
                    hourly=[],
                    note="no hourly history",
                )
            )
            continue
        f = forecast_hourly(values, first, horizon_hours=horizon_hours, level=level)
        if f is None:
            out.append(
                ContainerForecast(
                    container=c,
                    model="",
                    history_hours=len(values),
                    days=[],
                    hourly_start_ms=end_ms,
                    hourly=[],
                    note=f"only {len(values)} hours of history: a forecast needs 72",
                )
            )
            continue
        days = []
        for k in range(1, horizon_days + 1):
            d = day + dt.timedelta(days=k)
            s, e = day_bounds_ms(d, tz)
            idx = [i for i in range(len(f.values)) if s <= f.start_ms + i * HOUR_MS < e]
            days.append(
                ForecastDay(
                    date=d.isoformat(),
                    bytes=sum(f.values[i] for i in idx),
                    low=sum(f.low[i] for i in idx),
                    high=sum(f.high[i] for i in idx),
                )
            )
        note = f"from {f.history_hours} hours of history since {_stamp(first, zone)}"
        if f.history_hours < WEEKLY_MIN_HOURS:
            note += "; daily cycle only (the weekly one needs 3 weeks of history)"
        out.append(
            ContainerForecast(
                container=c,
                model=f.model,
                history_hours=f.history_hours,
                days=days,
                hourly_start_ms=f.start_ms,
                hourly=f.values,
                note=note,
            )
        )
    return out


def _names(names: Sequence[str], limit: int = 10) -> str:
    """Names joined, the first ``limit`` of them.

    Examples
    --------
    >>> _names(["a", "b", "c"], limit=2), _names(["a"])
    ('a, b and 1 more', 'a')
    """
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _capacity(
    forecasts: Sequence[ContainerForecast], budget: float | None, budgets: Mapping[str, float]
) -> tuple[list[BudgetBreach], str]:
    if budget is None and not budgets:
        return [], "no traffic budget set: no capacity check"
    breaches = []
    for f in forecasts:
        limit = budgets.get(f.container, budget)
        if limit is None:
            continue
        for d in f.days:
            if d.bytes > limit or d.high > limit:
                kind: Literal["over", "at_risk"] = "over" if d.bytes > limit else "at_risk"
                breaches.append(
                    BudgetBreach(
                        container=f.container,
                        date=d.date,
                        bytes=d.bytes,
                        high=d.high,
                        budget=limit,
                        kind=kind,
                    )
                )
    over = sorted({b.container for b in breaches if b.kind == "over"})
    risk = sorted({b.container for b in breaches if b.kind == "at_risk"} - set(over))
    if not breaches:
        return [], "no container is forecast to exceed its traffic budget"
    parts = []
    if over:
        parts.append("forecast over budget: " + _names(over))
    if risk:
        parts.append("may exceed budget (interval's upper bound): " + _names(risk))
    return breaches, "; ".join(parts)


def build_daily_report(
    query: TrafficQuery,
    day: dt.date,
    *,
    tz: str = "UTC",
    top_n: int = 10,
    prices: Prices = DEFAULT_PRICES,
    alerts: Sequence[AlertRecord] | None = None,
    forecast_days: int = 7,
    forecast_level: float = 0.95,
    max_forecasts: int = 50,
    budget_bytes_per_day: float | None = None,
    budgets: Mapping[str, float] | None = None,
    now_ms: int | None = None,
    resources: ResourceQuery | None = None,
    health: HealthTable | None = None,
) -> DailyReport:
    """The report of calendar ``day`` in ``tz`` from the store behind ``query``.

    ``alerts``: alert records (any that overlap the day are listed; ``None``: no
    detection data). ``resources``: the resource tables' query (the resources section;
    None: no resource data). ``health``: the ``health`` table (the availability section;
    None: no health data). ``budget_bytes_per_day``: every container's daily budget for the
    capacity line, ``budgets`` per container (overrides it). Forecasts cover the
    ``max_forecasts`` containers with the most bytes on the day.
    """
    if not 1 <= forecast_days <= 7:
        raise QueryError("forecast_days", forecast_days, ["1..7"])
    if top_n < 1:
        raise QueryError("top_n", top_n, ["a whole number >= 1"])
    zone = time_zone(tz)
    budgets = dict(budgets or {})
    start, end = day_bounds_ms(day, tz)
    prev_start, _ = day_bounds_ms(day - dt.timedelta(days=1), tz)
    week_start, week_end = day_bounds_ms(day - dt.timedelta(days=7), tz)
    trend_start, _ = day_bounds_ms(day - dt.timedelta(days=29), tz)

    today = _by_container(query.stats(start, end))
    before = _by_container(query.stats(prev_start, start))
    week = _by_container(query.stats(week_start, week_end))
    top = query.top(start, end, metric="bytes", n=top_n)
    hours = query.series(
        start, end, resolution="hour", metrics=("rx_bytes", "tx_bytes", "errors", "drops")
    )
    history = query.series(trend_start, end, resolution="hour", metrics=("bytes",))

    total_bytes = sum(_int(s.values["bytes"]) for s in today.values())
    peaks = _peak_hours(hours, zone)
    hour_span = _hour_span(hours)
    containers = []
    for c, s in today.items():
        b_in, b_out = _int(s.values["rx_bytes"]), _int(s.values["tx_bytes"])
        prev = _int(before[c].values["bytes"]) if c in before else 0
        last_week = _int(week[c].values["bytes"]) if c in week else 0
        containers.append(
            ContainerDay(
                container=c,
                name=s.name,
                bytes_in=b_in,
                bytes_out=b_out,
                bytes=b_in + b_out,
                packets=_int(s.values["packets"]),
                errors=_int(s.values["errors"]),
                drops=_int(s.values["drops"]),
                share=(b_in + b_out) / total_bytes if total_bytes else None,
                cost=prices.cost(b_in, b_out),
                first_hour_ms=hour_span.get(c, (start, start))[0],
                last_hour_ms=hour_span.get(c, (start, start))[1],
                previous_day_bytes=prev,
                change_day_pct=change_pct(b_in + b_out, prev),
                last_week_bytes=last_week,
                change_week_pct=change_pct(b_in + b_out, last_week),
                new=c not in before,
                peak_hour=peaks.get(c),
            )
        )
    containers.sort(key=lambda x: (-x.bytes, x.container))

    appeared = _minute_span(query, start, end, sorted(set(today) - set(before)))
    left = _minute_span(query, prev_start, start, sorted(set(before) - set(today)))
    new = [
        ContainerChange(container=c, at_ms=a, at=_stamp(a, zone))
        for c, (a, _) in sorted(appeared.items())
    ]
    gone = [
        ContainerChange(container=c, at_ms=b, at=_stamp(b, zone))
        for c, (_, b) in sorted(left.items())
    ]

    totals = Totals(
        containers=len(today),
        bytes_in=sum(c.bytes_in for c in containers),
        bytes_out=sum(c.bytes_out for c in containers),
        bytes=total_bytes,
        packets=sum(c.packets for c in containers),
        errors=sum(c.errors for c in containers),
        drops=sum(c.drops for c in containers),
        cost=sum(c.cost for c in containers),
        samples=sum(s.samples for s in today.values()),
    )
    top_list = [
        TopConsumer(rank=i + 1, container=t.container, bytes=int(t.value), share=t.share)
        for i, t in enumerate(top)
    ]

    days = [(day - dt.timedelta(days=k)).isoformat() for k in range(29, -1, -1)]
    daily = _daily_totals(history, tz)
    trend = []
    for t in top_list:
        mine = dict(
            daily.filter(pl.col("container") == t.container).select("date", "bytes").iter_rows()
        )
        trend.append(
            Trend(container=t.container, days=days, bytes=[int(mine.get(d, 0)) for d in days])
        )

    ranked = [c.container for c in containers]
    chosen = ranked[:max_forecasts]
    forecasts = _forecasts(history, chosen, day, tz, end, forecast_days, forecast_level)
    breaches, capacity = _capacity(forecasts, budget_bytes_per_day, budgets)

    notes = []
    if not today:
        notes.append(
            f"no traffic was recorded on {day.isoformat()} ({tz}): no container was seen that day"
        )
    elif len(today) == 1:
        only = next(iter(today))
        notes.append(f"only one container was seen: {only} carries all of the day's traffic")
    for n in new:
        if n.at_ms > start:
            notes.append(f"{n.container} appeared mid-day: first seen at {_clock(n.at_ms, zone)}")
        else:
            notes.append(f"{n.container} is new: not seen on the day before")
    for g in gone:
        notes.append(f"{g.container} disappeared: last seen {g.at}")
    if not before and today:
        notes.append("no data for the day before: day-over-day changes are not available")
    if len(chosen) < len(ranked):
        notes.append(f"forecasts cover the {len(chosen)} busiest of {len(ranked)} containers")

    hourly = _hourly_points(hours, zone)
    peak_hours = sorted(hourly, key=lambda h: (-h.bytes, h.ts_ms))[:3]
    return DailyReport(
        date=day.isoformat(),
        timezone=tz,
        start_ms=start,
        end_ms=end,
        generated_ms=time.time_ns() // 1_000_000 if now_ms is None else now_ms,
        status="ok" if today else "no_data",
        notes=notes,
        definitions=dict(DEFINITIONS),
        totals=totals,
        top=top_list,
        containers=containers,
        new_containers=new,
        disappeared_containers=gone,
        hot_spots=_hot_spots(today, hours, zone, top_n),
        hourly=hourly,
        peak_hours=peak_hours,
        trend=trend,
        cost=Cost(
            currency=prices.currency,
            egress_per_gb=prices.egress_per_gb,
            ingress_per_gb=prices.ingress_per_gb,
            total=totals.cost,
        ),
        anomalies=_anomalies(alerts, start, end, zone),
        forecast=Forecast(
            horizon_days=forecast_days,
            level=forecast_level,
            containers=forecasts,
            not_forecast=ranked[max_forecasts:],
            budget_bytes_per_day=budget_bytes_per_day,
            budgets=budgets,
            breaches=breaches,
            capacity=capacity,
        ),
        resources=resource_day(resources, alerts, start, end, top_n),
        availability=availability_day(
            health,
            alerts,
            start,
            end,
            time.time_ns() // 1_000_000 if now_ms is None else now_ms,
            top_n,
        ),
    )


def encode_report(report: DailyReport) -> bytes:
    """The report as JSON bytes (the ``.json`` file and the ``reports`` table's payload)."""
    return msgspec.json.encode(report)


def decode_report(data: bytes) -> DailyReport:
    """Parse a report written by :func:`encode_report`.

    Examples
    --------
    >>> from nettel.report.daily import Totals
    >>> decode_report(b"{}")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    msgspec.ValidationError: Object missing required field `date`
    """
    return msgspec.json.decode(data, type=DailyReport)
