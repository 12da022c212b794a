"""The ``network-telemetry`` MCP server: tools, resources and prompts over stdio or HTTP.

Tools read only through :class:`~nettel.store.query.TrafficQuery` (no argument ever
becomes a path). A bad argument raises a tool error whose message names the valid
values; an unexpected failure is logged here and reaches the client as a short error
without a trace; the server keeps serving either way.

HTTP (streamable): binds 127.0.0.1 by default. Binding any other address needs a
bearer token (:class:`HttpOptions`), and then every request without it gets 401. Host
and Origin headers are checked against the bind address (DNS rebinding); request
bodies are capped and each client address is rate limited (429 past the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import anyio
import structlog
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field
from starlette.types import ASGIApp, Receive, Scope, Send

from nettel.errors import ConfigError, NettelError
from nettel.mcp.tools import (
    AlertDetail,
    AlertList,
    Baseline,
    ContainerList,
    DailyReportOut,
    ForecastOut,
    Limit,
    Metric,
    NetworkStats,
    TelemetryTools,
    Timeframe,
    TopConsumers,
    TrafficSeries,
    Verdict,
)
from nettel.store.query import Aggregation

log = structlog.get_logger(__name__)
T = TypeVar("T")

SERVER_NAME = "network-telemetry"
INSTRUCTIONS = (
    "Network telemetry of the containers on this host: bytes, packets, errors, drops, "
    "connections and TCP states, per minute to per month. Start with list_containers or "
    "get_network_stats; use get_top_consumers to find heavy containers and "
    "get_traffic_timeseries to see when traffic changed."
)

ContainerArg = Annotated[
    str, Field(description="container identity, name, compose service or id prefix")
]
TimeframeArg = Annotated[
    Timeframe, Field(description="the last hour, day, week or month (30 days) up to now")
]
AggregationArg = Annotated[
    Aggregation,
    Field(description="sum: totals; avg: mean per second; max/min: peak/lowest per second"),
]


async def _answer(fn: Callable[[], T]) -> T:
    """Run a blocking store read in a thread; turn nettel's errors into tool errors."""
    try:
        return await anyio.to_thread.run_sync(fn)
    except NettelError as e:  # ToolInputError, QueryError: the message names valid values
        raise ToolError(str(e)) from e


