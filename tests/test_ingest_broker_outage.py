"""Ingest rides out a broker outage: samples taken while it is down arrive afterwards."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from structlog.testing import capture_logs

from conftest import Engine, consume_events, start_ingest, wait_for
from nettel.broker import EmbeddedBroker
from nettel.ingest.sources import EngineSource
from nettel.models import StatEvent

pytestmark = [pytest.mark.engine, pytest.mark.broker]

INTERVAL_S = 0.5


def now_ms() -> int:
    return time.time_ns() // 10**6


async def test_samples_taken_while_the_broker_is_down_arrive_after_it_returns(
    engine: Engine, broker: EmbeddedBroker
) -> None:
    containers = [engine.run("sleep 3600"), engine.run("sleep 3600")]
    source = EngineSource(engine.url)
    ingest = await start_ingest(source, broker.bootstrap_servers, INTERVAL_S)
    publisher = ingest.service.publisher
    try:
        await wait_for(lambda: publisher.sent >= 4, 20, "first events sent")
        await broker.stop()  # Tansu keeps records in memory only: they go with it
        t_down = now_ms()
        await asyncio.sleep(4.0)
        assert not ingest.task.done(), "ingest must keep running while the broker is down"
        assert publisher.buffered >= 2 * 6
        t_up = now_ms()
        await broker.start()  # a fresh, empty broker on the same port
        await wait_for(
            lambda: publisher.buffered == 0 and publisher.connected, 30, "the buffer to drain"
        )
        await asyncio.sleep(2 * INTERVAL_S)
    finally:
        await ingest.finish()
    assert publisher.dropped == 0
    events = await consume_events(broker.bootstrap_servers)
    for c in containers:
        # Delivery is at least once: a batch whose ack was lost is sent again, whole.
        by_ts: dict[int, StatEvent] = {}
        for e in events:
            if e.container_id == c.id:
                assert by_ts.setdefault(e.ts_ms, e) == e, "a duplicate must be identical"
        mine = sorted(by_ts.values(), key=lambda e: e.ts_ms)
        taken_while_down = [e for e in mine if t_down <= e.ts_ms <= t_up]
        expected = (t_up - t_down) / (INTERVAL_S * 1000)
        assert len(taken_while_down) >= expected - 2, (
            len(taken_while_down),
            expected,
            [e.ts_ms - t_down for e in mine],
        )
        # No gap: from (at the latest) the first sample after the outage began, every tick.
        assert mine[0].ts_ms <= t_down + 1.5 * INTERVAL_S * 1000
        gaps = [b.ts_ms - a.ts_ms for a, b in itertools.pairwise(mine)]
        assert max(gaps) <= 1.6 * INTERVAL_S * 1000, gaps
        assert sum(e.interval_ms for e in mine[1:]) == mine[-1].ts_ms - mine[0].ts_ms


async def test_a_full_buffer_drops_the_oldest_counts_and_logs_them(
    engine: Engine, broker: EmbeddedBroker
) -> None:
    engine.run("sleep 3600")
    source = EngineSource(engine.url)
    port = broker.port
    await broker.stop()
    with capture_logs() as logs:
        ingest = await start_ingest(source, f"127.0.0.1:{port}", 0.2, max_buffer=3)
        publisher = ingest.service.publisher
        await wait_for(lambda: publisher.dropped >= 5, 20, "drops while the broker is down")
        await broker.start()
        await wait_for(lambda: publisher.buffered == 0 and publisher.sent > 0, 30, "drain")
        await ingest.finish()
    assert any(e["event"] == "buffer_overflow" and e["dropped_total"] >= 1 for e in logs)
    events = await consume_events(broker.bootstrap_servers)
    assert events, "the newest events are delivered once the broker is back"
