"""What the MCP tools answer, as typed results, from the store's query API only.

Kept apart from the server wiring so the answers can be tested without a transport.
Every tool's timeframe is the last hour, day, week or month (30 days) up to now, cut
at whole minutes; the newest minute or two are not in the store yet (a window is
written once it closes). Containers are named by identity, container name, compose
service or project, or a container-id prefix (4+ characters); a name that matches
nothing raises with the closest known names, one that matches several with the matches.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
from pydantic import BaseModel, Field, model_serializer

from nettel.mcp.answers import ToolInputError, page, quoted
from nettel.models import TOTALS

if TYPE_CHECKING:  # the store (polars, deltalake) is imported at the first question
    from nettel.report.forecast import ForecastCache
    from nettel.store.alerts import AlertTable, FeedbackTable
    from nettel.store.bands import BandTable
    from nettel.store.directory import ContainerDirectory, DirectoryEntry
    from nettel.store.query import ContainerStats, OpenTraffic, TrafficQuery

#: How rows of a timeframe combine (as :data:`nettel.store.query.Aggregation`).
Aggregation = Literal["sum", "avg", "max", "min"]

Timeframe = Literal["hour", "day", "week", "month"]
TIMEFRAME_MS: dict[str, int] = {
    "hour": 3_600_000, "day": 86_400_000, "week": 7 * 86_400_000, "month": 30 * 86_400_000,
}  # fmt: skip
Metric = Literal[
    "bytes", "bytes_sent", "bytes_received", "packets", "packets_sent", "packets_received",
    "errors", "drops", "connections",
    "tcp_established", "tcp_syn_recv", "tcp_time_wait", "tcp_close_wait",
]  # fmt: skip
#: Tool metric name -> the store's metric name.
STORE_METRIC: dict[str, str] = {
    "bytes": "bytes", "bytes_sent": "tx_bytes", "bytes_received": "rx_bytes",
    "packets": "packets", "packets_sent": "tx_packets", "packets_received": "rx_packets",
    "errors": "errors", "drops": "drops", "connections": "connections",
    "tcp_established": "tcp_established", "tcp_syn_recv": "tcp_syn_recv",
    "tcp_time_wait": "tcp_time_wait", "tcp_close_wait": "tcp_close_wait",
}  # fmt: skip
ALL = "*"
DAY_MS = 86_400_000
#: Characters of a daily report's Markdown an answer carries (the resource has it all).
REPORT_CHARS = 4_000
ACTIVE_WITHIN_MS = 3 * 60_000
#: The kind of an alert by its rule (get_anomalies' ``kind``); any other rule, and the
#: model's alerts (no rule), are ``network``. The resource rules are
#: :data:`nettel.detect.resources.KIND_METRICS`' keys (not imported here: that loads
#: River), ``restart_container`` the audit rows of :mod:`nettel.mcp.actions`.
RULE_KIND: dict[str, str] = {
    "memory_leak": "resource", "oom_kill": "resource", "cpu_throttling": "resource",
    "restart_container": "action", "stop_container": "action",
}  # fmt: skip
AlertKind = Literal["network", "resource", "action", "any"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}


def triage_key(a: AlertOut) -> tuple[int, float, float, str]:
    """Sort key of an alert as an operator triages: most severe first, then the highest
    score (how far past its band), then the newest; the id breaks ties, so pages
    cut from this order are stable.

    Examples
    --------
    >>> mk = lambda i, sev, score, upd: AlertOut.model_construct(
    ...     id=i, severity=sev, score=score, updated=upd)
    >>> alerts = [mk("a", "warning", 90.0, "2026-01-02T00:00:00Z"),
    ...           mk("b", "critical", 5.0, "2026-01-01T00:00:00Z"),
    ...           mk("c", "critical", 50.0, "2026-01-01T00:00:00Z"),
    ...           mk("d", "critical", 5.0, "2026-01-03T00:00:00Z")]
    >>> [a.id for a in sorted(alerts, key=triage_key)]
    ['c', 'd', 'b', 'a']
    """
    updated_s = dt.datetime.fromisoformat(a.updated).timestamp()
    return -SEVERITY_RANK[a.severity], -a.score, -updated_s, a.id


def window(timeframe: str, now_ms: int) -> tuple[int, int]:
    """[start, end) of the last ``timeframe`` up to ``now_ms``, at whole minutes.

    Examples
    --------
    >>> window("hour", 7_230_500)
    (3600000, 7200000)
    >>> window("year", 0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nettel.mcp.answers.ToolInputError: unknown timeframe 'year': expected one of hour, day, ...
    """
    if timeframe not in TIMEFRAME_MS:
        raise ToolInputError(
            f"unknown timeframe {quoted(timeframe)}: expected one of {', '.join(TIMEFRAME_MS)}"
        )
    end = now_ms - now_ms % 60_000
    return end - TIMEFRAME_MS[timeframe], end


def iso(ms: int) -> str:
    """UTC ISO 8601 time of ``ms``.

    Examples
    --------
    >>> iso(0)
    '1970-01-01T00:00:00Z'
    """
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _drop_none(model: BaseModel, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    return {k: v for k, v in handler(model).items() if v is not None}


class Compact(BaseModel):
    """An answer model whose fields that are None are left out of its JSON.

    Examples
    --------
    >>> class A(Compact):
    ...     x: int | None = None
    ...     y: int = 1
    >>> A().model_dump()
    {'y': 1}
    """

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _drop_none(self, handler)


Number = int | float


class StatsData(BaseModel):
    """One container's (or all containers') traffic under one aggregation: sums are
    totals (counts), avg/max/min per second; connections a gauge (sum, avg: mean open)."""

    bytes_sent: Number | None
    bytes_received: Number | None
    connections: Number | None
    errors: Number | None
    packets_sent: Number | None
    packets_received: Number | None
    drops: Number | None


class Provisional(BaseModel):
    """The part of ``data`` from raw samples whose minute windows have not closed yet."""

    since: str = Field(description="start of the samples added (UTC)")
    through: str = Field(description="newest sample (UTC)")
    samples: int
    bytes_sent: int
    bytes_received: int


class NetworkStats(BaseModel):
    """``{"container", "timeframe", "data"}``; for every container together, ``container``
    is ``"*"`` and ``containers`` lists a page of them, the busiest first."""

    container: str
    timeframe: Timeframe
    data: StatsData
    provisional: Provisional | None = None
    containers: list[NetworkStats] | None = None
    total: int | None = Field(default=None, description="containers in all")
    next: str | None = Field(default=None, description="cursor of the next page")
    hint: str | None = None
    as_of: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _drop_none(self, handler)


class ContainerInfo(BaseModel):
    """A container nettel has seen, with its current rates (last 5 minutes with data)."""

    container: str
    name: str
    image: str
    compose_service: str
    container_id: str = Field(description="first 12 hex digits")
    state: Literal["active", "inactive"] = Field(description="active: data in the last 3 minutes")
    first_seen: str
    last_seen: str
    rx_bytes_per_s: Number | None
    tx_bytes_per_s: Number | None
    connections: Number | None


class ContainerList(BaseModel):
    """Containers seen over the store's retention: active first, busiest first."""

    containers: list[ContainerInfo]
    total: int
    next: str | None = None
    hint: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _drop_none(self, handler)