def build_server(tools: TelemetryTools, data_dir: str | None = None) -> MCPServer[Any]:
    """The MCP server over ``tools`` (``data_dir``: where stored reports are)."""
    data_dir = data_dir or tools.query.minute.uri.rsplit("/", 1)[0]
    server: MCPServer[Any] = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS)

    @server.tool()
    async def get_network_stats(
        timeframe: TimeframeArg = "hour",
        aggregation: AggregationArg = "sum",
        container: Annotated[
            str | None, Field(description="a container (see list_containers); omit for all")
        ] = None,
    ) -> NetworkStats:
        """Traffic of one container, or of every container, over the last hour/day/week/month.

        Returns {"container", "timeframe", "data": {bytes_sent, bytes_received,
        connections, errors, packets_sent, packets_received, drops}}. With aggregation
        "sum", byte/packet/error/drop values are totals; with "avg", "max" or "min" they
        are per second (mean, peak, lowest sample). connections is a gauge: sum and avg
        give the mean number open. With no container, container is "*" (all together:
        sums add up, max/min are the extremes among containers) and "containers" lists
        each one, busiest first.
        """
        return await _answer(lambda: tools.network_stats(container, timeframe, aggregation))

    @server.tool()
    async def list_containers() -> ContainerList:
        """Every container with data: identity, name, image, compose service, id, state
        (active: data in the last 3 minutes), first and last seen, and current rates
        (mean bytes/s and connections over the last 5 minutes). Most recent first."""
        return await _answer(tools.list_containers)

    @server.tool()
    async def get_top_consumers(
        timeframe: TimeframeArg = "day",
        metric: Annotated[Metric, Field(description="what to rank by")] = "bytes",
        direction: Annotated[
            Literal["desc", "asc"],
            Field(description='"desc": the most first (default); "asc": the least first'),
        ] = "desc",
        limit: Limit = 10,
        aggregation: AggregationArg = "sum",
    ) -> TopConsumers:
        """The containers with the most (or least) traffic of a metric over a timeframe,
        with each one's share of the total. TCP-state metrics rank by their maximum
        (use aggregation "max")."""
        return await _answer(
            lambda: tools.top_consumers(timeframe, metric, aggregation, direction == "desc", limit)
        )

    @server.tool()
    async def get_traffic_timeseries(
        container: ContainerArg,
        timeframe: TimeframeArg = "day",
        metric: Annotated[Metric, Field(description="which metric")] = "bytes",
        max_points: Annotated[
            int, Field(ge=2, le=500, description="at most this many points, 2 to 500")
        ] = 60,
        aggregation: AggregationArg = "sum",
    ) -> TrafficSeries:
        """One container's metric over a timeframe, downsampled to at most max_points
        buckets (1 min to 1 week, as fine as fits), with min/max/avg/p95 of the points.
        Buckets without data are left out."""
        return await _answer(
            lambda: tools.timeseries(container, timeframe, metric, aggregation, max_points)
        )

    @server.tool()
    async def get_anomalies(
        container: Annotated[str | None, Field(description="only this container")] = None,
        since: Annotated[
            str | None,
            Field(description="ISO date/time (UTC) or a duration back: 30m, 24h, 7d"),
        ] = "24h",
        severity: Annotated[
            Literal["info", "warning", "critical"] | None,
            Field(description="at least this severity"),
        ] = None,
        status: Annotated[
            Literal["open", "resolved", "any"], Field(description="open, resolved or any")
        ] = "any",
        limit: Annotated[int, Field(ge=1, le=100, description="at most this many, 1-100")] = 20,
    ) -> AlertList:
        """Spike alerts (the detector's and custom rules'), newest first: container,
        metric, observed vs expected band, severity, one-line explanation, status and any
        verdict. Use explain_anomaly for the traffic around one."""
        return await _answer(lambda: tools.anomalies(container, since, severity, status, limit))

    @server.tool()
    async def explain_anomaly(
        alert_id: Annotated[str, Field(description="an id from get_anomalies")],
    ) -> AlertDetail:
        """One alert in full: explanation, baseline band and its basis, related metrics
        that moved with it, restarts, and the metric's traffic from 30 minutes before it
        started to 30 minutes after it ended (per-bucket peaks)."""
        return await _answer(lambda: tools.explain(alert_id))

    @server.tool()
    async def get_baseline(
        container: ContainerArg,
        metric: Annotated[
            Literal[
                "rx_bytes",
                "tx_bytes",
                "rx_packets",
                "tx_packets",
                "errors",
                "drops",
                "connections",
                "syn_recv",
                "time_wait",
                "close_wait",
                "established",
            ],
            Field(description="a metric the detector watches"),
        ] = "tx_bytes",
    ) -> Baseline:
        """What the detector expects of a container's metric for each of the 168 hours of
        a week (UTC, from Monday 00:00): low, expected, high, and what it learned it from."""
        return await _answer(lambda: tools.baseline(container, metric))

    @server.tool()
    async def mark_alert(
        alert_id: Annotated[str, Field(description="an id from get_anomalies")],
        verdict: Annotated[
            Literal["false_positive", "confirmed"],
            Field(description="false_positive widens that band; confirmed keeps it"),
        ],
        note: Annotated[str, Field(max_length=500, description="why (optional)")] = "",
    ) -> Verdict:
        """Feedback to the detector on one alert (the only tool that writes): a false
        positive widens that container's band for that metric and hour of the week."""
        return await _answer(lambda: tools.mark(alert_id, verdict, note))

    @server.tool()
    async def get_daily_report(
        date: Annotated[
            str | None, Field(description="YYYY-MM-DD (UTC day); default: yesterday")
        ] = None,
    ) -> DailyReportOut:
        """A day's report as Markdown (totals in/out, top consumers and shares, changes
        against the day before and a week before, new and gone containers, anomalies,
        error/drop hot spots, peak hours, cost, forecast), with its headline figures."""
        return await _answer(lambda: tools.daily_report(date, data_dir))

    @server.tool()
    async def forecast_traffic(
        container: ContainerArg,
        metric: Annotated[Metric, Field(description="a counter: bytes, bytes_sent, ...")] = "bytes",
        horizon: Annotated[int, Field(ge=1, le=7, description="days ahead, 1 to 7")] = 7,
    ) -> ForecastOut:
        """Expected traffic of a container for the next days, per hour (first 48) and per
        day, with an interval, from a Holt-Winters model on its hourly history (daily and,
        after three weeks, weekly seasonality)."""
        return await _answer(lambda: tools.forecast(container, metric, horizon))

    @server.resource("nettel://reports/daily/{date}", mime_type="text/markdown")
    async def daily_report_resource(date: str) -> str:
        """The daily report of a day (YYYY-MM-DD) as Markdown."""
        result = await _answer(lambda: tools.daily_report(date, data_dir))
        return result.markdown

    @server.resource("nettel://alerts/open", mime_type="application/json")
    async def open_alerts_resource() -> str:
        """Alerts open now."""
        result = await _answer(lambda: tools.anomalies(None, None, None, "open", 100))
        return json.dumps(result.model_dump(mode="json"))

    @server.resource("nettel://containers", mime_type="application/json")
    async def containers_resource() -> str:
        """The containers nettel has seen (as list_containers returns them)."""
        result = await _answer(tools.list_containers)
        return json.dumps(result.model_dump(mode="json"))

    @server.prompt()
    def investigate_spike(container: str) -> str:
        """Investigate unusual traffic of one container."""
        return (
            f"Investigate the network traffic of container {container!r}. Call "
            f"get_network_stats for it over the last hour and day (aggregation sum, then "
            f"max), get_traffic_timeseries for bytes and connections over the last day to "
            f"find when it changed, and get_top_consumers to compare it with its "
            f"neighbours. Say what changed, when, by how much, and what to check next."
        )

    @server.prompt()
    def daily_briefing(date: str | None = None) -> str:
        """A short briefing on the containers' traffic of a day."""
        day = date or "the last day"
        return (
            f"Write a short briefing on container network traffic for {day}: call "
            f"get_network_stats (timeframe day, no container), get_top_consumers by bytes "
            f"and by errors, and list_containers for new or stopped containers. Give "
            f"totals, the top consumers with their share, anything unusual, in 10 lines."
        )

    return server


