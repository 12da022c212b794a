"""The ``resource-monitor`` MCP server: CPU, memory, disk I/O and processes per container.

One more server of the same product: the same answer shaping, budget, errors and audit
lines as ``network-telemetry`` (:class:`~nettel.mcp.server.TelemetryServer`), the same
container naming (:func:`~nettel.mcp.tools.resolve_container`), and answers read only
through the store (:class:`~nettel.store.resource_query.ResourceQuery`). Served over
stdio with ``nettel mcp --server resource-monitor`` and over HTTP at
``/resource-monitor/mcp`` beside ``/mcp`` on the same port.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from nettel.mcp.actions import ContainerActions, register_actions
from nettel.mcp.answers import ToolInputError, page
from nettel.mcp.server import (
    AggregationArg,
    ContainerArg,
    CursorArg,
    Limit50,
    SinceArg,
    StatusArg,
    TelemetryServer,
    TimeframeArg,
    _answer,
)
from nettel.mcp.tools import (
    AlertList,
    AlertOut,
    Compact,
    Point,
    TelemetryTools,
    Timeframe,
    _combine,
    _matches,
    iso,
    parse_since,
    ranked_alerts,
    resolve_container,
    window,
)
from nettel.store.alerts import AlertTable
from nettel.store.query import Aggregation, summarize
from nettel.store.resource_query import ResourceQuery

SERVER_NAME = "resource-monitor"
HTTP_PATH = "/resource-monitor/mcp"
INSTRUCTIONS = (
    "CPU, memory, disk I/O and processes of this host's containers, from the last minutes "
    "to 30 days (cgroup counters sampled with the network ones). cpu_percent is percent of "
    "one core. Answers are compact JSON with as_of; lists are ranked and paged (limit, "
    "cursor: pass 'next' back)."
)

Resource = Literal["cpu", "memory", "disk_read", "disk_write", "pids"]
#: What each rankable resource ranks by under ``sum``, and its unit.
RANKED_BY: dict[str, tuple[str, str]] = {
    "cpu": ("cpu_seconds", "cpu seconds"), "memory": ("memory_bytes", "bytes"),
    "disk_read": ("disk_read_bytes", "bytes"), "disk_write": ("disk_write_bytes", "bytes"),
    "pids": ("pids", "processes"),
}  # fmt: skip

Number = int | float


class ResourceData(Compact):
    """One container's (or all containers') resources under one aggregation: see
    :mod:`nettel.store.resource_query` for what each value means per aggregation."""

    cpu_percent: Number | None
    memory_bytes: Number | None
    memory_limit_bytes: Number | None
    disk_read_bytes: Number | None
    disk_write_bytes: Number | None
    pids: Number | None
    cpu_seconds: Number | None = None
    cpu_throttled_percent: Number | None = None
    oom_kills: int | None = None


class ResourceStatsOut(Compact):
    """``{"container", "timeframe", "data"}`` (the shape of ``get_network_stats``); for
    every container together ``container`` is ``"*"`` and ``containers`` lists a page of
    them, the busiest CPU first."""

    container: str
    timeframe: Timeframe
    data: ResourceData
    containers: list[ResourceStatsOut] | None = None
    total: int | None = Field(default=None, description="containers in all")
    next: str | None = Field(default=None, description="cursor of the next page")
    hint: str | None = None
    as_of: str | None = None


class ResourceTopEntry(Compact):
    """One ranked container."""

    container: str
    value: Number
    share: float | None = Field(default=None, description="of all containers' total, percent")
    memory_limit_bytes: int | None = None


class ResourceTop(BaseModel):
    """Containers ranked by a resource over a timeframe."""

    timeframe: Timeframe
    resource: Resource
    aggregation: Aggregation
    unit: str
    top: list[ResourceTopEntry]
    total: int
    as_of: str | None = None


SeriesMetric = Literal["cpu_percent", "memory_bytes", "disk_read_bytes", "disk_write_bytes",
                       "pids"]  # fmt: skip
SERIES_UNITS = {"cpu_percent": "percent of a core", "memory_bytes": "bytes (peak)",
                "disk_read_bytes": "bytes", "disk_write_bytes": "bytes",
                "pids": "processes (peak)"}  # fmt: skip


class ResourceSeries(BaseModel):
    """One container's resource over a timeframe in time buckets, with a summary."""

    container: str
    timeframe: Timeframe
    metric: SeriesMetric
    unit: str
    bucket_seconds: int
    points: list[Point]
    summary: dict[str, float | None] = Field(description="min, max, avg, p95 of the points")
    as_of: str | None = None