class TopEntryOut(BaseModel):
    """One container in a top-N."""

    container: str
    value: Number
    share: float | None = Field(description="part of all containers' total (sum/avg only)")


class TopConsumers(BaseModel):
    """The containers with the most (or least) of a metric over a timeframe."""

    timeframe: Timeframe
    metric: Metric
    aggregation: Aggregation
    unit: str
    total: Number | None = Field(description="all containers together (sum/avg only)")
    top: list[TopEntryOut]


class Point(BaseModel):
    """One bucket of a series."""

    ts: str = Field(description="bucket start, UTC")
    value: Number | None


class TrafficSeries(BaseModel):
    """A downsampled series with its summary."""

    container: str
    timeframe: Timeframe
    metric: Metric
    aggregation: Aggregation
    unit: str
    bucket_seconds: int | None = Field(description="bucket size (None: calendar months)")
    points: list[Point]
    summary: dict[str, float | None] = Field(description="min, max, avg, p95 of the points")


Severity = Literal["info", "warning", "critical"]
#: The detector's metric names -> the store's (traffic around an alert).
DETECT_METRIC: dict[str, str] = {
    "rx_bytes": "rx_bytes", "tx_bytes": "tx_bytes", "rx_packets": "rx_packets",
    "tx_packets": "tx_packets", "errors": "errors", "drops": "drops",
    "connections": "connections", "syn_recv": "tcp_syn_recv", "time_wait": "tcp_time_wait",
    "close_wait": "tcp_close_wait", "established": "tcp_established",
}  # fmt: skip


class AlertMetric(BaseModel):
    """One metric of an incident: its own peak and the band that peak broke."""

    metric: str
    direction: Literal["spike", "dip"]
    started: str
    peak: float
    band_low: float
    band_high: float


class AlertOut(BaseModel):
    """One alert (an incident: the metrics of one container that broke their bands
    together): what moved, how far from its band, since when, and why."""

    id: str
    container: str
    metric: str
    rule: str = Field(description="the custom rule's name; empty for the model's alerts")
    status: Literal["open", "resolved"]
    severity: Severity
    started: str
    updated: str
    resolved: str | None
    observed: float = Field(description="latest value (per second for rates)")
    peak: float
    expected: float
    band_low: float
    band_high: float
    band_basis: str = Field(description="week: this hour on this weekday; day: this hour")
    score: float
    related: dict[str, float] = Field(description="other metrics that moved: x expected")
    restarts: int = Field(description="container restarts in the hour before")
    explanation: str
    verdict: str | None = Field(description="false_positive or confirmed, if marked")
    direction: Literal["spike", "dip"] = Field(default="spike", description="of `metric`")
    metrics: list[AlertMetric] = Field(
        default_factory=list,
        description="every metric of the incident (the first names it), each with its peak "
        "and the band it broke",
    )


class AlertList(BaseModel):
    """Alerts, most severe first (severity, then score, then newest)."""

    alerts: list[AlertOut]
    omitted: int = Field(description="matching alerts after this page")
    next: str | None = None
    hint: str | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _drop_none(self, handler)


class AlertDetail(BaseModel):
    """One alert with the traffic around it."""

    alert: AlertOut
    traffic: TrafficSeries | None = Field(description="the metric from 30 min before to after")


class HourBand(BaseModel):
    """Expected band of one hour of the week."""

    hour_of_week: int = Field(description="0 = Monday 00:00-01:00 UTC")
    low: float
    expected: float
    high: float
    basis: str


class WeekBands(BaseModel):
    """Every hour of the week's band, indexed by hour of the week (0: Monday 00:00 UTC)."""

    low: list[float]
    expected: list[float]
    high: list[float]
    basis: dict[str, int] = Field(description="hours per basis")


class Baseline(BaseModel):
    """What a container's metric usually does at this hour of the week (UTC); with
    ``week``, at every hour."""

    container: str
    metric: str
    unit: str
    learned_samples: int
    hours: list[HourBand] = Field(description="this hour of the week")
    week: WeekBands | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _drop_none(self, handler)


class Verdict(BaseModel):
    """The feedback recorded for an alert."""

    id: str
    verdict: Literal["false_positive", "confirmed"]
    note: str
    effect: str


def unit_of(metric: str, aggregation: str) -> str:
    """The unit of a metric's value under an aggregation.

    Examples
    --------
    >>> unit_of("bytes_sent", "sum"), unit_of("bytes", "max"), unit_of("connections", "sum")
    ('bytes', 'bytes/s', 'connections')
    """
    if metric == "connections" or metric.startswith("tcp_"):
        return "connections" if metric == "connections" else "sockets"
    base = "bytes" if metric.startswith("bytes") else "packets"
    if metric in ("errors", "drops"):
        base = metric
    return base if aggregation == "sum" else f"{base}/s"


def _combine(values: Sequence[float | int | None], aggregation: str) -> float | None:
    """All containers' value from each one's: sum and avg add up, max and min take extremes.

    Examples
    --------
    >>> _combine([1, None, 2.5], "sum"), _combine([1, 3], "max"), _combine([None], "min")
    (3.5, 3.0, None)
    """
    have = [float(v) for v in values if v is not None]
    if not have:
        return None
    if aggregation in ("sum", "avg"):
        return sum(have)
    return max(have) if aggregation == "max" else min(have)


