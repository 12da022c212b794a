"""The compact wire format (schema 2) and the batch decoder: what they accept is exactly
what one-record decoding and validation accept, and nothing is lost between them."""

from __future__ import annotations

import msgspec
import pytest

from nettel.models import (
    CounterReading,
    StatEvent,
    TcpStates,
    decode_stat_batch,
    decode_stat_event,
    decode_wire_event,
    encode_stat_event,
    event_row,
)
from nettel.store.samples import events_frame, frame_events
from nettel.stream.validation import invalid_events, read_event

NOW_MS = 1_795_651_200_000


def sample(i: int, **changes: object) -> StatEvent:
    ev = StatEvent(
        ts_ms=NOW_MS - i * 5000, host="h1", container_id=f"id{i}", identity=f"svc/{i % 3}",
        name=f"n{i}", image="img:1", compose_project="p", compose_service=f"s{i}",
        interval_ms=5000, rx_bytes=10 * i, tx_bytes=3 * i, rx_packets=i, tx_packets=2,
        rx_errors=i % 2, connections=None if i % 3 == 0 else i,
        tcp=None if i % 2 else TcpStates(established=i, listen=1, time_wait=2),
        counter_reset=i % 5 == 0, source="engine+procfs", catch_up=i % 7 == 0,
        reading=None if i % 4 == 0 else CounterReading(
            counters=(i, 2 * i, 3, 4, 5, 6, 7, 2**62), netns=4026532561, boot_id="b"),
    )  # fmt: skip
    return msgspec.structs.replace(ev, **changes) if changes else ev


def test_both_formats_decode_to_the_same_event() -> None:
    for i in range(12):
        ev = sample(i)
        compact = encode_stat_event(ev, "msgpack")
        assert decode_stat_event(compact) == ev
        assert decode_stat_event(encode_stat_event(ev)) == ev
        wire = decode_wire_event(compact), decode_wire_event(encode_stat_event(ev))
        assert msgspec.to_builtins(wire[0]) == msgspec.to_builtins(wire[1])
        assert len(compact) < len(encode_stat_event(ev)) / 2


def test_a_batch_decodes_to_the_rows_and_columns_of_its_events() -> None:
    events = [sample(i) for i in range(40)]
    rows = decode_stat_batch([encode_stat_event(ev, "msgpack") for ev in events])
    assert rows == [event_row(ev) for ev in events]
    frame = events_frame(rows, [1] * 40, list(range(40)))
    assert frame_events(frame) == events
    assert invalid_events(frame, NOW_MS) == []


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (encode_stat_event(sample(1, rx_bytes=-5), "msgpack"), "rx_bytes is negative (-5)"),
        (encode_stat_event(sample(1, tx_bytes=2**63 - 1), "msgpack"),
         "tx_bytes 9223372036854775807 is more than an interface carries"),
        (encode_stat_event(sample(1, identity=""), "msgpack"), "identity is empty"),
        (encode_stat_event(sample(1), "msgpack")[:-3], "invalid event: "),
        (msgspec.msgpack.encode((3, *event_row(sample(1))[1:])), "invalid event: Invalid"),
        (encode_stat_event(sample(1), "msgpack").replace(b"h1", b"\xff\xff"), "invalid event"),
        (encode_stat_event(sample(1), "json").replace(b"4026532561", b"4" * 20),
         "invalid event: Expected `int` <= 9223372036854775807 - at `$.reading.netns`"),
        (encode_stat_event(sample(1), "json").replace(b'"rx_bytes":10,', b""),
         "invalid event: Object missing required field `rx_bytes`"),
    ],
)  # fmt: skip
def test_one_bad_event_sends_its_batch_one_record_at_a_time(value: bytes, reason: str) -> None:
    good = [encode_stat_event(sample(i), "msgpack") for i in range(5)]
    assert decode_stat_batch([*good, value, *good]) is None
    event, got = read_event(value, NOW_MS)
    assert event is None
    assert got is not None
    assert got.startswith(reason), got
    assert all(read_event(v, NOW_MS)[0] is not None for v in good)


def test_the_batch_checks_refuse_what_validation_refuses() -> None:
    events = [sample(1), sample(2, ts_ms=NOW_MS + 2 * 86_400_000),
              sample(3, rx_packets=10**12, interval_ms=100), sample(4, interval_ms=86_400_001),
              sample(5, ts_ms=NOW_MS - 401 * 86_400_000)]  # fmt: skip
    rows = decode_stat_batch([encode_stat_event(ev, "msgpack") for ev in events])
    assert rows is not None
    refused = invalid_events(events_frame(rows, [0] * 5, [10, 11, 12, 13, 14]), NOW_MS)
    assert [(o, r) for _, o, r in refused] == [
        (o, read_event(encode_stat_event(ev), NOW_MS)[1]) for o, ev in
        zip([11, 12, 13, 14], events[1:], strict=True)
    ]  # fmt: skip
