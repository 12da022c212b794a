"""A container's CPU, memory, block I/O and processes from its cgroup files (v1 or v2).

The cgroup of a container's main process is named in ``/proc/<pid>/cgroup``: one
``0::<path>`` line on a cgroup v2 host (every controller's files in one directory under
``/sys/fs/cgroup``), one ``<n>:<controllers>:<path>`` line per controller on a v1 (or
hybrid) host, whose files sit under ``/sys/fs/cgroup/<controllers>/<path>``. Each file
is read once per sample. Where they cannot be read, :func:`engine_stats_reading` turns
the engine's one-shot stats answer (the one the network fallback already asks for) into
the same reading. Every reading says its source.

Counters (CPU time, throttling, I/O, OOM) are cumulative here; :class:`ResourceTracker`
turns them into deltas with the network counters' reset rule. Gauges (memory, pids and
their limits) stay gauges; a limit of 0 means none is set.

Examples
--------
>>> parse_flat_keyed("nr_periods 4\\nnr_throttled 1\\nthrottled_usec 90\\n")["nr_throttled"]
1
>>> parse_io_stat("8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\\n"
...               "8:16 rbytes=1 wbytes=0 rios=1 wios=0\\n")
(4097, 8192, 2, 2)
>>> parse_limit("max\\n"), parse_limit("67108864\\n"), parse_limit("9223372036854771712")
(0, 67108864, 0)
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass
from typing import Any

from nettel.errors import SampleError
from nettel.ingest.counters import counter_deltas

#: A v1 limit at or above this is the kernel's "no limit" (PAGE_COUNTER_MAX, rounded).
_V1_UNLIMITED = 1 << 62
_NS_PER_US = 1000
#: v1's cpuacct.stat counts in USER_HZ ticks (100 per second on every Linux ABI).
_US_PER_TICK = 10_000


@dataclass(frozen=True, slots=True)
class ResourceCounters:
    """Cumulative counters of one cgroup (microseconds, bytes, operations, events)."""

    cpu_usage_us: int = 0
    cpu_user_us: int = 0
    cpu_system_us: int = 0
    cpu_periods: int = 0
    cpu_throttled_periods: int = 0
    cpu_throttled_us: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    io_reads: int = 0
    io_writes: int = 0
    oom_events: int = 0
    oom_kills: int = 0


@dataclass(frozen=True, slots=True)
class ResourceGauges:
    """Values of one cgroup at sample time (limits: 0 when none is set)."""

    memory_bytes: int = 0
    memory_limit_bytes: int = 0
    memory_anon_bytes: int = 0
    memory_file_bytes: int = 0
    memory_kernel_bytes: int = 0
    pids: int = 0
    pids_limit: int = 0


@dataclass(frozen=True, slots=True)
class ResourceReading:
    """One read of a container's cgroup: cumulative counters, gauges, and their source.

    ``generation`` names the incarnation the counters belong to (the main process id):
    counters of different generations never subtract.
    """

    counters: ResourceCounters
    gauges: ResourceGauges
    source: str
    generation: int


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat, memory.events, oom_control) as a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value:
            try:
                out[key] = int(value)
            except ValueError:
                continue
    return out


def parse_io_stat(text: str) -> tuple[int, int, int, int]:
    """(read bytes, written bytes, reads, writes) summed over the devices of v2 ``io.stat``."""
    rb = wb = rio = wio = 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if key == "rbytes":
                rb += int(value)
            elif key == "wbytes":
                wb += int(value)
            elif key == "rios":
                rio += int(value)
            elif key == "wios":
                wio += int(value)
    return rb, wb, rio, wio


def parse_blkio(text: str) -> tuple[int, int]:
    """(read, write) summed over the devices of a v1 ``blkio.throttle.io_service_*`` file.

    Examples
    --------
    >>> parse_blkio("8:0 Read 4096\\n8:0 Write 512\\n8:0 Total 4608\\nTotal 4608\\n")
    (4096, 512)
    """
    read = write = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            if parts[1] == "Read":
                read += int(parts[2])
            elif parts[1] == "Write":
                write += int(parts[2])
    return read, write


def parse_limit(text: str) -> int:
    """A limit file's value: 0 for ``max`` or v1's "unlimited"."""
    value = text.strip()
    if value == "max" or not value:
        return 0
    n = int(value)
    return 0 if n >= _V1_UNLIMITED else n


def cgroup_paths(proc_cgroup: str) -> dict[str, str]:
    """Controller -> path from ``/proc/<pid>/cgroup``; the v2 line under key ``""``.

    Examples
    --------
    >>> cgroup_paths("4:memory:/libpod_parent/x\\n2:cpu,cpuacct:/libpod_parent/x\\n0::/u\\n")
    {'memory': '/libpod_parent/x', 'cpu,cpuacct': '/libpod_parent/x', '': '/u'}
    """
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("ascii", "replace")


#: Bytes one pread asks for (a cgroup file is far smaller; a longer one is read on).
_CHUNK = 16384


def _pread_all(fd: int) -> str:
    data = os.pread(fd, _CHUNK, 0)
    while len(data) % _CHUNK == 0 and data:
        more = os.pread(fd, _CHUNK, len(data))
        if not more:
            break
        data += more
    return data.decode("ascii", "replace")


def default_fd_budget() -> int:
    """Descriptors the reader may keep open: a quarter of the process's soft limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, soft // 4) if soft != resource.RLIM_INFINITY else 4096