#: The store metrics ``get_network_stats`` answers with (the columns it reads).
STATS_METRICS = ("tx_bytes", "rx_bytes", "connections", "errors", "tx_packets", "rx_packets",
                 "drops")  # fmt: skip


def _data(s: ContainerStats) -> StatsData:
    v = s.values
    return StatsData(
        bytes_sent=v["tx_bytes"], bytes_received=v["rx_bytes"], connections=v["connections"],
        errors=v["errors"], packets_sent=v["tx_packets"], packets_received=v["rx_packets"],
        drops=v["drops"],
    )  # fmt: skip


def _with_open(data: StatsData | None, fresh: OpenTraffic) -> StatsData:
    """``data`` (sums) with the counts of samples not in closed minutes added."""
    base = data.model_dump() if data is not None else dict.fromkeys(StatsData.model_fields)
    add = {"bytes_sent": ("tx_bytes",), "bytes_received": ("rx_bytes",),
           "packets_sent": ("tx_packets",), "packets_received": ("rx_packets",),
           "errors": ("rx_errors", "tx_errors"), "drops": ("rx_drops", "tx_drops")}  # fmt: skip
    for field, counters in add.items():
        base[field] = (base[field] or 0) + sum(fresh.sums[c] for c in counters)
    return StatsData.model_validate(base)


def _together(data: Sequence[StatsData], aggregation: str) -> StatsData:
    """Every container together: sums and mean rates add up; max and min are the
    extremes among containers (the busiest container's peak, not the peak of the total)."""
    return StatsData.model_validate({
        f: _combine([getattr(d, f) for d in data], aggregation) for f in StatsData.model_fields
    })  # fmt: skip


def _provisional(fresh: Sequence[OpenTraffic]) -> Provisional | None:
    """What samples of open minutes added, all containers together (None: nothing)."""
    if not fresh:
        return None
    return Provisional(
        since=iso(min(o.from_ms for o in fresh)), through=iso(max(o.through_ms for o in fresh)),
        samples=sum(o.samples for o in fresh),
        bytes_sent=sum(o.sums["tx_bytes"] for o in fresh),
        bytes_received=sum(o.sums["rx_bytes"] for o in fresh),
    )  # fmt: skip


def resolve_container(name: str, known: Sequence[Any], listing: str = "list_containers") -> str:
    """The identity of the container ``name`` designates among ``known`` (records with
    ``container``, ``name``, ``compose_service``, ``compose_project``, ``container_id``):
    an identity, a name, a compose service or project, or an id prefix of 4+ characters.
    ``listing``: the tool an error points to for the known names.

    Examples
    --------
    >>> from types import SimpleNamespace as C
    >>> known = [C(container="shop/api", name="api-1", compose_service="api",
    ...            compose_project="shop", container_id="abcdef")]
    >>> resolve_container("api-1", known), resolve_container("abcd", known)
    ('shop/api', 'shop/api')
    """
    name = name.strip()
    if not name:
        raise ToolInputError(f"container is empty: name one (see {listing})")
    found = _matches(name, known)
    if found is not None:
        return found
    names = sorted({s.container for s in known} | {s.name for s in known if s.name})
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.3)
    hint = f"closest known: {', '.join(close)}" if close else "no container is close"
    if not names:
        hint = "no container has data yet"
    raise ToolInputError(f"unknown container {quoted(name)}: {hint} (see {listing})")


@dataclass
class StoreReaders:
    """What the tools read: the window tables, and the tables beside them (None: absent)."""

    query: TrafficQuery
    alerts: AlertTable | None = None
    feedback: FeedbackTable | None = None
    bands: BandTable | None = None
    directory: ContainerDirectory | None = None


#: How long the fallback container list (a data dir without a ``directory`` table,
#: answered from every window row) is kept before it is read again.
FALLBACK_DIRECTORY_S = 60.0
#: Forecasts kept (the least recently used go first).
FORECAST_CACHE = 64