ProcessSort = Literal["cpu", "rss"]


class ProcessEntry(Compact):
    """One process of a container (its PID as the host sees it)."""

    pid: int
    command: str
    state: str = Field(description="R running, S sleeping, D disk wait, Z zombie, ...")
    cpu_seconds: float = Field(description="user + system since it started")
    rss_bytes: int


class ProcessList(BaseModel):
    """A container's processes now, ranked."""

    container: str
    sort_by: ProcessSort
    processes: list[ProcessEntry]
    total: int = Field(description="processes in the container")
    as_of: str


#: ``processes(container)``: the container's name and its processes, read now; raises
#: :class:`~nettel.mcp.answers.ToolInputError` naming the running containers when
#: ``container`` is none of them (given by the composition root: the mcp layer reads
#: no engine and no ``/proc`` itself).
ListProcesses = Callable[[str], tuple[str, Sequence[ProcessEntry]]]


def rank_processes(container: str, found: Sequence[ProcessEntry], sort_by: ProcessSort,
                   limit: int, now_ms: int) -> ProcessList:  # fmt: skip
    """The ``limit`` processes using the most CPU seconds (``cpu``) or resident memory
    (``rss``), ties by PID.

    Examples
    --------
    >>> ps = [ProcessEntry(pid=1, command="sh", state="S", cpu_seconds=0.5, rss_bytes=900),
    ...       ProcessEntry(pid=7, command="dd", state="R", cpu_seconds=9.0, rss_bytes=100)]
    >>> [p.pid for p in rank_processes("web", ps, "rss", 5, 0).processes]
    [1, 7]
    >>> r = rank_processes("web", ps, "cpu", 1, 0)
    >>> [p.pid for p in r.processes], r.total
    ([7], 2)
    """
    key: Callable[[ProcessEntry], tuple[float, int]] = (
        (lambda p: (-p.cpu_seconds, p.pid))
        if sort_by == "cpu"
        else (lambda p: (-p.rss_bytes, p.pid))
    )
    ranked = sorted(found, key=key)[:limit]
    return ProcessList(container=container, sort_by=sort_by, processes=ranked,
                       total=len(found), as_of=iso(now_ms))  # fmt: skip


class ResourceAlert(AlertOut):
    """A resource alert (a memory leak, an OOM kill, CPU throttling)."""

    time_to_limit_s: float | None = Field(
        default=None, description="memory leak: projected seconds until the memory limit"
    )


class ResourceAlertList(AlertList):
    """Resource alerts, most severe first (severity, then score, then newest)."""

    alerts: list[ResourceAlert]  # type: ignore[assignment]  # pydantic: narrowed on purpose


Outlook = Literal["reaches limit", "not growing", "no limit"]


class MemoryForecast(Compact):
    """Where a container's memory is heading: the trend of its last hour of minutes and,
    if it keeps growing, when it reaches its limit."""

    container: str
    outlook: Outlook
    memory_bytes: int = Field(description="the newest minute's peak")
    memory_limit_bytes: int | None
    slope_bytes_per_s: float = Field(description="the fitted line's slope")
    r2: float = Field(description="how well the line fits, 0-1")
    minutes: int = Field(description="minutes the line is fitted to")
    time_to_limit_s: float | None = None
    explanation: str
    as_of: str


#: The minutes of ``resource_minute`` a memory forecast fits its line to.
FORECAST_MINUTES = 60


def _data(values: dict[str, float | int | None]) -> ResourceData:
    return ResourceData.model_validate(values)