@dataclass(frozen=True, kw_only=True)
class HttpOptions:
    """How the HTTP transport listens and whom it lets in."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_body_bytes: int = 1 << 20
    rate_per_minute: int = 600
    allowed_origins: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse to listen beyond loopback without a token.

        Examples
        --------
        >>> HttpOptions(host="0.0.0.0").check()
        Traceback (most recent call last):
        ...
        nettel.errors.ConfigError: NETTEL_MCP_HOST='0.0.0.0' is not valid: expected a loopback \
address (127.0.0.1, ::1, localhost) unless NETTEL_MCP_TOKEN is set
        """
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                "NETTEL_MCP_HOST", self.host,
                "a loopback address (127.0.0.1, ::1, localhost) unless NETTEL_MCP_TOKEN is set",
            )  # fmt: skip

    def security(self) -> TransportSecuritySettings:
        """Host and Origin checks for the bind address (DNS rebinding protection)."""
        hosts = ["127.0.0.1", "localhost", "[::1]"]
        if not is_loopback(self.host) and self.host not in ("0.0.0.0", "::"):
            hosts.append(f"[{self.host}]" if ":" in self.host else self.host)
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=self.host not in ("0.0.0.0", "::"),
            allowed_hosts=[f"{h}:{self.port}" for h in hosts],
            allowed_origins=[f"http://{h}:{self.port}" for h in hosts] + list(self.allowed_origins),
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``.

    Examples
    --------
    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("10.0.0.1")
    (True, True, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Guard:
    """ASGI middleware: bearer token, request rate per client, Origin on every path."""

    def __init__(self, app: ASGIApp, options: HttpOptions) -> None:
        self.app = app
        self.options = options
        self._buckets: dict[str, tuple[float, float]] = {}

    def _allow(self, client: str) -> bool:
        rate = self.options.rate_per_minute / 60.0
        now = time.monotonic()
        tokens, last = self._buckets.get(client, (float(self.options.rate_per_minute), now))
        tokens = min(float(self.options.rate_per_minute), tokens + (now - last) * rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1, now)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.options.token is not None:
            given = headers.get("authorization", "")
            expected = f"Bearer {self.options.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                await _plain(send, 401, "missing or wrong bearer token",
                             [(b"www-authenticate", b"Bearer")])  # fmt: skip
                return
        client = (scope.get("client") or ("?", 0))[0]
        if not self._allow(client):
            await _plain(send, 429, "too many requests: slow down", [(b"retry-after", b"1")])
            return
        await self.app(scope, receive, send)


async def _plain(send: Send, status: int, text: str,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    body = text.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()), *(extra or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def http_app(server: MCPServer[Any], options: HttpOptions) -> ASGIApp:
    """The streamable-HTTP ASGI app at ``/mcp``, behind the guard."""
    options.check()
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        max_request_body_size=options.max_body_bytes,
        transport_security=options.security(),
        host=options.host,
    )
    return _Guard(app, options)


async def serve_http(server: MCPServer[Any], options: HttpOptions,
                     stop: asyncio.Event | None = None) -> None:  # fmt: skip
    """Serve over streamable HTTP until ``stop`` is set (or cancelled); the caller owns
    the signals (uvicorn's own handlers are left out)."""
    import uvicorn

    app = http_app(server, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            lifespan="on", access_log=False)  # fmt: skip
    uv = uvicorn.Server(config)
    uv.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    log.info("mcp_http_listening", url=f"http://{options.host}:{options.port}/mcp",
             token=options.token is not None)  # fmt: skip

    async def serve() -> None:
        try:
            await uv.serve()
        except SystemExit as e:  # uvicorn exits when it cannot bind: make it an error
            raise OSError(f"MCP HTTP server could not listen on {options.host}:"
                          f"{options.port} (port in use?)") from e  # fmt: skip

    serving = asyncio.create_task(serve())
    try:
        if stop is None:
            await serving
            return
        waiting = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        uv.should_exit = True
        await serving
    finally:
        if not serving.done():
            uv.should_exit = True
            await asyncio.wait_for(asyncio.shield(serving), 5)


async def serve_stdio(server: MCPServer[Any]) -> None:
    """Serve over stdin/stdout (logs go to stderr)."""
    await server.run_stdio_async()