class TelemetryTools:
    """The answers behind the MCP tools, over one long-lived :class:`TrafficQuery`.

    Built over open tables, or (:meth:`for_data_dir`) over a data dir whose tables are
    opened at the first question, so a server answers ``initialize`` before the store
    layer (polars, deltalake) is even imported.
    """

    def __init__(self, query: TrafficQuery | None = None, *,
                 clock: Callable[[], float] = time.time, alerts: AlertTable | None = None,
                 feedback: FeedbackTable | None = None, bands: BandTable | None = None,
                 directory: ContainerDirectory | None = None,
                 open_store: Callable[[], StoreReaders] | None = None,
                 data_dir: str | None = None) -> None:  # fmt: skip
        if query is None and open_store is None:
            raise ValueError("TelemetryTools needs a query or a way to open the store")
        self.clock = clock
        self._store = None if query is None else StoreReaders(query, alerts, feedback, bands,
                                                              directory)  # fmt: skip
        self._open_store = open_store
        self._opening = threading.Lock()
        self.data_dir = data_dir or (None if query is None else query.minute.uri.rsplit("/", 1)[0])
        self._fallback: tuple[float, list[DirectoryEntry]] | None = None
        self._forecasts: ForecastCache | None = None

    @classmethod
    def for_data_dir(cls, data_dir: str, *, partitions: int, topic: str = "nettel.stats",
                     storage_options: dict[str, str] | None = None) -> TelemetryTools:  # fmt: skip
        """Tools over every table under ``data_dir``, opened at the first question."""
        base = data_dir.rstrip("/")
        opts = storage_options

        def open_store() -> StoreReaders:
            from nettel.store.alerts import AlertTable, FeedbackTable
            from nettel.store.bands import BandTable
            from nettel.store.directory import ContainerDirectory
            from nettel.store.query import TrafficQuery

            return StoreReaders(
                TrafficQuery(base, partitions=partitions, topic=topic, storage_options=opts),
                alerts=AlertTable(f"{base}/alerts", storage_options=opts),
                feedback=FeedbackTable(f"{base}/alert_feedback", storage_options=opts),
                bands=BandTable(f"{base}/bands", storage_options=opts),
                directory=ContainerDirectory(f"{base}/directory", storage_options=opts),
            )  # fmt: skip

        return cls(open_store=open_store, data_dir=base)

    @property
    def store(self) -> StoreReaders:
        """The tables (opened now if they were not yet: thread-safe)."""
        if self._store is None:
            with self._opening:
                if self._store is None:
                    assert self._open_store is not None
                    self._store = self._open_store()
        return self._store

    @property
    def query(self) -> TrafficQuery:
        """The window tables' query layer."""
        return self.store.query

    @property
    def alerts(self) -> AlertTable | None:
        """The alerts table (None: not given)."""
        return self.store.alerts

    @property
    def feedback(self) -> FeedbackTable | None:
        """The alert feedback table (None: not given)."""
        return self.store.feedback

    @property
    def bands(self) -> BandTable | None:
        """The bands table (None: not given)."""
        return self.store.bands

    def now_ms(self) -> int:
        """Now, in ms since the epoch."""
        return int(self.clock() * 1000)

    def warm(self) -> None:
        """Load the container directory and answer one question of each kind that the
        tables serve: a month's top consumer (every traffic table's snapshot, file list
        and the rollups' pending rows, which the query layer keeps), a day's alerts, a
        band, a forecast (River's import, and the hourly history's files, which the query
        layer keeps too). Then the first question is answered as fast as the next ones.
        The server calls it once serving; it holds only what those caches hold."""
        known = self._known()
        self.query.newest_end_ms()
        self.top_consumers("month", "bytes", "sum", True, 1)
        self.anomalies(None, "24h", None, "any", 1)
        import nettel.report  # noqa: F401  (forecasts and reports: River)

        if known:
            recent = max(known, key=lambda e: (e.last_seen_ms, e.container)).container
            if self.bands is not None:
                self.bands.weekly(recent, "tx_bytes")
            with contextlib.suppress(ToolInputError):  # under three days of history
                self.forecast(recent, "bytes", 7)

    def as_of(self) -> str:
        """The end of the newest minute in the store (UTC), for answers that say no better."""
        newest = self.query.newest_end_ms()
        return "no data yet" if newest is None else iso(min(newest, self.now_ms()))

    def _known(self, *, fresh: bool = False) -> list[DirectoryEntry]:
        """Every container seen: the ``directory`` table the stream worker keeps (reloaded
        when it changes; ``fresh``: check now); without one (a store from before it),
        every container of every window row, read again after a minute."""
        directory = self.store.directory
        if directory is not None:
            entries = directory.entries(max_age_s=0 if fresh else 2.0)
            if entries or directory.exists():
                return entries
        now = time.monotonic()
        if self._fallback is None or fresh or now - self._fallback[0] > FALLBACK_DIRECTORY_S:
            from nettel.store.directory import DirectoryEntry

            self._fallback = (now, [
                DirectoryEntry(container=s.container, name=s.name, container_id=s.container_id,
                               image=s.image, compose_project=s.compose_project,
                               compose_service=s.compose_service, host=s.host, partition=-1,
                               first_seen_ms=s.first_ms, last_seen_ms=s.through_ms)
                for s in self.query.stats(0, self.now_ms() + 60_000)
            ])  # fmt: skip
        return self._fallback[1]

    def resolve(self, name: str) -> str:
        """The identity of the container ``name`` designates (see the module docstring)."""
        name = name.strip()
        if name and _matches(name, self._known()) is None:
            # a container newer than the directory this server holds?
            return resolve_container(name, self._known(fresh=True))
        return resolve_container(name, self._known())

    def network_stats(self, container: str | None, timeframe: Timeframe,
                      aggregation: Aggregation, limit: int = 10,
                      cursor: str | None = None) -> NetworkStats:  # fmt: skip
        """``get_network_stats``: closed minutes from the tables; with ``sum``, the
        samples of minutes not closed yet too (marked ``provisional``)."""
        now = self.now_ms()
        start, end = window(timeframe, now)
        named = [self.resolve(container)] if container is not None else None
        rows = self.query.stats(start, end, aggregation=aggregation, containers=named,
                                metrics=STATS_METRICS)  # fmt: skip
        fresh = {} if aggregation != "sum" else self.query.open_traffic(
            start, now, {s.container: s.through_ms for s in rows}, named)  # fmt: skip
        newest = max([s.through_ms for s in rows] + [o.through_ms for o in fresh.values()],
                     default=None)  # fmt: skip
        as_of = iso(newest) if newest is not None else None
        data = {s.container: _data(s) for s in rows}
        for c, o in fresh.items():
            data[c] = _with_open(data.get(c), o)
        if named is not None:
            identity = named[0]
            empty = StatsData.model_validate(dict.fromkeys(StatsData.model_fields))
            return NetworkStats(container=identity, timeframe=timeframe,
                                data=data.get(identity, empty),
                                provisional=_provisional(list(fresh.values())),
                                as_of=as_of)  # fmt: skip
        busiest = sorted(data, key=lambda c: (-((data[c].bytes_sent or 0)
                                                + (data[c].bytes_received or 0)), c))  # fmt: skip
        shown = page("get_network_stats", busiest, cursor, limit)
        return NetworkStats(
            container=ALL, timeframe=timeframe, data=_together(list(data.values()), aggregation),
            provisional=_provisional(list(fresh.values())),
            containers=[NetworkStats(container=c, timeframe=timeframe, data=data[c])
                        for c in shown.items],
            total=shown.total, next=shown.next_cursor, hint=shown.hint("busiest first"),
            as_of=as_of,
        )  # fmt: skip

    def list_containers(
        self,
        limit: int = 20,
        cursor: str | None = None,
        state: Literal["any", "active", "inactive"] = "any",
    ) -> ContainerList:
        """``list_containers``: active first, then the busiest (bytes/s, last 5 minutes);
        names, ids and first/last seen from the container directory."""
        now = self.now_ms()
        known = self._known()
        recent_start = now - now % 60_000 - 5 * 60_000 - ACTIVE_WITHIN_MS
        recent = {s.container: s for s in self.query.stats(
            recent_start, now + 60_000, aggregation="avg",
            metrics=("rx_bytes", "tx_bytes", "bytes", "connections"))}  # fmt: skip

        def last_seen(e: DirectoryEntry) -> int:
            r = recent.get(e.container)
            return max(e.last_seen_ms, r.through_ms if r is not None else 0)

        def active(e: DirectoryEntry) -> bool:
            return last_seen(e) >= now - ACTIVE_WITHIN_MS

        def rate(c: str) -> float:
            r = recent.get(c)
            return 0.0 if r is None else float(r.values["bytes"] or 0)

        ranked = sorted((e for e in known if state == "any" or active(e) == (
            state == "active")), key=lambda e: (not active(e), -rate(e.container),
                                                e.container))  # fmt: skip
        shown = page("list_containers", ranked, cursor, limit, size=lambda _: 300)
        out = []
        for e in shown.items:
            r = recent.get(e.container)
            out.append(ContainerInfo(
                container=e.container, name=e.name, image=e.image,
                compose_service=e.compose_service, container_id=e.container_id[:12],
                state="active" if active(e) else "inactive",
                first_seen=iso(e.first_seen_ms), last_seen=iso(last_seen(e)),
                rx_bytes_per_s=r.values["rx_bytes"] if r else None,
                tx_bytes_per_s=r.values["tx_bytes"] if r else None,
                connections=r.values["connections"] if r else None,
            ))  # fmt: skip
        return ContainerList(containers=out, total=shown.total, next=shown.next_cursor,
                             hint=shown.hint("active first, busiest first"))  # fmt: skip

    def top_consumers(self, timeframe: Timeframe, metric: Metric, aggregation: Aggregation,
                      largest: bool, limit: int) -> TopConsumers:  # fmt: skip
        """``get_top_consumers``; sums of counters include the samples of minutes not
        closed yet (as ``get_network_stats`` does)."""
        _check_metric(metric)
        now = self.now_ms()
        start, end = window(timeframe, now)
        store_metric = STORE_METRIC[metric]
        counter = not (metric.startswith("tcp_") or metric == "connections")
        if aggregation == "sum" and counter:
            rows = self.query.stats(start, end, aggregation="sum", metrics=[store_metric])
            values: dict[str, int] = {s.container: int(s.values[store_metric] or 0) for s in rows}
            fresh = self.query.open_traffic(start, now, {s.container: s.through_ms for s in rows})
            for c, o in fresh.items():
                parts = TOTALS.get(store_metric, (store_metric,))
                values[c] = values.get(c, 0) + sum(o.sums[p] for p in parts)
            total = sum(values.values())
            sign = -1 if largest else 1
            ranked = sorted(values.items(), key=lambda kv: (sign * kv[1], kv[0]))[:limit]
            return TopConsumers(
                timeframe=timeframe, metric=metric, aggregation=aggregation,
                unit=unit_of(metric, aggregation), total=total,
                top=[TopEntryOut(container=c, value=v, share=v / total if total else None)
                     for c, v in ranked],
            )  # fmt: skip
        top = self.query.top(start, end, metric=store_metric, n=limit, aggregation=aggregation,
                             largest=largest)  # fmt: skip
        combined = None
        if aggregation in ("sum", "avg") and not metric.startswith("tcp_"):
            rows = self.query.stats(start, end, aggregation=aggregation, metrics=[store_metric])
            combined = _combine([s.values[store_metric] for s in rows], aggregation)
        return TopConsumers(
            timeframe=timeframe, metric=metric, aggregation=aggregation,
            unit=unit_of(metric, aggregation), total=combined,
            top=[TopEntryOut(container=t.container, value=t.value, share=t.share) for t in top],
        )  # fmt: skip

    def timeseries(self, container: str, timeframe: Timeframe, metric: Metric,
                   aggregation: Aggregation, max_points: int) -> TrafficSeries:  # fmt: skip
        """``get_traffic_timeseries``."""
        _check_metric(metric)
        identity = self.resolve(container)
        start, end = window(timeframe, self.now_ms())
        series = self.query.timeseries(identity, start, end, metric=STORE_METRIC[metric],
                                       aggregation=aggregation, max_points=max_points)  # fmt: skip
        return TrafficSeries(
            container=identity, timeframe=timeframe, metric=metric, aggregation=aggregation,
            unit=unit_of(metric, aggregation),
            bucket_seconds=None if series.bucket_ms is None else series.bucket_ms // 1000,
            points=[Point(ts=iso(t), value=v) for t, v in zip(series.ts_ms, series.values,
                                                               strict=True)],
            summary=series.summary(),
        )  # fmt: skip

    def what_changed(self, since: str, limit: int = 10, cursor: str | None = None) -> Changes:
        """``what_changed``: the last 24 hours (``yesterday``) or 7 days (``last_week``)
        against the same length of time just before; containers ranked by the size of
        their change in bytes."""
        if since not in CHANGE_PERIOD_MS:
            raise ToolInputError(
                f"since {quoted(since)} is not a period: expected one of "
                f"{', '.join(CHANGE_PERIOD_MS)}"
            )
        length = CHANGE_PERIOD_MS[since]
        now = self.now_ms()
        end = now - now % 60_000
        start, before = end - length, end - 2 * length
        after_rows = self.query.stats(start, end, metrics=["bytes"])
        fresh = self.query.open_traffic(start, now, {s.container: s.through_ms
                                                     for s in after_rows})  # fmt: skip
        after = {s.container: int(s.values["bytes"] or 0) for s in after_rows}
        for c, o in fresh.items():
            after[c] = after.get(c, 0) + o.sums["rx_bytes"] + o.sums["tx_bytes"]
        prior = {s.container: int(s.values["bytes"] or 0)
                 for s in self.query.stats(before, start, metrics=["bytes"])}  # fmt: skip

        def total(value: int | None) -> int:
            return value or 0

        deltas = [
            Change(container=c, bytes_now=total(after.get(c)), bytes_before=total(prior.get(c)),
                   delta=total(after.get(c)) - total(prior.get(c)),
                   ratio=(total(after.get(c)) / total(prior.get(c))) if total(prior.get(c))
                   else None)
            for c in after.keys() | prior.keys()
        ]  # fmt: skip
        deltas.sort(key=lambda d: (-abs(d.delta), d.container))
        shown = page("what_changed", deltas, cursor, limit)
        new = sorted(after.keys() - prior.keys())
        gone = sorted(prior.keys() - after.keys())
        opened, resolved = self._alerts_between(start, end)
        return Changes(
            period=since, since=iso(start), compared_with=iso(before),
            until=iso(max([end, *(o.through_ms for o in fresh.values())])),
            bytes_now=sum(total(x) for x in after.values()),
            bytes_before=sum(total(x) for x in prior.values()),
            containers=shown.items, total=shown.total, next=shown.next_cursor,
            hint=shown.hint("largest change first"),
            new_containers=new[:NAMES_LISTED], new_count=len(new),
            gone_containers=gone[:NAMES_LISTED], gone_count=len(gone),
            alerts_opened=opened, alerts_resolved=resolved,
        )  # fmt: skip

    def _alerts_between(self, start_ms: int, end_ms: int) -> tuple[AlertCount, AlertCount]:
        """Alerts opened and resolved in [start, end): counts by severity, top containers."""
        opened: list[dict[str, Any]] = []
        resolved: list[dict[str, Any]] = []
        for r in self._alert_rows(start_ms):
            started = int(r["started"].timestamp() * 1000)
            if start_ms <= started < end_ms:
                opened.append(r)
            done = r["resolved"]
            if done is not None and start_ms <= int(done.timestamp() * 1000) < end_ms:
                resolved.append(r)
        return _count(opened), _count(resolved)

    # ---- reports ------------------------------------------------------------

    def daily_report(self, date: str | None, data_dir: str, full: bool = False) -> DailyReportOut:
        """``get_daily_report``: the stored report of ``date`` (default yesterday, UTC),
        else one built now from the store: when none is stored, or when the stored one is
        older than the data it summarises (late data for the day landed since)."""
        from nettel.report import build_daily_report, load_report, report_is_current, yesterday
        from nettel.report.render import render_markdown

        try:
            day = dt.date.fromisoformat(date.strip()) if date else yesterday("UTC")
        except ValueError:
            raise ToolInputError(
                f"date {quoted(date)} is not a day: expected YYYY-MM-DD (default: yesterday)"
            ) from None
        today = dt.datetime.fromtimestamp(self.now_ms() / 1000, dt.UTC).date()
        if day > today:
            raise ToolInputError(f"date {day} is in the future: expected {today} or before")
        report = load_report(data_dir, day)
        stored = report is not None and report_is_current(self.query, report)
        if report is None or not stored:
            tz = "UTC" if report is None else report.timezone
            report = build_daily_report(self.query, day, tz=tz, alerts=_alert_records(self, day))
        doc = msgspec.to_builtins(report)
        markdown = render_markdown(report)
        if len(markdown) > REPORT_CHARS and not full:
            cut = markdown.rfind("\n", 0, REPORT_CHARS)
            markdown = (markdown[: cut if cut > 0 else REPORT_CHARS] + "\n\n… (cut; the whole "
                        f"report: resource nettel://reports/daily/{day.isoformat()})")  # fmt: skip
        return DailyReportOut(date=day.isoformat(), stored=stored, markdown=markdown,
                              totals=doc.get("totals", {}), top=doc.get("top", [])[:5])  # fmt: skip

    def forecast(self, container: str, metric: Metric, horizon_days: int) -> ForecastOut:
        """``forecast_traffic`` (fits kept per container and history: :class:`ForecastCache`)."""
        from nettel.report.forecast import ForecastCache

        _check_metric(metric)
        store_metric = STORE_METRIC[metric]
        if store_metric == "connections" or store_metric.startswith("tcp_"):
            raise ToolInputError(
                f"no forecast for {quoted(metric)}: expected one of bytes, bytes_sent, "
                "bytes_received, packets, packets_sent, packets_received, errors, drops"
            )
        identity = self.resolve(container)
        if self._forecasts is None:
            self._forecasts = ForecastCache(FORECAST_CACHE)
        fc = self._forecasts.forecast(self.query, identity, metric=store_metric,
                                      horizon_hours=horizon_days * 24,
                                      now_ms=self.now_ms())  # fmt: skip
        if fc is None:
            raise ToolInputError(f"{identity!r} has under three days of history: no forecast yet")
        rows = zip(fc.values, fc.low, fc.high, strict=True)
        hours = [ForecastPoint(ts=iso(fc.start_ms + i * 3_600_000), expected=v, low=lo, high=hi)
                 for i, (v, lo, hi) in enumerate(rows)]  # fmt: skip
        days = [
            ForecastPoint(ts=hours[i].ts, expected=sum(fc.values[i:i + 24]),
                          low=sum(fc.low[i:i + 24]), high=sum(fc.high[i:i + 24]))
            for i in range(0, len(hours), 24)
        ]  # fmt: skip
        return ForecastOut(container=identity, metric=metric, unit=unit_of(metric, "sum"),
                           model=fc.model, level=fc.level, history_hours=fc.history_hours,
                           hours=hours[:24], days=days)  # fmt: skip

    # ---- alerts -------------------------------------------------------------

    def _verdicts(self) -> dict[str, str]:
        if self.feedback is None:
            return {}
        rows = self.feedback.rows()
        return dict(zip(rows["id"].to_list(), rows["verdict"].to_list(), strict=True))

    def _alert_rows(self, since_ms: int | None = None) -> list[dict[str, Any]]:
        if self.alerts is None:
            return []
        return list(self.alerts.latest(since_ms).iter_rows(named=True))

    @staticmethod
    def alert_out(r: dict[str, Any], verdicts: dict[str, str]) -> AlertOut:
        """The answer of an alert row (``verdicts``: the verdicts marked, by alert id)."""

        def ms(t: Any) -> int:
            return int(t.timestamp() * 1000)

        return AlertOut(
            id=r["id"], container=r["container"], metric=r["metric"], rule=r["rule"] or "",
            status="resolved" if r["status"] == "resolved" else "open",
            severity=r["severity"], started=iso(ms(r["started"])),
            updated=iso(ms(r["updated"])),
            resolved=None if r["resolved"] is None else iso(ms(r["resolved"])),
            observed=r["observed"], peak=r["peak"], expected=r["expected"],
            band_low=r["band_low"], band_high=r["band_high"], band_basis=r["band_basis"] or "",
            score=r["score"], related=json.loads(r["related"] or "{}"),
            restarts=r["restarts"] or 0, explanation=r["explanation"],
            verdict=verdicts.get(r["id"]), direction=r.get("direction") or "spike",
            metrics=[
                AlertMetric(metric=m["metric"], direction=m["direction"],
                            started=iso(ms(m["started"])), peak=m["peak"],
                            band_low=m["band_low"], band_high=m["band_high"])
                for m in r.get("metrics") or ()
            ],
        )  # fmt: skip

    def anomalies(self, container: str | None, since: str | None, severity: str | None,
                  status: str, limit: int, cursor: str | None = None,
                  kind: str = "network") -> AlertList:  # fmt: skip
        """``get_anomalies``: alerts of ``kind`` (:data:`RULE_KIND`; ``any``: every kind)
        in :func:`triage_key` order, one incident per item."""
        if kind not in ("network", "resource", "action", "any"):
            raise ToolInputError(
                f"unknown kind {quoted(kind)}: expected one of network, resource, action, any"
            )
        since_ms = parse_since(since, self.now_ms())
        identity = self.resolve(container) if container else None
        verdicts = self._verdicts()
        return ranked_alerts("get_anomalies", self._alert_rows(since_ms),
                             lambda r: self.alert_out(r, verdicts), kind=kind,
                             identity=identity, severity=severity, status=status,
                             limit=limit, cursor=cursor, as_list=AlertList)  # fmt: skip

    def _alert(self, alert_id: str) -> dict[str, Any]:
        alert_id = alert_id.strip()
        rows = [r for r in self._alert_rows() if r["id"] == alert_id]
        if not rows:
            raise ToolInputError(
                f"unknown alert id {quoted(alert_id)}: ids come from get_anomalies (20 hex digits)"
            )
        return rows[0]

    def explain(self, alert_id: str) -> AlertDetail:
        """``explain_anomaly``."""
        r = self._alert(alert_id)
        a = self.alert_out(r, self._verdicts())
        start = int(r["started"].timestamp() * 1000) - 30 * 60_000
        end_at = r["resolved"] or r["updated"]
        end = min(int(end_at.timestamp() * 1000) + 30 * 60_000, self.now_ms() + 60_000)
        metric = DETECT_METRIC.get(r["metric"])
        traffic = None
        if metric is not None and end > start:
            series = self.query.timeseries(r["container"], start, end, metric=metric,
                                           aggregation="max", max_points=60)  # fmt: skip
            traffic = TrafficSeries(
                container=r["container"], timeframe="hour", metric=_tool_metric(metric),
                aggregation="max", unit=unit_of(_tool_metric(metric), "max"),
                bucket_seconds=None if series.bucket_ms is None else series.bucket_ms // 1000,
                points=[Point(ts=iso(t), value=v) for t, v in zip(series.ts_ms, series.values,
                                                                   strict=True)],
                summary=series.summary(),
            )  # fmt: skip
        return AlertDetail(alert=a, traffic=traffic)

    def mark(self, alert_id: str, verdict: str, note: str) -> Verdict:
        """``mark_alert``: the only write."""
        if verdict not in ("false_positive", "confirmed"):
            raise ToolInputError(
                f"unknown verdict {quoted(verdict)}: expected one of false_positive, confirmed"
            )
        if self.feedback is None:
            raise ToolInputError("this server has no feedback table")
        r = self._alert(alert_id)
        # one row per metric of the incident (alerts from before incidents: the one metric)
        evidence = r.get("metrics") or [
            {"metric": r["metric"], "started": r["started"], "peak": r["peak"]}]  # fmt: skip
        for m in evidence:
            started_ms = int(m["started"].timestamp() * 1000)
            self.feedback.append(r["id"], verdict, note[:500], container=r["container"],
                                 metric=m["metric"], started_ms=started_ms, peak=m["peak"],
                                 now_ms=self.now_ms())  # fmt: skip
        effect = (
            f"the detector will widen {r['container']}'s "
            f"{', '.join(m['metric'] for m in evidence)} band for that hour "
            "of the week at its next checkpoint"
            if verdict == "false_positive"
            else "recorded; the alert stands"
        )
        return Verdict(id=r["id"], verdict=verdict, note=note[:500], effect=effect)  # type: ignore[arg-type]

    def baseline(self, container: str, metric: str, hours: str = "now") -> Baseline:
        """``get_baseline``: the band of this hour of the week (``hours="week"``: all 168),
        from the bands table the detector writes (never detector state)."""
        if metric not in DETECT_METRIC:
            raise ToolInputError(
                f"unknown metric {quoted(metric)}: expected one of {', '.join(DETECT_METRIC)}"
            )
        identity = self.resolve(container)
        week = None if self.bands is None else self.bands.weekly(identity, metric)
        if week is None:
            raise ToolInputError(
                f"no baseline for {identity!r} {metric} yet: the detector has not checkpointed "
                "it (is `nettel detect` or `nettel up` running?)"
            )
        unit = "connections" if metric in ("connections",) else (
            "sockets" if metric in ("syn_recv", "time_wait", "close_wait", "established")
            else f"{metric}/s")  # fmt: skip
        return Baseline(
            container=identity, metric=metric, unit=unit, learned_samples=week.learned_samples,
            hours=[HourBand(hour_of_week=h, low=low, expected=expected, high=high, basis=basis)
                   for h, (low, expected, high, basis) in enumerate(week.slots)
                   if h == hour_of_week(self.now_ms())],
            week=None if hours != "week" else WeekBands(
                low=[low for low, _, _, _ in week.slots],
                expected=[expected for _, expected, _, _ in week.slots],
                high=[high for _, _, high, _ in week.slots],
                basis={k: sum(basis == k for *_, basis in week.slots)
                       for k in sorted({basis for *_, basis in week.slots})},
            ),
        )  # fmt: skip