class ResourceTools:
    """The answers behind the resource-monitor tools."""

    def __init__(self, query: ResourceQuery, *, alerts: AlertTable | None = None,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.query = query
        self.alerts = alerts
        self.clock = clock

    @classmethod
    def for_data_dir(cls, data_dir: str, *,
                     storage_options: dict[str, str] | None = None) -> ResourceTools:  # fmt: skip
        """Tools over the resource tables (and the alerts table) under ``data_dir``."""
        alerts = AlertTable(f"{data_dir.rstrip('/')}/alerts", storage_options=storage_options)
        return cls(ResourceQuery(data_dir, storage_options=storage_options), alerts=alerts)

    def now_ms(self) -> int:
        """Now, in ms since the epoch."""
        return int(self.clock() * 1000)

    def as_of(self) -> str:
        """The end of the newest minute in the store (UTC)."""
        newest = self.query.newest_end_ms()
        return "no data yet" if newest is None else iso(min(newest, self.now_ms()))

    def warm(self) -> None:
        """Load the newest minute once (the server calls it at start)."""
        self.query.newest_end_ms()

    def resolve(self, name: str) -> str:
        """The identity ``name`` designates among containers with resource data (a month).

        The month is read from ``resource_hour``, which trails the minute table by up to a
        roll interval: a name not found there is looked for in the last day's minutes too
        (a container seen only since the last roll)."""
        now = self.now_ms()
        known = self.query.stats(now - 30 * 86_400_000, now + 60_000)
        if _matches(name.strip(), known) is None:
            seen = {s.container for s in known}
            recent = self.query.stats(now - 86_400_000, now + 60_000)
            known += [s for s in recent if s.container not in seen]
        return resolve_container(name, known, listing="get_resource_stats")

    def resource_stats(self, container: str | None, timeframe: Timeframe,
                       aggregation: Aggregation, limit: int = 10,
                       cursor: str | None = None) -> ResourceStatsOut:  # fmt: skip
        """``get_resource_stats``."""
        start, end = window(timeframe, self.now_ms())
        named = [self.resolve(container)] if container is not None else None
        rows = self.query.stats(start, end, aggregation=aggregation, containers=named)
        newest = max((s.through_ms for s in rows), default=None)
        as_of = None if newest is None else iso(newest)
        if named is not None:
            found = next((s for s in rows if s.container == named[0]), None)
            values = found.values if found else dict.fromkeys(ResourceData.model_fields)
            return ResourceStatsOut(container=named[0], timeframe=timeframe,
                                    data=_data(values), as_of=as_of)  # fmt: skip
        ranked = sorted(rows, key=lambda s: -(s.values["cpu_seconds"] or 0))
        together = {f: _combine([s.values.get(f) for s in rows], aggregation)
                    for f in ResourceData.model_fields}  # fmt: skip
        together["oom_kills"] = sum(int(s.values["oom_kills"] or 0) for s in rows)
        together["cpu_throttled_percent"] = None  # a mean of percents would mislead
        p = page("get_resource_stats", ranked, cursor, limit)
        return ResourceStatsOut(
            container="*", timeframe=timeframe, data=_data(together),
            containers=[ResourceStatsOut(container=s.container, timeframe=timeframe,
                                         data=_data(s.values)) for s in p.items],
            total=p.total, next=p.next_cursor, hint=p.hint("busiest CPU first"),
            as_of=as_of,
        )  # fmt: skip

    def series(self, container: str, timeframe: Timeframe, metric: SeriesMetric,
               max_points: int = 60) -> ResourceSeries:  # fmt: skip
        """``get_resource_timeseries``: buckets of the timeframe, empty ones left out."""
        identity = self.resolve(container)
        start, end = window(timeframe, self.now_ms())
        bucket_ms, points = self.query.series(identity, start, end, metric, max_points)
        newest = points[-1][0] + bucket_ms if points else None
        return ResourceSeries(
            container=identity, timeframe=timeframe, metric=metric, unit=SERIES_UNITS[metric],
            bucket_seconds=bucket_ms // 1000, points=[Point(ts=iso(t), value=v) for t, v in points],
            summary=summarize(v for _, v in points),
            as_of=None if newest is None else iso(min(newest, end)),
        )  # fmt: skip

    def anomalies(self, container: str | None, since: str | None, status: str, limit: int,
                  cursor: str | None = None) -> ResourceAlertList:  # fmt: skip
        """``get_resource_anomalies``: the resource alerts (``kind`` ``resource`` of
        ``get_anomalies``), ranked and paged the same way, each with its time to the limit."""
        since_ms = parse_since(since, self.now_ms())
        identity = self.resolve(container) if container else None
        rows = [] if self.alerts is None else self.alerts.latest(since_ms).iter_rows(named=True)

        def out(r: dict[str, Any]) -> ResourceAlert:
            a = TelemetryTools.alert_out(r, {})
            return ResourceAlert(**dict(a), time_to_limit_s=r.get("time_to_limit_s"))

        return ranked_alerts("get_resource_anomalies", rows, out, kind="resource",
                             identity=identity, severity=None, status=status, limit=limit,
                             cursor=cursor, as_list=ResourceAlertList)  # fmt: skip

    def forecast_memory(self, container: str) -> MemoryForecast:
        """``forecast_memory``: the leak detector's line (:func:`~nettel.detect.resources.
        fit_line`, its R² floor) through the last hour's per-minute peaks, carried on to
        the newest limit: "reaches limit" (with ``time_to_limit_s``), "not growing" (a
        slope of 0 or less, or a line that explains too little) or "no limit"."""
        from nettel.detect.resources import ResourceSignals, fit_line

        identity = self.resolve(container)
        end = self.now_ms() + 60_000
        start = end - (FORECAST_MINUTES + 1) * 60_000
        _, points = self.query.series(identity, start, end, "memory_bytes", FORECAST_MINUTES + 1)
        mem = [(t / 1000, v) for t, v in points if v is not None]
        if len(mem) < 3:
            raise ToolInputError(f"{identity!r} has {len(mem)} minute(s) of memory in the last "
                                 "hour: a forecast needs 3; try again later")  # fmt: skip
        stats = self.query.stats(start, end, containers=[identity])
        limit = int(stats[0].values["memory_limit_bytes"] or 0) if stats else 0
        slope, r2 = fit_line(mem)
        now_bytes = int(mem[-1][1])
        min_r2 = ResourceSignals().min_r2
        eta: float | None = None
        outlook: Outlook = "no limit"
        if not limit:
            why = "no memory limit: nothing to run into"
        elif slope <= 0 or r2 < min_r2:
            outlook = "not growing"
            why = f"no steady rise (slope {slope:.3g} B/s, R² {r2:.2f}; a leak needs R² {min_r2})"
        else:
            outlook, eta = "reaches limit", max(0.0, (limit - now_bytes) / slope)
            why = (f"memory rises {slope / (1 << 20):.3g} MiB/s (R² {r2:.2f}); at this pace "
                   f"it reaches its limit of {limit} bytes in {eta:.0f} s")  # fmt: skip
        return MemoryForecast(
            container=identity, outlook=outlook, memory_bytes=now_bytes,
            memory_limit_bytes=limit or None, slope_bytes_per_s=round(slope, 3),
            r2=round(r2, 4), minutes=len(mem), time_to_limit_s=eta, explanation=why,
            as_of=iso(min(int(mem[-1][0] * 1000) + 60_000, self.now_ms())),
        )  # fmt: skip

    def top_consumers(self, timeframe: Timeframe, resource: Resource, aggregation: Aggregation,
                      limit: int = 10) -> ResourceTop:  # fmt: skip
        """``get_top_resource_consumers``: under ``sum``, CPU ranks by CPU seconds, memory by
        the last value, disk by bytes; the others rank by the aggregation's value."""
        start, end = window(timeframe, self.now_ms())
        rows = self.query.stats(start, end, aggregation=aggregation)
        key, unit = RANKED_BY[resource]
        if aggregation != "sum" and resource == "cpu":
            key, unit = "cpu_percent", "percent of a core"
        elif aggregation != "sum" and resource.startswith("disk"):
            unit = "bytes/s"
        have = [(s, s.values[key]) for s in rows if s.values[key] is not None]
        have.sort(key=lambda sv: -float(sv[1] or 0))
        summable = aggregation in ("sum", "avg") and resource != "memory"
        total = sum(float(v or 0) for _, v in have)
        top = [ResourceTopEntry(
            container=s.container, value=v or 0,
            share=round(100 * float(v or 0) / total, 2) if summable and total else None,
            memory_limit_bytes=(int(s.values["memory_limit_bytes"] or 0) or None)
            if resource == "memory" else None,
        ) for s, v in have[:limit]]  # fmt: skip
        newest = max((s.through_ms for s in rows), default=None)
        return ResourceTop(timeframe=timeframe, resource=resource, aggregation=aggregation,
                           unit=unit, top=top, total=len(have),
                           as_of=None if newest is None else iso(newest))  # fmt: skip


def build_resource_server(
    tools: ResourceTools,
    actions: ContainerActions | None = None,
    processes: ListProcesses | None = None,
) -> TelemetryServer:
    """The ``resource-monitor`` MCP server over ``tools``; with ``processes``, also
    ``list_processes``; with ``actions`` enabled, also the acting tools
    (:func:`~nettel.mcp.actions.register_actions`)."""
    from nettel import version

    server = TelemetryServer(SERVER_NAME, instructions=INSTRUCTIONS, as_of=tools.as_of,
                             version=version())  # fmt: skip
    server.warm = tools.warm

    @server.tool()
    async def get_resource_stats(
        timeframe: TimeframeArg = "hour",
        aggregation: AggregationArg = "sum",
        container: Annotated[str | None, Field(description="one container; omit for all")] = None,
        limit: Limit50 = 10,
        cursor: CursorArg = None,
    ) -> ResourceStatsOut:
        """Resources of one container or all over a timeframe: {container, timeframe, data:
        {cpu_percent, memory_bytes, memory_limit_bytes, disk_read_bytes, disk_write_bytes,
        pids}}. sum: mean cpu_percent, last memory/pids, total disk bytes, cpu_seconds;
        avg: means (disk bytes/s); max/min: peaks/lows. All: container "*", busiest CPU
        first."""
        return await _answer(
            lambda: tools.resource_stats(container, timeframe, aggregation, limit, cursor)
        )

    @server.tool()
    async def get_top_resource_consumers(
        timeframe: TimeframeArg = "day",
        resource: Annotated[Resource, Field(description="what to rank by")] = "cpu",
        aggregation: AggregationArg = "sum",
        limit: Limit50 = 10,
    ) -> ResourceTop:
        """Containers ranked by CPU, memory, disk read/write or pids over a timeframe, with
        share of the total where values add up."""
        return await _answer(lambda: tools.top_consumers(timeframe, resource, aggregation, limit))

    @server.tool()
    async def get_resource_timeseries(
        container: ContainerArg,
        timeframe: TimeframeArg = "day",
        metric: Annotated[SeriesMetric, Field(description="which resource")] = "cpu_percent",
        max_points: Annotated[int, Field(ge=2, le=200, description="2-200 buckets")] = 60,
    ) -> ResourceSeries:
        """One container's resource in at most max_points time buckets: mean cpu_percent,
        peak memory_bytes and pids, disk bytes per bucket; with min/max/avg/p95. Empty
        buckets left out."""
        return await _answer(lambda: tools.series(container, timeframe, metric, max_points))

    @server.tool()
    async def get_resource_anomalies(
        container: Annotated[str | None, Field(description="only this container")] = None,
        since: SinceArg = "24h",
        status: StatusArg = "any",
        limit: Limit50 = 10,
        cursor: CursorArg = None,
    ) -> ResourceAlertList:
        """Memory leaks (with time_to_limit_s), OOM kills and CPU throttling, most severe
        first, each with a one-line explanation."""
        return await _answer(lambda: tools.anomalies(container, since, status, limit, cursor))

    @server.tool()
    async def forecast_memory(container: ContainerArg) -> MemoryForecast:
        """When a container's memory reaches its limit at the last hour's pace (or "not
        growing" / "no limit"), with the fitted slope."""
        return await _answer(lambda: tools.forecast_memory(container))

    if processes is not None:

        @server.tool()
        async def list_processes(
            container: Annotated[
                str, Field(description="container name or id, as the engine knows it")
            ],
            sort_by: Annotated[
                ProcessSort, Field(description="cpu: CPU seconds; rss: resident memory")
            ] = "cpu",
            limit: Limit50 = 15,
        ) -> ProcessList:
            """A running container's processes now (pid, command, state, CPU seconds, RSS),
            read from its cgroup and /proc, the top ones by CPU or memory."""

            def answer() -> ProcessList:
                name, found = processes(container)
                return rank_processes(name, found, sort_by, limit, tools.now_ms())

            return await _answer(answer)

    register_actions(server, actions)
    return server
