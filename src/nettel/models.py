"""The records every layer shares. Imports nothing of ours.

A :class:`StatEvent` is one sample of one container's network counters: deltas over
``interval_ms`` ending at ``ts_ms``. It travels on ``nettel.stats`` with the
container's stable identity as key, as one compact MessagePack array (schema version 2,
:data:`WIRE_V2`; a fetched batch decodes in one call, :func:`decode_stat_batch`) or as
JSON (schema version 1, readable with kcat): :data:`WireFormat`. Consumers read both.

Examples
--------
>>> ev = StatEvent(ts_ms=1_700_000_000_000, host="h1", container_id="abc123", identity="web",
...                name="web", image="nginx", interval_ms=5000, rx_bytes=10, tx_bytes=20)
>>> decode_stat_event(encode_stat_event(ev)) == ev
True
>>> decode_stat_event(encode_stat_event(ev, "msgpack")) == ev
True
>>> ev.schema_version
1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Annotated, Any, Final, Literal, Protocol, Self

import msgspec

SCHEMA_VERSION: Final = 1

#: The counters in wire order (:data:`COUNTERS` below is the same tuple).
COUNTERS_WIRE: Final = (
    "rx_bytes", "tx_bytes", "rx_packets", "tx_packets",
    "rx_errors", "tx_errors", "rx_drops", "tx_drops",
)  # fmt: skip

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


class CounterReading(msgspec.Struct, frozen=True, kw_only=True):
    """The cumulative counters behind a sample, and what proves which interface they are.

    ``counters`` are in :data:`COUNTERS` order. ``netns`` is the network namespace's
    inode (the PID where only the engine's stats API is readable); ``boot_id`` the
    kernel's boot id. Counters of the same container id, namespace and boot only go up,
    so two readings subtract to the traffic between them, whatever was lost in between.

    Examples
    --------
    >>> a = CounterReading(counters=(100, 7, 1, 1, 0, 0, 0, 0), netns=4026, boot_id="b1")
    >>> b = CounterReading(counters=(250, 9, 2, 2, 0, 0, 0, 0), netns=4026, boot_id="b1")
    >>> a.same_interface(b), b.value("tx_bytes")
    (True, 9)
    """

    counters: tuple[int, int, int, int, int, int, int, int]
    netns: int = 0
    boot_id: str = ""

    def value(self, counter: str) -> int:
        """One counter by name."""
        return self.counters[COUNTERS.index(counter)]

    def same_interface(self, other: CounterReading) -> bool:
        """Whether ``other`` reads the same namespace in the same boot."""
        return self.netns == other.netns and self.boot_id == other.boot_id


class StatEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One sample of one container's traffic: deltas over ``interval_ms`` ending at ``ts_ms``.

    ``counter_reset`` is set on the first sample after the counters went down (a restart,
    an interface re-created): its deltas then count from the reset, never negative.
    ``connections`` and ``tcp`` are ``None`` where the source cannot see sockets
    (the engine's stats API). ``reading``: the cumulative counters the deltas end at
    (None in events of older versions). ``catch_up``: the deltas span a gap (a restart
    of nettel or of its broker) since the last sample that reached the store, over the
    real ``interval_ms``: counted, never scored as a spike.
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
    reading: CounterReading | None = None
    catch_up: bool = False


@dataclass(frozen=True, slots=True)
class DurableReading:
    """The newest sample of a container that reached the store: where a restart counts from."""

    identity: str
    container_id: str
    ts_ms: int
    reading: CounterReading


#: Sockets one network namespace can hold (far above what any kernel's memory allows).
MAX_SOCKETS: Final = 10**8

_SocketCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_SOCKETS)]
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class WireCounterReading(CounterReading, frozen=True, kw_only=True):
    """:class:`CounterReading` as decoded off the wire: every number fits an Int64 column
    (checked by the decoder, so a hostile reading is refused, not a table write)."""

    counters: tuple[_Int64, _Int64, _Int64, _Int64, _Int64, _Int64, _Int64, _Int64]
    netns: _Int64 = 0


class WireTcpStates(TcpStates, frozen=True, kw_only=True, omit_defaults=False):
    """:class:`TcpStates` as decoded off the wire: each count in [0, :data:`MAX_SOCKETS`]
    (checked by the decoder, so a hostile count never reaches an Int64 column)."""

    established: _SocketCount = 0
    syn_sent: _SocketCount = 0
    syn_recv: _SocketCount = 0
    fin_wait1: _SocketCount = 0
    fin_wait2: _SocketCount = 0
    time_wait: _SocketCount = 0
    close: _SocketCount = 0
    close_wait: _SocketCount = 0
    last_ack: _SocketCount = 0
    listen: _SocketCount = 0
    closing: _SocketCount = 0


class WireStatEvent(StatEvent, frozen=True, kw_only=True):
    """A :class:`StatEvent` as consumers read it off the wire: every counter required.

    Code that builds events may leave counters out (they default to 0), but an event
    that arrives without one is malformed, not idle: reading the absent counter as 0
    would undercount silently. Instances are :class:`StatEvent` s in every other way.

    Examples
    --------
    >>> raw = b'{"ts_ms": 1, "host": "h", "container_id": "c", "identity": "c", "name": "c",'
    >>> decode_wire_event(raw + b' "interval_ms": 5000}')
    Traceback (most recent call last):
    ...
    msgspec.ValidationError: Object missing required field `rx_bytes`
    """

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_errors: int
    tx_errors: int
    rx_drops: int
    tx_drops: int
    tcp: WireTcpStates | None = None
    reading: WireCounterReading | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StatEvent)
_wire_decoder = msgspec.json.Decoder(WireStatEvent)

#: How events travel on the stats topic: ``msgpack`` (compact, schema version 2, the
#: default) or ``json`` (schema version 1, readable with kcat). Consumers read both.
WireFormat = Literal["msgpack", "json"]
WIRE_FORMATS: Final[tuple[WireFormat, ...]] = ("msgpack", "json")

#: Schema version of the compact format: one MessagePack array, fields in :data:`WIRE_V2`
#: order (the version first), TCP states and the reading nested as arrays.
COMPACT_SCHEMA_VERSION: Final = 2

#: Field order of the compact format (after the version): what :func:`decode_stat_batch`
#: returns columns of.
WIRE_V2: Final = (
    "ts_ms", "host", "container_id", "identity", "name", "image", "compose_project",
    "compose_service", "interval_ms", *COUNTERS_WIRE, "connections", "tcp",
    "counter_reset", "source", "reading", "catch_up",
)  # fmt: skip


class _WireTcpV2(WireTcpStates, frozen=True, kw_only=True, array_like=True):
    """TCP states in the compact format: an array in :data:`TCP_STATE_NAMES` order."""


class _WireReadingV2(WireCounterReading, frozen=True, kw_only=True, array_like=True):
    """The reading in the compact format: ``[counters, netns, boot_id]``."""


#: One event in the compact format: every field required, in :data:`WIRE_V2` order
#: after the version, typed as :class:`WireStatEvent` types them.
_V2_TYPES: Final = {f.name: f.type for f in msgspec.structs.fields(WireStatEvent)} | {
    "tcp": _WireTcpV2 | None, "reading": _WireReadingV2 | None}  # fmt: skip
_WireEventV2 = msgspec.defstruct(
    "_WireEventV2", [("schema_version", Literal[2]), *((n, _V2_TYPES[n]) for n in WIRE_V2)],
    array_like=True, frozen=True, kw_only=True,
)  # fmt: skip


_msgpack_encoder = msgspec.msgpack.Encoder()
_v2_decoder = msgspec.msgpack.Decoder(_WireEventV2)

#: A value no real counter reaches (validation's ceilings are far below): bounds the
#: batch decoder's integers so that they fit Int64 columns and sums.
_MAX_WIRE_INT: Final = 2**53
_Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX_WIRE_INT)]
_Time = Annotated[int, msgspec.Meta(ge=0, le=_MAX_WIRE_INT)]
_Name = Annotated[str, msgspec.Meta(min_length=1)]
_Sockets = Annotated[int, msgspec.Meta(ge=0, le=MAX_SOCKETS)]
_Row = tuple[
    Literal[2], _Time, str, str, _Name, str, str, str, str, _Count,
    _Count, _Count, _Count, _Count, _Count, _Count, _Count, _Count,
    _Sockets | None,
    tuple[_Sockets, _Sockets, _Sockets, _Sockets, _Sockets, _Sockets, _Sockets, _Sockets,
          _Sockets, _Sockets, _Sockets] | None,
    bool, str,
    tuple[tuple[_Int64, _Int64, _Int64, _Int64, _Int64, _Int64, _Int64, _Int64], _Int64, str]
    | None,
    bool,
]  # fmt: skip
_batch_decoder = msgspec.msgpack.Decoder(list[_Row])


def encode_stat_event(event: StatEvent, wire_format: WireFormat = "json") -> bytes:
    """The bytes of ``event`` as written on the stats topic, in ``wire_format``.

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1, host="h", container_id="c", identity="c", name="c",
    ...                interval_ms=5000, rx_bytes=7)
    >>> len(encode_stat_event(ev)), len(encode_stat_event(ev, "msgpack"))
    (370, 39)
    >>> decode_stat_event(encode_stat_event(ev, "msgpack")) == ev
    True
    """
    if wire_format == "json":
        return _encoder.encode(event)
    return _msgpack_encoder.encode(event_row(event))


def event_row(event: StatEvent) -> tuple[Any, ...]:
    """``event`` as a row of the compact format: what :func:`decode_stat_batch` returns.

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1, host="h", container_id="c", identity="web", name="w",
    ...                interval_ms=5000, rx_bytes=7, tcp=TcpStates(listen=1))
    >>> row = event_row(ev)
    >>> row[0], row[4], row[10], row[19][9], row[22]
    (2, 'web', 7, 1, None)
    """
    tcp = event.tcp
    reading = event.reading
    return (
        COMPACT_SCHEMA_VERSION, event.ts_ms, event.host, event.container_id, event.identity,
        event.name, event.image, event.compose_project, event.compose_service,
        event.interval_ms, event.rx_bytes, event.tx_bytes, event.rx_packets,
        event.tx_packets, event.rx_errors, event.tx_errors, event.rx_drops, event.tx_drops,
        event.connections, None if tcp is None else _tcp_counts_of(tcp),
        event.counter_reset, event.source,
        None if reading is None else (reading.counters, reading.netns, reading.boot_id),
        event.catch_up,
    )  # fmt: skip


def _is_json(data: bytes) -> bool:
    """Whether ``data`` is an event of the JSON format (an object) rather than the compact
    one (a MessagePack array, whose first byte is never ``{`` or white space)."""
    return data[:1] in _JSON_FIRST


_JSON_FIRST: Final = frozenset((b"{", b" ", b"\t", b"\n", b"\r"))


def _decode_v2(data: bytes) -> StatEvent:
    """One compact event; a string that is not UTF-8 is a ``DecodeError`` like any other."""
    try:
        wire = _v2_decoder.decode(data)
    except UnicodeDecodeError as e:
        raise msgspec.DecodeError(f"MessagePack string is not UTF-8 ({e.reason})") from None
    fields = msgspec.structs.asdict(wire)
    tcp, reading = fields["tcp"], fields["reading"]
    fields["schema_version"] = SCHEMA_VERSION  # the model's version, whatever the wire's
    fields["tcp"] = None if tcp is None else TcpStates(**msgspec.structs.asdict(tcp))
    fields["reading"] = None if reading is None else CounterReading(
        counters=reading.counters, netns=reading.netns, boot_id=reading.boot_id)  # fmt: skip
    return StatEvent(**fields)


def decode_stat_event(data: bytes) -> StatEvent:
    """Parse and type-check one event of either format; raises
    ``msgspec.ValidationError`` or ``DecodeError``."""
    if _is_json(data):
        return _decoder.decode(data)
    return _decode_v2(data)


def decode_wire_event(data: bytes) -> StatEvent:
    """Parse and type-check one event off the wire (either format), every counter
    required (see :class:`WireStatEvent`); raises ``msgspec.ValidationError`` or
    ``DecodeError``.

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1, host="h", container_id="c", identity="c", name="c",
    ...                interval_ms=5000, rx_bytes=7)
    >>> decode_wire_event(encode_stat_event(ev)).rx_bytes
    7
    >>> decode_wire_event(encode_stat_event(ev, "msgpack")).rx_bytes
    7
    """
    if _is_json(data):
        return _wire_decoder.decode(data)
    return _decode_v2(data)


def decode_stat_batch(values: Sequence[bytes]) -> list[tuple[Any, ...]] | None:
    """Every event of a fetched batch as one row tuple (:data:`WIRE_V2` order after the
    schema version), decoded in one call: or None when the batch cannot take the fast
    path (an event of the JSON format, a malformed one, or a value out of the bounds
    every valid event keeps), so that each event is decoded alone, with its own error.

    Rows keep ``tcp`` as an 11-tuple in :data:`TCP_STATES` order and ``reading`` as
    ``(counters, netns, boot_id)``, or None.

    Examples
    --------
    >>> ev = StatEvent(ts_ms=1, host="h", container_id="c", identity="c", name="c",
    ...                interval_ms=5000, rx_bytes=7)
    >>> rows = decode_stat_batch([encode_stat_event(ev, "msgpack")] * 2)
    >>> len(rows), rows[0][:3], rows[0][10]
    (2, (2, 1, 'h'), 7)
    >>> decode_stat_batch([encode_stat_event(ev)]) is None
    True
    """
    n = len(values)
    if n == 0:
        return []
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 1 << 16:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    try:
        return _batch_decoder.decode(head + b"".join(values))
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return None


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
COUNTERS: Final = COUNTERS_WIRE

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

_counters_of: Final = attrgetter(*COUNTERS)
_tcp_counts_of: Final = attrgetter(*TCP_STATES)
_UNROLLED: Final = (
    ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors", "tx_errors",
     "rx_drops", "tx_drops", "bytes", "packets", "errors", "drops"),
    ("established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2", "time_wait", "close",
     "close_wait", "last_ack", "listen", "closing"),
)  # fmt: skip
if (RATE_METRICS, TCP_STATES) != _UNROLLED:  # pragma: no cover - a guard for editors
    raise ImportError("WindowAggregate.add is unrolled over RATE_METRICS and TCP_STATES")


def window_start(ts_ms: int, size_ms: int = WINDOW_MS) -> int:
    """Start of the window that holds ``ts_ms``.

    Examples
    --------
    >>> window_start(125_000), window_start(59_999), window_start(60_000)
    (120000, 0, 60000)
    """
    return ts_ms - ts_ms % size_ms


class _Sampled(Protocol):
    """What a window needs of an event to name its container and time."""

    @property
    def ts_ms(self) -> int: ...
    @property
    def identity(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def container_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def image(self) -> str: ...
    @property
    def compose_project(self) -> str: ...
    @property
    def compose_service(self) -> str: ...


@dataclass(slots=True)
class ContainerWindow:
    """Which container and which window a row of a window table is about (the head of
    :class:`WindowAggregate` and :class:`ResourceAggregate`)."""

    identity: str
    window_start_ms: int
    window_ms: int
    host: str
    container_id: str
    name: str
    image: str
    compose_project: str
    compose_service: str

    @classmethod
    def first(cls, ev: _Sampled, size_ms: int = WINDOW_MS) -> Self:
        """An empty window for ``ev``'s container and time."""
        return cls(
            identity=ev.identity, window_start_ms=window_start(ev.ts_ms, size_ms),
            window_ms=size_ms, host=ev.host, container_id=ev.container_id, name=ev.name,
            image=ev.image, compose_project=ev.compose_project,
            compose_service=ev.compose_service,
        )  # fmt: skip


