"""The health stream: ``nettel.health`` into the ``health`` table, exactly once.

A member of its own consumer group (``nettel-health``) run by
:class:`~nettel.stream.runtime.ConsumerRuntime` (rebalances, barriers, rotations).
Records are buffered per partition; every tick writes them in one Delta commit that
also holds each partition's next offset (:class:`~nettel.store.health.HealthTable`),
and only then commits the offsets to Kafka. A restart resumes from the offsets stored
in the table: nothing buffered is lost (it is read again), nothing written is written
twice. Records that do not decode go to the dead-letter topic with the reason.

``on_written``, if given, is called after every write pass (each tick, outside the
write lock) with the records made durable since its last call, maybe none (the
restart triggers: :func:`~nettel.cli.restart_triggers`, which also look at new alerts
then); records written just before a crash are not seen again (a trigger is an act,
not data: the next failed check fires it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaProducer

from nettel import metrics
from nettel.models import HealthRecord, decode_health_record
from nettel.store.health import HealthTable
from nettel.stream.runtime import ConsumerRuntime, ConsumerSettings, completed
from nettel.stream.validation import send_dead_letter

log = structlog.get_logger(__name__)


class HealthStreamWorker:
    """One member of the ``nettel-health`` group: health records into their table.

    It is the job of :attr:`runtime`, which runs it (``runtime.run(stop)``) and answers
    the broker rotation's ``drained`` and ``rotated``.

    ``fresh_log``: the log began empty with this worker (the embedded broker), so
    offsets stored under its epoch before this worker wrote any are an earlier log's
    and are ignored (the rule of :class:`~nettel.stream.resources.ResourceStreamWorker`).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        table: HealthTable,
        *,
        topic: str = "nettel.health",
        dlq_topic: str = "nettel.stats.dlq",
        group: str = "nettel-health",
        flush_interval_s: float = 30.0,
        epoch: int = 0,
        seal_on_stop: bool = False,
        idle_timeout_s: float = 2.0,
        fresh_log: bool = False,
        on_written: Callable[[list[HealthRecord]], Awaitable[None]] | None = None,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.table = table
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.group = group
        self.flush_interval_s = flush_interval_s
        self.epoch = epoch
        self.consumed = 0
        self.written = 0
        self.dead_lettered = 0
        self._rows: dict[int, list[tuple[HealthRecord, int, int]]] = {}
        self._next: dict[int, int] = {}  # partition -> next offset read
        self._stored: dict[int, int] = {}  # partition -> next offset in the table
        self._fresh_epochs = {epoch} if fresh_log else set()
        self._written: set[tuple[int, int]] = set()
        self._dlq: Any = None
        self._flush_lock = asyncio.Lock()
        self.on_written = on_written
        self._unseen: list[HealthRecord] = []  # written, not yet shown to on_written
        self.runtime = ConsumerRuntime(
            bootstrap_servers, self,
            ConsumerSettings(group=group, topic=topic, tick_interval_s=flush_interval_s,
                             idle_timeout_s=idle_timeout_s, seal_on_stop=seal_on_stop),
            epoch=epoch,
        )  # fmt: skip

    # -- the job the runtime runs ------------------------------------------------------

    async def open(self) -> None:
        """Start the dead-letter producer."""
        self._rows.clear()
        self._next.clear()
        self._stored.clear()
        self._dlq = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers)
        await self._dlq.start()
        log.info("health_stream_started", group=self.group, topic=self.topic)

    async def close(self) -> None:
        """Stop the dead-letter producer; safe to call twice."""
        if self._dlq is not None:
            await self._dlq.stop()
            self._dlq = None
        log.info("health_stream_stopped", consumed=self.consumed, written=self.written,
                 dead_lettered=self.dead_lettered)  # fmt: skip

    async def restore(self, partitions: list[int]) -> dict[int, int]:
        """Resume ``partitions`` from the offsets stored with the rows."""
        async with self._flush_lock:
            points = await asyncio.to_thread(
                self.table.written_through, self.group, self.topic, partitions, self.epoch
            )
            if self.epoch in self._fresh_epochs:  # an earlier log's offsets: not ours
                points = {p: v for p, v in points.items() if (self.epoch, p) in self._written}
            for p in partitions:
                self._rows[p] = []
                self._next[p] = self._stored[p] = points.get(p, 0)
            return {p: points.get(p, 0) for p in partitions}

    async def revoked(self, partitions: list[int]) -> None:
        """Write what is buffered, then forget ``partitions``."""
        await self._flush()
        for p in partitions:
            self._rows.pop(p, None)
            self._next.pop(p, None)
            self._stored.pop(p, None)

    async def tick(self) -> None:
        """Write what is buffered."""
        await self._flush()

    async def finish(self) -> None:
        """Write what is buffered before stopping."""
        await self._flush()

    async def seal(self) -> None:
        """Write what is buffered (nothing is held open here)."""
        await self._flush()

    def idle(self, partition: int, now_ms: int) -> None:
        """Nothing waits on time here."""

    async def reset(self, epoch: int, sealed: bool) -> list[int]:
        """Start every owned partition afresh for the empty log of ``epoch``."""
        async with self._flush_lock:
            if not sealed:
                await self._flush_locked()
            self.epoch = epoch
            self._fresh_epochs.add(epoch)
            for p in self._rows:
                self._rows[p] = []
                self._next[p] = self._stored[p] = 0
            return list(self._rows)

    async def process(self, batch: Mapping[int, Sequence[Any]], now_ms: int) -> None:
        """Decode and buffer every record; refused ones go to the dead-letter topic."""
        for partition, records in batch.items():
            rows = self._rows.get(partition)
            if rows is None:
                continue
            for record in records:
                self.consumed += 1
                self._next[partition] = record.offset + 1
                try:
                    rows.append((decode_health_record(record.value), partition, record.offset))
                except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as e:
                    await self._dead_letter(record, f"not a health record: {e}")
                    if self._rows.get(partition) is not rows:
                        break  # revoked or restored meanwhile

    # -- internals -----------------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._flush_lock:
            await completed(self._flush_locked())
        if self.on_written is not None:
            records, self._unseen = self._unseen, []
            try:
                await self.on_written(records)
            except Exception as e:  # an act that failed must not stop the writing
                log.warning("health_on_written_failed", error=str(e))

    async def _flush_locked(self) -> None:
        rows = [r for p in self._rows for r in self._rows[p]]
        points = {p: o for p, o in self._next.items() if o > self._stored.get(p, 0)}
        if not points:  # nothing read since the last write: no commit
            return
        await asyncio.to_thread(self.table.append, rows, points, writer=self.group,
                                topic=self.topic, epoch=self.epoch)  # fmt: skip
        for p in self._rows:
            self._rows[p] = []
        self._stored.update(points)
        self._written.update((self.epoch, p) for p in points)
        self.written += len(rows)
        if self.on_written is not None:
            self._unseen.extend(r for r, _, _ in rows)
        metrics.ROWS_WRITTEN.labels("health").inc(len(rows))
        await self.runtime.commit(points)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        self.dead_lettered += 1
        await send_dead_letter(self._dlq, self.dlq_topic, record, reason)