CHANGE_PERIOD_MS: dict[str, int] = {"yesterday": DAY_MS, "last_week": 7 * DAY_MS}
#: New or gone containers named in a what_changed answer (the rest are counted).
NAMES_LISTED = 20


class Change(BaseModel):
    """One container's traffic (rx + tx bytes) in the period and the one before."""

    container: str
    bytes_now: int
    bytes_before: int
    delta: int
    ratio: float | None = Field(description="now / before (None: nothing before)")


class AlertCount(BaseModel):
    """Alerts of a period: how many, by severity, and the containers with the most."""

    count: int
    by_severity: dict[str, int]
    top_containers: dict[str, int]


class Changes(BaseModel):
    """What changed in the last day (or week) against the one before."""

    period: str
    since: str
    until: str
    compared_with: str = Field(description="start of the period before")
    bytes_now: int
    bytes_before: int
    containers: list[Change]
    total: int
    next: str | None = None
    hint: str | None = None
    new_containers: list[str]
    new_count: int
    gone_containers: list[str]
    gone_count: int
    alerts_opened: AlertCount
    alerts_resolved: AlertCount

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _drop_none(self, handler)


def _count(rows: Sequence[dict[str, Any]]) -> AlertCount:
    by_severity: dict[str, int] = {}
    per_container: dict[str, int] = {}
    for r in rows:
        by_severity[r["severity"]] = by_severity.get(r["severity"], 0) + 1
        per_container[r["container"]] = per_container.get(r["container"], 0) + 1
    top = sorted(per_container.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return AlertCount(count=len(rows), by_severity=by_severity, top_containers=dict(top))


class DailyReportOut(BaseModel):
    """A day's report: Markdown for reading, and its headline figures."""

    date: str
    stored: bool = Field(
        description="false: built now (none was stored for that day, or the stored one was "
        "older than the data: late data landed since)"
    )
    markdown: str
    totals: dict[str, Any]
    top: list[dict[str, Any]] = Field(description="top consumers with their share")


class ForecastPoint(BaseModel):
    """One forecast hour."""

    ts: str
    expected: float
    low: float
    high: float


class ForecastOut(BaseModel):
    """Expected traffic per hour (or per day summed), with an interval."""

    container: str
    metric: Metric
    unit: str
    model: str
    level: float = Field(description="interval coverage, e.g. 0.95")
    history_hours: int
    hours: list[ForecastPoint] = Field(description="the first 24 hours; the rest is in days")
    days: list[ForecastPoint] = Field(description="per-day sums of the hourly forecast")


def _tool_metric(store_metric: str) -> Any:
    return next((k for k, v in STORE_METRIC.items() if v == store_metric), store_metric)


def _alert_records(tools: TelemetryTools, day: dt.date) -> list[Any] | None:
    """The alerts of ``day`` for a report built on demand (None: no detector data)."""
    from nettel.report.publish import stored_alerts

    if tools.alerts is None:
        return None
    start = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)
    base = tools.alerts.uri.rsplit("/", 1)[0]
    found = stored_alerts(base)(start, start + DAY_MS)
    return None if found is None else list(found)


