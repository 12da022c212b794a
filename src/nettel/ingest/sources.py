"""Sources of units and their readings: the container engine's API, or procfs alone.

:class:`EngineSource` lists containers through the ``docker`` SDK (Docker, or Podman's
compatible socket), follows the engine's event stream for start/stop/restart, and
reads counters from ``/proc/<pid>/net`` when the host's /proc is readable, else from
the engine's one-shot stats call. :class:`ProcfsSource` needs no engine: every
network namespace on the host is a unit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import docker
import docker.errors
import structlog

from nettel.errors import EngineUnavailableError, SampleError
from nettel.ingest.cgroups import (
    CgroupReader,
    ResourceReading,
    engine_stats_reading,
    read_unit_resources,
)
from nettel.ingest.procfs import InterfaceCounters, NetnsReader, select_interfaces
from nettel.ingest.units import COMPOSE_PROJECT, COMPOSE_SERVICE, Unit, stable_identity
from nettel.models import TcpStates

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample of a unit: cumulative counters, socket states, and when it was taken;
    ``resources``: its cgroup reading, where the source reads resources too."""

    ts_ms: int
    netns: int
    counters: InterfaceCounters
    tcp: TcpStates | None
    source: str
    resources: ResourceReading | None = None


class Source(Protocol):
    """What the sampler needs from a source."""

    name: str

    def refresh(self) -> None:
        """Bring the unit list up to date (may call the engine)."""

    def units(self) -> list[Unit]:
        """The units to sample now (no I/O)."""

    def read(self, unit: Unit) -> Reading:
        """Sample one unit; raises :class:`SampleError` when it cannot."""

    def reads_fast(self, unit: Unit) -> bool:
        """Whether reading ``unit`` is a few file reads (never waits on a remote API)."""

    def close(self) -> None:
        """Release connections and threads; safe to call twice."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def read_procfs_unit(unit: Unit, reader: NetnsReader, source: str = "procfs") -> Reading:
    """Sample ``unit`` through ``/proc/<pid>/net``; :class:`SampleError` if it vanished."""
    if unit.pid is None:
        raise SampleError(f"{unit.identity}: no process to read")
    try:
        r = reader.read(unit.pid)
    except OSError as e:
        raise SampleError(f"{unit.identity}: {reader.proc_root}/{unit.pid} unreadable: {e}") from e
    return Reading(
        ts_ms=_now_ms(),
        netns=r.netns_inode,
        counters=select_interfaces(r.counters, unit.exclude_interfaces),
        tcp=r.tcp,
        source=source,
    )


def _parse_engine_time_ms(value: str) -> int | None:
    if not value or value.startswith("0001-"):
        return None
    try:
        # Engines give RFC 3339 with nanoseconds; Python takes microseconds at most.
        head, _, frac = value.partition(".")
        tz = ""
        if frac:
            digits = "".join(ch for ch in frac if ch.isdigit())
            tz = frac[len(digits) :]
            value = f"{head}.{digits[:6]}{tz}"
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


class EngineSource:
    """Containers from the engine API; counters from procfs where readable, else the API."""

    name = "engine"

    def __init__(
        self,
        base_url: str,
        *,
        proc_root: str = "/proc",
        inventory_interval_s: float = 30.0,
        timeout_s: float = 10.0,
        client_factory: Callable[..., Any] = docker.DockerClient,
        resources: bool = False,
        cgroup_root: str = "/sys/fs/cgroup",
    ) -> None:
        self.base_url = base_url
        self.proc_root = proc_root
        self.netns = NetnsReader(proc_root)
        #: read each container's cgroup too (:mod:`nettel.ingest.cgroups`), in the same
        #: job as its network counters; None: resources are not sampled
        self.cgroups = (
            CgroupReader(proc_root=proc_root, cgroup_root=cgroup_root) if resources else None
        )
        #: containers whose cgroup files could not be read: their resources come from
        #: the engine's stats call, in a job of their own
        self._cgroup_unreadable: set[str] = set()
        #: containers read through procfs at least once: when their process vanishes
        #: (a restart in progress) they are re-inspected, never switched to the stats
        #: call, whose incarnation key (the PID) would flag a second reset
        self._procfs_units: set[str] = set()
        self.inventory_interval_s = inventory_interval_s
        self._watch_start_ms = _now_ms()
        try:
            self._client = client_factory(base_url=base_url, timeout=timeout_s)
            self._client.ping()
        except Exception as e:
            raise EngineUnavailableError(f"engine at {base_url} did not answer: {e}") from e
        self._units: dict[str, Unit] = {}
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._dirty.set()
        self._last_full_ms = 0
        self._closed = threading.Event()
        self._events_thread = threading.Thread(
            target=self._follow_events, name="nettel-engine-events", daemon=True
        )
        self._events_thread.start()

    def units(self) -> list[Unit]:
        with self._lock:
            return list(self._units.values())

    def refresh(self) -> None:
        """Re-list containers when the event stream said something changed, or periodically."""
        now = _now_ms()
        if not self._dirty.is_set() and now - self._last_full_ms < self.inventory_interval_s * 1e3:
            return
        self._dirty.clear()
        try:
            listed = self._client.api.containers()
        except Exception as e:
            self._dirty.set()
            log.warning("engine_list_failed", error=str(e), engine=self.base_url)
            return
        self._last_full_ms = now
        running = {c["Id"] for c in listed}
        with self._lock:
            known = dict(self._units)
        fresh: dict[str, Unit] = {}
        for cid in running:
            unit = known.get(cid)
            if unit is None or not self._alive(unit):
                unit = self._inspect(cid)
            if unit is not None:
                fresh[cid] = unit
        with self._lock:
            self._units = fresh
        for cid in set(known) - set(fresh):
            log.info("container_gone", container=known[cid].identity, container_id=cid[:12])
            self._cgroup_unreadable.discard(cid)
            self._procfs_units.discard(cid)
            if self.cgroups is not None:
                self.cgroups.forget(cid)
        for cid in set(fresh) - set(known):
            log.info("container_found", container=fresh[cid].identity, container_id=cid[:12])

    def _alive(self, unit: Unit) -> bool:
        return unit.pid is not None and os.path.exists(f"{self.proc_root}/{unit.pid}")

    def _inspect(self, cid: str) -> Unit | None:
        try:
            info = self._client.api.inspect_container(cid)
        except docker.errors.NotFound:
            return None
        except Exception as e:
            log.warning("engine_inspect_failed", container_id=cid[:12], error=str(e))
            return None
        state = info.get("State") or {}
        if not state.get("Running"):
            return None
        config = info.get("Config") or {}
        labels = config.get("Labels") or {}
        name = str(info.get("Name", cid[:12])).lstrip("/")
        started_ms = _parse_engine_time_ms(str(state.get("StartedAt", "")))
        pid = int(state.get("Pid") or 0) or None
        return Unit(
            identity=stable_identity(name, labels),
            container_id=cid,
            name=name,
            pid=pid,
            image=str(config.get("Image", "")),
            compose_project=labels.get(COMPOSE_PROJECT, ""),
            compose_service=labels.get(COMPOSE_SERVICE, ""),
            started_ms=started_ms if started_ms and started_ms > self._watch_start_ms else None,
        )

    def _procfs_readable(self, unit: Unit) -> bool:
        return unit.pid is not None and os.access(f"{self.proc_root}/{unit.pid}/net/dev", os.R_OK)

    def reads_fast(self, unit: Unit) -> bool:
        return self._procfs_readable(unit) and unit.container_id not in self._cgroup_unreadable

    def read(self, unit: Unit) -> Reading:
        if self._procfs_readable(unit):
            try:
                reading = read_procfs_unit(unit, self.netns, source="engine+procfs")
            except SampleError:
                self._dirty.set()
                raise
            self._procfs_units.add(unit.container_id)
            if self.cgroups is None:
                return reading
            if unit.container_id not in self._cgroup_unreadable:
                try:
                    resources = read_unit_resources(self.cgroups, unit.container_id, unit.pid)
                    return dataclasses.replace(reading, resources=resources)
                except SampleError as e:
                    self._cgroup_unreadable.add(unit.container_id)
                    log.warning("cgroup_unreadable", container=unit.identity, error=str(e),
                                fallback="engine stats")  # fmt: skip
            stats = self._stats(unit)
            return dataclasses.replace(
                reading, resources=engine_stats_reading(stats, unit.pid or 0)
            )
        if unit.container_id in self._procfs_units:
            self._dirty.set()  # its process is gone: re-inspect, read the new one next tick
            raise SampleError(f"{unit.identity}: process {unit.pid} gone (restarting?)")
        return self._read_stats(unit)

    def _stats(self, unit: Unit) -> dict[str, Any]:
        try:
            stats: dict[str, Any] = self._client.api.stats(
                unit.container_id, stream=False, one_shot=True
            )
        except Exception as e:
            self._dirty.set()
            raise SampleError(f"{unit.identity}: engine stats failed: {e}") from e
        return stats

    def _read_stats(self, unit: Unit) -> Reading:
        stats = self._stats(unit)
        nets: dict[str, dict[str, int]] = stats.get("networks") or {}
        counters = select_interfaces(
            {
                k: InterfaceCounters(
                    rx_bytes=v.get("rx_bytes", 0),
                    rx_packets=v.get("rx_packets", 0),
                    rx_errors=v.get("rx_errors", 0),
                    rx_drops=v.get("rx_dropped", 0),
                    tx_bytes=v.get("tx_bytes", 0),
                    tx_packets=v.get("tx_packets", 0),
                    tx_errors=v.get("tx_errors", 0),
                    tx_drops=v.get("tx_dropped", 0),
                )
                for k, v in nets.items()
            },
            unit.exclude_interfaces,
        )
        # Without /proc there is no namespace inode: the PID stands for the incarnation.
        resources = None if self.cgroups is None else engine_stats_reading(stats, unit.pid or 0)
        return Reading(_now_ms(), unit.pid or 0, counters, None, "engine-stats", resources)

    def _follow_events(self) -> None:
        backoff = 0.5
        while not self._closed.is_set():
            try:
                stream = self._client.events(decode=True, filters={"type": "container"})
                backoff = 0.5
                for ev in stream:
                    if self._closed.is_set():
                        break
                    action = str(ev.get("Action") or ev.get("status") or "")
                    if action in {"start", "restart", "die", "stop", "destroy", "remove", "kill"}:
                        log.debug(
                            "engine_event", action=action, container_id=str(ev.get("id"))[:12]
                        )
                        self._dirty.set()
            except Exception as e:
                if self._closed.is_set():
                    break
                log.warning("engine_events_lost", error=str(e), retry_s=backoff)
                self._dirty.set()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self.cgroups is not None:
            self.cgroups.close()
        with contextlib.suppress(Exception):
            self._client.close()


class ProcfsSource:
    """Every network namespace on the host as a unit, the host's own included."""

    name = "procfs"

    def __init__(
        self,
        *,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        inventory_interval_s: float = 30.0,
    ) -> None:
        self.proc_root = proc_root
        self.sys_root = sys_root
        self.netns = NetnsReader(proc_root)
        self.inventory_interval_s = inventory_interval_s
        self._units: list[Unit] = []
        self._seen: set[int] = set()
        self._last_scan_ms: int | None = None
        self._dirty = True

    def units(self) -> list[Unit]:
        return list(self._units)

    def _named_netns(self) -> dict[int, str]:
        names: dict[int, str] = {}
        with contextlib.suppress(OSError):
            for name in os.listdir("/run/netns"):
                with contextlib.suppress(OSError):
                    names[os.stat(f"/run/netns/{name}").st_ino] = name
        return names

    def _virtual_interfaces(self) -> frozenset[str]:
        try:
            return frozenset(os.listdir(f"{self.sys_root}/devices/virtual/net"))
        except OSError:
            return frozenset()

    def refresh(self) -> None:
        """Scan /proc for network namespaces; one unit per namespace, lowest PID reads it.

        A namespace first seen on a later scan started after the previous scan, so its
        first sample counts from zero and loses nothing.
        """
        now = _now_ms()
        last = self._last_scan_ms
        if not self._dirty and last is not None and now - last < self.inventory_interval_s * 1e3:
            return
        self._dirty = False
        by_ns: dict[int, int] = {}
        for entry in os.listdir(self.proc_root):
            if not entry.isdigit():
                continue
            try:
                ino = os.stat(f"{self.proc_root}/{entry}/ns/net").st_ino
            except OSError:
                continue
            pid = int(entry)
            if ino not in by_ns or pid < by_ns[ino]:
                by_ns[ino] = pid
        host_ns = -1
        for who in ("1", "self"):  # PID 1 may be hidden (sandboxes); ours is then the host's
            try:
                host_ns = os.stat(f"{self.proc_root}/{who}/ns/net").st_ino
                break
            except OSError:
                continue
        named = self._named_netns()
        units = []
        for ino, pid in sorted(by_ns.items(), key=lambda kv: kv[1]):
            if ino == host_ns:
                identity, name = "host", "host"
                exclude = self._virtual_interfaces()
            else:
                name = named.get(ino) or self._comm(pid)
                identity = f"netns/{name}" if ino in named else f"netns/{name}-{ino}"
                exclude = frozenset()
            new = ino not in self._seen
            self._seen.add(ino)
            units.append(
                Unit(
                    identity=identity,
                    container_id=f"netns:{ino}",
                    name=name,
                    pid=pid,
                    started_ms=last if new else None,
                    exclude_interfaces=exclude,
                )
            )
        self._units = units
        self._last_scan_ms = now

    def _comm(self, pid: int) -> str:
        try:
            with open(f"{self.proc_root}/{pid}/comm", encoding="utf-8", errors="replace") as f:
                return f.read().strip() or str(pid)
        except OSError:
            return str(pid)

    def reads_fast(self, unit: Unit) -> bool:
        return True

    def read(self, unit: Unit) -> Reading:
        try:
            return read_procfs_unit(unit, self.netns)
        except SampleError:
            self._dirty = True
            raise

    def close(self) -> None:
        return None
