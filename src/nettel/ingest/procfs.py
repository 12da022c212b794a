"""Read a network namespace's counters and TCP states from procfs.

Parsing is pure (text in, numbers out); reading takes the ``proc_root`` and a PID
whose network namespace is sampled. ``/proc/<pid>/net/dev`` costs one small file
read per sample, no engine API call.

Examples
--------
>>> text = '''Inter-|   Receive |  Transmit
...  face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop ...
...     lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0
...   eth0: 1936 25 1 2 0 0 0 0 104015 20 3 4 0 0 0 0
... '''
>>> counters = parse_net_dev(text)
>>> c = counters["eth0"]
>>> (c.rx_bytes, c.rx_packets, c.rx_errors, c.rx_drops, c.tx_bytes, c.tx_packets, c.tx_drops)
(1936, 25, 1, 2, 104015, 20, 4)
>>> sum_counters(counters.values()).rx_bytes
2036
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass, fields

from nettel.ingest.sockdiag import SockDiag
from nettel.models import TCP_STATE_NAMES, TcpStates


@dataclass(frozen=True, slots=True)
class InterfaceCounters:
    """Cumulative counters of one interface (or a sum of several), as the kernel keeps them."""

    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_drops: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_drops: int = 0


COUNTER_NAMES = tuple(f.name for f in fields(InterfaceCounters))


def parse_net_dev(text: str) -> dict[str, InterfaceCounters]:
    """Per-interface counters from the text of ``/proc/<pid>/net/dev``."""
    out: dict[str, InterfaceCounters] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        v = rest.split()
        if len(v) < 12:
            continue
        out[name.strip()] = InterfaceCounters(
            rx_bytes=int(v[0]),
            rx_packets=int(v[1]),
            rx_errors=int(v[2]),
            rx_drops=int(v[3]),
            tx_bytes=int(v[8]),
            tx_packets=int(v[9]),
            tx_errors=int(v[10]),
            tx_drops=int(v[11]),
        )
    return out


def sum_counters(items: Iterable[InterfaceCounters]) -> InterfaceCounters:
    """Field-wise sum of interface counters."""
    totals = [0] * len(COUNTER_NAMES)
    for c in items:
        for i, name in enumerate(COUNTER_NAMES):
            totals[i] += getattr(c, name)
    return InterfaceCounters(*totals)


def select_interfaces(
    counters: dict[str, InterfaceCounters], exclude: Container[str] = ()
) -> InterfaceCounters:
    """Sum of the interfaces that carry a unit's own traffic: all but ``lo`` and ``exclude``.

    Examples
    --------
    >>> c = {"lo": InterfaceCounters(rx_bytes=5), "eth0": InterfaceCounters(rx_bytes=7),
    ...      "veth1": InterfaceCounters(rx_bytes=9)}
    >>> select_interfaces(c, exclude={"veth1"}).rx_bytes
    7
    """
    return sum_counters(v for k, v in counters.items() if k != "lo" and k not in exclude)


def parse_tcp_states(*texts: str) -> TcpStates:
    """Count sockets per state over the texts of ``net/tcp`` and ``net/tcp6``.

    Examples
    --------
    >>> tcp = '''  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
    ...    0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
    ...    1: 0200580A:1F90 0300580A:A2C4 01 00000000:00000000 00:00000000 00000000     0
    ...    2: 0200580A:1F90 0300580A:A2C6 06 00000000:00000000 00:00000000 00000000     0
    ... '''
    >>> s = parse_tcp_states(tcp)
    >>> s.listen, s.established, s.time_wait, s.connections
    (1, 1, 1, 2)
    """
    counts: dict[str, int] = {}
    for text in texts:
        for line in text.splitlines()[1:]:
            parts = line.split(None, 4)
            if len(parts) < 4:
                continue
            try:
                name = TCP_STATE_NAMES[int(parts[3], 16)]
            except (KeyError, ValueError):
                continue
            counts[name] = counts.get(name, 0) + 1
    return TcpStates(**counts)


def _proc_address(hex_addr: str) -> str:
    """The text form of an address of ``net/tcp`` (8 hex digits, little-endian words) or
    ``net/tcp6`` (32); an IPv4-mapped IPv6 address becomes its IPv4 form."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


@dataclass(frozen=True, slots=True)
class TcpConnections:
    """The TCP sockets of a namespace that a dependency map needs: the ports it listens
    on and its established connections as (local port, remote address, remote port).
    ``truncated``: the texts held more sockets than the limit, only the first were read."""

    listening: frozenset[int]
    established: tuple[tuple[int, str, int], ...]
    truncated: bool = False


