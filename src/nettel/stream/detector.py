"""The detector worker: every event scored, alerts on ``nettel.alerts`` and in ``alerts``.

It consumes ``nettel.stats`` in the group ``nettel-detect``. Each assigned partition has
its own :class:`~nettel.detect.fleet.FleetDetector` (its containers' models, rules and
alert lifecycles). Alerts are published as they happen (key: the container; partition:
the source partition, so one worker owns both), and every ``checkpoint_interval_s`` the
worker writes, per partition: the new alert versions to the ``alerts`` table with the
next source offset (one commit, app transaction), then the pickled detector with that
offset and the alerts topic's position (``detect_state``).

A restart (or a rebalance) restores each partition's detector from its checkpoint and
reads again from its offset: the models replay the same events into the same state, so
they neither forget their baselines nor raise new alerts for old events. The alerts
they regenerate have the ids they had; those already on the topic (read back from the
checkpointed position) are not published again, those already in the table (its app
transaction) not written again.

Feedback (``mark_alert``: false positive) is read from ``alert_feedback`` at each
checkpoint and widens that container's band for that metric and time slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from nettel.detect.alerts import Alert, encode_alert
from nettel.detect.fleet import FleetDetector
from nettel.models import decode_stat_event
from nettel.store.alerts import AlertTable, DetectState, DetectStateTable, FeedbackTable
from nettel.stream.worker import validate

log = structlog.get_logger(__name__)


@dataclass
class DetectStats:
    """Counts a detector keeps, for logs and tests."""

    consumed: int = 0
    invalid: int = 0
    alerts_published: int = 0
    alerts_suppressed: int = 0
    checkpoints: int = 0


@dataclass
class _Partition:
    fleet: FleetDetector
    next_offset: int
    alerts_offset: int
    #: alert versions found on the topic at resume, with their offsets there
    published: dict[tuple[str, str, int], int] = field(default_factory=dict)
    pending: list[dict[str, Any]] = field(default_factory=list)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: DetectWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker._checkpoint([tp.partition for tp in revoked])
        for tp in revoked:
            self.worker._parts.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker._resume(list(assigned))


class DetectWorker:
    """One member of the ``nettel-detect`` group (any number may run)."""

    def __init__(
        self,
        bootstrap_servers: str,
        data_dir: str,
        *,
        topic: str = "nettel.stats",
        alerts_topic: str = "nettel.alerts",
        group: str = "nettel-detect",
        checkpoint_interval_s: float = 30.0,
        epoch: int = 0,
        fleet_factory: Callable[[], FleetDetector] = FleetDetector,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        base = data_dir.rstrip("/")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.alerts_topic = alerts_topic
        self.group = group
        self.checkpoint_interval_s = checkpoint_interval_s
        self.epoch = epoch
        self.fleet_factory = fleet_factory
        self.alerts = AlertTable(f"{base}/alerts", storage_options=storage_options)
        self.state = DetectStateTable(f"{base}/detect_state", storage_options=storage_options)
        self.feedback = FeedbackTable(f"{base}/alert_feedback", storage_options=storage_options)
        self.stats = DetectStats()
        self._parts: dict[int, _Partition] = {}
        self._consumer: Any = None
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self._feedback_version = -1

    @property
    def assigned(self) -> list[int]:
        """Partitions this worker owns now."""
        return sorted(self._parts)

    def fleet(self, partition: int) -> FleetDetector | None:
        """The detector of ``partition``, if this worker owns it."""
        part = self._parts.get(partition)
        return None if part is None else part.fleet

    async def _published_since(self, offsets: dict[int, int]) -> dict[int, dict[Any, int]]:
        """Alert versions already on each alerts partition from its offset on (with the
        offset of each), read with one plain consumer up to the high watermarks."""
        seen: dict[int, dict[tuple[str, str, int], int]] = {p: {} for p in offsets}
        if not offsets:
            return seen
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers,
                                  enable_auto_commit=False)  # fmt: skip
        await reader.start()
        try:
            tps = {p: TopicPartition(self.alerts_topic, p) for p in offsets}
            reader.assign(list(tps.values()))
            for p, tp in tps.items():
                reader.seek(tp, offsets[p])
            pending = set(tps)
            deadline = time.monotonic() + 30.0
            while pending and time.monotonic() < deadline:
                batch = await reader.getmany(timeout_ms=200)
                for tp, records in batch.items():
                    for record in records:
                        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                            a = msgspec.json.decode(record.value, type=Alert)
                            seen[tp.partition][(a.id, a.status, a.updated_ms)] = record.offset
                for p in list(pending):
                    high = reader.highwater(tps[p])
                    if high is not None and await reader.position(tps[p]) >= high:
                        pending.discard(p)
            if pending:
                log.warning("alerts_topic_not_read_to_end", partitions=sorted(pending))
        finally:
            await reader.stop()
        log.info("detect_alerts_read_back", partitions=len(offsets),
                 versions=sum(len(v) for v in seen.values()))  # fmt: skip
        return seen

    async def _resume(self, tps: list[TopicPartition]) -> None:
        partitions = [tp.partition for tp in tps]
        stored = await asyncio.to_thread(self.state.load, partitions)
        starts: dict[int, tuple[Any, int, int]] = {}
        for tp in tps:
            s = stored.get(tp.partition)
            if s is None:
                starts[tp.partition] = (self.fleet_factory(), 0, 0)
                continue
            same_log = s.epoch == self.epoch  # our own checkpoint: safe to unpickle
            starts[tp.partition] = (pickle.loads(s.blob), s.next_offset if same_log else 0,
                                    s.alerts_offset if same_log else 0)  # fmt: skip
        # the checkpoint's alerts offset: alerts of every event from its offset on are at
        # or after it; those already there are not published again (see _publish)
        published = await self._published_since({p: a for p, (_, _, a) in starts.items()})
        for tp in tps:
            fleet, offset, alerts_offset = starts[tp.partition]
            self._parts[tp.partition] = _Partition(fleet, offset, alerts_offset,
                                                   published[tp.partition])  # fmt: skip
            self._consumer.seek(tp, offset)
        log.info("detect_partitions_assigned", group=self.group, partitions=partitions,
                 resumed={p: s.next_offset for p, s in stored.items()})  # fmt: skip

    async def _publish(self, partition: int, offset: int, alerts: Sequence[Alert]) -> None:
        part = self._parts[partition]
        for a in alerts:
            row = msgspec.structs.asdict(a) | {"partition": partition, "offset": offset}
            part.pending.append(row)
            key = (a.id, a.status, a.updated_ms)
            at = part.published.pop(key, None)
            if at is not None:  # published before a restart: regenerated, not sent again
                part.alerts_offset = max(part.alerts_offset, at + 1)
                self.stats.alerts_suppressed += 1
                continue
            meta = await self._producer.send_and_wait(
                self.alerts_topic, encode_alert(a), key=a.identity.encode(), partition=partition
            )
            part.alerts_offset = max(part.alerts_offset, meta.offset + 1)
            self.stats.alerts_published += 1
            log.info("alert", id=a.id, status=a.status, container=a.identity, metric=a.metric,
                     severity=a.severity, explanation=a.explanation)  # fmt: skip

    async def _apply_feedback(self) -> None:
        version = await asyncio.to_thread(self.feedback.version)
        if version <= self._feedback_version:
            return
        rows = await asyncio.to_thread(self.feedback.rows)
        for r in rows.iter_rows(named=True):
            if r["verdict"] != "false_positive":
                continue
            for part in self._parts.values():
                det = part.fleet.detector(r["container"])
                if det is not None:
                    det.false_positive(r["metric"], int(r["started"].timestamp() * 1000),
                                       r["peak"])  # fmt: skip
        self._feedback_version = version

    async def _checkpoint(self, partitions: Sequence[int] | None = None) -> None:
        async with self._lock:
            await self._checkpoint_locked(partitions)

    async def _checkpoint_locked(self, partitions: Sequence[int] | None = None) -> None:
        """Write alerts and states. The caller holds the lock, which the run loop holds
        while it handles a batch: the cut falls between events, never inside one."""
        parts = {p: self._parts[p] for p in (partitions or list(self._parts))
                 if p in self._parts}  # fmt: skip
        if not parts:
            return
        await self._apply_feedback()
        # one consistent cut, taken between two events (the loop runs on meanwhile)
        cut = {p: (list(part.pending), part.next_offset) for p, part in parts.items()}
        states = [
            DetectState(
                p,
                self.epoch,
                part.next_offset,
                part.alerts_offset,
                self._feedback_version,
                pickle.dumps(part.fleet),
            )
            for p, part in parts.items()
        ]
        await asyncio.to_thread(self._write_alert_rows, cut)
        await asyncio.to_thread(self.state.save, states)
        for p, (rows, _) in cut.items():
            del parts[p].pending[: len(rows)]
        self.stats.checkpoints += 1

    def _write_alert_rows(self, cut: dict[int, tuple[list[dict[str, Any]], int]]) -> None:
        """Alert rows not yet in the table, with each partition's next offset, one commit."""
        rows: list[dict[str, Any]] = []
        for p, (pending, _) in cut.items():
            through = self.alerts.written_through(self.group, self.topic, p, self.epoch)
            rows += [r for r in pending if r["offset"] >= through]
        points = {p: next_offset for p, (_, next_offset) in cut.items()}
        self.alerts.append(rows, points, writer=self.group, topic=self.topic, epoch=self.epoch)

    async def drained(self) -> bool:
        """Checkpoint, then whether every owned partition has been read to its end (the
        embedded broker's rotation waits for this before it replaces the log)."""
        if self._consumer is None:
            return True
        await self._checkpoint()
        for p, part in self._parts.items():
            high = self._consumer.highwater(TopicPartition(self.topic, p))
            if high is None or part.next_offset < high:
                return False
        return True

    async def rotated(self, epoch: int) -> None:
        """The embedded broker was replaced: keep the models, read the new log from 0."""
        async with self._lock:
            old, self.epoch = self.epoch, epoch
            for p, part in self._parts.items():
                part.next_offset = part.alerts_offset = 0
                part.published.clear()
                part.pending.clear()
                self._consumer.seek(TopicPartition(self.topic, p), 0)
        log.info("detect_rotated", old_epoch=old, epoch=epoch)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, score and alert until ``stop``; checkpoints before returning.

        May be run again after a failure: each partition resumes from its checkpoint.
        """
        self._parts.clear()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=self.group,
            enable_auto_commit=False, auto_offset_reset="earliest",
        )  # fmt: skip
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all")
        await self._producer.start()
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Rebalance(self))
        log.info("detect_started", group=self.group, topic=self.topic)
        next_checkpoint = time.monotonic() + self.checkpoint_interval_s
        try:
            while not stop.is_set():
                batch = await self._consumer.getmany(timeout_ms=200, max_records=10_000)
                async with self._lock:  # no checkpoint or rotation in the middle of a batch
                    await self._handle(batch)
                    if time.monotonic() >= next_checkpoint:
                        await self._checkpoint_locked()
                        next_checkpoint = time.monotonic() + self.checkpoint_interval_s
            await self._checkpoint()
        finally:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            with contextlib.suppress(Exception):
                await self._producer.stop()
            log.info("detect_stopped", consumed=self.stats.consumed,
                     alerts=self.stats.alerts_published)  # fmt: skip

    async def _handle(self, batch: dict[Any, list[Any]]) -> None:
        """Score every record of ``batch`` and publish the alerts, event by event."""
        for tp, records in batch.items():
            if tp.partition not in self._parts:
                continue
            for record in records:
                part = self._parts.get(tp.partition)
                if part is None or record.offset < part.next_offset:
                    continue
                self.stats.consumed += 1
                part.next_offset = record.offset + 1
                try:
                    ev = decode_stat_event(record.value)
                except (msgspec.ValidationError, msgspec.DecodeError):
                    self.stats.invalid += 1  # the stream worker dead-letters it
                    continue
                if validate(ev, time.time_ns() // 1_000_000) is not None:
                    self.stats.invalid += 1
                    continue
                alerts = part.fleet.process(ev)
                if alerts:
                    await self._publish(tp.partition, record.offset, alerts)