@dataclass(slots=True)
class WindowAggregate(ContainerWindow):
    """One container's traffic over one window, as the ``minute`` table stores it.

    Per counter: the sum of deltas and the min and max of the per-sample rate (per
    second); per total of both directions (:data:`TOTALS`), the rate extremes too. The
    mean rate is ``sum / (interval_ms / 1000)``: sums, counts, min and max roll up
    exactly to hours and days, means and percentiles would not. Connections
    (a gauge): last, max, min, and the sum and count of the samples that had it, so
    the mean is ``connections_sum / connections_samples`` at any resolution.
    """

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
        interval_ms = ev.interval_ms
        self.interval_ms += interval_ms
        self.resets += ev.counter_reset
        # unrolled over the metrics (this runs once per event): the same arithmetic,
        # comparisons and results as a loop over RATE_METRICS with getattr
        rxb, txb, rxp, txp, rxe, txe, rxd, txd = _counters_of(ev)
        sums = self.sums
        sums["rx_bytes"] += rxb
        sums["tx_bytes"] += txb
        sums["rx_packets"] += rxp
        sums["tx_packets"] += txp
        sums["rx_errors"] += rxe
        sums["tx_errors"] += txe
        sums["rx_drops"] += rxd
        sums["tx_drops"] += txd
        seconds = interval_ms / 1000
        if seconds > 0:
            rates = (rxb / seconds, txb / seconds, rxp / seconds, txp / seconds,
                     rxe / seconds, txe / seconds, rxd / seconds, txd / seconds,
                     (rxb + txb) / seconds, (rxp + txp) / seconds,
                     (rxe + txe) / seconds, (rxd + txd) / seconds)  # fmt: skip
            rmin, rmax = self.rate_min, self.rate_max
            if len(rmin) == len(RATE_METRICS) and len(rmax) == len(RATE_METRICS):
                r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11 = rates
                if r0 < rmin["rx_bytes"]:
                    rmin["rx_bytes"] = r0
                if r0 > rmax["rx_bytes"]:
                    rmax["rx_bytes"] = r0
                if r1 < rmin["tx_bytes"]:
                    rmin["tx_bytes"] = r1
                if r1 > rmax["tx_bytes"]:
                    rmax["tx_bytes"] = r1
                if r2 < rmin["rx_packets"]:
                    rmin["rx_packets"] = r2
                if r2 > rmax["rx_packets"]:
                    rmax["rx_packets"] = r2
                if r3 < rmin["tx_packets"]:
                    rmin["tx_packets"] = r3
                if r3 > rmax["tx_packets"]:
                    rmax["tx_packets"] = r3
                if r4 < rmin["rx_errors"]:
                    rmin["rx_errors"] = r4
                if r4 > rmax["rx_errors"]:
                    rmax["rx_errors"] = r4
                if r5 < rmin["tx_errors"]:
                    rmin["tx_errors"] = r5
                if r5 > rmax["tx_errors"]:
                    rmax["tx_errors"] = r5
                if r6 < rmin["rx_drops"]:
                    rmin["rx_drops"] = r6
                if r6 > rmax["rx_drops"]:
                    rmax["rx_drops"] = r6
                if r7 < rmin["tx_drops"]:
                    rmin["tx_drops"] = r7
                if r7 > rmax["tx_drops"]:
                    rmax["tx_drops"] = r7
                if r8 < rmin["bytes"]:
                    rmin["bytes"] = r8
                if r8 > rmax["bytes"]:
                    rmax["bytes"] = r8
                if r9 < rmin["packets"]:
                    rmin["packets"] = r9
                if r9 > rmax["packets"]:
                    rmax["packets"] = r9
                if r10 < rmin["errors"]:
                    rmin["errors"] = r10
                if r10 > rmax["errors"]:
                    rmax["errors"] = r10
                if r11 < rmin["drops"]:
                    rmin["drops"] = r11
                if r11 > rmax["drops"]:
                    rmax["drops"] = r11
            else:  # the first sample with an interval (or dicts set from outside)
                for name, rate in zip(RATE_METRICS, rates, strict=True):
                    if name not in rmin or rate < rmin[name]:
                        rmin[name] = rate
                    if name not in rmax or rate > rmax[name]:
                        rmax[name] = rate
        conns = ev.connections
        if conns is not None:
            if ev.ts_ms >= self._last_ts_ms:
                self.connections_last = conns
            self.connections_max = max(self.connections_max or 0, conns)
            if self.connections_min is None or conns < self.connections_min:
                self.connections_min = conns
            self.connections_sum += conns
            self.connections_samples += 1
        tcp = ev.tcp
        if tcp is not None:
            tcp_max = self.tcp_max
            if len(tcp_max) == len(TCP_STATES):
                t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10 = _tcp_counts_of(tcp)
                if t0 > tcp_max["established"]:
                    tcp_max["established"] = t0
                if t1 > tcp_max["syn_sent"]:
                    tcp_max["syn_sent"] = t1
                if t2 > tcp_max["syn_recv"]:
                    tcp_max["syn_recv"] = t2
                if t3 > tcp_max["fin_wait1"]:
                    tcp_max["fin_wait1"] = t3
                if t4 > tcp_max["fin_wait2"]:
                    tcp_max["fin_wait2"] = t4
                if t5 > tcp_max["time_wait"]:
                    tcp_max["time_wait"] = t5
                if t6 > tcp_max["close"]:
                    tcp_max["close"] = t6
                if t7 > tcp_max["close_wait"]:
                    tcp_max["close_wait"] = t7
                if t8 > tcp_max["last_ack"]:
                    tcp_max["last_ack"] = t8
                if t9 > tcp_max["listen"]:
                    tcp_max["listen"] = t9
                if t10 > tcp_max["closing"]:
                    tcp_max["closing"] = t10
            else:
                for state, n in zip(TCP_STATES, _tcp_counts_of(tcp), strict=True):
                    tcp_max[state] = max(tcp_max.get(state, 0), n)
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


