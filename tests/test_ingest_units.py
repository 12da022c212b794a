"""Pure ingest logic: counters to deltas, resets, identities. No engine, no broker."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from nettel.errors import SampleError
from nettel.ingest.counters import CounterTracker
from nettel.ingest.procfs import COUNTER_NAMES, InterfaceCounters
from nettel.ingest.sampler import Sampler
from nettel.ingest.sources import Reading
from nettel.ingest.units import Unit
from nettel.models import StatEvent

counter_values = st.lists(st.integers(0, 2**40), min_size=8, max_size=8)


@given(st.lists(st.tuples(counter_values, st.booleans()), min_size=2, max_size=40))
def test_deltas_never_negative_and_sum_to_the_counted_traffic(
    steps: list[tuple[list[int], bool]],
) -> None:
    """Whatever the counters do, deltas are >= 0 and add up to what each incarnation counted."""
    tracker = CounterTracker()
    netns = 1
    expected = [0] * 8
    got = [0] * 8
    prev: list[int] | None = None
    for i, (values, restart) in enumerate(steps):
        if restart and i > 0:
            netns += 1
        d = tracker.update(
            "u",
            netns=netns,
            counters=InterfaceCounters(*values),
            ts_ms=i * 1000,
            since_ms=0 if i == 0 else None,
        )
        assert d is not None
        deltas = [getattr(d.counters, n) for n in COUNTER_NAMES]
        assert all(x >= 0 for x in deltas)
        went_down = prev is not None and any(v < p for v, p in zip(values, prev, strict=True))
        assert d.reset == ((restart and i > 0) or went_down)
        if i == 0 or d.reset:
            expected = [e + v for e, v in zip(expected, values, strict=True)]
        else:
            assert prev is not None
            expected = [e + v - p for e, v, p in zip(expected, values, prev, strict=True)]
        got = [g + x for g, x in zip(got, deltas, strict=True)]
        prev = values
    assert got == expected


def test_first_reading_is_a_baseline_unless_the_unit_started_after_watching() -> None:
    t = CounterTracker()
    assert t.update("old", netns=1, counters=InterfaceCounters(rx_bytes=10**9), ts_ms=5) is None
    d = t.update("new", netns=2, counters=InterfaceCounters(rx_bytes=500), ts_ms=5, since_ms=1)
    assert d is not None
    assert (d.counters.rx_bytes, d.interval_ms, d.reset) == (500, 4, False)


class ScriptedSource:
    """A pure-logic stand-in source: readings scripted per unit (a unit test of the sampler)."""

    name = "scripted"

    def __init__(self, units: list[Unit], behaviour: dict[str, str]) -> None:
        self._units = units
        self.behaviour = behaviour
        self.values: dict[str, int] = {}

    def refresh(self) -> None:
        return None

    def units(self) -> list[Unit]:
        return list(self._units)

    def reads_fast(self, unit: Unit) -> bool:
        return self.behaviour.get(unit.identity) != "slow"

    def read(self, unit: Unit) -> Reading:
        how = self.behaviour.get(unit.identity, "ok")
        if how == "vanish":
            raise SampleError(f"{unit.identity}: gone")
        if how == "bug":
            raise RuntimeError("source bug")
        if how == "slow":
            time.sleep(1.0)
        self.values[unit.identity] = self.values.get(unit.identity, 0) + 100
        v = self.values[unit.identity]
        return Reading(time.time_ns() // 10**6, 1, InterfaceCounters(rx_bytes=v), None, "scripted")

    def close(self) -> None:
        return None


@pytest.fixture
def units() -> list[Unit]:
    return [Unit(identity=n, container_id=n, name=n, pid=1) for n in ("a", "b", "slow", "gone")]


async def test_a_slow_or_failing_unit_does_not_hold_back_the_others(units: list[Unit]) -> None:
    source = ScriptedSource(units, {"slow": "slow", "gone": "vanish"})
    events: list[StatEvent] = []
    sampler = Sampler(source, events.append, host="h", interval_s=0.3)
    try:
        for _ in range(3):
            await sampler.tick()
    finally:
        sampler.close()
    names = {e.identity for e in events}
    assert names == {"a", "b"}
    assert sum(e.rx_bytes for e in events if e.identity == "a") == 200
    assert sampler.skipped >= 3


async def test_nothing_to_watch_is_said_once_and_its_end_too(units: list[Unit]) -> None:
    source = ScriptedSource([], {})
    sampler = Sampler(source, lambda _: None, host="h", interval_s=0.3)
    try:
        with capture_logs() as logs:
            for _ in range(3):
                await sampler.tick()
            source._units = units[:1]
            await sampler.tick()
            await sampler.tick()
    finally:
        sampler.close()
    said = [(r["event"], r.get("containers")) for r in logs if "watch" in r["event"]]
    assert said == [("nothing_to_watch", None), ("watching_again", 1)]
