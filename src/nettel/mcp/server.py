"""The ``network-telemetry`` MCP server: tools, resources and prompts over stdio or HTTP.

Tools read only through :class:`~nettel.store.query.TrafficQuery` (no argument ever
becomes a path). Answers are shaped for an agent's budget (:mod:`nettel.mcp.answers`).
A bad argument gets a one-line error naming the valid values; an unexpected failure is
logged here and reaches the client as a short error without a trace; the server keeps
serving either way. Every tool call logs one audit line (``mcp_tool_call``).

HTTP (streamable): binds 127.0.0.1 by default; any other address needs a bearer token
of 32+ characters (the examples' tokens are refused at start). Every request, on every
bind address, passes in order: a rate limit per client address (before the token, so
guessing is throttled; a bounded LRU map of addresses), Host and Origin allowlists
(loopback plus ``NETTEL_MCP_ALLOWED_HOSTS``/``_ORIGINS``: 421 and 403), the token
(401), a body size limit (413).

The same port serves nettel's own health: ``GET /healthz`` (JSON: version, the age of
each periodic job, 503 when one is late; no token needed, so probes and ``nettel
doctor`` can ask; rate limit and Host/Origin checks still apply) and ``GET /metrics``
(Prometheus exposition of :mod:`nettel.metrics`; it needs the bearer token when one is
set, like ``/mcp``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import anyio
import structlog
from mcp.server import MCPServer
from mcp.server.mcpserver.context import Context
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent
from mcp.types import Tool as MCPTool
from pydantic import Field, ValidationError
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from nettel import metrics, version
from nettel.errors import ConfigError, NettelError
from nettel.mcp.answers import compact, fit, one_line_error, quoted, to_text
from nettel.mcp.tools import (
    Aggregation,
    AlertDetail,
    AlertKind,
    AlertList,
    Baseline,
    Changes,
    ContainerList,
    DailyReportOut,
    ForecastOut,
    Metric,
    NetworkStats,
    TelemetryTools,
    Timeframe,
    TopConsumers,
    TrafficSeries,
    Verdict,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")

SERVER_NAME = "network-telemetry"
INSTRUCTIONS = (
    "Network traffic of this host's containers (bytes, packets, errors, drops, connections, "
    "TCP states), from the last minutes to 30 days. Answers are compact JSON with as_of (the "
    "newest data in them); lists are ranked and paged (limit, cursor: pass 'next' back)."
)

ContainerArg = Annotated[str, Field(description="name, compose service, identity or id prefix")]
TimeframeArg = Annotated[Timeframe, Field(description="the last hour, day, week or 30 days")]
AggregationArg = Annotated[
    Aggregation, Field(description="sum: totals; avg/max/min: per-second mean/peak/lowest")
]
CursorArg = Annotated[str | None, Field(description="'next' of the previous page")]
SinceArg = Annotated[str | None, Field(description="ISO time (UTC) or duration back: 30m, 24h, 7d")]
StatusArg = Annotated[Literal["open", "resolved", "any"], Field(description="")]


Limit50 = Annotated[int, Field(ge=1, le=50, description="items per page, 1-50")]
Limit100 = Annotated[int, Field(ge=1, le=100, description="items per page, 1-100")]


class TelemetryServer(MCPServer[Any]):
    """The SDK's server, with every tool answer shaped for an agent and audited.

    Answers: numbers compacted, compact JSON in the text part (the same document as the
    structured content), cut to the budget, ``as_of`` always set (see
    :mod:`nettel.mcp.answers`). Errors: one line naming the valid values. Output
    schemas are left out of ``tools/list`` (they would triple its size); structured
    content is still sent. Each call logs one ``mcp_tool_call`` line: client address,
    tool, a digest of the arguments, outcome.
    """

    def __init__(self, name: str, *, instructions: str, as_of: Callable[[], str],
                 version: str | None = None) -> None:  # fmt: skip
        super().__init__(name, instructions=instructions, version=version or "")
        self._as_of = as_of
        self.warm: Callable[[], None] | None = None
        self._warming: asyncio.Task[None] | None = None

    def start_warming(self) -> None:
        """Warm the tools' caches in the background, once (see :func:`_warm`)."""
        if self._warming is None:
            self._warming = asyncio.get_running_loop().create_task(_warm(self))

    async def list_tools(self) -> list[MCPTool]:
        """Every tool, without its output schema or the titles pydantic gives each field,
        its description on one line. The first listing starts warming the store in the
        background: a client lists the tools once initialized, before its first question."""
        self.start_warming()
        return [
            t.model_copy(
                update={
                    "output_schema": None,
                    "input_schema": _untitled(t.input_schema),
                    "description": " ".join((t.description or "").split()),
                }
            )
            for t in await super().list_tools()
        ]

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Context[Any, Any] | None = None) -> Any:  # fmt: skip
        """Run a tool; shape its answer or its error; log the call."""
        started = time.perf_counter()
        outcome = "ok"
        chars = 0
        try:
            if self._tool_manager.get_tool(name) is None:
                known = ", ".join(t.name for t in self._tool_manager.list_tools())
                raise ToolError(f"unknown tool {quoted(name)}: expected one of {known}")
            result = await super().call_tool(name, arguments, context)
            if isinstance(result, CallToolResult) and isinstance(result.structured_content, dict):
                doc = compact(result.structured_content)
                doc.setdefault("as_of", await anyio.to_thread.run_sync(self._as_of))
                doc = fit(doc)
                text = to_text(doc)
                chars = len(text)
                result = CallToolResult(content=[TextContent(type="text", text=text)],
                                        structured_content=doc)  # fmt: skip
            return result
        except UnexpectedToolError as e:
            outcome = "crash"
            log.error("mcp_tool_crashed", tool=name, error=repr(e.__cause__)[:300])
            raise ToolError(f"Error executing tool {name}: internal error (logged on the "
                            "server); the server keeps serving") from None  # fmt: skip
        except ToolError as e:
            outcome = "error"
            cause = e.__cause__
            errors = (
                [dict(e) for e in cause.errors()] if isinstance(cause, ValidationError) else None
            )
            raise ToolError(one_line_error(name, str(e), errors)) from None
        finally:
            log.info("mcp_tool_call", client=_client_of(context), tool=name[:100],
                     args_digest=_digest(arguments), outcome=outcome, chars=chars,
                     ms=round((time.perf_counter() - started) * 1000, 1))  # fmt: skip