# -- resources (the resource-monitor server): their own event on their own topic --------

RESOURCE_SCHEMA_VERSION: Final = 1

#: Cumulative cgroup counters a resource event carries as deltas, in table order.
RESOURCE_COUNTERS: Final = (
    "cpu_usage_us", "cpu_user_us", "cpu_system_us", "cpu_periods", "cpu_throttled_periods",
    "cpu_throttled_us", "io_read_bytes", "io_write_bytes", "io_reads", "io_writes",
    "oom_events", "oom_kills",
)  # fmt: skip

#: Gauges a resource event carries as read (0 for a limit: none set).
RESOURCE_GAUGES: Final = (
    "memory_bytes", "memory_limit_bytes", "memory_anon_bytes", "memory_file_bytes",
    "memory_kernel_bytes", "pids", "pids_limit",
)  # fmt: skip


class ResourceEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One sample of one container's CPU, memory, block I/O and processes.

    Counters (:data:`RESOURCE_COUNTERS`) are deltas over ``interval_ms`` ending at
    ``ts_ms``, with the network counters' reset rule (``counter_reset``: they went down or
    the container's main process changed, so they count from the reset); gauges
    (:data:`RESOURCE_GAUGES`) are the values at ``ts_ms``. ``source`` says where they
    were read: ``cgroup-v1``, ``cgroup-v2`` or ``engine-stats`` (the engine's one-shot
    stats call, where the cgroup files cannot be read). It travels as JSON on its own
    topic (``nettel.resources``), keyed by identity like :class:`StatEvent`.

    Examples
    --------
    >>> ev = ResourceEvent(ts_ms=5000, host="h", container_id="c", identity="web",
    ...                    name="web", interval_ms=5000, cpu_usage_us=250_000,
    ...                    memory_bytes=1 << 20, source="cgroup-v2")
    >>> decode_resource_event(encode_resource_event(ev)) == ev, ev.cpu_percent()
    (True, 5.0)
    """

    ts_ms: Annotated[int, msgspec.Meta(ge=0)]
    host: str
    container_id: str
    identity: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    name: str
    image: str = ""
    compose_project: str = ""
    compose_service: str = ""
    interval_ms: Annotated[int, msgspec.Meta(ge=0, le=2 * 86_400_000)]
    source: str = "cgroup-v2"
    counter_reset: bool = False
    schema_version: int = RESOURCE_SCHEMA_VERSION
    cpu_usage_us: _Count = 0
    cpu_user_us: _Count = 0
    cpu_system_us: _Count = 0
    cpu_periods: _Count = 0
    cpu_throttled_periods: _Count = 0
    cpu_throttled_us: _Count = 0
    io_read_bytes: _Count = 0
    io_write_bytes: _Count = 0
    io_reads: _Count = 0
    io_writes: _Count = 0
    oom_events: _Count = 0
    oom_kills: _Count = 0
    memory_bytes: _Count = 0
    memory_limit_bytes: _Count = 0
    memory_anon_bytes: _Count = 0
    memory_file_bytes: _Count = 0
    memory_kernel_bytes: _Count = 0
    pids: _Count = 0
    pids_limit: _Count = 0

    def cpu_percent(self) -> float:
        """CPU used over the interval, in percent of one core."""
        return 100 * self.cpu_usage_us / (self.interval_ms * 1000) if self.interval_ms else 0.0


_resource_encoder = msgspec.json.Encoder()
_resource_decoder = msgspec.json.Decoder(ResourceEvent)


def encode_resource_event(event: ResourceEvent) -> bytes:
    """JSON bytes of ``event`` (what travels on the resources topic)."""
    return _resource_encoder.encode(event)


def decode_resource_event(data: bytes) -> ResourceEvent:
    """A validated event from JSON bytes; raises ``msgspec.ValidationError``/``DecodeError``."""
    return _resource_decoder.decode(data)


#: Gauges whose windows keep last, max, min and sum (the mean is sum / samples).
RESOURCE_GAUGE_STATS: Final = ("memory_bytes", "pids")
#: Gauges whose windows keep last and max.
RESOURCE_GAUGE_PEAKS: Final = ("memory_anon_bytes", "memory_file_bytes", "memory_kernel_bytes")
#: Limits: windows keep the last one.
RESOURCE_LIMITS: Final = ("memory_limit_bytes", "pids_limit")


@dataclass(slots=True)
class ResourceAggregate(ContainerWindow):
    """One container's resources over one window, as the ``resource_minute`` table stores it.

    Counters (:data:`RESOURCE_COUNTERS`): sums of deltas, and the peak CPU rate of a sample
    (``cpu_peak_millicores``: thousandths of a core, an integer that stores compactly).
    Gauges: last, max, min and sum over samples
    (:data:`RESOURCE_GAUGE_STATS`), last and max (:data:`RESOURCE_GAUGE_PEAKS`), last
    (:data:`RESOURCE_LIMITS`): all roll up exactly to hours and days.

    Examples
    --------
    >>> ev = lambda ts, cpu, mem: ResourceEvent(ts_ms=ts, host="h", container_id="c",
    ...     identity="web", name="web", interval_ms=5000, cpu_usage_us=cpu, memory_bytes=mem,
    ...     memory_limit_bytes=1 << 30)
    >>> w = ResourceAggregate.first(ev(65_000, 0, 0))
    >>> w.add(ev(65_000, 500_000, 300)); w.add(ev(70_000, 2_500_000, 100))
    >>> w.samples, w.sums["cpu_usage_us"], w.cpu_peak_millicores, w.cpu_percent()
    (2, 3000000, 500, 30.0)
    >>> w.gauge_last["memory_bytes"], w.gauge_max["memory_bytes"], w.gauge_sum["memory_bytes"]
    (100, 300, 400)
    """

    samples: int = 0
    interval_ms: int = 0
    resets: int = 0
    source: str = ""
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESOURCE_COUNTERS, 0))
    cpu_peak_millicores: int | None = None
    gauge_last: dict[str, int] = field(default_factory=dict)
    gauge_max: dict[str, int] = field(default_factory=dict)
    gauge_min: dict[str, int] = field(default_factory=dict)
    gauge_sum: dict[str, int] = field(default_factory=dict)
    partition: int = -1
    _last_ts_ms: int = -1

    def add(self, ev: ResourceEvent) -> None:
        """Fold one sample in."""
        self.samples += 1
        self.interval_ms += ev.interval_ms
        self.resets += ev.counter_reset
        sums = self.sums
        for name in RESOURCE_COUNTERS:
            sums[name] += getattr(ev, name)
        if ev.interval_ms > 0:
            peak = round(10 * ev.cpu_percent())
            if self.cpu_peak_millicores is None or peak > self.cpu_peak_millicores:
                self.cpu_peak_millicores = peak
        newest = ev.ts_ms >= self._last_ts_ms
        gmax, gmin, gsum, glast = self.gauge_max, self.gauge_min, self.gauge_sum, self.gauge_last
        for name in RESOURCE_GAUGE_STATS:
            v = getattr(ev, name)
            gsum[name] = gsum.get(name, 0) + v
            if name not in gmin or v < gmin[name]:
                gmin[name] = v
        for name in (*RESOURCE_GAUGE_STATS, *RESOURCE_GAUGE_PEAKS):
            v = getattr(ev, name)
            if name not in gmax or v > gmax[name]:
                gmax[name] = v
        if newest:
            for name in (*RESOURCE_GAUGE_STATS, *RESOURCE_GAUGE_PEAKS, *RESOURCE_LIMITS):
                glast[name] = getattr(ev, name)
            self._last_ts_ms = ev.ts_ms
            self.container_id, self.name, self.image = ev.container_id, ev.name, ev.image
            self.source = ev.source

    def cpu_percent(self) -> float:
        """Mean CPU over the window's samples, in percent of one core."""
        return (
            100 * self.sums["cpu_usage_us"] / (self.interval_ms * 1000) if self.interval_ms else 0.0
        )


