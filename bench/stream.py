"""Stream worker throughput and the minute table's bytes per stored value.

Publishes a simulated span of traffic (`nettel simulate`'s generator) to the embedded
broker first, then runs one stream worker in this process until it has consumed
everything. The worker is built by ``nettel.cli.make_stream`` with the default settings
(only the data dir is set), exactly as `nettel up` builds it: consume + decode +
validate + window, the ``samples`` table, minute flushes every
``NETTEL_FLUSH_INTERVAL_S``, rollups into hour and day. It reports
events per second of wall time and of this process's CPU: over the whole run, and from
the first record on (``*_after_start``: without the consumer group's join, ~5 s with
the embedded broker, which no event rate amortises in a 15 s run). The embedded
broker's front runs in this process too, relaying every fetch (under 1% of the CPU).
Bytes per stored value: the minute table's Parquet bytes over rows x value columns.

    python bench/stream.py [--containers 100] [--hours 12]

Writes bench/results/stream.json. Query latency: bench/query.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from typing import Any

from deltalake import DeltaTable

from nettel.broker import EmbeddedBroker, free_loopback_port
from nettel.cli import make_stream
from nettel.config import Settings
from nettel.ingest.publisher import EventPublisher
from nettel.ingest.simulate import TrafficSimulator
from nettel.store.maintenance import maintain_table
from nettel.store.minute import MinuteTable, minute_schema
from nettel.store.rollup import HOUR_MS

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result


def live_bytes(uri: str) -> int:
    """Bytes of the Parquet files the table's latest version holds."""
    actions = DeltaTable(uri).get_add_actions(flatten=True)
    return int(sum(actions.column("size_bytes").to_pylist()))


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run(containers: int, hours: float) -> dict[str, Any]:
    broker = EmbeddedBroker(free_loopback_port())
    await broker.start(topics={"nettel.stats": 12, "nettel.stats.dlq": 1})
    sim = TrafficSimulator(containers, seed=3)
    start_ms = time.time_ns() // 1_000_000 - int((hours + 1) * HOUR_MS)
    total = 0
    # the format `nettel up`'s ingest and `nettel simulate` write (NETTEL_WIRE_FORMAT)
    publisher = EventPublisher(broker.bootstrap_servers, "nettel.stats", max_buffer=2_000_000,
                               wire_format=Settings.from_env({}).wire_format)  # fmt: skip
    async with publisher:
        for ev in sim.events(start_ms, int(hours * HOUR_MS)):
            publisher.publish_event(ev)
            total += 1
            if publisher.buffered > 200_000:
                await publisher.drained(50_000)
        await publisher.drained(0)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"NETTEL_DATA_DIR": tmp})
        worker = make_stream(settings, broker.bootstrap_servers, epoch=broker.epoch,
                             embedded=True)  # fmt: skip
        minute = MinuteTable(f"{tmp}/minute")
        stop = asyncio.Event()
        c0, t0 = cpu_s(), time.monotonic()
        task = asyncio.create_task(worker.run(stop))
        while worker.stats.consumed == 0:  # noqa: ASYNC110 - a bench polls
            await asyncio.sleep(0.005)
        c1, t1 = cpu_s(), time.monotonic()  # the group joined: the first record is in
        while worker.stats.consumed < total:  # noqa: ASYNC110 - a bench polls
            await asyncio.sleep(0.1)
        stop.set()
        await task  # the final flush (and roll) included
        wall, cpu = time.monotonic() - t0, cpu_s() - c0
        steady, steady_cpu = time.monotonic() - t1, cpu_s() - c1
        rows = minute.scan().select("samples").collect()
        parquet = live_bytes(f"{tmp}/minute")
        value_columns = len(minute_schema()) - 2  # all but date (partition) and container
        # as `nettel up` leaves it after a maintenance pass (one file per date partition)
        maintain_table(f"{tmp}/minute", "minute", retention_days=None)
        rows_after = minute.scan().select("samples").collect().height
        maintained = live_bytes(f"{tmp}/minute")
    await broker.stop()
    return {
        "containers": containers,
        "simulated_hours": hours,
        "events": total,
        "wall_s": round(wall, 2),
        "events_per_s_wall": round(total / wall),
        "events_per_s_cpu": round(total / cpu),
        "startup_s": round(wall - steady, 2),
        "events_per_s_after_start": round(total / steady),
        "events_per_s_cpu_after_start": round(total / steady_cpu),
        "minute_rows": rows.height,
        "minute_parquet_bytes": parquet,
        "bytes_per_stored_value": round(parquet / max(rows.height * value_columns, 1), 3),
        "minute_rows_after_maintenance": rows_after,
        "minute_parquet_bytes_after_maintenance": maintained,
        "bytes_per_stored_value_after_maintenance": round(
            maintained / max(rows_after * value_columns, 1), 3
        ),
        "flushes": worker.stats.flushes,
        "samples_written": worker.stats.samples_written,
        "built_by": "nettel.cli.make_stream (default settings: samples on, flush every "
        f"{settings.flush_interval_s:g} s, rollups every {settings.rollup_interval_s:g} s)",
        "target_events_per_s": 250_000,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--hours", type=float, default=12.0)
    args = ap.parse_args()
    figures = asyncio.run(run(args.containers, args.hours))
    write_result("stream", figures, "python bench/stream.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