def _untitled(schema: dict[str, Any]) -> dict[str, Any]:
    """An input schema without ``title`` keys (the argument names say as much).

    Examples
    --------
    >>> _untitled({"title": "fArguments", "type": "object",
    ...            "properties": {"title": {"title": "Title", "type": "string"}}})
    {'type': 'object', 'properties': {'title': {'type': 'string'}}}
    """
    out = {k: v for k, v in schema.items() if k != "title"}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: _untitled(p) if isinstance(p, dict) else p
                             for name, p in out["properties"].items()}  # fmt: skip
    return out


def _client_of(context: Context[Any, Any] | None) -> str:
    """The caller's address over HTTP; ``stdio`` (or ``local``) otherwise."""
    request_context = getattr(context, "_request_context", None)
    if request_context is None:
        return "local"
    client = getattr(getattr(request_context, "request", None), "client", None)
    return str(getattr(client, "host", None) or "stdio")


def _digest(arguments: dict[str, Any]) -> str:
    """A short digest of the arguments (the audit line never holds their values)."""
    canonical = json.dumps(arguments, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


async def _answer(fn: Callable[[], T]) -> T:
    """Run a blocking store read in a thread; turn nettel's errors into tool errors."""
    try:
        return await anyio.to_thread.run_sync(fn)
    except NettelError as e:  # ToolInputError, QueryError: the message names valid values
        raise ToolError(str(e)) from e


def build_server(tools: TelemetryTools, data_dir: str | None = None) -> TelemetryServer:
    """The MCP server over ``tools`` (``data_dir``: where stored reports are; default the
    tools' data dir). Nothing of the store is opened here: the tools open it when asked."""
    data_dir = data_dir or tools.data_dir
    if data_dir is None:
        raise ValueError("build_server needs the data dir of the tools' store")
    server = TelemetryServer(SERVER_NAME, instructions=INSTRUCTIONS, as_of=tools.as_of,
                             version=version())  # fmt: skip
    server.warm = tools.warm
    metrics.watch_tables(data_dir)

    @server.tool()
    async def get_network_stats(
        timeframe: TimeframeArg = "hour",
        aggregation: AggregationArg = "sum",
        container: Annotated[str | None, Field(description="one container; omit for all")] = None,
        limit: Limit50 = 10,
        cursor: CursorArg = None,
    ) -> NetworkStats:
        """Traffic of one container or all over a timeframe: {container, timeframe, data:
        {bytes_sent, bytes_received, connections, errors, packets_sent, packets_received,
        drops}}. All: container "*", totals, and containers busiest first. sum includes the
        open minute's samples (provisional)."""
        return await _answer(
            lambda: tools.network_stats(container, timeframe, aggregation, limit, cursor)
        )

    @server.tool()
    async def list_containers(
        state: Annotated[
            Literal["any", "active", "inactive"], Field(description="active: data in last 3 min")
        ] = "any",
        limit: Limit50 = 20,
        cursor: CursorArg = None,
    ) -> ContainerList:
        """Containers seen (active first, busiest first): name, image, service, id, state,
        first/last seen, bytes/s and connections over the last 5 min."""
        return await _answer(lambda: tools.list_containers(limit, cursor, state))

    @server.tool()
    async def get_top_consumers(
        timeframe: TimeframeArg = "day",
        metric: Annotated[Metric, Field(description="what to rank by")] = "bytes",
        direction: Annotated[
            Literal["desc", "asc"], Field(description="desc: most first")
        ] = "desc",
        limit: Limit50 = 10,
        aggregation: AggregationArg = "sum",
    ) -> TopConsumers:
        """Containers ranked by a metric over a timeframe, with share of the total.
        tcp_* metrics need aggregation max."""
        return await _answer(
            lambda: tools.top_consumers(timeframe, metric, aggregation, direction == "desc", limit)
        )

    @server.tool()
    async def get_traffic_timeseries(
        container: ContainerArg,
        timeframe: TimeframeArg = "day",
        metric: Annotated[Metric, Field(description="which metric")] = "bytes",
        max_points: Annotated[int, Field(ge=2, le=200, description="2-200 buckets")] = 60,
        aggregation: AggregationArg = "sum",
    ) -> TrafficSeries:
        """One container's metric in at most max_points time buckets (1 min to 1 week),
        with min/max/avg/p95. Empty buckets left out."""
        return await _answer(
            lambda: tools.timeseries(container, timeframe, metric, aggregation, max_points)
        )

    @server.tool()
    async def get_anomalies(
        container: Annotated[str | None, Field(description="only this container")] = None,
        since: SinceArg = "24h",
        severity: Annotated[
            Literal["info", "warning", "critical"] | None, Field(description="at least this")
        ] = None,
        status: StatusArg = "any",
        limit: Limit100 = 10,
        cursor: CursorArg = None,
        kind: Annotated[
            AlertKind,
            Field(
                description="resource: memory leak, OOM kill, CPU throttling; action: restarts done"
            ),
        ] = "network",
    ) -> AlertList:
        """Alerts, most severe first (then highest score, then newest): incidents (a
        container's metrics that broke their bands together, each with its peak and band)
        and custom rules' alerts, with severity, status and a one-line explanation.
        explain_anomaly gives the traffic around one."""
        return await _answer(
            lambda: tools.anomalies(container, since, severity, status, limit, cursor, kind)
        )

    @server.tool()
    async def explain_anomaly(
        alert_id: Annotated[str, Field(description="id from get_anomalies")],
    ) -> AlertDetail:
        """One alert in full: why, band and basis, related metrics, restarts, and its
        metric's per-bucket peaks from 30 min before to 30 min after."""
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
        hours: Annotated[
            Literal["now", "week"], Field(description="now: this hour; week: all 168")
        ] = "now",
    ) -> Baseline:
        """What is normal for a container's metric at this hour of the week (UTC): low,
        expected, high per second, and its basis."""
        return await _answer(lambda: tools.baseline(container, metric, hours))

    @server.tool()
    async def mark_alert(
        alert_id: Annotated[str, Field(description="id from get_anomalies")],
        verdict: Annotated[Literal["false_positive", "confirmed"], Field(description="")],
        note: Annotated[str, Field(max_length=500, description="why")] = "",
    ) -> Verdict:
        """Feedback on an alert (the only write): false_positive widens that band."""
        return await _answer(lambda: tools.mark(alert_id, verdict, note))

    @server.tool()
    async def what_changed(
        since: Annotated[
            Literal["yesterday", "last_week"], Field(description="last 24 h or 7 days vs before")
        ] = "yesterday",
        limit: Limit50 = 10,
        cursor: CursorArg = None,
    ) -> Changes:
        """What changed in the last day (or week) against the one before: total and
        per-container bytes (largest change first), new and gone containers, alerts
        opened and resolved."""
        return await _answer(lambda: tools.what_changed(since, limit, cursor))

    @server.tool()
    async def get_daily_report(
        date: Annotated[
            str | None, Field(description="YYYY-MM-DD (UTC); default yesterday")
        ] = None,
    ) -> DailyReportOut:
        """A day's report (Markdown: totals, top consumers, changes, anomalies, hot spots,
        cost, forecast) with its headline figures."""
        return await _answer(lambda: tools.daily_report(date, data_dir))

    @server.tool()
    async def forecast_traffic(
        container: ContainerArg,
        metric: Annotated[Metric, Field(description="a counter: bytes, bytes_sent, ...")] = "bytes",
        horizon: Annotated[int, Field(ge=1, le=7, description="days ahead, 1-7")] = 7,
    ) -> ForecastOut:
        """A container's expected traffic per day (and the next 24 h per hour) with an
        interval (Holt-Winters on its hourly history)."""
        return await _answer(lambda: tools.forecast(container, metric, horizon))

    @server.resource("nettel://reports/daily/{date}", mime_type="text/markdown")
    async def daily_report_resource(date: str) -> str:
        """The daily report of a day (YYYY-MM-DD) as Markdown."""
        result = await _answer(lambda: tools.daily_report(date, data_dir, full=True))
        return result.markdown

    @server.resource("nettel://alerts/open", mime_type="application/json")
    async def open_alerts_resource() -> str:
        """Alerts of every kind open now (up to 100, every page)."""

        def every_page() -> AlertList:
            first = tools.anomalies(None, None, None, "open", 100, kind="any")
            while first.next is not None and len(first.alerts) < 100:
                more = tools.anomalies(None, None, None, "open", 100, first.next, "any")
                first = first.model_copy(update={"alerts": first.alerts + more.alerts,
                                                 "next": more.next, "hint": None,
                                                 "omitted": more.omitted})  # fmt: skip
            return first

        result = await _answer(every_page)
        return to_text(compact(result.model_dump(mode="json")))

    @server.resource("nettel://containers", mime_type="application/json")
    async def containers_resource() -> str:
        """The containers nettel has seen (as list_containers returns them)."""
        result = await _answer(lambda: tools.list_containers(50))
        return to_text(compact(result.model_dump(mode="json")))

    @server.prompt()
    def investigate_spike(container: str) -> str:
        """Investigate unusual traffic of one container."""
        return (
            f"Investigate the network traffic of container {container!r}: get_network_stats "
            f"(hour, day; sum then max), get_traffic_timeseries (bytes, connections, day) to "
            f"find when it changed, get_baseline for what is normal now, get_anomalies for "
            f"alerts. Say what changed, when, by how much, and what to check next."
        )

    @server.prompt()
    def daily_briefing(date: str | None = None) -> str:
        """A short briefing on the containers' traffic of a day."""
        day = date or "the last day"
        return (
            f"Write a short briefing on container network traffic for {day}: call "
            f"what_changed, get_top_consumers by bytes and by errors, and get_anomalies. Give "
            f"totals, the top consumers with their share, anything unusual, in 10 lines."
        )

    return server