L = TypeVar("L", bound=AlertList)


def ranked_alerts(
    tool: str,
    rows: Iterable[dict[str, Any]],
    out: Callable[[dict[str, Any]], AlertOut],
    *,
    kind: str,
    identity: str | None,
    severity: str | None,
    status: str,
    limit: int,
    cursor: str | None,
    as_list: type[L],
) -> L:
    """The page ``cursor`` designates of the alert ``rows`` (latest versions, as
    :meth:`~nettel.store.alerts.AlertTable.latest` gives them) of ``kind`` (``any``: all),
    of container ``identity`` (None: any), at least ``severity``, of ``status`` (``any``:
    both), each made an answer by ``out``, in :func:`triage_key` order and within the
    answer budget; the list of tool ``tool`` (its cursors), as ``as_list``."""
    found = []
    for r in rows:
        if kind != "any" and RULE_KIND.get(r["rule"] or "", "network") != kind:
            continue
        a = out(r)
        if identity is not None and a.container != identity:
            continue
        if severity is not None and SEVERITY_RANK[a.severity] < SEVERITY_RANK[severity]:
            continue
        if status != "any" and a.status != status:
            continue
        found.append(a)
    found.sort(key=triage_key)
    shown = page(tool, found, cursor, limit, size=lambda a: len(a.model_dump_json()))
    return as_list(alerts=shown.items, omitted=shown.total - shown.offset - len(shown.items),
                   next=shown.next_cursor, hint=shown.hint("most severe first"))  # fmt: skip


