"""Counting across a restart: events carry their cumulative reading, the samples table keeps
it, and a restart (or a lost broker log) counts from the last durable one.

The sampler's source here is a fake (pure logic); the table is a real Delta table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from nettel.ingest.procfs import InterfaceCounters
from nettel.ingest.publisher import EventPublisher
from nettel.ingest.sampler import Sampler, counter_reading
from nettel.ingest.service import IngestService
from nettel.ingest.sources import Reading
from nettel.ingest.units import Unit
from nettel.models import (
    COUNTERS,
    CounterReading,
    DurableReading,
    StatEvent,
    decode_stat_event,
    encode_stat_event,
)
from nettel.store.samples import PartitionSamples, SamplesTable, samples_frame

BOOT = "3f1c0d9e-0000-4000-8000-000000000001"


def counters(base: int) -> InterfaceCounters:
    """Counters that all differ, so a mix-up of any two shows."""
    return InterfaceCounters(**{c: base * (i + 1) + i for i, c in enumerate(COUNTERS)})


def reading_of(c: InterfaceCounters, netns: int = 7, boot_id: str = BOOT) -> CounterReading:
    return counter_reading(c, netns, boot_id)


@dataclass
class FakeSource:
    """Units and the readings to return next (pure logic: no engine, no /proc)."""

    units_now: list[Unit]
    readings: dict[str, Reading] = field(default_factory=dict)
    name: str = "fake"

    def refresh(self) -> None:
        return None

    def units(self) -> list[Unit]:
        return list(self.units_now)

    def read(self, unit: Unit) -> Reading:
        return self.readings[unit.identity]

    def reads_fast(self, unit: Unit) -> bool:
        return True

    def close(self) -> None:
        return None

    def set(self, identity: str, ts_ms: int, c: InterfaceCounters, netns: int = 7) -> None:
        self.readings[identity] = Reading(ts_ms, netns, c, None, "fake")


def unit(identity: str, container_id: str) -> Unit:
    return Unit(identity=identity, container_id=container_id, name=identity, pid=1)


def delta(ev: StatEvent) -> dict[str, int]:
    return {c: getattr(ev, c) for c in COUNTERS}


def minus(a: InterfaceCounters, b: InterfaceCounters) -> dict[str, int]:
    return {c: getattr(a, c) - getattr(b, c) for c in COUNTERS}


async def test_a_restart_counts_each_container_from_its_last_durable_reading() -> None:
    same, moved, other, rebooted = (unit("same", "c1"), unit("moved", "c2"),
                                    unit("other", "c3-new"), unit("rebooted", "c4"))  # fmt: skip
    source = FakeSource([same, moved, other, rebooted])
    t1 = time.time_ns() // 1_000_000
    t0 = t1 - 12_500
    durable = {
        "same": DurableReading("same", "c1", t0, reading_of(counters(100))),
        "moved": DurableReading("moved", "c2", t0, reading_of(counters(100))),
        "other": DurableReading("other", "c3-old", t0, reading_of(counters(100))),
        "rebooted": DurableReading("rebooted", "c4", t0, reading_of(counters(100), boot_id="x")),
    }
    for u in (same, other, rebooted):
        source.set(u.identity, t1, counters(900))
    source.set("moved", t1, counters(30), netns=8)  # restarted meanwhile: a new namespace
    emitted: list[StatEvent] = []
    sampler = Sampler(source, emitted.append, host="h", interval_s=1.0, boot_id=BOOT)
    sampler.resume_from(durable)
    try:
        first = {ev.identity: ev for ev in await sampler.tick()}
        # the same interface: everything since the durable reading, over the real gap
        assert delta(first["same"]) == minus(counters(900), counters(100))
        assert first["same"].interval_ms == t1 - t0
        assert first["same"].catch_up
        assert not first["same"].counter_reset
        assert first["same"].reading == reading_of(counters(900))
        # the same container in a new namespace: counts from the namespace's start
        assert delta(first["moved"]) == minus(counters(30), InterfaceCounters())
        assert first["moved"].counter_reset
        assert not first["moved"].catch_up
        # another container of that name, or another boot: only a baseline, as before
        assert "other" not in first
        assert "rebooted" not in first
        assert sampler.caught_up == 2
        source.set("same", t1 + 500, counters(950))
        (nxt,) = [ev for ev in await sampler.tick() if ev.identity == "same"]
        assert delta(nxt) == minus(counters(950), counters(900))
        assert not nxt.catch_up
    finally:
        sampler.close()


async def test_a_lost_broker_log_is_made_up_from_the_last_durable_reading() -> None:
    """What the dead broker held (acknowledged, never written) is counted again in one
    catch-up event, sent ahead of what is still buffered."""
    web, db = unit("web", "c1"), unit("db", "c2")
    source = FakeSource([web, db])
    durable_now: dict[str, DurableReading] = {}
    publisher = EventPublisher("127.0.0.1:1", "nettel.stats")  # never started: a buffer
    service = IngestService(source, publisher, host="h", interval_s=1.0,
                            durable_readings=lambda: durable_now)  # fmt: skip
    service.sampler.boot_id = BOOT
    try:
        base = time.time_ns() // 1_000_000 - 10_000  # the sampler forgets what is old
        for i, ts in enumerate((base + 10_000, base + 11_000, base + 12_000, base + 13_000)):
            for u in (web, db):
                source.set(u.identity, ts, counters(100 * (i + 1)))
            await service.sampler.tick()
        # web: everything up to 11 000 durable; the 12 000 event was acknowledged by the
        # dead broker and lost, the 13 000 one is still buffered
        durable_now["web"] = DurableReading("web", "c1", base + 11_000, reading_of(counters(200)))
        # db: durable up to 10 000; nothing of it is buffered any more
        durable_now["db"] = DurableReading("db", "c2", base + 10_000, reading_of(counters(100)))
        last_web = (b"web", base + 13_000)
        kept = [(k, v) for k, v in publisher.pending()
                if (k, decode_stat_event(v).ts_ms) == last_web]  # fmt: skip
        publisher._buf.clear()
        for key, value in kept:
            publisher.publish(key, value)
        assert await service.make_up_for_lost_log(2) == 2
        pending = [decode_stat_event(v) for _, v in publisher.pending()]
        bridges = {ev.identity: ev for ev in pending if ev.catch_up}
        assert [ev.catch_up for ev in pending] == [True, True, False], "bridges go first"
        assert delta(bridges["web"]) == minus(counters(300), counters(200))
        assert (bridges["web"].ts_ms, bridges["web"].interval_ms) == (base + 12_000, 1_000)
        assert bridges["web"].reading == reading_of(counters(300))
        assert delta(bridges["db"]) == minus(counters(400), counters(100))
        assert (bridges["db"].ts_ms, bridges["db"].interval_ms) == (base + 13_000, 3_000)
        # the buffered web event and its bridge add up to everything since 11 000
        total = {c: delta(bridges["web"])[c] + getattr(pending[-1], c) for c in COUNTERS}
        assert total == minus(counters(400), counters(200))
    finally:
        service.sampler.close()


def event(identity: str, ts_ms: int, reading: CounterReading | None) -> StatEvent:
    return StatEvent(ts_ms=ts_ms, host="h", container_id=f"id-{identity}", identity=identity,
                     name=identity, interval_ms=500, rx_bytes=5, reading=reading)  # fmt: skip


def test_the_samples_table_keeps_readings_and_gains_the_columns_in_place(tmp_path: Path) -> None:
    """An older table without the reading columns takes them on the next append; the
    newest reading of each container comes back, rows without one are left out."""
    now = time.time_ns() // 1_000_000
    table = SamplesTable(str(tmp_path / "samples"))
    old = samples_frame([(0, 0, event("web", now - 9_000, None))], 1)
    old.drop("catch_up", "netns", "boot_id", *(f"reading_{c}" for c in COUNTERS)).write_delta(
        table.uri, delta_write_options={"partition_by": ["date"]})  # fmt: skip
    assert table.latest_readings() == {}, "an older table has no readings"
    r1, r2 = reading_of(counters(10)), reading_of(counters(20))
    events = [event("web", now - 5_000, r1), event("web", now - 4_000, r2),
              event("db", now - 4_500, r1), event("db", now - 4_000, None)]  # fmt: skip
    table.append_samples([PartitionSamples("nettel.stats", 0, list(enumerate(events)), 4)],
                         writer="w", epoch=1)  # fmt: skip
    frame = table.scan().collect()
    assert frame.height == 5
    assert frame.filter(pl.col("reading_rx_bytes").is_null()).height == 2
    assert table.latest_readings() == {
        "web": DurableReading("web", "id-web", now - 4_000, r2),
        "db": DurableReading("db", "id-db", now - 4_500, r1),
    }


def test_events_of_older_versions_still_decode() -> None:
    old = b'{"ts_ms":1,"host":"h","container_id":"c","identity":"c","name":"c","interval_ms":5}'
    ev = decode_stat_event(old)
    assert ev.reading is None
    assert not ev.catch_up
    new = event("web", 1, reading_of(counters(3)))
    assert decode_stat_event(encode_stat_event(new)) == new
