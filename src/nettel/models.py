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

from dataclasses import dataclass, field
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


#: The counters every event carries as deltas, in the order tables store them.
COUNTERS: Final = (
    "rx_bytes", "tx_bytes", "rx_packets", "tx_packets",
    "rx_errors", "tx_errors", "rx_drops", "tx_drops",
)  # fmt: skip

#: Both directions together: metrics whose rate extremes windows keep too (their sums
#: are the sums of their parts).
TOTALS: Final = {
    "bytes": ("rx_bytes", "tx_bytes"),
    "packets": ("rx_packets", "tx_packets"),
    "errors": ("rx_errors", "tx_errors"),
    "drops": ("rx_drops", "tx_drops"),
}

#: Every metric with a sum and per-second rate extremes: the counters, then the totals.
RATE_METRICS: Final = (*COUNTERS, *TOTALS)

#: TCP states kept as per-window maxima.
TCP_STATES: Final = tuple(TCP_STATE_NAMES.values())

WINDOW_MS: Final = 60_000


def window_start(ts_ms: int, size_ms: int = WINDOW_MS) -> int:
    """Start of the window that holds ``ts_ms``.

    Examples
    --------
    >>> window_start(125_000), window_start(59_999), window_start(60_000)
    (120000, 0, 60000)
    """
    return ts_ms - ts_ms % size_ms


@dataclass
class WindowAggregate:
    """One container's traffic over one window, as the ``minute`` table stores it.

    Per counter: the sum of deltas and the min and max of the per-sample rate (per
    second); per total of both directions (:data:`TOTALS`), the rate extremes too. The
    mean rate is ``sum / (interval_ms / 1000)``: sums, counts, min and max roll up
    exactly to hours and days, means and percentiles would not. Connections
    (a gauge): last, max, min, and the sum and count of the samples that had it, so
    the mean is ``connections_sum / connections_samples`` at any resolution.
    """

    identity: str
    window_start_ms: int
    window_ms: int
    host: str
    container_id: str
    name: str
    image: str
    compose_project: str
    compose_service: str
    samples: int = 0
    interval_ms: int = 0
    resets: int = 0
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    rate_min: dict[str, float] = field(default_factory=dict)
    rate_max: dict[str, float] = field(default_factory=dict)
    connections_last: int | None = None
    connections_max: int | None = None
    connections_min: int | None = None
    connections_sum: int = 0
    connections_samples: int = 0
    tcp_max: dict[str, int] = field(default_factory=dict)
    partition: int = -1
    _last_ts_ms: int = -1

    @classmethod
    def first(cls, ev: StatEvent, size_ms: int = WINDOW_MS) -> WindowAggregate:
        """An empty window for ``ev``'s container and time."""
        return cls(
            identity=ev.identity, window_start_ms=window_start(ev.ts_ms, size_ms),
            window_ms=size_ms, host=ev.host, container_id=ev.container_id, name=ev.name,
            image=ev.image, compose_project=ev.compose_project,
            compose_service=ev.compose_service,
        )  # fmt: skip

    def add(self, ev: StatEvent) -> None:
        """Fold one sample in.

        Examples
        --------
        >>> ev = StatEvent(ts_ms=65_000, host="h", container_id="c", identity="web",
        ...                name="web", interval_ms=5000, rx_bytes=500, connections=3)
        >>> w = WindowAggregate.first(ev)
        >>> w.add(ev); w.add(StatEvent(ts_ms=70_000, host="h", container_id="c",
        ...     identity="web", name="web", interval_ms=5000, rx_bytes=1500, connections=1))
        >>> w.samples, w.sums["rx_bytes"], w.rate_min["rx_bytes"], w.rate_max["rx_bytes"]
        (2, 2000, 100.0, 300.0)
        >>> w.connections_last, w.connections_max, w.connections_min, w.mean_rate("rx_bytes")
        (1, 3, 1, 200.0)
        >>> w.connections_sum, w.connections_samples
        (4, 2)
        """
        self.samples += 1
        self.interval_ms += ev.interval_ms
        self.resets += ev.counter_reset
        seconds = ev.interval_ms / 1000
        for name in RATE_METRICS:
            parts = TOTALS.get(name)
            if parts is None:
                value: int = getattr(ev, name)
                self.sums[name] += value
            else:
                value = getattr(ev, parts[0]) + getattr(ev, parts[1])
            if seconds > 0:
                rate = value / seconds
                if name not in self.rate_min or rate < self.rate_min[name]:
                    self.rate_min[name] = rate
                if name not in self.rate_max or rate > self.rate_max[name]:
                    self.rate_max[name] = rate
        if ev.connections is not None:
            if ev.ts_ms >= self._last_ts_ms:
                self.connections_last = ev.connections
            self.connections_max = max(self.connections_max or 0, ev.connections)
            if self.connections_min is None or ev.connections < self.connections_min:
                self.connections_min = ev.connections
            self.connections_sum += ev.connections
            self.connections_samples += 1
        if ev.tcp is not None:
            for state in TCP_STATES:
                self.tcp_max[state] = max(self.tcp_max.get(state, 0), getattr(ev.tcp, state))
        if ev.ts_ms >= self._last_ts_ms:
            self._last_ts_ms = ev.ts_ms
            self.container_id, self.name, self.image = ev.container_id, ev.name, ev.image

    def mean_rate(self, counter: str) -> float:
        """Time-weighted mean rate per second of ``counter`` over the window's samples."""
        return self.sums[counter] / (self.interval_ms / 1000) if self.interval_ms else 0.0


@dataclass(frozen=True, slots=True)
class ReplayPoint:
    """What a durable write of one partition stores so that a restart replays exactly.

    ``resume_offset``: the earliest offset a window not yet written needs;
    ``event_time_ms``: the partition's event time just before that offset (-1: none);
    ``next_offset``: the first offset not yet processed at the write;
    ``written_through_ms``: the partition's event time at the write (-1: none).
    """

    resume_offset: int
    event_time_ms: int
    next_offset: int
    written_through_ms: int
