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

import os
from collections.abc import Container, Iterable
from dataclasses import dataclass, fields

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


def _read(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


@dataclass(frozen=True, slots=True)
class NetnsReading:
    """What one sample of a network namespace saw."""

    netns_inode: int
    counters: dict[str, InterfaceCounters]
    tcp: TcpStates


def netns_inode(pid: int, proc_root: str = "/proc") -> int:
    """Inode of ``pid``'s network namespace: changes when the namespace is re-created."""
    return os.stat(f"{proc_root}/{pid}/ns/net").st_ino


def read_netns(pid: int, proc_root: str = "/proc") -> NetnsReading:
    """Read counters and TCP states of ``pid``'s network namespace.

    Raises ``OSError`` (``FileNotFoundError``, ``ProcessLookupError``) when the process
    is gone; the namespace inode is read before and after, so a reading that raced a
    restart is refused rather than mixed.
    """
    base = f"{proc_root}/{pid}"
    inode = netns_inode(pid, proc_root)
    counters = parse_net_dev(_read(f"{base}/net/dev"))
    tcp = parse_tcp_states(_read(f"{base}/net/tcp"), _read(f"{base}/net/tcp6"))
    if netns_inode(pid, proc_root) != inode:
        raise FileNotFoundError(f"{base}: network namespace changed while it was read")
    return NetnsReading(netns_inode=inode, counters=counters, tcp=tcp)