def parse_tcp_connections(*texts: str, limit: int = 4096) -> TcpConnections:
    """Listening ports and established connections of ``net/tcp`` and ``net/tcp6``
    texts, reading at most ``limit`` socket lines (the work per sample is bounded).

    Examples
    --------
    >>> tcp = '''  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
    ...    0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
    ...    1: 0200580A:1F90 0300580A:A2C4 01 00000000:00000000 00:00000000 00000000     0
    ...    2: 0200580A:D431 0400580A:1538 01 00000000:00000000 00:00000000 00000000     0
    ... '''
    >>> c = parse_tcp_connections(tcp)
    >>> sorted(c.listening), c.established
    ([8080], ((8080, '10.88.0.3', 41668), (54321, '10.88.0.4', 5432)))
    >>> parse_tcp_connections(tcp, limit=1).truncated
    True
    """
    listening: set[int] = set()
    established: list[tuple[int, str, int]] = []
    seen = 0
    for text in texts:
        for line in text.splitlines()[1:]:
            parts = line.split(None, 4)
            if len(parts) < 4:
                continue
            if seen >= limit:
                return TcpConnections(frozenset(listening), tuple(established), True)
            seen += 1
            state = parts[3]
            if state not in ("01", "0A"):
                continue
            try:
                lport = parts[1].rsplit(":", 1)[1]
                if state == "0A":
                    listening.add(int(lport, 16))
                    continue
                remote, rport = parts[2].rsplit(":", 1)
                established.append((int(lport, 16), _proc_address(remote), int(rport, 16)))
            except ValueError:
                continue
    return TcpConnections(frozenset(listening), tuple(established))


def read_tcp_connections(pid: int, proc_root: str = "/proc", limit: int = 4096) -> TcpConnections:
    """:func:`parse_tcp_connections` of the namespace of process ``pid``; raises
    ``OSError`` when it is gone."""
    base = f"{proc_root}/{pid}/net"
    return parse_tcp_connections(_read(f"{base}/tcp"), _read(f"{base}/tcp6"), limit=limit)


def _read(path: str) -> str:
    """One file of procfs in as few read() calls as possible.

    ``/proc/<pid>/net/tcp`` walks the kernel's whole TCP hash table on every read()
    call, whatever the namespace holds, so the usual read-until-empty costs two walks;
    seq_file fills the buffer until the end, so a short read is the end.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = 1 << 16
        chunks = []
        while True:
            chunk = os.read(fd, size)
            chunks.append(chunk)
            if len(chunk) < size:
                break
            size = min(size * 4, 1 << 24)
        return b"".join(chunks).decode("ascii", errors="replace")
    finally:
        os.close(fd)


#: States that change only with a segment in or out, or a change of sockstat's counts.
#: SYN_RECV, SYN_SENT, FIN_WAIT*, LAST_ACK, CLOSING can end on a timer with no packet.
STABLE_STATES = frozenset({"established", "listen", "close_wait", "time_wait"})


def parse_snmp_tcp(snmp: str) -> tuple[int, ...]:
    """The namespace's TCP MIB counters (``Tcp:`` lines of ``net/snmp``), IPv4 and IPv6.

    Examples
    --------
    >>> parse_snmp_tcp("Ip: Forwarding\\nIp: 1\\nTcp: RtoAlgorithm InSegs\\nTcp: 1 42\\n")
    (1, 42)
    """
    lines = [ln for ln in snmp.splitlines() if ln.startswith("Tcp:")]
    return tuple(int(v) for v in lines[1].split()[1:]) if len(lines) >= 2 else ()


def parse_sockstat_tcp(sockstat: str, sockstat6: str) -> tuple[int, ...]:
    """The per-namespace TCP counts of a namespace's sockstat files: (inuse, tw, inuse6).

    ``orphan``, ``alloc`` and ``mem`` are host-wide, so they are left out.

    Examples
    --------
    >>> parse_sockstat_tcp("sockets: used 9\\nTCP: inuse 4 orphan 0 tw 2 alloc 5 mem 1\\n",
    ...                    "TCP6: inuse 1\\nUDP6: inuse 0\\n")
    (4, 2, 1)
    """
    values: list[int] = []
    for text, prefix, keys in (
        (sockstat, "TCP:", ("inuse", "tw")),
        (sockstat6, "TCP6:", ("inuse",)),
    ):
        for line in text.splitlines():
            if line.startswith(prefix):
                parts = line.split()
                pairs = dict(zip(parts[1::2], parts[2::2], strict=False))
                values.extend(int(pairs.get(k, 0)) for k in keys)
    return tuple(values)


@dataclass(frozen=True, slots=True)
class NetnsReading:
    """What one sample of a network namespace saw; ``tcp_walked`` if net/tcp was read."""

    netns_inode: int
    counters: dict[str, InterfaceCounters]
    tcp: TcpStates
    tcp_walked: bool = True


def netns_inode(pid: int, proc_root: str = "/proc") -> int:
    """Inode of ``pid``'s network namespace: changes when the namespace is re-created."""
    return os.stat(f"{proc_root}/{pid}/ns/net").st_ino


