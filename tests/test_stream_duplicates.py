"""Exactly once under broker timeouts: a publisher's resend is on the topic twice, counted once.

A real Tansu broker, stopped (SIGSTOP) while a batch is on its way: the publisher's send
times out, it reconnects and sends the batch again, and the broker, resumed, appends both
copies. The stream worker (samples, minute, hour) and the detector, built as ``nettel up``
builds them, count every event once, also when copies of events written before a restart
arrive after it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from structlog.testing import capture_logs

from conftest import consume_events, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.cli import make_detect, make_stream
from nettel.config import Settings
from nettel.ingest.publisher import EventPublisher
from nettel.models import StatEvent
from nettel.store.rollup import HOUR_MS
from nettel.stream.detector import DetectWorker
from nettel.stream.worker import StreamWorker
from test_stream_worker import expected_windows, rollups, table_windows

pytestmark = pytest.mark.broker

TOPICS = {"nettel.stats": 2, "nettel.stats.dlq": 1, "nettel.alerts": 2}
TIMEOUT_MS = 400


def traffic(start_ms: int, containers: int, count: int) -> list[StatEvent]:
    """``count`` samples per container, 5 s apart, every one with its own volume."""
    return [
        StatEvent(ts_ms=start_ms + i * 5000, host="h", container_id=f"c{c}", identity=f"web{c}",
                  name=f"web{c}", interval_ms=5000, rx_bytes=1000 + 7 * i + c,
                  tx_bytes=10 * i + c, rx_packets=i + 1, connections=c + i % 3)
        for i in range(count) for c in range(containers)
    ]  # fmt: skip


async def send_through_a_stall(broker: EmbeddedBroker, first: list[StatEvent],
                               stalled: list[StatEvent]) -> EventPublisher:  # fmt: skip
    """Send ``first``, then ``stalled`` while the broker is stopped for longer than the
    request timeout: the publisher sends that batch again once it answers."""
    publisher = EventPublisher(broker.bootstrap_servers, "nettel.stats",
                               request_timeout_ms=TIMEOUT_MS)  # fmt: skip
    async with publisher:
        for ev in first:
            publisher.publish_event(ev)
        await wait_for(lambda: publisher.sent >= len(first), 30, "the first events sent")
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            for ev in stalled:
                publisher.publish_event(ev)
            await wait_for(lambda: not publisher.connected, 10, "the send to time out")
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        await wait_for(lambda: publisher.buffered == 0, 30, "the batch sent again")
    return publisher


async def run_until(workers: tuple[StreamWorker, DetectWorker], done: object, what: str) -> None:
    """Run the stream worker and the detector side by side until ``done``."""
    for w in workers:  # group timing only: a member that left is otherwise waited for
        w.runtime.settings.consumer_options.update(
            session_timeout_ms=3000, heartbeat_interval_ms=500
        )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        await wait_for(done, 60, what)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def test_a_resent_batch_is_on_the_topic_twice_and_counted_once_across_a_restart(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, TOPICS)
    # an hour ago, on an hour: every window closes (idle watermark), the hour rolls up
    start = (time.time_ns() // 1_000_000 - 2 * HOUR_MS) // HOUR_MS * HOUR_MS
    events = traffic(start, containers=3, count=60)  # 5 minutes of 3 containers
    first, stalled, after = events[:60], events[60:120], events[120:]
    await send_through_a_stall(broker, first, stalled)
    on_topic = await consume_events(bootstrap)
    copies = Counter((e.identity, e.ts_ms) for e in on_topic)
    assert len(copies) == 120
    assert len(on_topic) > 120, "the stalled batch should be on the topic twice"
    assert max(copies.values()) == 2

    settings = Settings(data_dir=str(tmp_path), flush_interval_s=0.3, rollup_interval_s=0.0,
                        window_grace_s=1.0, detect_checkpoint_s=0.3)  # fmt: skip
    worker = make_stream(settings, bootstrap)
    detector = make_detect(settings, bootstrap)
    with capture_logs() as logs:
        await run_until((worker, detector), lambda: worker.stats.consumed >= len(on_topic)
                        and worker.open_windows() == 0 and worker.stats.flushes >= 2
                        and detector.stats.consumed >= len(on_topic),
                        "the first run to write every window")  # fmt: skip
    cutoff = start + HOUR_MS
    assert table_windows(worker.table, cutoff) == expected_windows(events[:120], cutoff)
    assert worker.stats.duplicates == len(on_topic) - 120
    assert detector.stats.duplicates == len(on_topic) - 120
    assert detector.stats.scored == 120
    assert any(e["event"] == "duplicates_dropped" and e["worker"] == "stream" for e in logs)

    # a resend that arrives after a restart: copies of events written before it (their
    # windows closed: without what the new run reads back they would be late rows)
    publisher = EventPublisher(bootstrap, "nettel.stats")
    async with publisher:
        for ev in [*first[-30:], *after]:
            publisher.publish_event(ev)
        await wait_for(lambda: publisher.buffered == 0, 30, "the copies and the rest sent")
    second = make_stream(settings, bootstrap)
    detector = make_detect(settings, bootstrap)
    await run_until((second, detector), lambda: second.stats.consumed >= 30 + len(after)
                    and second.open_windows() == 0 and second.stats.flushes >= 2
                    and detector.stats.consumed >= 30 + len(after),
                    "the second run to write every window")  # fmt: skip
    assert table_windows(worker.table, cutoff) == expected_windows(events, cutoff)
    assert second.stats.duplicates == 30
    assert detector.stats.duplicates == 30
    assert detector.stats.scored == len(after)
    hour, _ = rollups(worker.table)
    assert table_windows(hour, cutoff, HOUR_MS) == expected_windows(events, cutoff, HOUR_MS)
    samples = pl.read_delta(str(tmp_path / "samples")).select("container", "ts")
    assert samples.height == len(events)
    assert samples.n_unique() == len(events)