class _OpenFiles:
    """Cgroup files kept open per unit and re-read with ``pread`` (a third of the CPU of
    opening them each time), up to ``budget`` descriptors; past it files are opened per
    read. A file that fails to read is closed (its cgroup is gone)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._fds: dict[str, dict[str, int]] = {}
        self._open = 0

    def read(self, key: str, path: str) -> str:
        files = self._fds.setdefault(key, {})
        fd = files.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if self._open >= self.budget:
                try:
                    return _pread_all(fd)
                finally:
                    os.close(fd)
            files[path] = fd
            self._open += 1
        return _pread_all(fd)

    def close(self, key: str) -> None:
        for fd in self._fds.pop(key, {}).values():
            os.close(fd)
            self._open -= 1

    def close_all(self) -> None:
        for key in list(self._fds):
            self.close(key)


def controller_dir(paths: Mapping[str, str], root: str, controller: str) -> str | None:
    """The v1 directory of ``controller`` under ``root`` for :func:`cgroup_paths`'
    ``paths`` (None if the process is in no such hierarchy).

    Examples
    --------
    >>> controller_dir({"cpu,cpuacct": "/x"}, "/sys/fs/cgroup", "cpuacct")
    '/sys/fs/cgroup/cpu,cpuacct/x'
    """
    for controllers, path in paths.items():
        if controller in controllers.split(","):
            return f"{root}/{controllers}{path}"
    return None


@dataclass(frozen=True, slots=True)
class _Dirs:
    pid: int
    v2: str | None
    cpu: str | None = None
    cpuacct: str | None = None
    memory: str | None = None
    blkio: str | None = None
    pids: str | None = None


class CgroupReader:
    """Reads containers' cgroup files under ``cgroup_root`` (v2 or v1, found per host).

    The directories of a process are found once (from ``/proc/<pid>/cgroup``) and kept
    until the unit's main process changes.
    """

    def __init__(self, *, proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup",
                 fd_budget: int | None = None) -> None:  # fmt: skip
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.unified = os.path.exists(f"{cgroup_root}/cgroup.controllers")
        self._dirs: dict[str, _Dirs] = {}
        self._files = _OpenFiles(default_fd_budget() if fd_budget is None else fd_budget)

    def _find(self, key: str, pid: int) -> _Dirs:
        dirs = self._dirs.get(key)
        if dirs is not None and dirs.pid == pid:
            return dirs
        self._files.close(key)  # another process: perhaps another cgroup
        paths = cgroup_paths(_read(f"{self.proc_root}/{pid}/cgroup"))
        if self.unified:
            if "" not in paths:
                raise OSError(f"no cgroup v2 line in {self.proc_root}/{pid}/cgroup")
            dirs = _Dirs(pid, f"{self.cgroup_root}{paths['']}")
        else:
            r = self.cgroup_root
            dirs = _Dirs(pid, None, *(controller_dir(paths, r, c) for c in
                                      ("cpu", "cpuacct", "memory", "blkio", "pids")))  # fmt: skip
        self._dirs[key] = dirs
        return dirs

    def read(self, key: str, pid: int) -> ResourceReading:
        """The cgroup reading of process ``pid`` (the unit ``key``); OSError if unreadable."""
        dirs = self._find(key, pid)

        def read(path: str) -> str:
            return self._files.read(key, path)

        try:
            if dirs.v2 is not None:
                return _read_v2(read, dirs.v2, pid)
            return _read_v1(read, dirs)
        except (OSError, ValueError):
            self.forget(key)  # found again next time (the process may have changed)
            raise

    def forget(self, key: str) -> None:
        """Drop what is kept of a unit that is gone (its open files too)."""
        self._dirs.pop(key, None)
        self._files.close(key)

    def close(self) -> None:
        """Close every file kept open; safe to call twice."""
        self._files.close_all()
        self._dirs.clear()


def _read_v2(_read: Callable[[str], str], d: str, pid: int) -> ResourceReading:
    cpu = parse_flat_keyed(_read(f"{d}/cpu.stat"))
    mem = parse_flat_keyed(_read(f"{d}/memory.stat"))
    events = parse_flat_keyed(_read(f"{d}/memory.events"))
    rb, wb, rio, wio = parse_io_stat(_read(f"{d}/io.stat"))
    kernel = mem.get("kernel")
    if kernel is None:  # kernels before 5.18 split it
        kernel = mem.get("kernel_stack", 0) + mem.get("slab", 0) + mem.get("pagetables", 0)
    counters = ResourceCounters(
        cpu_usage_us=cpu.get("usage_usec", 0), cpu_user_us=cpu.get("user_usec", 0),
        cpu_system_us=cpu.get("system_usec", 0), cpu_periods=cpu.get("nr_periods", 0),
        cpu_throttled_periods=cpu.get("nr_throttled", 0),
        cpu_throttled_us=cpu.get("throttled_usec", 0), io_read_bytes=rb, io_write_bytes=wb,
        io_reads=rio, io_writes=wio, oom_events=events.get("oom", 0),
        oom_kills=events.get("oom_kill", 0),
    )  # fmt: skip
    gauges = ResourceGauges(
        memory_bytes=int(_read(f"{d}/memory.current")),
        memory_limit_bytes=parse_limit(_read(f"{d}/memory.max")),
        memory_anon_bytes=mem.get("anon", 0), memory_file_bytes=mem.get("file", 0),
        memory_kernel_bytes=kernel, pids=int(_read(f"{d}/pids.current")),
        pids_limit=parse_limit(_read(f"{d}/pids.max")),
    )  # fmt: skip
    return ResourceReading(counters, gauges, "cgroup-v2", pid)


def _read_v1(_read: Callable[[str], str], d: _Dirs) -> ResourceReading:
    if None in (d.cpu, d.cpuacct, d.memory, d.blkio, d.pids):
        raise OSError("a cgroup v1 controller is not mounted for this process")
    # cpuacct.usage is exact (ns); the user/system split of cpuacct.stat is sampled at
    # the scheduler tick (USER_HZ units), as the kernel keeps it on v1
    usage_ns = int(_read(f"{d.cpuacct}/cpuacct.usage"))
    split = parse_flat_keyed(_read(f"{d.cpuacct}/cpuacct.stat"))
    cpu = parse_flat_keyed(_read(f"{d.cpu}/cpu.stat"))
    mem = parse_flat_keyed(_read(f"{d.memory}/memory.stat"))
    oom = parse_flat_keyed(_read(f"{d.memory}/memory.oom_control"))
    rb, wb = parse_blkio(_read(f"{d.blkio}/blkio.throttle.io_service_bytes"))
    rio, wio = parse_blkio(_read(f"{d.blkio}/blkio.throttle.io_serviced"))
    counters = ResourceCounters(
        cpu_usage_us=usage_ns // _NS_PER_US, cpu_user_us=split.get("user", 0) * _US_PER_TICK,
        cpu_system_us=split.get("system", 0) * _US_PER_TICK, cpu_periods=cpu.get("nr_periods", 0),
        cpu_throttled_periods=cpu.get("nr_throttled", 0),
        cpu_throttled_us=cpu.get("throttled_time", 0) // _NS_PER_US, io_read_bytes=rb,
        io_write_bytes=wb, io_reads=rio, io_writes=wio,
        # v1 counts OOM kills only: each is an OOM event too
        oom_events=oom.get("oom_kill", 0), oom_kills=oom.get("oom_kill", 0),
    )  # fmt: skip
    gauges = ResourceGauges(
        memory_bytes=int(_read(f"{d.memory}/memory.usage_in_bytes")),
        memory_limit_bytes=parse_limit(_read(f"{d.memory}/memory.limit_in_bytes")),
        memory_anon_bytes=mem.get("total_rss", mem.get("rss", 0)),
        memory_file_bytes=mem.get("total_cache", mem.get("cache", 0)),
        memory_kernel_bytes=0,  # v1 keeps it in memory.kmem.*, not read (one more file)
        pids=int(_read(f"{d.pids}/pids.current")),
        pids_limit=parse_limit(_read(f"{d.pids}/pids.max")),
    )  # fmt: skip
    return ResourceReading(counters, gauges, "cgroup-v1", d.pid)


def _blkio_sum(entries: Any, op: str) -> int:
    return sum(int(e.get("value", 0)) for e in entries or () if str(e.get("op", "")).lower() == op)


def _limit(value: Any) -> int:
    n = int(value or 0)
    return 0 if n >= _V1_UNLIMITED else n


def engine_stats_reading(stats: Mapping[str, Any], generation: int) -> ResourceReading:
    """The reading in an engine's one-shot stats answer (Docker's shape; Podman's too).

    Examples
    --------
    >>> r = engine_stats_reading({
    ...     "cpu_stats": {"cpu_usage": {"total_usage": 3_000_000, "usage_in_usermode": 1_000_000,
    ...                   "usage_in_kernelmode": 2_000_000},
    ...                   "throttling_data": {"periods": 9, "throttled_periods": 2,
    ...                                       "throttled_time": 5000}},
    ...     "memory_stats": {"usage": 4096, "limit": 65536, "stats": {"anon": 1024}},
    ...     "blkio_stats": {"io_service_bytes_recursive": [{"op": "read", "value": 7},
    ...                                                    {"op": "write", "value": 9}]},
    ...     "pids_stats": {"current": 3, "limit": 100}}, generation=1)
    >>> r.counters.cpu_usage_us, r.counters.io_write_bytes, r.gauges.memory_bytes, r.source
    (3000, 9, 4096, 'engine-stats')
    """
    cpu = stats.get("cpu_stats") or {}
    usage = cpu.get("cpu_usage") or {}
    throttling = cpu.get("throttling_data") or {}
    mem = stats.get("memory_stats") or {}
    mstats = mem.get("stats") or {}
    blk = (stats.get("blkio_stats") or {}).get("io_service_bytes_recursive")
    blk_ops = (stats.get("blkio_stats") or {}).get("io_serviced_recursive")
    pids = stats.get("pids_stats") or {}
    counters = ResourceCounters(
        cpu_usage_us=int(usage.get("total_usage") or 0) // _NS_PER_US,
        cpu_user_us=int(usage.get("usage_in_usermode") or 0) // _NS_PER_US,
        cpu_system_us=int(usage.get("usage_in_kernelmode") or 0) // _NS_PER_US,
        cpu_periods=int(throttling.get("periods") or 0),
        cpu_throttled_periods=int(throttling.get("throttled_periods") or 0),
        cpu_throttled_us=int(throttling.get("throttled_time") or 0) // _NS_PER_US,
        io_read_bytes=_blkio_sum(blk, "read"), io_write_bytes=_blkio_sum(blk, "write"),
        io_reads=_blkio_sum(blk_ops, "read"), io_writes=_blkio_sum(blk_ops, "write"),
        oom_events=int(mstats.get("oom") or 0), oom_kills=int(mstats.get("oom_kill") or 0),
    )  # fmt: skip
    gauges = ResourceGauges(
        memory_bytes=int(mem.get("usage") or 0),
        memory_limit_bytes=_limit(mem.get("limit")),
        memory_anon_bytes=int(mstats.get("anon", mstats.get("rss", 0)) or 0),
        memory_file_bytes=int(mstats.get("file", mstats.get("cache", 0)) or 0),
        memory_kernel_bytes=int(mstats.get("kernel", 0) or 0),
        pids=int(pids.get("current") or 0),
        pids_limit=_limit(pids.get("limit")),
    )  # fmt: skip
    return ResourceReading(counters, gauges, "engine-stats", generation)


@dataclass(frozen=True, slots=True)
class ResourceDelta:
    """Counter deltas of one unit over ``interval_ms`` (``reset``: they restarted)."""

    counters: ResourceCounters
    interval_ms: int
    reset: bool


@dataclass(slots=True)
class _LastResources:
    reading: ResourceReading
    ts_ms: int


class ResourceTracker:
    """Each unit's last cgroup reading; deltas with the network counters' reset rule.

    A unit's first reading is its baseline (None), unless it started after ingest began
    watching (``since_ms``): then it counts from zero. A new generation (another main
    process: a restart) or any counter going down is a reset: the delta is what was
    counted since (the kernel counts a new cgroup from zero), flagged.

    Examples
    --------
    >>> t = ResourceTracker()
    >>> read = lambda cpu, gen=1: ResourceReading(ResourceCounters(cpu_usage_us=cpu),
    ...                                          ResourceGauges(), "cgroup-v2", gen)
    >>> t.update("web", read(100), ts_ms=1000) is None
    True
    >>> d = t.update("web", read(350), ts_ms=6000)
    >>> d.counters.cpu_usage_us, d.interval_ms, d.reset
    (250, 5000, False)
    >>> d = t.update("web", read(40, gen=2), ts_ms=11000)
    >>> d.counters.cpu_usage_us, d.reset
    (40, True)
    """

    def __init__(self) -> None:
        self._last: dict[str, _LastResources] = {}

    def update(self, key: str, reading: ResourceReading, *, ts_ms: int,
               since_ms: int | None = None) -> ResourceDelta | None:  # fmt: skip
        """Record a reading of ``key``; its delta from the previous one (None: a baseline)."""
        last = self._last.get(key)
        self._last[key] = _LastResources(reading, ts_ms)
        if last is None:
            if since_ms is None:
                return None
            return ResourceDelta(reading.counters, max(0, ts_ms - since_ms), reset=False)
        interval = max(0, ts_ms - last.ts_ms)
        diffs = None
        if reading.generation == last.reading.generation:
            diffs = counter_deltas(astuple(reading.counters), astuple(last.reading.counters))
        if diffs is None:
            return ResourceDelta(reading.counters, interval, reset=True)
        return ResourceDelta(ResourceCounters(*diffs), interval, reset=False)

    def forget(self, key: str) -> None:
        """Drop a unit that is gone."""
        self._last.pop(key, None)


def read_unit_resources(reader: CgroupReader, key: str, pid: int | None) -> ResourceReading:
    """The cgroup reading of a unit; :class:`SampleError` if its files cannot be read."""
    if pid is None:
        raise SampleError(f"{key}: no process to read the cgroup of")
    try:
        return reader.read(key, pid)
    except (OSError, ValueError) as e:
        raise SampleError(f"{key}: cgroup files unreadable: {e}") from e
