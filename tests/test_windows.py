"""Windows are pure functions of the event sequence: a crash and replay changes nothing."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nettel.models import COUNTERS, StatEvent, TcpStates
from nettel.stream.windows import PartitionWindows, ReplayPoint, WindowAggregate

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