HEALTH_SCHEMA_VERSION = 1
#: What a :class:`HealthRecord` reports: an engine event (``start``, ``die``, ``oom``,
#: ``health``: the healthcheck's status changed, ``restart``), a container's state as
#: first seen (``state``), one minute of a dependency edge (``edge``), or an edge that
#: appeared (``edge_new``) or vanished (``edge_gone``).
HealthKind = Literal["start", "die", "oom", "health", "restart", "state", "edge", "edge_new",
                     "edge_gone"]  # fmt: skip


class HealthRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One health observation of a container, or one minute of a dependency edge.

    Travels as JSON on its own topic (``nettel.health``), keyed by ``container`` (the
    identity; for an edge the client's), so one container's records stay in order.
    Events carry the engine's view after the event: ``status`` (``running``,
    ``exited``, ...), ``health`` (the healthcheck's status: ``healthy``, ``unhealthy``,
    ``starting``, "" without one), ``restarts`` (the engine's restart count),
    ``exit_code`` and ``output`` (the last healthcheck output, cut to 256 characters).
    An edge says ``container`` held ``connections`` TCP connections (the most seen
    established at once over ``samples`` samples of the minute starting at ``ts_ms``)
    to ``server``:``port``; ``server`` is a container identity, ``host`` or ``external``.

    Examples
    --------
    >>> r = HealthRecord(ts_ms=60_000, host="h", kind="edge", container="client",
    ...                  server="web", port=8080, connections=2, samples=4)
    >>> decode_health_record(encode_health_record(r)) == r
    True
    """

    ts_ms: Annotated[int, msgspec.Meta(ge=0)]
    host: str
    kind: HealthKind
    container: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    container_id: str = ""
    status: str = ""
    health: str = ""
    restarts: Annotated[int, msgspec.Meta(ge=0)] = 0
    exit_code: int | None = None
    oom_killed: bool = False
    output: Annotated[str, msgspec.Meta(max_length=256)] = ""
    server: str = ""
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    connections: Annotated[int, msgspec.Meta(ge=0, le=MAX_SOCKETS)] = 0
    samples: Annotated[int, msgspec.Meta(ge=0)] = 0
    first_seen_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    last_seen_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    schema_version: int = HEALTH_SCHEMA_VERSION


_health_encoder = msgspec.json.Encoder()
_health_decoder = msgspec.json.Decoder(HealthRecord)


def encode_health_record(record: HealthRecord) -> bytes:
    """JSON bytes of ``record``."""
    return _health_encoder.encode(record)


def decode_health_record(data: bytes) -> HealthRecord:
    """A validated record from JSON bytes; raises ``msgspec.ValidationError``/``DecodeError``."""
    return _health_decoder.decode(data)