#: Tokens nettel's examples show (deploy/mcp.env.example, tests): never accepted.
EXAMPLE_TOKENS = frozenset({"change-me", "changeme", "<secret>", "secret", "token"})
MIN_TOKEN_CHARS = 32


@dataclass(frozen=True, kw_only=True)
class HttpOptions:
    """How the HTTP transport listens and whom it lets in.

    ``allowed_hosts``/``allowed_origins``: Host and Origin values accepted besides the
    loopback names on ``port`` (``name`` for any port or ``name:port``; origins as
    ``scheme://name[:port]``). ``auth_failures_per_minute``: wrong tokens an address may
    send before it gets 429. ``max_clients``: client addresses each rate limiter
    remembers (least recently seen forgotten first).
    """

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_body_bytes: int = 1 << 20
    rate_per_minute: int = 600
    auth_failures_per_minute: int = 30
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_clients: int = 10_000

    def check(self) -> None:
        """Refuse to listen beyond loopback without a token, or with a weak one.

        Examples
        --------
        >>> HttpOptions(host="0.0.0.0").check()
        Traceback (most recent call last):
        ...
        nettel.errors.ConfigError: NETTEL_MCP_HOST='0.0.0.0' is not valid: expected a loopback \
address (127.0.0.1, ::1, localhost) unless NETTEL_MCP_TOKEN is set
        >>> HttpOptions(token="change-me").check()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        nettel.errors.ConfigError: NETTEL_MCP_TOKEN='<9 characters>' is not valid: expected \
a random token of at least 32 characters, not the example (e.g. `openssl rand -hex 32`)
        """
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                "NETTEL_MCP_HOST", self.host,
                "a loopback address (127.0.0.1, ::1, localhost) unless NETTEL_MCP_TOKEN is set",
            )  # fmt: skip
        if self.token is not None and (
            len(self.token) < MIN_TOKEN_CHARS or self.token.strip().lower() in EXAMPLE_TOKENS
        ):
            raise ConfigError(
                "NETTEL_MCP_TOKEN", f"<{len(self.token)} characters>",
                f"a random token of at least {MIN_TOKEN_CHARS} characters, not the example "
                "(e.g. `openssl rand -hex 32`)",
            )  # fmt: skip

    def hosts(self) -> tuple[str, ...]:
        """Host header values accepted (``name`` alone: any port).

        Examples
        --------
        >>> HttpOptions(host="0.0.0.0", port=80, allowed_hosts=("mcp.internal",)).hosts()
        ('127.0.0.1:80', 'localhost:80', '[::1]:80', 'mcp.internal')
        """
        names = ["127.0.0.1", "localhost", "[::1]"]
        # B104: a comparison, not a bind (the bind address is the user's NETTEL_MCP_HOST)
        if not is_loopback(self.host) and self.host not in ("0.0.0.0", "::"):  # nosec B104
            names.append(f"[{self.host}]" if ":" in self.host else self.host)
        return (*(f"{h}:{self.port}" for h in names), *self.allowed_hosts)

    def origins(self) -> tuple[str, ...]:
        """Origin header values accepted (a request without Origin is not a browser's).

        Examples
        --------
        >>> HttpOptions(port=80).origins()[:2]
        ('http://127.0.0.1:80', 'https://127.0.0.1:80')
        """
        out = []
        for h in self.hosts():
            out += [f"http://{h}", f"https://{h}"]
        return (*out, *self.allowed_origins)

    def security(self) -> TransportSecuritySettings:
        """The SDK's own Host and Origin checks, with the same lists as :class:`_Guard`."""
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=False,  # _Guard checks both on every bind address
            allowed_hosts=list(self.hosts()),
            allowed_origins=list(self.origins()),
        )


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether a Host header value is allowed (entries without a port allow any port).

    Examples
    --------
    >>> host_allowed("127.0.0.1:80", ["127.0.0.1:80"]), host_allowed("evil:80", ["127.0.0.1:80"])
    (True, False)
    >>> host_allowed("mcp.internal:8765", ["mcp.internal"])
    True
    """
    host = host.strip().lower()
    for entry in allowed:
        entry = entry.lower()
        if host == entry:
            return True
        if (
            not entry.endswith("]")
            and ":" not in entry.lstrip("[")
            and (host.rsplit(":", 1)[0] == entry)
        ):
            return True
    return False


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


class RateLimiter:
    """A token bucket per client address, for at most ``max_clients`` addresses.

    The least recently seen address is forgotten first (it starts again with a full
    bucket), so a flood of addresses cannot grow the map without bound.

    Examples
    --------
    >>> limiter = RateLimiter(per_minute=2, max_clients=2, clock=lambda: 0.0)
    >>> [limiter.allow("a") for _ in range(3)]
    [True, True, False]
    >>> limiter.allow("b"), limiter.allow("c"), len(limiter)
    (True, True, 2)
    """

    def __init__(self, per_minute: int, max_clients: int,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def empty(self, client: str) -> bool:
        """Whether ``client``'s bucket has no request left now (nothing is taken)."""
        tokens, last = self._buckets.get(client, (float(self.per_minute), self.clock()))
        return tokens + (self.clock() - last) * self.per_minute / 60.0 < 1

    def allow(self, client: str) -> bool:
        """Take one request from ``client``'s bucket; False when it is empty."""
        full = float(self.per_minute)
        now = self.clock()
        tokens, last = self._buckets.pop(client, (full, now))
        tokens = min(full, tokens + (now - last) * self.per_minute / 60.0)
        allowed = tokens >= 1
        self._buckets[client] = (tokens - 1 if allowed else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed


class _Guard:
    """ASGI middleware, in this order: rate per client address (before anything else, so
    token guessing is throttled: an address whose wrong tokens exhaust
    ``auth_failures_per_minute`` gets 429 until its bucket refills), Host and Origin
    allowlists, ``/healthz`` (answered here, no token), bearer token, body size,
    ``/metrics`` (answered here)."""

    def __init__(self, app: ASGIApp, options: HttpOptions) -> None:
        self.app = app
        self.options = options
        self.limiter = RateLimiter(options.rate_per_minute, options.max_clients)
        self.failures = RateLimiter(options.auth_failures_per_minute, options.max_clients)
        self.hosts = options.hosts()
        self.origins = options.origins()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("?", 0))[0]
        if self.failures.empty(client) or not self.limiter.allow(client):
            await _plain(send, 429, "too many requests: slow down", [(b"retry-after", b"1")])
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not host_allowed(headers.get("host", ""), self.hosts):
            await _plain(send, 421, "Host not allowed: add it to NETTEL_MCP_ALLOWED_HOSTS")
            return
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/") not in self.origins:
            await _plain(send, 403, "Origin not allowed: add it to NETTEL_MCP_ALLOWED_ORIGINS")
            return
        path = scope.get("path", "")
        if path == HEALTH_PATH:  # no token: probes and `nettel doctor` ask it
            status, body = health()
            await _send(send, status, json.dumps(body).encode(), b"application/json")
            return
        if self.options.token is not None:
            given = headers.get("authorization", "")
            expected = f"Bearer {self.options.token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                self.failures.allow(client)
                log.warning("mcp_http_unauthorized", client=client)
                await _plain(send, 401, "missing or wrong bearer token",
                             [(b"www-authenticate", b"Bearer")])  # fmt: skip
                return
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.options.max_body_bytes:
            await _plain(send, 413, f"request body over {self.options.max_body_bytes} bytes")
            return
        if path == METRICS_PATH:
            from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

            exposition = await anyio.to_thread.run_sync(generate_latest, REGISTRY)
            await _send(send, 200, exposition, CONTENT_TYPE_LATEST.encode())
            return
        await self.app(scope, receive, send)


HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"


def health() -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/healthz``: 503 when a periodic job is late.

    Examples
    --------
    >>> status, body = health()
    >>> status in (200, 503), body["service"], sorted(body)
    (True, 'nettel', ['jobs_age_s', 'late', 'service', 'status', 'version'])
    """
    late = metrics.JOBS.late()
    body = {"service": "nettel", "version": version(), "status": "late" if late else "ok",
            "late": late, "jobs_age_s": metrics.JOBS.ages()}  # fmt: skip
    return (503 if late else 200), body


async def _send(send: Send, status: int, body: bytes, content_type: bytes,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()), *(extra or [])]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


async def _plain(send: Send, status: int, text: str,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    await _send(send, status, text.encode(), b"text/plain; charset=utf-8", extra)


class _ByPath:
    """Several servers' streamable-HTTP apps on one port, each at its own path: a request
    goes to the app serving its path (else the first, which answers 404); the lifespan
    runs every app's (each starts its own session manager)."""

    def __init__(self, apps: Mapping[str, Starlette]) -> None:
        self.apps = dict(apps)
        self.default = next(iter(self.apps.values()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self.apps.get(str(scope.get("path", "")).rstrip("/"), self.default)
        await app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            async with contextlib.AsyncExitStack() as stack:
                for app in self.apps.values():
                    await stack.enter_async_context(app.router.lifespan_context(app))
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except Exception as e:
            await send({"type": "lifespan.startup.failed", "message": repr(e)[:300]})
            raise
        await send({"type": "lifespan.shutdown.complete"})


def http_app(server: MCPServer[Any], options: HttpOptions,
             more: Mapping[str, MCPServer[Any]] | None = None) -> ASGIApp:  # fmt: skip
    """The streamable-HTTP ASGI app at ``/mcp`` (and each of ``more``'s servers at its
    path), behind the guard."""
    options.check()
    apps = {
        path: srv.streamable_http_app(
            streamable_http_path=path,
            max_request_body_size=options.max_body_bytes,
            transport_security=options.security(),
            host=options.host,
        )
        for path, srv in {"/mcp": server, **(more or {})}.items()
    }
    app: ASGIApp = apps["/mcp"] if len(apps) == 1 else _ByPath(apps)
    return _Guard(app, options)


async def serve_http(server: MCPServer[Any], options: HttpOptions,
                     stop: asyncio.Event | None = None,
                     more: Mapping[str, MCPServer[Any]] | None = None) -> None:  # fmt: skip
    """Serve over streamable HTTP until ``stop`` is set (or cancelled); the caller owns
    the signals (uvicorn's own handlers are left out). ``more``: other servers of the
    product, by HTTP path (e.g. ``/resource-monitor/mcp``)."""
    import uvicorn

    app = http_app(server, options, more)
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
    warming = asyncio.gather(*(_warm(srv) for srv in (server, *(more or {}).values())))
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
        warming.cancel()
        if not serving.done():
            uv.should_exit = True
            await asyncio.wait_for(asyncio.shield(serving), 5)


async def serve_stdio(server: MCPServer[Any]) -> None:
    """Serve over stdin/stdout (logs go to stderr). The store is warmed once the client
    lists the tools (:meth:`TelemetryServer.list_tools`), so ``initialize`` is answered
    first."""
    try:
        await server.run_stdio_async()
    finally:
        warming = getattr(server, "_warming", None)
        if warming is not None:
            warming.cancel()


async def _warm(server: MCPServer[Any]) -> None:
    """Warm the tools' caches in a thread once serving (a failure only logs)."""
    warm = getattr(server, "warm", None)
    if warm is None:
        return
    try:
        await anyio.to_thread.run_sync(warm)
    except Exception as e:  # a cold cache only costs time
        log.warning("mcp_warm_failed", error=repr(e)[:300])
