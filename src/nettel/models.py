"""The records every layer shares. Imports nothing of ours.

A :class:`StatEvent` is one sample of one container's network counters: deltas over
``interval_ms`` ending at ``ts_ms``. It travels as JSON on ``nettel.stats`` with the
container's stable identity as key.

Examples
--------
>>> ev = StatEvent(ts_ms=1_700_000_000_000, host="h1", container_id="abc123", identity="web",
...                name="web", image="nginx", interval_ms=5000, rx_bytes=10, tx_bytes=20)
>>> decode_stat_event(encode_stat_event(ev)) == ev
True
>>> ev.schema_version
1
"""

from __future__ import annotations

from typing import Final

import msgspec

SCHEMA_VERSION: Final = 1

#: TCP states as numbered in the kernel's include/net/tcp_states.h (hex in /proc/net/tcp).
TCP_STATE_NAMES: Final[dict[int, str]] = {
    0x01: "established",
    0x02: "syn_sent",
    0x03: "syn_recv",
    0x04: "fin_wait1",
    0x05: "fin_wait2",
    0x06: "time_wait",
    0x07: "close",
    0x08: "close_wait",
    0x09: "last_ack",
    0x0A: "listen",
    0x0B: "closing",
}


class TcpStates(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=False):
    """Count of TCP sockets (IPv4 and IPv6) in each state at sample time.

    Examples
    --------
    >>> TcpStates(established=3, listen=1).connections
    3
    """

    established: int = 0
    syn_sent: int = 0
    syn_recv: int = 0
    fin_wait1: int = 0
    fin_wait2: int = 0
    time_wait: int = 0
    close: int = 0
    close_wait: int = 0
    last_ack: int = 0
    listen: int = 0
    closing: int = 0

    @property
    def connections(self) -> int:
        """Sockets that are connections: every state but LISTEN and CLOSE."""
        return (
            self.established
            + self.syn_sent
            + self.syn_recv
            + self.fin_wait1
            + self.fin_wait2
            + self.time_wait
            + self.close_wait
            + self.last_ack
            + self.closing
        )


class StatEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One sample of one container's traffic: deltas over ``interval_ms`` ending at ``ts_ms``.

    ``counter_reset`` is set on the first sample after the counters went down (a restart,
    an interface re-created): its deltas then count from the reset, never negative.
    ``connections`` and ``tcp`` are ``None`` where the source cannot see sockets
    (the engine's stats API).
    """

    ts_ms: int
    host: str
    container_id: str
    identity: str
    name: str
    image: str = ""
    compose_project: str = ""
    compose_service: str = ""
    interval_ms: int
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    rx_drops: int = 0
    tx_drops: int = 0
    connections: int | None = None
    tcp: TcpStates | None = None
    counter_reset: bool = False
    source: str = "procfs"
    schema_version: int = SCHEMA_VERSION


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StatEvent)


def encode_stat_event(event: StatEvent) -> bytes:
    """JSON bytes of ``event``, as written on the stats topic."""
    return _encoder.encode(event)


def decode_stat_event(data: bytes) -> StatEvent:
    """Parse and type-check one event; raises ``msgspec.ValidationError`` or ``DecodeError``."""
    return _decoder.decode(data)


def decode_stat_events(data: list[bytes]) -> list[StatEvent]:
    """Parse a batch of events (all must be valid).

    Examples
    --------
    >>> raw = encode_stat_event(StatEvent(ts_ms=1, host="h", container_id="c", identity="c",
    ...                                   name="c", interval_ms=1))
    >>> len(decode_stat_events([raw, raw]))
    2
    """
    return [_decoder.decode(d) for d in data]
