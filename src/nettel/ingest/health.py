"""Container health and the dependency map, from the engine and the socket tables.

:class:`HealthWatcher` polls, every ``interval_s``:

- the engine's event log since the last poll (``/events`` with ``since``/``until``: a
  finite answer, no stream thread) for ``start``, ``die`` (with its exit code),
  ``oom``, ``health_status`` and ``restart``; each container with such an event is
  inspected once for its state after it (health status and the last check's output,
  restart count, exit code, OOM kill) and becomes a :class:`~nettel.models.HealthRecord`;
  after a ``health_status`` event it is inspected once more at the next poll, and a
  changed status is one more ``health`` record (Podman announces a check as it starts);
- the running containers (one list call), each seen for the first time inspected once
  (PID, addresses, gateways) and reported as a ``state`` record, again once a day;
- each running container's TCP sockets (``/proc/<pid>/net/tcp`` and ``tcp6``, at most
  ``max_sockets`` lines: the work per poll is bounded), whose established connections
  are mapped to containers by their addresses, to ``host`` (a gateway of their networks)
  or ``external``, and counted per minute into edges ``client -> server:port``; an edge
  not seen in the ``vanish_ms`` before its minute is also an ``edge_new`` record, one not
  seen for ``vanish_ms`` an ``edge_gone`` record (none in the first ``vanish_ms`` after
  the watcher starts: it does not know yet what was there before it).

A connection is counted once: from its client's side (the local port is not one the
container listens on), or from the server's side when the client is not a container.
An edge's ``connections`` is the most seen established at once in its minute. Closed
minutes are published at the next poll, the open one when the watcher stops (a
restart within the same minute may give it twice: readers take the maximum). This
runs apart from the network sampler: its hot path reads no more than before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from nettel.ingest.procfs import read_tcp_connections
from nettel.ingest.units import stable_identity
from nettel.models import HealthKind, HealthRecord, encode_health_record

log = structlog.get_logger(__name__)

#: Engine actions that become health records, and the kind each is recorded as.
ACTIONS: dict[str, HealthKind] = {"start": "start", "die": "die", "oom": "oom",
                                  "health_status": "health", "restart": "restart"}  # fmt: skip
MINUTE_MS = 60_000
#: How long an edge goes unseen before it is reported gone (and a returning one new).
EDGE_VANISH_MS = 5 * MINUTE_MS
#: How far ahead of now an events query ends (and so how long it waits).
EVENTS_AHEAD_S = 0.2
#: How often a running container's state is recorded even when nothing happened to it.
STATE_EVERY_MS = 86_400_000
#: How many event keys of the overlapping second are remembered between polls.
_SEEN_MAX = 4096


@dataclass(slots=True)
class _Known:
    identity: str
    pid: int | None
    ips: frozenset[str]
    gateways: frozenset[str]


@dataclass(slots=True)
class _Edge:
    connections: int = 0
    samples: int = 0
    first_seen_ms: int = 0
    last_seen_ms: int = 0


@dataclass(slots=True)
class EdgeCounter:
    """Per-minute edges ``client -> server:port`` from samples of connection counts.

    Examples
    --------
    >>> c = EdgeCounter()
    >>> c.add(61_000, {("client", "web", 8080): 2}); c.add(65_000, {("client", "web", 8080): 3})
    >>> c.add(125_000, {("client", "web", 8080): 1})
    >>> [(e.ts_ms, e.connections, e.samples) for e in c.closed(125_000, "h")]
    [(60000, 3, 2)]
    >>> [(e.ts_ms, e.connections) for e in c.closed(125_000, "h", everything=True)]
    [(120000, 1)]

    Appearing and vanishing, once ``vanish_ms`` has passed since the first sample:

    >>> c = EdgeCounter(vanish_ms=120_000)
    >>> for minute in range(8):  # web -> db throughout; worker -> db from minute 3 to 4
    ...     c.add(minute * 60_000, {("web", "db", 5432): 1}
    ...           | ({("worker", "db", 5432): 1} if 3 <= minute <= 4 else {}))
    ...     for r in c.closed(minute * 60_000 + 1, "h"):
    ...         if r.kind != "edge":
    ...             print(r.kind, r.container, r.ts_ms // 60_000)
    edge_new worker 3
    edge_gone worker 5
    """

    edges: dict[tuple[int, str, str, int], _Edge] = field(default_factory=dict)
    vanish_ms: int = EDGE_VANISH_MS
    _seen: dict[tuple[str, str, int], int] = field(default_factory=dict)  # -> last minute
    _since_ms: int | None = None  # the first sample's minute

    def add(self, now_ms: int, counts: Mapping[tuple[str, str, int], int]) -> None:
        """Fold one sample (connections per (client, server, port)) into its minute."""
        minute = now_ms - now_ms % MINUTE_MS
        if self._since_ms is None:
            self._since_ms = minute
        for (client, server, port), n in counts.items():
            edge = self.edges.get((minute, client, server, port))
            if edge is None:
                edge = self.edges[(minute, client, server, port)] = _Edge(first_seen_ms=now_ms)
            edge.connections = max(edge.connections, n)
            edge.samples += 1
            edge.last_seen_ms = now_ms

    def closed(self, now_ms: int, host: str, *, everything: bool = False) -> list[HealthRecord]:
        """Edge records of the minutes before ``now_ms``'s (every minute: ``everything``),
        forgotten once returned, with the edges that appeared in them and those unseen
        for ``vanish_ms`` (the edges remembered for that are at most a ``vanish_ms``'s)."""
        current = now_ms - now_ms % MINUTE_MS
        done = [k for k in self.edges if everything or k[0] < current]
        out = []
        warm = self._since_ms is not None
        for key in sorted(done):
            minute, client, server, port = key
            e = self.edges.pop(key)
            out.append(HealthRecord(
                ts_ms=minute, host=host, kind="edge", container=client, server=server,
                port=port, connections=e.connections, samples=e.samples,
                first_seen_ms=e.first_seen_ms, last_seen_ms=e.last_seen_ms,
            ))  # fmt: skip
            last = self._seen.get((client, server, port))
            fresh = last is None or minute - last > self.vanish_ms
            if fresh and warm and minute - (self._since_ms or 0) >= self.vanish_ms:
                out.append(HealthRecord(ts_ms=minute, host=host, kind="edge_new",
                                        container=client, server=server, port=port,
                                        connections=e.connections))  # fmt: skip
            self._seen[(client, server, port)] = max(minute, last or minute)
        if not everything:
            for edge, last in sorted(self._seen.items(), key=lambda kv: kv[1]):
                if current - last > self.vanish_ms:
                    del self._seen[edge]
                    out.append(HealthRecord(ts_ms=last + MINUTE_MS, host=host,
                                            kind="edge_gone", container=edge[0],
                                            server=edge[1], port=edge[2]))  # fmt: skip
        return out


def classify_peer(address: str, containers: Mapping[str, str], gateways: Iterable[str]) -> str:
    """Who is at ``address``: a container's identity, ``host``, ``external``, or "" for
    the container itself (loopback).

    Examples
    --------
    >>> known = {"10.88.0.3": "web"}
    >>> [classify_peer(a, known, {"10.88.0.1"}) for a in
    ...  ("10.88.0.3", "10.88.0.1", "93.184.216.34", "127.0.0.1", "::1")]
    ['web', 'host', 'external', '', '']
    """
    named = containers.get(address)
    if named is not None:
        return named
    if ipaddress.ip_address(address).is_loopback:
        return ""
    return "host" if address in gateways else "external"


def _output(info: Mapping[str, Any]) -> str:
    checks = ((info.get("State") or {}).get("Health") or {}).get("Log") or []
    return str(checks[-1].get("Output") or "").strip()[:256] if checks else ""


def _networks(info: Mapping[str, Any]) -> tuple[frozenset[str], frozenset[str]]:
    nets = (info.get("NetworkSettings") or {}).get("Networks") or {}
    ips = {str(n.get("IPAddress") or "") for n in nets.values()}
    ips |= {str(n.get("GlobalIPv6Address") or "") for n in nets.values()}
    gateways = {str(n.get("Gateway") or "") for n in nets.values()}
    return frozenset(ips - {""}), frozenset(gateways - {""})


def record_from_inspect(info: Mapping[str, Any], kind: HealthKind, ts_ms: int, host: str,
                        exit_code: int | None = None) -> HealthRecord:  # fmt: skip
    """The record of ``kind`` about the container ``info`` (an inspect answer) describes.

    Examples
    --------
    >>> info = {"Id": "abc", "Name": "/web", "RestartCount": 2, "Config": {"Labels": {}},
    ...         "State": {"Status": "running", "ExitCode": 0, "OOMKilled": False,
    ...                   "Health": {"Status": "unhealthy", "Log": [{"Output": "down\\n"}]}}}
    >>> r = record_from_inspect(info, "health", 1000, "h")
    >>> r.container, r.status, r.health, r.restarts, r.output
    ('web', 'running', 'unhealthy', 2, 'down')
    """
    state = info.get("State") or {}
    labels = (info.get("Config") or {}).get("Labels") or {}
    name = str(info.get("Name") or str(info.get("Id", ""))[:12]).lstrip("/")
    health = str((state.get("Health") or {}).get("Status") or "")
    status = "exited" if kind == "die" else str(state.get("Status") or "")
    code = exit_code if exit_code is not None else state.get("ExitCode")
    return HealthRecord(
        ts_ms=ts_ms, host=host, kind=kind, container=stable_identity(name, labels),
        container_id=str(info.get("Id", "")), status=status, health=health,
        restarts=int(info.get("RestartCount") or state.get("RestartCount") or 0),
        exit_code=None if kind in ("start", "health") or code is None else int(code),
        oom_killed=bool(state.get("OOMKilled")) or kind == "oom", output=_output(info),
    )  # fmt: skip


class HealthWatcher:
    """Health records and dependency edges of one host's containers, published to Kafka.

    ``client``: a ``docker.DockerClient`` (Docker or Podman); ``publisher``: an
    :class:`~nettel.ingest.publisher.EventPublisher` on the health topic. :meth:`poll`
    is one blocking round (run in a thread by :meth:`run`).
    """

    def __init__(self, client: Any, publisher: Any, *, host: str, interval_s: float = 15.0,
                 proc_root: str = "/proc", max_sockets: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.client = client
        self.publisher = publisher
        self.host = host
        self.interval_s = interval_s
        self.proc_root = proc_root
        self.max_sockets = max_sockets
        self.clock = clock
        self.edges = EdgeCounter()
        self.published = 0
        self._known: dict[str, _Known] = {}
        self._recheck: dict[str, str] = {}  # container id -> health its event saw
        self._stated: dict[str, int] = {}  # container id -> when a record last gave its state
        self._since_s = int(clock())
        self._seen: set[tuple[str, str, int]] = set()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _inspect(self, cid: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self.client.api.inspect_container(cid)
        except Exception as e:  # gone meanwhile, or the engine failed: next poll sees it
            log.debug("health_inspect_failed", container_id=cid[:12], error=str(e))
            return None
        return info

    def _remember(self, cid: str, info: Mapping[str, Any]) -> None:
        state = info.get("State") or {}
        rec = record_from_inspect(info, "state", 0, self.host)
        ips, gateways = _networks(info)
        pid = int(state.get("Pid") or 0) or None if state.get("Running") else None
        self._known[cid] = _Known(rec.container, pid, ips, gateways)

    def _events(self, now_s: float) -> list[HealthRecord]:
        """Records of the engine's events from the last poll's end (less a second) to now.

        The engine answers events up to ``until`` and returns only once ``until`` has
        passed (a past ``until`` gets nothing from Podman), so it is set a moment ahead.
        """
        since = self._since_s - 1  # one second of overlap: events are stamped in ns
        until = f"{now_s + EVENTS_AHEAD_S:.3f}"
        found: dict[str, list[tuple[int, HealthKind, int | None]]] = {}
        names: dict[str, Mapping[str, Any]] = {}
        seen: set[tuple[str, str, int]] = set()
        stream = self.client.api.events(since=since, until=until, decode=True,
                                        filters={"type": "container"})  # fmt: skip
        for ev in stream:
            # Docker says "health_status: unhealthy", Podman "health_status"
            action = str(ev.get("Action") or ev.get("status") or "").split(":", 1)[0]
            kind = ACTIONS.get(action)
            if kind is None:
                continue
            cid = str(ev.get("id") or (ev.get("Actor") or {}).get("ID") or "")
            nano = int(ev.get("timeNano") or int(ev.get("time") or 0) * 10**9)
            key = (cid, action, nano)
            seen.add(key)
            if key in self._seen or not cid:
                continue
            attrs = (ev.get("Actor") or {}).get("Attributes") or {}
            code = attrs.get("exitCode")
            found.setdefault(cid, []).append(
                (nano // 10**6, kind, int(code) if kind == "die" and code is not None else None)
            )
            names[cid] = attrs
        self._seen = seen if len(seen) <= _SEEN_MAX else set()
        self._since_s = int(now_s)
        out = []
        for cid, events in found.items():
            info = self._inspect(cid)
            if info is None:  # removed already: what the event itself says
                attrs = names[cid]
                name = str(attrs.get("name") or cid[:12])
                info = {"Id": cid, "Name": name, "Config": {"Labels": dict(attrs)}, "State": {}}
            else:
                self._remember(cid, info)
            for ts_ms, kind, code in events:
                record = record_from_inspect(info, kind, ts_ms, self.host, code)
                out.append(record)
                if kind == "health":  # the check may still run: look again next poll
                    self._recheck[cid] = record.health
        return out

    def _rechecked(self, now_ms: int, skip: set[str]) -> list[HealthRecord]:
        """A ``health`` record for each container whose healthcheck status changed since
        the event that announced the check (Podman announces it as it starts)."""
        out = []
        for cid, before in list(self._recheck.items()):
            if cid in skip:
                continue
            del self._recheck[cid]
            info = self._inspect(cid)
            if info is not None:
                record = record_from_inspect(info, "health", now_ms, self.host)
                if record.health != before:
                    out.append(record)
        return out

    def _refresh(self, now_ms: int, reported: set[str]) -> list[HealthRecord]:
        """Re-list running containers; a state record for each one first seen, and again
        every :data:`STATE_EVERY_MS` (so that the table, kept for days, always holds every
        running container's state, however long ago its last event was)."""
        listed = self.client.api.containers()
        running = {str(c["Id"]) for c in listed}
        for cid in reported:
            self._stated[cid] = now_ms
        due = {
            c for c in running if now_ms - self._stated.get(c, -STATE_EVERY_MS) >= STATE_EVERY_MS
        }
        out = []
        for cid in (running - set(self._known)) | due:
            info = self._inspect(cid)
            if info is None:
                continue
            self._remember(cid, info)
            if cid in due:
                out.append(record_from_inspect(info, "state", now_ms, self.host))
                self._stated[cid] = now_ms
        for cid in set(self._known) - running:
            del self._known[cid]
        for cid in set(self._stated) - running:
            del self._stated[cid]
        return out

    def _sample_edges(self, now_ms: int) -> None:
        by_ip = {ip: k.identity for k in self._known.values() for ip in k.ips}
        gateways = {g for k in self._known.values() for g in k.gateways}
        counts: dict[tuple[str, str, int], int] = {}
        for cid, known in self._known.items():
            if known.pid is None:
                continue
            try:
                conns = read_tcp_connections(known.pid, self.proc_root, self.max_sockets)
            except OSError:  # its process is gone: re-inspect at the next list
                self._known[cid].pid = None
                continue
            for lport, address, rport in conns.established:
                peer = classify_peer(address, by_ip, gateways)
                if not peer or peer == known.identity:
                    continue
                if lport in conns.listening:  # it serves this one
                    if peer in ("host", "external"):
                        key = (peer, known.identity, lport)
                        counts[key] = counts.get(key, 0) + 1
                    continue  # a container client counts it from its side
                key = (known.identity, peer, rport)
                counts[key] = counts.get(key, 0) + 1
        self.edges.add(now_ms, counts)

    def poll(self, *, final: bool = False) -> list[HealthRecord]:
        """One round: engine events, new containers, a socket sample, closed minutes
        (every minute when ``final``)."""
        now_ms = self._now_ms()
        records = self._events(now_ms / 1000)
        records += self._rechecked(now_ms, {r.container_id for r in records if r.kind == "health"})
        records += self._refresh(now_ms, {r.container_id for r in records})
        self._sample_edges(now_ms)
        return records + self.edges.closed(now_ms, self.host, everything=final)

    def publish(self, records: Iterable[HealthRecord]) -> None:
        """Hand ``records`` to the publisher, keyed by container."""
        for r in records:
            self.publisher.publish(r.container.encode(), encode_health_record(r))
            self.published += 1

    async def run(self, stop: asyncio.Event) -> None:
        """Poll and publish every ``interval_s`` until ``stop``; the open minute's edges
        are published before the publisher stops."""
        await self.publisher.start()
        try:
            while not stop.is_set():
                try:
                    self.publish(await asyncio.to_thread(self.poll))
                except Exception as e:  # the engine failed this round: try the next
                    log.warning("health_poll_failed", error=str(e))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval_s)
            with contextlib.suppress(Exception):
                self.publish(await asyncio.to_thread(self.poll, final=True))
        finally:
            await self.publisher.stop()
            log.info("health_watcher_stopped", published=self.published)