def parse_since(since: str | None, now_ms: int) -> int | None:
    """``since`` as epoch ms: an ISO date/time (UTC unless it says) or a duration back
    from now (``30m``, ``24h``, ``7d``); None: no bound.

    Examples
    --------
    >>> parse_since("2h", 10 * 3_600_000)
    28800000
    >>> parse_since("1970-01-02", 0)
    86400000
    >>> parse_since("yesterday", 0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nettel.mcp.answers.ToolInputError: since 'yesterday' is not a time: expected ...
    """
    if since is None or not since.strip():
        return None
    text = since.strip()
    units = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}
    if text[-1:] in units and text[:-1].isdigit():
        return now_ms - int(text[:-1]) * units[text[-1]]
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ToolInputError(
            f"since {quoted(since)} is not a time: expected an ISO date or time "
            "(2026-11-26, 2026-11-26T14:00:00Z) or a duration like 30m, 24h, 7d"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def hour_of_week(ts_ms: int) -> int:
    """Hour of the week of ``ts_ms`` (0: Monday 00:00-01:00 UTC).

    Examples
    --------
    >>> hour_of_week(0)  # 1970-01-01 was a Thursday
    72
    """
    return (ts_ms // 3_600_000 + 72) % 168


def _matches(name: str, known: Sequence[Any]) -> str | None:
    """The one identity ``name`` designates among ``known`` (None: none); raises when it
    designates several. Tried in order: identity, name/service/project, id prefix."""
    for match in (
        lambda s: s.container == name,
        lambda s: name in (s.name, s.compose_service, s.compose_project),
        lambda s: len(name) >= 4 and s.container_id.startswith(name),
    ):
        found = sorted({s.container for s in known if match(s)})
        if len(found) == 1:
            return str(found[0])
        if len(found) > 1:
            raise ToolInputError(
                f"container {quoted(name)} matches several: {', '.join(found[:10])}; name one"
            )
    return None


def _check_metric(metric: str) -> None:
    if metric not in STORE_METRIC:
        raise ToolInputError(
            f"unknown metric {quoted(metric)}: expected one of {', '.join(STORE_METRIC)}"
        )