@dataclass(slots=True)
class _TcpMemo:
    signature: tuple[int, ...]
    tcp: TcpStates
    used_ns: int


class NetnsReader:
    """Reads namespaces' counters and TCP states, skipping the TCP table walk when it can.

    States come from ``net/tcp`` + ``net/tcp6`` or, when this process may enter the
    namespace (root) and it is cheaper there, one netlink inet_diag dump; either walks
    the kernel's TCP hash table, which costs milliseconds on hosts with a large shared
    one. The
    walk is skipped, and the last states reused, when the namespace's TCP MIB (segments
    in, out, retransmitted, resets, opens: ``net/snmp``) and its sockstat TCP counts (in
    use, TIME_WAIT) are unchanged and the last walk saw only :data:`STABLE_STATES`: then
    no segment moved and no timer ended a socket, so no state can have changed. Safe for
    one reader thread per namespace at a time.
    """

    def __init__(
        self, proc_root: str = "/proc", *, forget_after_s: float = 3600.0, netlink: bool = True
    ) -> None:
        self.proc_root = proc_root
        self.forget_after_s = forget_after_s
        self.walks = 0
        self.skips = 0
        self._memo: dict[int, _TcpMemo] = {}
        self._methods: dict[int, str] = {}
        self._diag = SockDiag(f"{proc_root}/self/ns/net") if netlink else None
        if self._diag is not None and not self._diag.usable:
            self._diag = None

    @property
    def method(self) -> str:
        """How TCP states can be counted: ``netlink`` (inet_diag, if allowed) or ``procfs``."""
        return "netlink" if self._diag is not None else "procfs"

    def _walk_procfs(self, base: str) -> TcpStates:
        return parse_tcp_states(_read(f"{base}/net/tcp"), _read(f"{base}/net/tcp6"))

    def _walk_netlink(self, base: str) -> TcpStates:
        assert self._diag is not None
        return self._diag.states(f"{base}/ns/net")

    def _walk(self, base: str, inode: int) -> TcpStates:
        """Count states the cheaper way for this namespace, timing both on its first walk.

        netlink wins by far where namespaces share a large TCP hash table (one binary
        walk for IPv4 and IPv6 instead of two text ones); procfs wins where each
        namespace has a small table of its own (no setns, no socket).
        """
        if self._diag is None:
            return self._walk_procfs(base)
        method = self._methods.get(inode)
        try:
            if method == "netlink":
                return self._walk_netlink(base)
            if method == "procfs":
                return self._walk_procfs(base)
            t0 = time.thread_time_ns()
            via_netlink = self._walk_netlink(base)
            t1 = time.thread_time_ns()
            via_procfs = self._walk_procfs(base)
            t2 = time.thread_time_ns()
            if len(self._methods) > 4096:
                self._methods.clear()  # bounded: namespaces come and go
            self._methods[inode] = "netlink" if t1 - t0 < t2 - t1 else "procfs"
            return via_netlink if via_netlink == via_procfs else self._walk_procfs(base)
        except PermissionError:
            self._diag = None  # not allowed after all: procfs from now on
            return self._walk_procfs(base)

    def read(self, pid: int) -> NetnsReading:
        """Read ``pid``'s namespace. Raises ``OSError`` if the process is gone.

        The namespace inode is read before and after, so a reading that raced a restart
        is refused rather than mixed.
        """
        base = f"{self.proc_root}/{pid}"
        inode = netns_inode(pid, self.proc_root)
        counters = parse_net_dev(_read(f"{base}/net/dev"))
        signature = parse_snmp_tcp(_read(f"{base}/net/snmp")) + parse_sockstat_tcp(
            _read(f"{base}/net/sockstat"), _read(f"{base}/net/sockstat6")
        )
        now = time.monotonic_ns()
        memo = self._memo.get(inode)
        if memo is not None and memo.signature == signature:
            tcp, walked = memo.tcp, False
            memo.used_ns = now
            self.skips += 1
        else:
            tcp = self._walk(base, inode)
            walked = True
            self.walks += 1
            stable = all(
                getattr(tcp, name) == 0 for name in TCP_STATE_NAMES.values()
                if name not in STABLE_STATES
            )  # fmt: skip
            if stable:
                self._memo[inode] = _TcpMemo(signature, tcp, now)
            else:
                self._memo.pop(inode, None)
        if netns_inode(pid, self.proc_root) != inode:
            self._memo.pop(inode, None)
            raise FileNotFoundError(f"{base}: network namespace changed while it was read")
        self._evict(now)
        return NetnsReading(netns_inode=inode, counters=counters, tcp=tcp, tcp_walked=walked)

    def _evict(self, now_ns: int) -> None:
        if len(self._memo) < 64:
            return
        cutoff = now_ns - int(self.forget_after_s * 1e9)
        for inode in [k for k, m in list(self._memo.items()) if m.used_ns < cutoff]:
            self._memo.pop(inode, None)
