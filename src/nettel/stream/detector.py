"""The detector worker: every event scored, alerts on ``nettel.alerts`` and in ``alerts``.

It consumes ``nettel.stats`` in the group ``nettel-detect``. Each assigned partition has
its own :class:`~nettel.detect.fleet.FleetDetector` (its containers' models, rules and
alert lifecycles). Alerts are published as they happen (key: the container; partition:
the source partition, so one worker owns both), and every ``checkpoint_interval_s`` the
worker writes, per partition whose state changed: the new alert versions to the
``alerts`` table with the next source offset (one commit, app transaction; none when
there is no new alert), then the detector as a typed checkpoint
(:mod:`nettel.detect.checkpoint`, never pickle) with that offset and the alerts topic's
position (``detect_state``), then, every ``bands_interval_s`` and at the checkpoint of a
stop or a rebalance, the hourly bands that changed (``bands``, what the MCP server
reads; computing them costs more than the checkpoint). Every ``state_vacuum_every``
checkpoints it vacuums ``detect_state`` (the files replaced more than its window of
minutes ago), so the table stays bounded between maintenance passes. An idle service
writes nothing.

A checkpoint that cannot be read (an unknown format version, a malformed or forged
blob) is refused and logged (``detect_checkpoint_refused``); that partition starts cold:
a fresh detector reads it again from its first offset, so the alerts it regenerates
keep their ids and none is published or written twice.

A restart (or a rebalance) restores each partition's detector from its checkpoint and
reads again from its offset: the models replay the same events into the same state, so
they neither forget their baselines nor raise new alerts for old events. The alerts
they regenerate have the ids they had; those already on the topic (read back from the
checkpointed position) are not published again, those already in the table (its app
transaction) not written again.

The topic may hold an event twice (the publisher resends a batch whose send timed out):
an event not newer than its container's last scored one (:meth:`FleetDetector.last_seen
<nettel.detect.fleet.FleetDetector.last_seen>`, part of the checkpoint, so it holds
across a restart) is a copy: dropped, counted and logged, never scored twice.

Feedback (``mark_alert``: false positive) is read from ``alert_feedback`` at each
checkpoint and widens that container's band for that metric and time slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from nettel import metrics
from nettel.detect.alerts import Alert, encode_alert
from nettel.detect.bands import BandTracker
from nettel.detect.checkpoint import CheckpointError, decode_checkpoint, encode_checkpoint
from nettel.detect.fleet import FleetDetector
from nettel.models import StatEvent
from nettel.store.alerts import AlertTable, DetectState, DetectStateTable, FeedbackTable
from nettel.store.bands import BandTable
from nettel.stream.runtime import ConsumerRuntime, ConsumerSettings, completed
from nettel.stream.validation import read_event

log = structlog.get_logger(__name__)


@dataclass
class DetectStats:
    """Counts a detector keeps, for logs and tests."""

    consumed: int = 0
    invalid: int = 0
    alerts_published: int = 0
    alerts_suppressed: int = 0
    checkpoints: int = 0
    checkpoints_refused: int = 0
    scored: int = 0
    duplicates: int = 0


@dataclass
class _Partition:
    fleet: FleetDetector
    next_offset: int
    alerts_offset: int
    #: alert versions found on the topic at resume, with their offsets there
    published: dict[tuple[str, str, int], int] = field(default_factory=dict)
    pending: list[dict[str, Any]] = field(default_factory=list)
    #: the state changed since the last checkpoint (offsets, models, feedback)
    changed: bool = False
    #: the offset the last saved checkpoint resumes from
    saved_offset: int = -1
    bands: BandTracker = field(default_factory=BandTracker)
    #: containers given feedback since their bands were last written
    feedback_for: set[str] = field(default_factory=set)
    #: checkpointed since its bands were last written
    bands_stale: bool = False


class DetectWorker:
    """One member of the ``nettel-detect`` group (any number may run): a job of
    :class:`~nettel.stream.runtime.ConsumerRuntime`, which owns the consumer."""

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
        bands_interval_s: float = 300.0,
        state_vacuum_every: int = 10,
    ) -> None:
        base = data_dir.rstrip("/")
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.alerts_topic = alerts_topic
        self.group = group
        self.checkpoint_interval_s = checkpoint_interval_s
        self.epoch = epoch
        self.fleet_factory = fleet_factory
        self.bands_interval_s = bands_interval_s
        self.state_vacuum_every = state_vacuum_every
        self._bands_due = 0.0  # monotonic time from which the next checkpoint writes bands
        self.alerts = AlertTable(f"{base}/alerts", storage_options=storage_options)
        self.state = DetectStateTable(f"{base}/detect_state", storage_options=storage_options)
        self.feedback = FeedbackTable(f"{base}/alert_feedback", storage_options=storage_options)
        self.bands = BandTable(f"{base}/bands", storage_options=storage_options)
        self.stats = DetectStats()
        self._parts: dict[int, _Partition] = {}
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self._feedback_version = -1
        self.runtime = ConsumerRuntime(
            bootstrap_servers, self,
            ConsumerSettings(group=group, topic=topic, max_records=10_000,
                             tick_interval_s=checkpoint_interval_s),
            epoch=epoch,
        )  # fmt: skip

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

    async def restore(self, partitions: list[int]) -> dict[int, int]:
        """Restore each partition's detector from its checkpoint; the offset to read from."""
        tps = [TopicPartition(self.topic, p) for p in partitions]
        stored = await asyncio.to_thread(self.state.load, partitions)
        starts: dict[int, tuple[Any, int, int]] = {}
        for tp in tps:
            s = stored.get(tp.partition)
            fleet = None if s is None else self._restore(tp.partition, s)
            if s is None or fleet is None:
                starts[tp.partition] = (self.fleet_factory(), 0, 0)
                continue
            same_log = s.epoch == self.epoch
            starts[tp.partition] = (fleet, s.next_offset if same_log else 0,
                                    s.alerts_offset if same_log else 0)  # fmt: skip
        # the checkpoint's alerts offset: alerts of every event from its offset on are at
        # or after it; those already there are not published again (see _publish)
        published = await self._published_since({p: a for p, (_, _, a) in starts.items()})
        for tp in tps:
            fleet, offset, alerts_offset = starts[tp.partition]
            self._parts[tp.partition] = _Partition(fleet, offset, alerts_offset,
                                                   published[tp.partition],
                                                   saved_offset=offset)  # fmt: skip
        log.info("detect_partitions_assigned", group=self.group, partitions=partitions,
                 resumed={p: s.next_offset for p, s in stored.items()})  # fmt: skip
        return {p: self._parts[p].next_offset for p in partitions}

    async def revoked(self, partitions: list[int]) -> None:
        """Checkpoint ``partitions``, then forget them."""
        await self._checkpoint(partitions)
        for p in partitions:
            self._parts.pop(p, None)

    def _restore(self, partition: int, state: DetectState) -> FleetDetector | None:
        """The partition's detector from its checkpoint; None (start cold) when the
        checkpoint is refused: it was not written by this format, or was tampered with."""
        try:
            fleet: FleetDetector = decode_checkpoint(state.blob, FleetDetector)
        except CheckpointError as e:
            self.stats.checkpoints_refused += 1
            log.error("detect_checkpoint_refused", partition=partition, reason=str(e),
                      bytes=len(state.blob), action="starting cold from offset 0")  # fmt: skip
            return None
        return fleet

    async def _publish(self, partition: int, offset: int, alerts: Sequence[Alert]) -> None:
        part = self._parts[partition]
        for a in alerts:
            row = msgspec.to_builtins(a) | {"partition": partition, "offset": offset}
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
            metrics.ALERTS_PUBLISHED.inc()
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
                    part.changed = True
                    part.feedback_for.add(r["container"])
        self._feedback_version = version

    async def _checkpoint(self, partitions: Sequence[int] | None = None) -> None:
        async with self._lock:
            await completed(self._checkpoint_locked(partitions, with_bands=True))

    async def _checkpoint_locked(
        self, partitions: Sequence[int] | None = None, *, with_bands: bool = False
    ) -> None:
        """Write alerts and states. The caller holds the lock, which the run loop holds
        while it handles a batch: the cut falls between events, never inside one."""
        owned = {p: self._parts[p] for p in (partitions or list(self._parts))
                 if p in self._parts}  # fmt: skip
        if not owned:
            return
        await self._apply_feedback()
        # only what changed since the last checkpoint: an idle service writes nothing
        parts = {p: part for p, part in owned.items() if part.changed or part.pending
                 or part.next_offset != part.saved_offset}  # fmt: skip
        for part in parts.values():
            part.bands_stale = True
        due = with_bands or time.monotonic() >= self._bands_due
        band_parts = {p: part for p, part in owned.items() if due and part.bands_stale}
        metrics.ALERTS_OPEN.set(sum(part.fleet.open_alerts for part in self._parts.values()))
        if not parts and not band_parts:
            # nothing changed: the checkpoint is current, so the job is not late
            metrics.JOBS.done("detect_checkpoint", self.checkpoint_interval_s)
            return
        # one consistent cut, taken between two events (the loop runs on meanwhile)
        cut = {p: (list(part.pending), part.next_offset) for p, part in parts.items()}
        # encoded in a thread: the lock keeps every fleet still meanwhile
        states = await asyncio.to_thread(self._snapshot, parts)
        if parts:
            await asyncio.to_thread(self._write_alert_rows, cut)
            await asyncio.to_thread(self.state.save, states)
            for p, (rows, offset) in cut.items():
                del parts[p].pending[: len(rows)]
                parts[p].saved_offset = offset
                parts[p].changed = False
        if band_parts:
            await self._write_bands(band_parts)
            self._bands_due = time.monotonic() + self.bands_interval_s
        if parts:
            self.stats.checkpoints += 1
            if self.stats.checkpoints % self.state_vacuum_every == 0:
                await self._vacuum_state()
        metrics.JOBS.done("detect_checkpoint", self.checkpoint_interval_s)

    async def _vacuum_state(self) -> None:
        """Vacuum ``detect_state`` (the files its checkpoints replaced, once older than
        its window of minutes), so it stays bounded whatever the maintenance interval:
        at a checkpoint every 30 s, about 30 checkpoints' files. A failure is logged and
        the checkpoint stands (the next vacuum, or maintenance, deletes the files)."""
        try:
            removed = await asyncio.to_thread(self.state.vacuum)
        except Exception as e:
            log.warning("detect_state_not_vacuumed", error=repr(e))
            return
        if removed:
            log.info("detect_state_vacuumed", files=removed)

    def _snapshot(self, parts: dict[int, _Partition]) -> list[DetectState]:
        """The checkpoint of each of ``parts``."""
        return [
            DetectState(p, self.epoch, part.next_offset, part.alerts_offset,
                        self._feedback_version, encode_checkpoint(part.fleet))
            for p, part in parts.items()
        ]  # fmt: skip

    async def _write_bands(self, band_parts: dict[int, _Partition]) -> None:
        """Upsert the bands that changed, one partition at a time (derived data: a failed
        write is logged and tried again at the next checkpoint, as the rows still differ).
        The caller holds the lock, so the fleets stay as they were cut. One partition at
        a time because the changed rows are dicts: at 200 containers, those of every
        partition at once were ~130 MB of Python objects (twice that with a copy)."""
        for p, part in band_parts.items():
            fed = list(part.feedback_for)
            changed = await asyncio.to_thread(part.bands.changes, part.fleet, fed)
            try:
                await asyncio.to_thread(self.bands.upsert, changed, partition=p)
            except Exception as e:
                log.warning("detect_bands_not_written", partition=p, rows=len(changed),
                            error=repr(e))  # fmt: skip
                return
            part.bands.written(changed)
            part.feedback_for.difference_update(fed)
            part.bands_stale = False

    def _write_alert_rows(self, cut: dict[int, tuple[list[dict[str, Any]], int]]) -> None:
        """Alert rows not yet in the table, with each partition's next offset, one commit
        (none without rows: a replay from the state's offset regenerates no alert here)."""
        written = self.alerts.append_unwritten(cut, writer=self.group, topic=self.topic,
                                               epoch=self.epoch)  # fmt: skip
        metrics.ROWS_WRITTEN.labels("alerts").inc(written)

    async def drained(self) -> bool:
        """Whether every partition has been read to its end and checkpointed (the
        embedded broker's rotation waits for this before it replaces the log; see
        :meth:`~nettel.stream.runtime.ConsumerRuntime.drained`)."""
        return await self.runtime.drained()

    async def rotated(self, epoch: int) -> None:
        """The embedded broker was replaced: keep the models, read the new log from 0."""
        await self.runtime.rotated(epoch)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, score and alert until ``stop``; checkpoints before returning."""
        await self.runtime.run(stop)

    # -- the job the runtime runs ------------------------------------------------------

    async def open(self) -> None:
        """Start the alerts producer. A run after a failed one (a supervisor's restart)
        begins with no partition: each is restored from its checkpoint when assigned."""
        self._parts.clear()
        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all")
        await self._producer.start()
        log.info("detect_started", group=self.group, topic=self.topic)

    async def close(self) -> None:
        """Stop the alerts producer."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        log.info("detect_stopped", consumed=self.stats.consumed,
                 alerts=self.stats.alerts_published)  # fmt: skip

    async def tick(self) -> None:
        """Checkpoint every ``checkpoint_interval_s``; the bands only once
        ``bands_interval_s`` has passed (their merge takes seconds and a transient
        ~250 MB: merged at every tick, it made the soak's RSS spikes)."""
        async with self._lock:
            await completed(self._checkpoint_locked())

    async def seal(self) -> None:
        """Checkpoint everything read (a barrier)."""
        await self._checkpoint()

    async def finish(self) -> None:
        """Checkpoint before stopping."""
        await self._checkpoint()

    def idle(self, partition: int, now_ms: int) -> None:
        """Nothing to do: scores need events."""

    async def reset(self, epoch: int, sealed: bool) -> list[int]:
        """Keep the models; every owned partition reads the new log from 0."""
        async with self._lock:
            old, self.epoch = self.epoch, epoch
            for part in self._parts.values():
                part.next_offset = part.alerts_offset = 0
                part.changed = True
                part.published.clear()
                part.pending.clear()
        log.info("detect_rotated", old_epoch=old, epoch=epoch, sealed=sealed)
        return list(self._parts)

    async def process(self, batch: Mapping[int, Sequence[Any]], now_ms: int) -> None:
        """Score a batch; no checkpoint or rotation runs in the middle of it."""
        async with self._lock:
            await self._handle(batch)

    def _count_copies(self, partition: int, copies: int) -> None:
        self.stats.duplicates += copies
        metrics.DUPLICATES_DROPPED.labels("detect").inc(copies)
        log.warning("duplicates_dropped", worker="detect", topic=self.topic,
                    partition=partition, count=copies, total=self.stats.duplicates)  # fmt: skip

    async def _handle(self, batch: Mapping[int, Sequence[Any]]) -> None:
        """Score each partition's records of ``batch`` at once (the fleet scores them in
        rounds, as if one by one) and publish the alerts in the order of their events."""
        for partition, records in batch.items():
            part = self._parts.get(partition)
            if part is None:
                continue
            events: list[StatEvent] = []
            offsets: list[int] = []
            now_ms = time.time_ns() // 1_000_000
            newest: dict[str, int] = {}  # this batch's newest event per container
            copies = 0
            for record in records:
                if record.offset < part.next_offset:
                    continue
                self.stats.consumed += 1
                part.next_offset = record.offset + 1
                ev, _ = read_event(record.value, now_ms)
                if ev is None:
                    self.stats.invalid += 1  # the stream worker dead-letters it
                    continue
                last = newest.get(ev.identity)
                if last is None:
                    last = part.fleet.last_seen(ev.identity)
                if last is not None and ev.ts_ms <= last:
                    copies += 1  # a copy of an event already scored (a resend)
                    continue
                newest[ev.identity] = ev.ts_ms
                events.append(ev)
                offsets.append(record.offset)
            if copies:
                self._count_copies(partition, copies)
            if not events:
                continue
            self.stats.scored += len(events)
            raised = part.fleet.process_indexed(events)
            for i, group in itertools.groupby(raised, key=lambda pair: pair[0]):
                await self._publish(partition, offsets[i], [a for _, a in group])
