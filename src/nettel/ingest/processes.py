"""A container's processes, read from its cgroup and ``/proc`` (no exec in the container).

The processes are those its cgroup's ``cgroup.procs`` lists (cgroup v2: the unified
directory; v1: the ``pids``, ``cpuacct`` or ``memory`` controller's directory), found
from ``/proc/<pid>/cgroup`` of its main process as the resource reader finds its files
(:func:`~nettel.ingest.cgroups.cgroup_paths`). For each: state and CPU seconds (user +
system) from ``/proc/<pid>/stat``, resident memory from ``VmRSS`` in
``/proc/<pid>/status``, the command line from ``/proc/<pid>/cmdline`` (the kernel's
name in brackets for a process without one). A process that exits while it is read is
left out. PIDs are the host's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nettel.ingest.cgroups import cgroup_paths, controller_dir

#: Characters of a command line kept (the rest is cut with an ellipsis).
COMMAND_CHARS = 100
#: Controllers whose v1 directory lists the cgroup's processes, the first found used.
_V1_CONTROLLERS = ("pids", "cpuacct", "memory")


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One process of a container at the time it was read."""

    pid: int
    command: str
    state: str
    cpu_seconds: float
    rss_bytes: int


def parse_stat(text: str, ticks_per_s: int) -> tuple[str, str, float]:
    """(name, state, CPU seconds) from a ``/proc/<pid>/stat`` line (the name may hold
    spaces and parentheses: it ends at the last ``)``).

    Examples
    --------
    >>> line = "42 (my (odd) cmd) S 1 42 42 0 -1 4194560 90 0 0 0 250 50 0 0 20 0 1 0 9"
    >>> parse_stat(line, 100)
    ('my (odd) cmd', 'S', 3.0)
    """
    head, _, rest = text.rpartition(")")
    name = head.partition("(")[2]
    fields = rest.split()
    return name, fields[0], (int(fields[11]) + int(fields[12])) / ticks_per_s


def parse_rss(status: str) -> int:
    """Resident bytes from ``/proc/<pid>/status`` (0 without ``VmRSS``: a kernel thread).

    Examples
    --------
    >>> parse_rss("Name:\\tsh\\nVmRSS:\\t     1220 kB\\nThreads:\\t1\\n")
    1249280
    >>> parse_rss("Name:\\tkthreadd\\n")
    0
    """
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def command_line(cmdline: bytes, name: str) -> str:
    """The command line, arguments joined by spaces, printable ASCII only, cut to
    :data:`COMMAND_CHARS`; ``[name]`` when there is none.

    Examples
    --------
    >>> command_line(b"sh\\x00-c\\x00sleep 5\\x00", "sh")
    'sh -c sleep 5'
    >>> command_line(b"", "kworker/0:1")
    '[kworker/0:1]'
    >>> len(command_line(b"x" * 500, "x"))
    100
    """
    text = cmdline.rstrip(b"\0").replace(b"\0", b" ").decode("ascii", "replace")
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
    if not text:
        return f"[{name}]"
    return text if len(text) <= COMMAND_CHARS else text[: COMMAND_CHARS - 1] + "…"


def cgroup_procs_path(pid: int, *, proc_root: str = "/proc",
                      cgroup_root: str = "/sys/fs/cgroup") -> str:  # fmt: skip
    """The ``cgroup.procs`` file of process ``pid``'s cgroup (v2 or v1, as the host has)."""
    with open(f"{proc_root}/{pid}/cgroup", encoding="ascii", errors="replace") as f:
        paths = cgroup_paths(f.read())
    if os.path.exists(f"{cgroup_root}/cgroup.controllers"):
        if "" not in paths:
            raise OSError(f"no cgroup v2 line in {proc_root}/{pid}/cgroup")
        return f"{cgroup_root}{paths['']}/cgroup.procs"
    for controller in _V1_CONTROLLERS:
        d = controller_dir(paths, cgroup_root, controller)
        if d is not None:
            return f"{d}/cgroup.procs"
    raise OSError(f"no pids, cpuacct or memory cgroup in {proc_root}/{pid}/cgroup")


def read_process(pid: int, *, proc_root: str = "/proc",
                 ticks_per_s: int | None = None) -> ProcessSample | None:  # fmt: skip
    """Process ``pid`` as ``/proc`` shows it now; None if it is gone."""
    ticks = ticks_per_s or os.sysconf("SC_CLK_TCK")
    base = f"{proc_root}/{pid}"
    try:
        with open(f"{base}/stat", encoding="utf-8", errors="replace") as f:
            name, state, cpu = parse_stat(f.read(), ticks)
        with open(f"{base}/status", encoding="utf-8", errors="replace") as f:
            rss = parse_rss(f.read())
        with open(f"{base}/cmdline", "rb") as f:
            cmd = command_line(f.read(), name)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return ProcessSample(pid=pid, command=cmd, state=state, cpu_seconds=cpu, rss_bytes=rss)


def container_processes(pid: int, *, proc_root: str = "/proc",
                        cgroup_root: str = "/sys/fs/cgroup") -> list[ProcessSample]:  # fmt: skip
    """Every process in the cgroup of process ``pid`` (a container's main process), in
    ``cgroup.procs`` order; OSError if the cgroup cannot be read."""
    path = cgroup_procs_path(pid, proc_root=proc_root, cgroup_root=cgroup_root)
    with open(path, encoding="ascii") as f:
        pids = [int(line) for line in f.read().split()]
    ticks = os.sysconf("SC_CLK_TCK")
    found = (read_process(p, proc_root=proc_root, ticks_per_s=ticks) for p in pids)
    return [p for p in found if p is not None]
