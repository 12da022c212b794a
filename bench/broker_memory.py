"""Memory of the embedded broker + nettel over a simulated week, rotation on.

Produces a simulated week of samples for N containers (default 100 at 5 s: 12.1 M
events) as fast as nettel's own publisher can send them through the embedded broker
(Tansu behind nettel's front), while a consumer reads them all, following the broker
across rotations. The broker is rotated once its RSS passes --max-rss-mb and the
consumer has read everything acknowledged. Every second it records the RSS of the
broker and of this process (publisher, front, consumer).

    python bench/broker_memory.py [--containers 100] [--days 7] [--max-rss-mb 256]

Checks, per container, that every sample arrived (the consumer sees every timestamp
of the week) and reports duplicates (delivery is at least once). Writes
bench/results/broker_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from nettel.broker import (
    EPOCH_HEADER,
    BrokerRotation,
    EmbeddedBroker,
    free_loopback_port,
    process_rss_bytes,
)
from nettel.ingest.publisher import EventPublisher
from nettel.models import StatEvent, TcpStates, decode_stat_event, encode_stat_event

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

TOPIC = "nettel.stats"
PARTITIONS = 12
INTERVAL_MS = 5000


class Follower:
    """Reads every partition, and from offset 0 again whenever the broker is replaced."""

    def __init__(self, bootstrap: str, containers: int, steps: int) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20,
        )  # fmt: skip
        self.tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        self.epoch = 0
        self.seen = [bytearray(steps) for _ in range(containers)]
        self.read = 0
        self.distinct = 0
        self.duplicates = 0

    async def rotated(self, epoch: int) -> None:
        self.epoch = epoch
        for tp in self.tps:
            self.consumer.seek(tp, 0)

    async def run(self, stop: asyncio.Event, t0_ms: int) -> None:
        await self.consumer.start()
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=200, max_records=20000)
                for msgs in batch.values():
                    for m in msgs:
                        if int(dict(m.headers)[EPOCH_HEADER]) < self.epoch:
                            continue  # fetched from the old log before the switch
                        ev = decode_stat_event(m.value)
                        c = int(ev.container_id)
                        step = (ev.ts_ms - t0_ms) // INTERVAL_MS
                        self.read += 1
                        if self.seen[c][step]:
                            self.duplicates += 1
                        else:
                            self.seen[c][step] = 1
                            self.distinct += 1
        finally:
            await self.consumer.stop()


def make_event(c: int, step: int, t0_ms: int, rng: random.Random) -> bytes:
    hour = (step * INTERVAL_MS // 3_600_000) % 24
    base = 2000 + 50_000 * (1 + (hour >= 8) * (hour <= 20)) * (1 + c % 7)
    rx = int(base * rng.uniform(0.7, 1.3))
    return encode_stat_event(
        StatEvent(
            ts_ms=t0_ms + step * INTERVAL_MS, host="bench", container_id=str(c),
            identity=f"svc-{c}", name=f"svc-{c}", image="bench:1", interval_ms=INTERVAL_MS,
            rx_bytes=rx, tx_bytes=rx // 3, rx_packets=rx // 900, tx_packets=rx // 2500,
            connections=c % 13, tcp=TcpStates(established=c % 13, listen=1),
        )
    )  # fmt: skip


async def run(containers: int, days: float, max_rss_mb: int) -> dict[str, Any]:
    steps = int(days * 86400 * 1000 // INTERVAL_MS)
    total = steps * containers
    broker = EmbeddedBroker(free_loopback_port())
    await broker.start(topics={TOPIC: PARTITIONS})
    publisher = EventPublisher(broker.bootstrap_servers, TOPIC, max_buffer=200_000)
    follower = Follower(broker.bootstrap_servers, containers, steps)

    async def drained() -> bool:
        return follower.distinct >= publisher.sent

    rotation = BrokerRotation(
        broker, {TOPIC: PARTITIONS}, [publisher], max_rss_bytes=max_rss_mb << 20,
        drained=drained, on_rotated=[follower.rotated], check_interval_s=1.0,
        drain_timeout_s=120,
    )  # fmt: skip
    stop = asyncio.Event()
    t0_ms = 1_700_000_000_000
    samples: list[tuple[float, int, int]] = []

    async def monitor() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), broker.rss_bytes(), process_rss_bytes(os.getpid())))
            await asyncio.sleep(1.0)

    tasks = [asyncio.create_task(follower.run(stop, t0_ms)), asyncio.create_task(monitor()),
             asyncio.create_task(rotation.run(stop))]  # fmt: skip
    rng = random.Random(7)
    started = time.monotonic()
    await publisher.start()
    try:
        for step in range(steps):
            for c in range(containers):
                publisher.publish(f"svc-{c}".encode(), make_event(c, step, t0_ms, rng))
            while publisher.buffered > 50_000:  # noqa: ASYNC110 - backpressure for a bench
                await asyncio.sleep(0.01)
            if step % 20_000 == 0:
                print(f"step {step}/{steps} sent {publisher.sent} read {follower.distinct} "
                      f"rotations {broker.rotations} broker_rss_mb {broker.rss_bytes() >> 20}",
                      flush=True)  # fmt: skip
        deadline = time.monotonic() + 600
        while follower.distinct < total and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await publisher.stop()
        await broker.stop()
    missing = sum(len(s) - sum(s) for s in follower.seen)
    peak_total = max(b + n for _, b, n in samples)
    return {
        "containers": containers,
        "simulated_days": days,
        "events": total,
        "elapsed_s": round(elapsed, 1),
        "events_per_s": round(total / elapsed),
        "rotations": broker.rotations,
        "rotate_at_broker_rss_mb": max_rss_mb,
        "peak_broker_rss_mb": max(b for _, b, _ in samples) >> 20,
        "peak_nettel_rss_mb": max(n for _, _, n in samples) >> 20,
        "peak_total_rss_mb": peak_total >> 20,
        "bound_mb": 1024,
        "within_bound": peak_total < 1 << 30,
        "events_missing": missing,
        "duplicates_read": follower.duplicates,
        "dropped_by_publisher": publisher.dropped,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--days", type=float, default=7.0)
    ap.add_argument("--max-rss-mb", type=int, default=256)
    args = ap.parse_args()
    figures = asyncio.run(run(args.containers, args.days, args.max_rss_mb))
    write_result(
        "broker_memory", figures, "python bench/broker_memory.py " + " ".join(sys.argv[1:])
    )


if __name__ == "__main__":
    main()
