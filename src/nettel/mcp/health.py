"""The ``health-check`` MCP server: container health, the dependency map, incidents.

One more server of the same product (see :mod:`nettel.mcp.resources`): the same answer
shaping, budget, errors and audit lines (:class:`~nettel.mcp.server.TelemetryServer`),
the same container naming (:func:`~nettel.mcp.tools.resolve_container`), answers read
only through the store (:class:`~nettel.store.health.HealthTable`,
:class:`~nettel.store.alerts.AlertTable`). Served over stdio with ``nettel mcp --server
health-check`` and over HTTP at ``/health-check/mcp`` beside ``/mcp`` on the same port.

An incident (``get_incidents``) groups the containers that died, were OOM-killed,
restarted, turned unhealthy or alerted in the window by the upstream they share on the
dependency map (edges of the window and the day before it): a troubled upstream is
named as the likely root ("web unhealthy; depends on db:5432, which died at 13:02:05
(exit 137)"); an untroubled one shared by two or more is named as the thing to check.
A container that served clients in the day before the window and none in it is noted
as having lost all its clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_serializer

from nettel.mcp.actions import ContainerActions, register_actions
from nettel.mcp.answers import BUDGET_CHARS, page
from nettel.mcp.server import CursorArg, Limit50, TelemetryServer, TimeframeArg, _answer
from nettel.mcp.tools import Timeframe, _drop_none, iso, resolve_container, window
from nettel.store.alerts import AlertTable
from nettel.store.health import HealthTable

SERVER_NAME = "health-check"
HTTP_PATH = "/health-check/mcp"
INSTRUCTIONS = (
    "Health of this host's containers (engine state, healthcheck status, restarts, exits), "
    "the dependency map between them (who connects to whom, from their TCP connections) "
    "and incidents grouped by the upstream they share. Answers are compact JSON with "
    "as_of; lists are ranked and paged (limit, cursor: pass 'next' back)."
)
#: How far back a container's health is looked for.
HEALTH_LOOKBACK_MS = 30 * 86_400_000
OneContainerArg = Annotated[str | None, Field(description="one container; omit for all")]
#: Order of statuses in get_health: worst first.
_RANK = {"unhealthy": 0, "exited": 1, "dead": 1, "oom": 1, "restarting": 2, "starting": 3}


class _Compact(BaseModel):
    """An answer's part whose unset (None) fields are left out."""

    @model_serializer(mode="wrap")
    def _serialize(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        return _drop_none(self, handler)


class LastExit(_Compact):
    """A container's last exit."""

    code: int | None
    at: str
    oom_killed: bool | None = None


class HealthEntry(_Compact):
    """One container's health: ``status`` is its healthcheck's status while it runs
    with one, else the engine's state."""

    container: str
    status: str
    since: str
    state: str
    health: str | None = None
    restarts: int = Field(description="the engine's restart count")
    starts: int | None = Field(default=None, description="starts seen in 30 days")
    last_exit: LastExit | None = None
    output: str | None = Field(default=None, description="the last healthcheck's output")


class HealthOut(_Compact):
    """Health of one container or a page of all, worst first."""

    containers: list[HealthEntry]
    total: int
    next: str | None = Field(default=None, description="cursor of the next page")
    hint: str | None = None
    as_of: str | None = None


class Edge(_Compact):
    """``client`` connects to ``server``:``port``: ``connections`` at most at once in a
    minute, over ``minutes`` minutes of the timeframe; ``depth`` hops from the container
    asked about."""

    client: str
    server: str
    port: int
    connections: int
    minutes: int
    last_seen: str
    depth: int | None = None


class DependenciesOut(_Compact):
    """The map around ``container`` (``upstream``: what it calls, ``downstream``: who
    calls it) or, for every container (``container`` "*"), its busiest edges."""

    container: str
    timeframe: Timeframe
    upstream: list[Edge] | None = None
    downstream: list[Edge] | None = None
    edges: list[Edge] | None = None
    total: int
    next: str | None = Field(default=None, description="cursor of the next page")
    hint: str | None = None
    as_of: str | None = None


class Incident(BaseModel):
    """Containers in trouble together, with the upstream they share when there is one."""

    containers: list[str] = Field(description="the root first; at most 20")
    count: int = Field(description="containers in the incident")
    started: str
    root: str | None = Field(default=None, description="the shared upstream")
    explanation: str
    events: list[str]


class IncidentsOut(_Compact):
    """Incidents since the start of the timeframe, newest first."""

    since: Timeframe
    incidents: list[Incident]
    total: int
    next: str | None = Field(default=None, description="cursor of the next page")
    hint: str | None = None
    as_of: str | None = None


@dataclass(frozen=True, slots=True)
class _Known:
    container: str
    container_id: str
    name: str
    compose_service: str = ""
    compose_project: str = ""


def _hhmmss(ts: Any) -> str:
    return str(ts.strftime("%H:%M:%S"))


def _trouble(row: dict[str, Any]) -> str | None:
    """What a health event says went wrong (None: nothing)."""
    kind = row["kind"]
    if kind == "die":
        return f"died (exit {row['exit_code']})" + (", OOM-killed" if row["oom_killed"] else "")
    if kind == "oom":
        return "OOM-killed"
    if kind == "restart":
        return "restarted"
    if kind in ("health", "state") and row["health"] == "unhealthy":
        return "unhealthy"
    return None


class HealthTools:
    """The answers behind the health-check tools."""

    def __init__(self, table: HealthTable, alerts: AlertTable, *,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.table = table
        self.alerts = alerts
        self.clock = clock

    @classmethod
    def for_data_dir(cls, data_dir: str, *,
                     storage_options: dict[str, str] | None = None) -> HealthTools:  # fmt: skip
        """Tools over the ``health`` and ``alerts`` tables under ``data_dir``."""
        base = data_dir.rstrip("/")
        return cls(HealthTable(f"{base}/health", storage_options=storage_options),
                   AlertTable(f"{base}/alerts", storage_options=storage_options))  # fmt: skip

    def now_ms(self) -> int:
        """Now, in ms since the epoch."""
        return int(self.clock() * 1000)

    def as_of(self) -> str:
        """When the newest health record in the store was observed (UTC)."""
        newest = self.table.newest_ms(self.now_ms() - 2 * 86_400_000)
        return "no data yet" if newest is None else iso(min(newest, self.now_ms()))

    def warm(self) -> None:
        """Read the table once (the server calls it at start)."""
        self.as_of()

    def resolve(self, name: str, listing: str = "get_health") -> str:
        """The identity ``name`` designates among containers with health records."""
        summary = self.table.summary(self.now_ms() - HEALTH_LOOKBACK_MS)
        rows = summary.select("container", "container_id").iter_rows(named=True)
        known = [_Known(r["container"], r["container_id"] or "", r["container"]) for r in rows]
        return resolve_container(name, known, listing=listing)

    def health(self, container: str | None, limit: int = 20,
               cursor: str | None = None) -> HealthOut:  # fmt: skip
        """``get_health``."""
        summary = self.table.summary(self.now_ms() - HEALTH_LOOKBACK_MS)
        if container is not None:
            summary = summary.filter(container=self.resolve(container))
        entries = [self._entry(r, full=container is not None)
                   for r in summary.iter_rows(named=True)]  # fmt: skip
        entries.sort(key=lambda e: (_RANK.get(e.status, 4), e.container))
        p = page("get_health", entries, cursor, limit, size=lambda e: len(e.model_dump_json()))
        return HealthOut(containers=p.items, total=p.total, next=p.next_cursor,
                         hint=p.hint("worst first"))  # fmt: skip

    @staticmethod
    def _entry(r: dict[str, Any], *, full: bool) -> HealthEntry:
        state, health = r["state"] or "unknown", r["health"] or None
        status = health if state == "running" and health else state
        exited = None
        if r["exited"] is not None:
            exited = LastExit(code=r["exit_code"], at=iso(int(r["exited"].timestamp() * 1000)),
                              oom_killed=True if r["oom_killed"] else None)  # fmt: skip
        output = r["output"] if r["output"] and (full or status == "unhealthy") else None
        return HealthEntry(
            container=r["container"], status=status, state=state, health=health,
            since=iso(int(r["since"].timestamp() * 1000)), restarts=int(r["restarts"] or 0),
            starts=int(r["starts"]) or None, last_exit=exited,
            output=None if output is None else output[: 256 if full else 80],
        )  # fmt: skip

    def _edges(self, since_ms: int) -> list[Edge]:
        """Every edge since ``since_ms`` (built unvalidated: the table's types are the
        model's, and a fan-in of hundreds is built on every call)."""
        rows = self.table.edges(since_ms).iter_rows(named=True)
        return [Edge.model_construct(**{**r, "last_seen": iso(int(r["last_seen"].timestamp()
                                                                  * 1000))})
                for r in rows]  # fmt: skip

    def dependencies(self, container: str | None, depth: int = 1, timeframe: Timeframe = "hour",
                     limit: int = 20, cursor: str | None = None) -> DependenciesOut:  # fmt: skip
        """``get_dependencies``: breadth first, each edge once, nearest first."""
        start, _ = window(timeframe, self.now_ms())
        edges = self._edges(start)
        size: Callable[[Edge], int] = lambda e: len(e.model_dump_json())  # noqa: E731
        if container is None:
            p = page("get_dependencies", edges, cursor, limit, size=size)
            return DependenciesOut(container="*", timeframe=timeframe, edges=p.items,
                                   total=p.total, next=p.next_cursor,
                                   hint=p.hint("most connections first"))  # fmt: skip
        me = self.resolve(container, listing="get_health")
        up = _walk(edges, me, depth, upstream=True)
        down = _walk(edges, me, depth, upstream=False)
        half = BUDGET_CHARS * 3 // 8  # each direction gets half of the list budget
        pu = page("get_dependencies", up, cursor, limit, size=size, budget=half)
        pd = page("get_dependencies", down, cursor, limit, size=size, budget=half)
        more = pu.next_cursor is not None or pd.next_cursor is not None
        longer = pu if len(pu.items) >= len(pd.items) else pd
        return DependenciesOut(
            container=me, timeframe=timeframe, upstream=pu.items, downstream=pd.items,
            total=len(up) + len(down), next=longer.next_cursor if more else None,
            hint=(f"showing {len(pu.items)} of {len(up)} upstream and {len(pd.items)} of "
                  f"{len(down)} downstream (nearest first); for more pass cursor="
                  f"{longer.next_cursor!r}") if more else None,
        )  # fmt: skip

    def incidents(self, since: Timeframe = "day", limit: int = 10,
                  cursor: str | None = None) -> IncidentsOut:  # fmt: skip
        """``get_incidents``: troubles of the window grouped by shared upstream."""
        start, _ = window(since, self.now_ms())
        trouble: dict[str, list[tuple[Any, str]]] = {}
        for r in self.table.events(start).iter_rows(named=True):
            what = _trouble(r)
            if what is not None:
                trouble.setdefault(r["container"], []).append((r["ts"], what))
        alerts = self.alerts.latest(start)
        for r in alerts.select("container", "started", "metric").iter_rows(named=True):
            trouble.setdefault(r["container"], []).append(
                (r["started"], f"alert on {r['metric']}"))  # fmt: skip
        edges = self._edges(start - 86_400_000)
        upstream: dict[str, dict[str, int]] = {}
        for e in edges:
            upstream.setdefault(e.client, {}).setdefault(e.server, e.port)
        groups: list[Incident] = []
        placed: set[str] = set()
        # a troubled upstream first (the likely root), then an untroubled shared one
        candidates = sorted({s for ups in upstream.values() for s in ups},
                            key=lambda s: (s not in trouble, s))  # fmt: skip
        for server in candidates:
            hit = sorted(c for c in trouble if c not in placed and server in upstream.get(c, {}))
            if not hit or (server not in trouble and len(hit) < 2):
                continue
            port = upstream[hit[0]][server]
            who = " and ".join(hit) if len(hit) < 4 else f"{', '.join(hit[:3])} and " \
                f"{len(hit) - 3} more"  # fmt: skip
            whats = sorted({w for c in hit for _, w in trouble[c]})
            lead = f"{who} {'/'.join(whats)}; " + (
                "both depend" if len(hit) == 2 else "depends" if len(hit) == 1 else "all depend"
            )
            if server in trouble:
                at, what = min(trouble[server], key=lambda tw: tw[0])
                text = f"{lead} on {server}:{port}, which {what} at {_hhmmss(at)}"
                members = [server, *hit]
            else:
                text = f"{lead} on {server}:{port} (no trouble recorded there: check it)"
                members = hit
            groups.append(self._incident(members, server, text, trouble))
            placed.update(members)
        for c in sorted(set(trouble) - placed):
            text = f"{c} {'/'.join(sorted({w for _, w in trouble[c]}))}; no shared upstream seen"
            groups.append(self._incident([c], None, text, trouble))
        groups += _abandoned(edges, iso(start), placed)
        groups.sort(key=lambda i: i.started, reverse=True)
        p = page("get_incidents", groups, cursor, limit, size=lambda i: len(i.model_dump_json()))
        return IncidentsOut(since=since, incidents=p.items, total=p.total, next=p.next_cursor,
                            hint=p.hint("newest first"))  # fmt: skip

    @staticmethod
    def _incident(members: list[str], root: str | None, text: str,
                  trouble: dict[str, list[tuple[Any, str]]]) -> Incident:  # fmt: skip
        seen = sorted((at, c, w) for c in members for at, w in trouble.get(c, ()))
        events = [f"{_hhmmss(at)} {c} {w}" for at, c, w in seen]
        if len(events) > 8:
            events = [*events[:7], f"... {len(events) - 7} more"]
        started = iso(int(seen[0][0].timestamp() * 1000))
        return Incident(containers=members[:20], count=len(members), started=started,
                        root=root, explanation=text[:400], events=events)  # fmt: skip


def _abandoned(edges: list[Edge], start: str, placed: set[str]) -> list[Incident]:
    """Containers that served clients before ``start`` and none since (not already in an
    incident), each noted once.

    Examples
    --------
    >>> e = lambda c, s, at: Edge(client=c, server=s, port=80, connections=1, minutes=1,
    ...                           last_seen=at)
    >>> edges = [e("a", "old", "T09"), e("b", "old", "T08"), e("a", "web", "T11")]
    >>> [i.explanation for i in _abandoned(edges, "T10", set())]
    ['old lost all its clients (a, b): none connected since T09']
    """
    served = {e.server for e in edges if e.last_seen >= start}
    lost: dict[str, list[Edge]] = {}
    for e in edges:
        if e.server not in served and e.server not in placed | {"host", "external"}:
            lost.setdefault(e.server, []).append(e)
    out = []
    for server, gone in sorted(lost.items()):
        clients = sorted({e.client for e in gone})
        last = max(e.last_seen for e in gone)
        named = ", ".join(clients[:5]) + (f" and {len(clients) - 5} more" if len(clients) > 5
                                           else "")  # fmt: skip
        out.append(Incident(
            containers=[server], count=1, started=last, root=None,
            explanation=f"{server} lost all its clients ({named}): none connected since {last}",
            events=[f"{e.last_seen} last connection from {e.client}" for e in gone[:8]],
        ))  # fmt: skip
    return out


def _walk(edges: list[Edge], start: str, depth: int, *, upstream: bool) -> list[Edge]:
    """Edges reached from ``start`` within ``depth`` hops (toward servers when
    ``upstream``), breadth first, each once, with its depth.

    Examples
    --------
    >>> e = lambda c, s: Edge(client=c, server=s, port=1, connections=1, minutes=1,
    ...                       last_seen="")
    >>> edges = [e("client", "web"), e("web", "db"), e("db", "disk")]
    >>> [(x.client, x.server, x.depth) for x in _walk(edges, "client", 2, upstream=True)]
    [('client', 'web', 1), ('web', 'db', 2)]
    >>> [(x.client, x.depth) for x in _walk(edges, "db", 3, upstream=False)]
    [('web', 1), ('client', 2)]
    """
    out: list[Edge] = []
    frontier, seen = {start}, {start}
    for level in range(1, depth + 1):
        nxt: set[str] = set()
        for e in edges:
            near, far = (e.client, e.server) if upstream else (e.server, e.client)
            if near in frontier:
                out.append(Edge.model_construct(**{**e.__dict__, "depth": level}))
                if far not in seen:
                    nxt.add(far)
        seen |= nxt
        frontier = nxt
        if not frontier:
            break
    return out


def build_health_server(tools: HealthTools,
                        actions: ContainerActions | None = None) -> TelemetryServer:  # fmt: skip
    """The ``health-check`` MCP server over ``tools``; with ``actions`` enabled, also the
    acting tools shared with resource-monitor (:func:`~nettel.mcp.actions.register_actions`)."""
    from nettel import version

    server = TelemetryServer(SERVER_NAME, instructions=INSTRUCTIONS, as_of=tools.as_of,
                             version=version())  # fmt: skip
    server.warm = tools.warm

    @server.tool()
    async def get_health(container: OneContainerArg = None, limit: Limit50 = 20,
                         cursor: CursorArg = None) -> HealthOut:  # fmt: skip
        """Health of one container or all, worst first: status (healthcheck status while
        running with one, else engine state), since, restarts, last exit (code, time,
        OOM), the last check's output when unhealthy."""
        return await _answer(lambda: tools.health(container, limit, cursor))

    @server.tool()
    async def get_dependencies(
        container: OneContainerArg = None,
        depth: Annotated[int, Field(ge=1, le=3, description="hops to follow, 1-3")] = 1,
        timeframe: TimeframeArg = "hour",
        limit: Limit50 = 20,
        cursor: CursorArg = None,
    ) -> DependenciesOut:
        """The dependency map from TCP connections: for a container, its upstream (what it
        calls: server:port) and downstream (who calls it) with connection counts; for
        all, the busiest edges client -> server:port. host/external name non-containers."""
        return await _answer(lambda: tools.dependencies(container, depth, timeframe, limit, cursor))

    @server.tool()
    async def get_incidents(
        since: Annotated[
            Timeframe, Field(description="the last hour, day, week or 30 days")
        ] = "day",
        limit: Limit50 = 10,
        cursor: CursorArg = None,
    ) -> IncidentsOut:
        """Exits, OOM kills, restarts, unhealthy checks and alerts grouped into incidents,
        newest first, each explained by the upstream its containers share; containers
        that lost all their clients."""
        return await _answer(lambda: tools.incidents(since, limit, cursor))

    register_actions(server, actions)
    return server
