"""The stream worker: events from Kafka into the ``minute`` table, exactly once.

It consumes ``nettel.stats`` in the consumer group ``nettel-stream``, validates each
event (invalid ones go to the dead-letter topic with the reason in a header, counted),
folds valid ones into each partition's event-time windows, and every
``flush_interval_s`` writes the closed windows together with every partition's
:class:`~nettel.models.ReplayPoint` in one Delta commit; then, at most every
``rollup_interval_s``, rolls its partitions' new minute rows into ``hour`` and those
into ``day`` (:mod:`nettel.store.rollup`). On assignment it resumes each
partition from the point stored in the table, never from Kafka's committed offsets, so
a crash or a rebalance neither loses a window nor counts one twice. Kafka offsets are
committed too, after the write, for lag tools only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from nettel.models import COUNTERS, StatEvent, decode_stat_event
from nettel.store.minute import MinuteTable, PartitionPoint
from nettel.store.rollup import RollupTable
from nettel.stream.windows import PartitionWindows

log = structlog.get_logger(__name__)

DAY_MS = 86_400_000


def validate(ev: StatEvent, now_ms: int, *, max_age_ms: int = 400 * DAY_MS) -> str | None:
    """Why ``ev`` cannot be counted, or None. Types are already checked by decoding.

    Examples
    --------
    >>> ok = StatEvent(ts_ms=10**12, host="h", container_id="c", identity="c", name="c",
    ...                interval_ms=5000, rx_bytes=5)
    >>> validate(ok, 10**12) is None
    True
    >>> validate(msgspec.structs.replace(ok, rx_bytes=-1), 10**12)
    'rx_bytes is negative (-1)'
    >>> validate(msgspec.structs.replace(ok, ts_ms=10**12 + 2 * DAY_MS), 10**12)
    'ts_ms 1000172800000 is more than a day ahead'
    """
    for name in COUNTERS:
        value = getattr(ev, name)
        if value < 0:
            return f"{name} is negative ({value})"
    if ev.interval_ms < 0 or ev.interval_ms > DAY_MS:
        return f"interval_ms {ev.interval_ms} is outside [0, 1 day]"
    if ev.ts_ms > now_ms + DAY_MS:
        return f"ts_ms {ev.ts_ms} is more than a day ahead"
    if ev.ts_ms < now_ms - max_age_ms:
        return f"ts_ms {ev.ts_ms} is older than the longest retention"
    if not ev.identity:
        return "identity is empty"
    if ev.connections is not None and ev.connections < 0:
        return f"connections is negative ({ev.connections})"
    return None


@dataclass
class WorkerStats:
    """Counts a worker keeps, for logs and tests."""

    consumed: int = 0
    dead_lettered: int = 0
    windows_written: int = 0
    flushes: int = 0
    late: int = 0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker._flush()
        for tp in revoked:
            self.worker._windows.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker._resume(list(assigned))


class StreamWorker:
    """One member of the ``nettel-stream`` group (any number may run)."""

    def __init__(
        self,
        bootstrap_servers: str,
        table: MinuteTable,
        *,
        topic: str = "nettel.stats",
        dlq_topic: str = "nettel.stats.dlq",
        group: str = "nettel-stream",
        grace_ms: int = 30_000,
        flush_interval_s: float = 30.0,
        epoch: int = 0,
        max_records: int = 50_000,
        rollups: Sequence[RollupTable] = (),
        rollup_interval_s: float = 0.0,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.table = table
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.group = group
        self.grace_ms = grace_ms
        self.flush_interval_s = flush_interval_s
        self.epoch = epoch
        self.max_records = max_records
        self.rollups = list(rollups)
        self.rollup_interval_s = rollup_interval_s
        self._next_roll = 0.0
        self.stats = WorkerStats()
        self._windows: dict[int, PartitionWindows] = {}
        self._consumer: Any = None
        self._dlq: Any = None
        self._flush_lock = asyncio.Lock()

    @property
    def assigned(self) -> list[int]:
        """Partitions this worker owns now."""
        return sorted(self._windows)

    async def _resume(self, tps: list[TopicPartition]) -> None:
        partitions = [tp.partition for tp in tps]
        points = await asyncio.to_thread(
            self.table.replay_points, self.group, self.topic, partitions, epoch=self.epoch
        )
        for tp in tps:
            point = points.get(tp.partition)
            self._windows[tp.partition] = PartitionWindows(self.grace_ms, replay=point)
            offset = 0 if point is None else point.resume_offset
            self._consumer.seek(tp, offset)
        log.info("partitions_assigned", group=self.group, partitions=partitions,
                 resumed={p: pt.resume_offset for p, pt in points.items()})  # fmt: skip

    async def _flush(self) -> None:
        async with self._flush_lock:
            rows = []
            points = []
            for partition, pw in self._windows.items():
                closed = pw.close_ready()
                for row in closed:
                    row.partition = partition
                rows.extend(closed)
                point = pw.replay_point()
                if point is not None:
                    points.append(PartitionPoint(self.topic, partition, point))
            if not points:
                return
            await asyncio.to_thread(
                self.table.append, rows, points, writer=self.group, epoch=self.epoch
            )
            self.stats.windows_written += len(rows)
            self.stats.flushes += 1
            if time.monotonic() >= self._next_roll:
                await asyncio.to_thread(self._roll, [p.partition for p in points])
                self._next_roll = time.monotonic() + self.rollup_interval_s
            self.stats.late = sum(pw.late for pw in self._windows.values())
            with contextlib.suppress(Exception):  # for lag tools only; the store is the truth
                await self._consumer.commit(
                    {TopicPartition(self.topic, p.partition): p.point.next_offset for p in points}
                )

    def _roll(self, partitions: list[int]) -> None:
        for table in self.rollups:  # hour from minute, then day from hour
            for p in partitions:
                table.roll(p, writer=self.group, topic=self.topic)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        self.stats.dead_lettered += 1
        log.warning("event_dead_lettered", topic=self.topic, partition=record.partition,
                    offset=record.offset, reason=reason)  # fmt: skip
        source = f"{self.topic}/{record.partition}/{record.offset}"
        await self._dlq.send_and_wait(
            self.dlq_topic, value=record.value, key=record.key,
            headers=[("nettel-error", reason.encode()), ("nettel-source", source.encode())],
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, window and write until ``stop``; flushes what closed before returning."""
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=self.group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20,
        )  # fmt: skip
        self._dlq = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers)
        await self._dlq.start()
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Rebalance(self))
        log.info("stream_started", group=self.group, topic=self.topic)
        next_flush = time.monotonic() + self.flush_interval_s
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=200, max_records=self.max_records)
                now_ms = time.time_ns() // 1_000_000
                for tp, records in batch.items():
                    pw = self._windows.get(tp.partition)
                    if pw is None:
                        continue  # revoked meanwhile
                    for record in records:
                        self.stats.consumed += 1
                        try:
                            ev = decode_stat_event(record.value)
                        except (msgspec.ValidationError, msgspec.DecodeError) as e:
                            await self._dead_letter(record, f"invalid event: {e}")
                            continue
                        reason = validate(ev, now_ms)
                        if reason is not None:
                            await self._dead_letter(record, reason)
                            continue
                        pw.add(ev, record.offset)
                if time.monotonic() >= next_flush:
                    await self._flush()
                    next_flush = time.monotonic() + self.flush_interval_s
            await self._flush()
        finally:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            with contextlib.suppress(Exception):
                await self._dlq.stop()
            log.info("stream_stopped", consumed=self.stats.consumed,
                     windows_written=self.stats.windows_written,
                     dead_lettered=self.stats.dead_lettered, late=self.stats.late)  # fmt: skip
