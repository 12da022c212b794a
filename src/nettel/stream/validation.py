"""What a consumer accepts from ``nettel.stats``, and why it refuses the rest.

Every record is read by :func:`read_event`: its size is capped, it is decoded with every
counter required (:class:`~nettel.models.WireStatEvent`), and :func:`validate` bounds
what the values can be. The stream worker reads whole batches of compact events at once
(:func:`~nettel.models.decode_stat_batch`, :func:`invalid_events`): the same rules over
columns, and :func:`read_event` for a batch that holds anything else. A refused record
goes to the dead-letter topic with the reason (the stream worker does that); it never
stops the pipeline and never reaches a table.

The bounds are generous ceilings of what any interface can carry, not guesses of normal
traffic: they exist so that one hostile or corrupt event cannot overflow a table's
Int64 columns or be stored whole.

- an event is at most :data:`MAX_EVENT_BYTES` (a real one is ~600 bytes of JSON, ~110
  of MessagePack);
- ``interval_ms`` is in [0, 1 day];
- per event, bytes in either direction at most :data:`MAX_BYTES_PER_S` per second of
  its interval, packets, errors and drops at most :data:`MAX_PACKETS_PER_S` (an
  interval under a second counts as one second);
- connections and each TCP state count in [0, :data:`~nettel.models.MAX_SOCKETS`] (the
  TCP counts are checked by the decoder, :class:`~nettel.models.WireTcpStates`);
- ``ts_ms`` at most a day ahead of the wall clock and not older than the longest
  retention; ``identity`` not empty.

With these, one event's counter is below 2^53 and a minute row (which covers at most
:data:`~nettel.stream.windows.MAX_ROW_COVER_MS` of intervals) below 2^54, far from 2^63.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Final

import msgspec
import polars as pl
import structlog

from nettel import metrics
from nettel.models import COUNTERS, MAX_SOCKETS, StatEvent, decode_wire_event
from nettel.store.samples import frame_events

DAY_MS: Final = 86_400_000

#: Largest record accepted, in bytes (either format).
MAX_EVENT_BYTES: Final = 16 * 1024
#: Bytes per second one container's interfaces can carry in one direction: 100 GB/s
#: (800 Gbit/s), beyond any NIC or veth pair.
MAX_BYTES_PER_S: Final = 100 * 10**9
#: Packets (and errors, drops) per second in one direction: 2 G/s, above 800 Gbit/s
#: of minimum-size frames (1.2 G/s).
MAX_PACKETS_PER_S: Final = 2 * 10**9
#: The longest interval one sample may cover.
MAX_INTERVAL_MS: Final = DAY_MS

_BYTES_PER_MS: Final = MAX_BYTES_PER_S // 1000
_PACKETS_PER_MS: Final = MAX_PACKETS_PER_S // 1000
_counters_of = attrgetter(*COUNTERS)


def validate(ev: StatEvent, now_ms: int, *, max_age_ms: int = 400 * DAY_MS) -> str | None:
    """Why ``ev`` cannot be counted, or None. Types are already checked by decoding.

    Examples
    --------
    >>> ok = StatEvent(ts_ms=10**12, host="h", container_id="c", identity="c", name="c",
    ...                interval_ms=5000, rx_bytes=5)
    >>> validate(ok, 10**12) is None
    True
    >>> validate(msgspec.structs.replace(ok, rx_bytes=-1), 10**12)
    'rx_bytes is negative (-1)'
    >>> validate(msgspec.structs.replace(ok, ts_ms=10**12 + 2 * DAY_MS), 10**12)
    'ts_ms 1000172800000 is more than a day ahead'
    >>> validate(msgspec.structs.replace(ok, tx_bytes=2**62), 10**12)
    'tx_bytes 4611686018427387904 is more than an interface carries in 5000 ms (500000000000)'
    >>> read_event(msgspec.json.encode(msgspec.structs.asdict(ok) | {"tcp": {"listen": 2**63}}),
    ...            10**12)[1]
    'invalid event: Expected `int` <= 100000000 - at `$.tcp.listen`'
    """
    counters = _counters_of(ev)
    rxb, txb, rxp, txp, rxe, txe, rxd, txd = counters
    if min(counters) < 0:
        for name, value in zip(COUNTERS, counters, strict=True):
            if value < 0:
                return f"{name} is negative ({value})"
    interval_ms = ev.interval_ms
    if interval_ms < 0 or interval_ms > MAX_INTERVAL_MS:
        return f"interval_ms {interval_ms} is outside [0, 1 day]"
    covered_ms = interval_ms if interval_ms > 1000 else 1000
    max_bytes = _BYTES_PER_MS * covered_ms
    max_packets = _PACKETS_PER_MS * covered_ms
    if (rxb > max_bytes or txb > max_bytes
            or max(rxp, txp, rxe, txe, rxd, txd) > max_packets):  # fmt: skip
        for name, value in zip(COUNTERS, counters, strict=True):
            limit = max_bytes if name.endswith("_bytes") else max_packets
            if value > limit:
                return (f"{name} {value} is more than an interface carries in "
                        f"{interval_ms} ms ({limit})")  # fmt: skip
    ts_ms = ev.ts_ms
    if ts_ms > now_ms + DAY_MS:
        return f"ts_ms {ts_ms} is more than a day ahead"
    if ts_ms < now_ms - max_age_ms:
        return f"ts_ms {ts_ms} is older than the longest retention"
    if not ev.identity:
        return "identity is empty"
    conns = ev.connections
    if conns is not None and (conns < 0 or conns > MAX_SOCKETS):
        return f"connections {conns} is outside [0, {MAX_SOCKETS}]"
    return None


def invalid_events(frame: pl.DataFrame, now_ms: int, *, max_age_ms: int = 400 * DAY_MS
                   ) -> list[tuple[int, int, str]]:  # fmt: skip
    """(partition, offset, reason) of each event of ``frame`` (an
    :func:`~nettel.store.samples.events_frame`) that :func:`validate` refuses: the same
    rules over whole columns, and :func:`validate` itself for the reason of the few.

    Examples
    --------
    >>> from nettel.models import event_row
    >>> from nettel.store.samples import events_frame
    >>> ok = StatEvent(ts_ms=10**12, host="h", container_id="c", identity="c", name="c",
    ...                interval_ms=5000, rx_bytes=5)
    >>> big = msgspec.structs.replace(ok, rx_packets=10**13)
    >>> invalid_events(events_frame([event_row(ok), event_row(big)], [0, 0], [7, 8]), 10**12)
    [(0, 8, 'rx_packets 10000000000000 is more than an interface carries in 5000 ms (10000000000)')]
    """
    interval = pl.col("interval_ms")
    covered = pl.max_horizontal(interval, pl.lit(1000))
    packets = [c for c in COUNTERS if not c.endswith("_bytes")]
    refused = (
        (interval < 0) | (interval > MAX_INTERVAL_MS)
        | (pl.min_horizontal(*COUNTERS) < 0)
        | (pl.max_horizontal("rx_bytes", "tx_bytes") > covered * _BYTES_PER_MS)
        | (pl.max_horizontal(*packets) > covered * _PACKETS_PER_MS)
        | (pl.col("ts_ms") > now_ms + DAY_MS) | (pl.col("ts_ms") < now_ms - max_age_ms)
        | (pl.col("container") == "")
        | ~pl.col("connections").is_between(0, MAX_SOCKETS).fill_null(value=True)
    )  # fmt: skip
    flagged = frame.filter(refused)
    if flagged.is_empty():
        return []
    reasons = [validate(ev, now_ms, max_age_ms=max_age_ms) for ev in frame_events(flagged)]
    return [(p, o, r) for p, o, r in zip(flagged["partition"], flagged["offset"], reasons,
                                          strict=True) if r is not None]  # fmt: skip


def read_event(value: bytes | None, now_ms: int) -> tuple[StatEvent | None, str | None]:
    """The event a record carries, or None and why it is refused.

    Examples
    --------
    >>> read_event(b"x" * (MAX_EVENT_BYTES + 1), 0)
    (None, 'event of 16385 bytes is larger than 16384')
    >>> read_event(b'{"ts_ms": 1}', 0)[1]
    'invalid event: Object missing required field `host`'
    >>> read_event(None, 0)
    (None, 'record has no value')
    """
    if value is None:
        return None, "record has no value"
    if len(value) > MAX_EVENT_BYTES:
        return None, f"event of {len(value)} bytes is larger than {MAX_EVENT_BYTES}"
    try:
        ev = decode_wire_event(value)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return None, f"invalid event: {e}"
    reason = validate(ev, now_ms)
    return (None, reason) if reason is not None else (ev, None)


def dead_letter_value(value: bytes | None) -> tuple[bytes | None, list[tuple[str, bytes]]]:
    """What the dead-letter topic gets of a refused record: its value, cut to
    :data:`MAX_EVENT_BYTES` when larger (with its size in a ``nettel-truncated-from``
    header), so that no record is too large for the broker to take.

    Examples
    --------
    >>> v, headers = dead_letter_value(b"y" * 20_000)
    >>> len(v), headers
    (16384, [('nettel-truncated-from', b'20000')])
    >>> dead_letter_value(b"{}")
    (b'{}', [])
    """
    if value is None or len(value) <= MAX_EVENT_BYTES:
        return value, []
    return value[:MAX_EVENT_BYTES], [("nettel-truncated-from", str(len(value)).encode())]


async def send_dead_letter(producer: Any, dlq_topic: str, record: Any, reason: str) -> None:
    """Send ``record`` (an aiokafka ``ConsumerRecord``) refused for ``reason`` to
    ``dlq_topic`` with ``producer``: its key and value (:func:`dead_letter_value`), the
    reason and where it came from in headers; counted and logged."""
    metrics.DEAD_LETTERED.inc()
    structlog.get_logger(__name__).warning(
        "event_dead_lettered", topic=record.topic, partition=record.partition,
        offset=record.offset, reason=reason,
    )  # fmt: skip
    source = f"{record.topic}/{record.partition}/{record.offset}"
    value, extra = dead_letter_value(record.value)
    await producer.send_and_wait(
        dlq_topic, value=value, key=record.key,
        headers=[("nettel-error", reason.encode()), ("nettel-source", source.encode()), *extra],
    )  # fmt: skip
