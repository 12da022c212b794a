"""Windows are pure functions of the event sequence: a crash and replay changes nothing."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from nettel.models import COUNTERS, StatEvent, TcpStates, event_row
from nettel.store.samples import events_frame
from nettel.stream.windows import PartitionWindows, ReplayPoint, WindowAggregate, fold_events

GRACE_MS = 30_000


def event(i: int, container: int, ts_ms: int) -> StatEvent:
    return StatEvent(
        ts_ms=ts_ms, host="h", container_id=f"c{container}", identity=f"svc{container}",
        name=f"svc{container}", interval_ms=5000, rx_bytes=1000 + i, tx_bytes=i * 7,
        rx_packets=i % 13, connections=i % 5, tcp=TcpStates(established=i % 5),
        counter_reset=i % 17 == 0,
    )  # fmt: skip


streams = st.lists(
    st.tuples(st.integers(0, 3), st.integers(-90_000, 20_000)), min_size=1, max_size=300
).map(
    lambda steps: [
        event(i, c, 1_000_000 + i * 2_000 + jitter) for i, (c, jitter) in enumerate(steps)
    ]
)


def totals(rows: list[WindowAggregate]) -> dict[tuple[str, int], tuple[Any, ...]]:
    """Rows of the same window added up, as readers do."""
    acc: dict[tuple[str, int], list[Any]] = defaultdict(lambda: [0, 0, 0, [0] * 8, None, None])
    for r in rows:
        a = acc[(r.identity, r.window_start_ms)]
        a[0] += r.samples
        a[1] += r.interval_ms
        a[2] += r.resets
        a[3] = [x + r.sums[c] for x, c in zip(a[3], COUNTERS, strict=True)]
        a[4] = max(a[4] or 0.0, r.rate_max.get("rx_bytes", 0.0))
        a[5] = max(a[5] or 0, r.connections_max or 0)
    return {k: (v[0], v[1], v[2], tuple(v[3]), v[4], v[5]) for k, v in acc.items()}


def run(
    events: list[StatEvent],
    flushes: set[int],
    crashes: set[int],
    seals: frozenset[int] = frozenset(),
) -> list[WindowAggregate]:
    """Process ``events``; write at ``flushes``; at ``crashes`` lose all since the last write;
    at ``seals`` write every open window too (as before a broker rotation)."""
    written: list[WindowAggregate] = []
    stored: ReplayPoint | None = None
    pw = PartitionWindows(GRACE_MS)
    offset = 0
    crashed: set[int] = set()
    while offset < len(events):
        pw.add(events[offset], offset)
        offset += 1
        if offset in seals:
            pw.seal()
        if offset in flushes or offset in seals or offset == len(events):
            written.extend(pw.close_ready())
            stored = pw.replay_point()
        if offset in crashes and offset not in crashed:
            crashed.add(offset)  # each crash point fires once, as a real crash would
            pw = PartitionWindows(GRACE_MS, replay=stored)
            offset = 0 if stored is None else stored.resume_offset
    # the end of the stream: close everything still open, as a far-future event would
    pw.add(event(0, 9, 10**12), len(events))
    written.extend(r for r in pw.close_ready() if r.identity != "svc9")
    return written


@settings(max_examples=300, deadline=None)
@given(
    streams,
    st.sets(st.integers(1, 300), max_size=40),
    st.sets(st.integers(1, 300), max_size=8),
)
def test_crashes_and_replays_write_exactly_the_crash_free_result(
    events: list[StatEvent], flushes: set[int], crashes: set[int]
) -> None:
    clean = run(events, flushes, set())
    assert totals(run(events, flushes, crashes)) == totals(clean)
    # and nothing is lost or made up: every event is in exactly one row
    assert sum(r.samples for r in clean) == len(events)
    assert sum(r.sums["rx_bytes"] for r in clean) == sum(e.rx_bytes for e in events)


@settings(max_examples=200, deadline=None)
@given(
    streams,
    st.sets(st.integers(1, 300), max_size=20),
    st.frozensets(st.integers(1, 300), max_size=8),
    st.sets(st.integers(1, 300), max_size=6),
)
def test_sealing_open_windows_at_any_point_keeps_every_total(
    events: list[StatEvent], flushes: set[int], seals: frozenset[int], crashes: set[int]
) -> None:
    """Sealed windows are partial rows: added up they equal the unsealed result, crashes or not."""
    clean = run(events, flushes, set())
    sealed = run(events, flushes, set(), seals)
    assert totals(sealed) == totals(clean)
    assert totals(run(events, flushes, crashes, seals)) == totals(clean)
    if any(0 < s < len(events) for s in seals):
        assert len(sealed) >= len(clean)


def test_a_sample_after_end_plus_grace_is_late_and_kept_apart() -> None:
    pw = PartitionWindows(GRACE_MS)
    pw.add(event(1, 0, 10_000), 0)
    pw.add(event(2, 0, 60_000 + GRACE_MS), 1)  # closes [0, 60 s)
    pw.add(event(3, 0, 59_000), 2)  # late for [0, 60 s)
    rows = pw.close_ready()
    assert pw.late == 1
    assert [(r.window_start_ms, r.samples) for r in rows] == [(0, 1), (0, 1)]
    point = pw.replay_point()
    assert point is not None
    assert point.resume_offset == 1  # the window [60 s, 120 s) still needs offset 1
    assert point.next_offset == 3


def varied(i: int, container: int, ts_ms: int) -> StatEvent:
    """Events with every field the windows fold moving: no interval, no sockets seen,
    a new container id, duplicate times."""
    ev = event(i, container, ts_ms)
    return msgspec.structs.replace(
        ev, interval_ms=(0 if i % 11 == 3 else 1000 + i % 7 * 1000),
        connections=None if i % 4 == 1 else i * 7 % 9, tcp=None if i % 6 == 2 else ev.tcp,
        container_id=f"c{container}-{i // 40}", tx_drops=i % 3, image=f"img{i % 5}",
    )  # fmt: skip


varied_streams = st.lists(
    st.tuples(st.integers(0, 3), st.integers(-40_000, 20_000), st.integers(0, 2)),
    min_size=40, max_size=150,
).map(lambda steps: [(p, varied(i, c, 1_000_000 + i * 2_000 + (jitter // 1000) * 1000))
                     for i, (c, jitter, p) in enumerate(steps)])  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(varied_streams, st.sets(st.integers(1, 150), max_size=12))
def test_folding_whole_batches_equals_adding_one_event_at_a_time(
    stream: list[tuple[int, StatEvent]], cuts: set[int]
) -> None:
    """The columnar fold of fetched batches writes the very rows, replay points and late
    counts of :meth:`PartitionWindows.add` in order, through flushes and replays."""
    offsets: list[int] = []
    seen: dict[int, int] = {}
    for p, _ in stream:
        offsets.append(seen.get(p, 0))
        seen[p] = offsets[-1] + 1
    bounds = sorted(c for c in cuts if c < len(stream))
    batches = list(zip([0, *bounds], [*bounds, len(stream)], strict=True))

    def consume(batched: bool) -> tuple[list[Any], list[Any]]:
        windows = {p: PartitionWindows(GRACE_MS) for p in range(3)}
        written: list[Any] = []
        points: list[Any] = []
        for lo, hi in batches:
            part = list(range(lo, hi))
            if batched:
                frame = events_frame(
                    [event_row(stream[k][1]) for k in part],
                    [stream[k][0] for k in part],
                    [offsets[k] for k in part],
                )
                assert fold_events(windows, frame) == []
            else:
                for k in part:
                    assert windows[stream[k][0]].add(stream[k][1], offsets[k]) is None
            for p in range(3):
                written.append(
                    sorted(windows[p].close_ready(), key=lambda w: (w.identity, w.window_start_ms))
                )
                points.append((windows[p].replay_point(), windows[p].late,
                               windows[p].open_windows()))  # fmt: skip
        return written, points

    assert consume(True) == consume(False)
