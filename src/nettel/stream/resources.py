"""The resource stream: ``nettel.resources`` into ``resource_minute`` (and its rollups).

The same exactly-once rules as the network stream, on the same machinery: a member of
its own consumer group (``nettel-resources``) run by
:class:`~nettel.stream.runtime.ConsumerRuntime` (rebalances, idle watermark, barriers,
rotations), event-time windows with grace (:class:`ResourceWindows`, the windows of
:class:`~nettel.stream.windows.PartitionWindows` folding
:class:`~nettel.models.ResourceAggregate` s), every flush one Delta commit holding the
closed windows and each partition's replay point
(:class:`~nettel.store.resources.ResourceMinuteTable`), restores from those points, then
rolls into ``resource_hour`` and ``resource_day``. Records that do not decode or
validate go to the dead-letter topic with the reason in a header.

A resource event not newer than the last one folded for its container is a copy (the
publisher resends a batch whose send timed out) and is dropped, counted and logged
(:mod:`nettel.stream.dedupe`). There is no samples table to read what was folded before a
partition's resume point, so on assignment the worker reads up to
:data:`DEDUPE_LOOKBACK_RECORDS` records before it again, only to note their times.

It runs apart from the network stream so that the network hot path (its event format,
its worker) stays exactly as it is, and a slow resource commit never delays it.

Given an ``alerts`` table, it also **detects**: every event goes through its partition's
:class:`~nettel.detect.resources.ResourceAlerts` (a memory leak with its time to the
limit, OOM kills, CPU throttling), whose alert versions are published on the alerts
topic as they happen (key: the container) and written to ``alerts`` at each flush,
before the windows' commit, with each partition's next offset as an app transaction
(writer ``nettel-resources``), so a replay writes none twice. This worker, not the
detector worker, runs it because it already reads every resource event once, keyed by
container, and the signals need only the last ``window_s`` of samples: a second
consumer group would read and decode the topic again for three small signals, and the
detector's checkpointed per-partition models are built for the network metrics. The
signals' short history is not checkpointed: after a restart it is rebuilt from the
replayed events (those of the open windows), and the incidents the table holds open
for the partition are adopted (:meth:`~nettel.detect.resources.ResourceAlerts.adopt`:
carried on under their id when found again, else resolved); alerts of events read
before the last stored point are not published again, those after it may be (same ids
while the history is the same: a consumer de-duplicates by ``id``, ``status``,
``updated_ms``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaProducer

from nettel import metrics
from nettel.detect.alerts import Alert, encode_alert
from nettel.detect.resources import KIND_METRICS, ResourceAlerts
from nettel.models import ReplayPoint, ResourceAggregate, ResourceEvent, decode_resource_event
from nettel.store.alerts import AlertTable
from nettel.store.minute import MinuteTable, PartitionPoint
from nettel.store.rollup import RollupTable
from nettel.stream.dedupe import LastFolded
from nettel.stream.runtime import ConsumerRuntime, ConsumerSettings, completed
from nettel.stream.validation import send_dead_letter
from nettel.stream.windows import MAX_ROW_COVER_MS, PartitionWindows, _Open

log = structlog.get_logger(__name__)

#: Records read again before a partition's resume point on assignment, only to learn
#: what was folded there (copies of them after it are then recognised).
DEDUPE_LOOKBACK_RECORDS = 20_000


class ResourceWindows(PartitionWindows):
    """:class:`PartitionWindows` (closing, late partials, seal, replay points) whose
    windows fold :class:`ResourceEvent` s into :class:`ResourceAggregate` s.

    Examples
    --------
    >>> pw = ResourceWindows(grace_ms=30_000)
    >>> ev = lambda ts: ResourceEvent(ts_ms=ts, host="h", container_id="c", identity="web",
    ...                               name="web", interval_ms=5000, cpu_usage_us=10)
    >>> pw.add(ev(10_000), 0); pw.add(ev(95_000), 1); pw.add(ev(20_000), 2)
    >>> [(w.window_start_ms, w.sums["cpu_usage_us"]) for w in pw.close_ready()], pw.late
    ([(0, 10), (0, 10)], 1)
    """

    def add(self, ev: Any, offset: int) -> str | None:
        """Fold one resource sample (at ``offset``) into its window; why it was refused,
        or None (the rules of :meth:`PartitionWindows.add`)."""
        before = self.event_time_ms
        self._next_offset = offset + 1
        span = self.size_ms + self.grace_ms
        start = ev.ts_ms - ev.ts_ms % self.size_ms
        replay = self.replay
        replaying = replay is not None and offset < replay.next_offset
        key = (ev.identity, start)
        if start + span <= before:  # late: a partial row of its window
            if replaying:
                self.replayed += 1
                return None
            table, time_before = self._late, before
            self.late += 1
        else:
            self.event_time_ms = max(before, ev.ts_ms)
            if replaying and replay is not None and start + span <= replay.written_through_ms:
                self.replayed += 1
                table = None
            else:
                table, time_before = self._open, before
        reason = None
        if table is not None:
            entry = table.get(key)
            if entry is None:
                agg0: Any = ResourceAggregate.first(ev, self.size_ms)
                entry = table[key] = _Open(agg0, offset, time_before)
                if table is self._open and (
                    self._earliest_start is None or start < self._earliest_start
                ):
                    self._earliest_start = start
            agg: Any = entry.agg
            if agg.interval_ms + 1000 * agg.samples + ev.interval_ms + 1000 > MAX_ROW_COVER_MS:
                reason = f"its window row {key[0]}@{key[1]} would cover more than " \
                         f"{MAX_ROW_COVER_MS} ms of samples"  # fmt: skip
            else:
                agg.add(ev)
        earliest = self._earliest_start
        if earliest is not None and earliest + span <= self.event_time_ms:
            self._close_due()
        return reason


class ResourceStreamWorker:
    """One member of the ``nettel-resources`` group: resource events into their tables.

    ``fresh_log``: the log began empty with this worker (the embedded broker), so points
    stored under its epoch before this worker wrote any are an earlier log's (one with the
    same epoch number) and are ignored, as :class:`~nettel.stream.worker.StreamWorker`
    does; the same holds for the log of every epoch a rotation announces. ``alerts``:
    the table resource alerts go to (None: no detection), ``detector_factory`` makes
    each partition's :class:`~nettel.detect.resources.ResourceAlerts`.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        table: MinuteTable,
        *,
        topic: str = "nettel.resources",
        dlq_topic: str = "nettel.stats.dlq",
        group: str = "nettel-resources",
        grace_ms: int = 30_000,
        flush_interval_s: float = 30.0,
        epoch: int = 0,
        rollups: Sequence[RollupTable] = (),
        rollup_interval_s: float = 0.0,
        seal_on_stop: bool = False,
        idle_timeout_s: float = 2.0,
        fresh_log: bool = False,
        alerts: AlertTable | None = None,
        alerts_topic: str = "nettel.alerts",
        detector_factory: Callable[[], ResourceAlerts] = ResourceAlerts,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.table = table
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.group = group
        self.grace_ms = grace_ms
        self.flush_interval_s = flush_interval_s
        self.epoch = epoch
        self.rollups = list(rollups)
        self.rollup_interval_s = rollup_interval_s
        self.alerts = alerts
        self.alerts_topic = alerts_topic
        self.detector_factory = detector_factory
        self.consumed = 0
        self.dead_lettered = 0
        self.alerts_published = 0
        self._detectors: dict[int, ResourceAlerts] = {}
        #: per partition: the first offset whose alerts were not published before a restart
        self._live_from: dict[int, int] = {}
        self._alert_rows: dict[int, list[dict[str, Any]]] = {}
        self.windows_written = 0
        self.duplicates = 0
        self._next_roll = 0.0
        self._windows: dict[int, ResourceWindows] = {}
        #: per partition, each container's newest folded time, and the resume offset
        #: below which records are read only to learn it
        self._seen: dict[int, LastFolded] = {}
        self._resume: dict[int, int] = {}
        self._fresh_epochs = {epoch} if fresh_log else set()
        self._written: set[tuple[int, int]] = set()  # (epoch, partition) with points stored
        self._dlq: Any = None
        self._flush_lock = asyncio.Lock()
        self.runtime = ConsumerRuntime(
            bootstrap_servers, self,
            ConsumerSettings(group=group, topic=topic, tick_interval_s=flush_interval_s,
                             idle_timeout_s=idle_timeout_s, seal_on_stop=seal_on_stop),
            epoch=epoch,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, window and write until ``stop``."""
        await self.runtime.run(stop)

    async def drained(self) -> bool:
        """Whether everything the broker holds is written (the rotation barrier)."""
        return await self.runtime.drained()

    async def rotated(self, epoch: int) -> None:
        """The broker's log was replaced by an empty one of ``epoch``: read it from 0."""
        await self.runtime.rotated(epoch)

    # -- the job the runtime runs ------------------------------------------------------

    async def open(self) -> None:
        """Start the producer (dead letters and alerts)."""
        self._windows.clear()
        self._seen.clear()
        self._resume.clear()
        self._dlq = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all")
        await self._dlq.start()
        log.info("resource_stream_started", group=self.group, topic=self.topic)

    async def close(self) -> None:
        """Stop the dead-letter producer; safe to call twice."""
        if self._dlq is not None:
            await self._dlq.stop()
            self._dlq = None
        log.info("resource_stream_stopped", consumed=self.consumed,
                 windows_written=self.windows_written,
                 dead_lettered=self.dead_lettered)  # fmt: skip

    def new_windows(self, replay: ReplayPoint | None = None) -> ResourceWindows:
        """A partition's windows as this worker folds them (its grace), resuming from
        ``replay`` if given: what :meth:`restore` and :meth:`reset` give each partition,
        and what a benchmark folds with."""
        return ResourceWindows(self.grace_ms, replay=replay)

    async def restore(self, partitions: list[int]) -> dict[int, int]:
        """Restore ``partitions`` from the points stored with the rows."""
        async with self._flush_lock:
            points: dict[int, ReplayPoint] = await asyncio.to_thread(
                self.table.replay_points, self.group, self.topic, partitions, epoch=self.epoch
            )
            if self.epoch in self._fresh_epochs:  # an earlier log's points: not ours
                points = {p: v for p, v in points.items() if (self.epoch, p) in self._written}
            still_open = await asyncio.to_thread(self._still_open, partitions)
            for p in partitions:
                self._windows[p] = self.new_windows(points.get(p))
                self._seen[p] = LastFolded()
                self._resume[p] = 0 if p not in points else points[p].resume_offset
                self._detectors[p] = self.detector_factory()
                self._detectors[p].adopt(a for q, a in still_open if q == p)
                self._live_from[p] = points[p].next_offset if p in points else 0
                self._alert_rows[p] = []
            return {p: max(0, self._resume[p] - DEDUPE_LOOKBACK_RECORDS) for p in partitions}

    async def revoked(self, partitions: list[int]) -> None:
        """Write what closed, then forget ``partitions``."""
        await self._flush()
        for p in partitions:
            self._windows.pop(p, None)
            self._seen.pop(p, None)
            self._resume.pop(p, None)
            self._detectors.pop(p, None)
            self._alert_rows.pop(p, None)

    async def tick(self) -> None:
        """Write what closed."""
        await self._flush()

    async def finish(self) -> None:
        """Write what closed before stopping."""
        await self._flush()

    async def seal(self) -> None:
        """Write every open window too (the log is about to go)."""
        await self._flush(seal=True)

    def idle(self, partition: int, now_ms: int) -> None:
        """The idle watermark: close the windows the clock has passed."""
        pw = self._windows.get(partition)
        if pw is not None:
            pw.advance(now_ms)

    async def reset(self, epoch: int, sealed: bool) -> list[int]:
        """Start every owned partition afresh for the empty log of ``epoch``."""
        async with self._flush_lock:
            if not sealed:
                await self._flush_locked(seal=True)
            self.epoch = epoch
            self._fresh_epochs.add(epoch)
            for p in self._windows:
                self._windows[p] = self.new_windows()
                self._resume[p] = 0
                self._live_from[p] = 0  # the signals' history stays; the log starts anew
            return list(self._windows)

    async def process(self, batch: Mapping[int, Sequence[Any]], now_ms: int) -> None:
        """Decode and fold in every record; refused ones go to the dead-letter topic."""
        for partition, records in batch.items():
            pw = self._windows.get(partition)
            seen = self._seen.get(partition)
            if pw is None or seen is None:
                continue
            resume = self._resume.get(partition, 0)
            copies = 0
            for record in records:
                looking_back = record.offset < resume
                self.consumed += not looking_back
                try:
                    ev: ResourceEvent | None = decode_resource_event(record.value)
                    reason = None
                except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as e:
                    ev, reason = None, f"not a resource event: {e}"
                if ev is not None and not seen.admit(ev.identity, ev.ts_ms):
                    if not looking_back:  # a copy of one already folded (a resend)
                        copies += 1
                        pw.passed(record.offset)
                    continue
                if looking_back:
                    continue  # folded and written before the resume point: times only
                if ev is not None:
                    reason = pw.add(ev, record.offset)
                if ev is not None and reason is None and self.alerts is not None:
                    await self._detect(partition, ev, record.offset)
                if reason is not None:
                    await self._dead_letter(record, reason)
                    if self._windows.get(partition) is not pw:
                        break  # revoked or restored meanwhile
            if copies:
                self.duplicates += copies
                metrics.DUPLICATES_DROPPED.labels("resources").inc(copies)
                log.warning("duplicates_dropped", worker="resources", topic=self.topic,
                            partition=partition, count=copies,
                            total=self.duplicates)  # fmt: skip

    # -- internals -----------------------------------------------------------------------

    async def _flush(self, *, seal: bool = False) -> None:
        async with self._flush_lock:
            await completed(self._flush_locked(seal=seal))

    async def _flush_locked(self, *, seal: bool) -> None:
        rows: list[ResourceAggregate] = []
        points = []
        for partition, pw in self._windows.items():
            if partition in self._seen:
                self._seen[partition].forget_gone()
            if seal:
                pw.seal()
            closed: list[Any] = pw.close_ready()
            for row in closed:
                row.partition = partition
            rows.extend(closed)
            point = pw.replay_point()
            if point is not None:
                points.append(PartitionPoint(self.topic, partition, point))
        if not points:
            return
        cut = {p.partition: (list(self._alert_rows.get(p.partition, ())), p.point.next_offset)
               for p in points}  # fmt: skip
        await asyncio.to_thread(self._write_alert_rows, cut)
        for p, (written, _) in cut.items():
            del self._alert_rows[p][: len(written)]
        await asyncio.to_thread(
            self.table.append, rows, points, writer=self.group, epoch=self.epoch
        )
        self._written.update((self.epoch, p.partition) for p in points)
        self.windows_written += len(rows)
        metrics.ROWS_WRITTEN.labels("resource_minute").inc(len(rows))
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_roll:
            await asyncio.to_thread(self._roll, [p.partition for p in points])
            self._next_roll = loop.time() + self.rollup_interval_s
        await self.runtime.commit({p.partition: p.point.next_offset for p in points})

    def _still_open(self, partitions: list[int]) -> list[tuple[int, Alert]]:
        """(partition, alert) of the resource alerts a previous run left open (a day back)."""
        if self.alerts is None:
            return []
        since_ms = time.time_ns() // 1_000_000 - 86_400_000
        rows = self.alerts.still_open(KIND_METRICS, partitions, since_ms)
        return [(r["partition"], msgspec.convert(r, Alert)) for r in rows]

    async def _detect(self, partition: int, ev: ResourceEvent, offset: int) -> None:
        """Run the partition's signals on ``ev``; publish and keep the alerts it raises
        (not again those of an event read before the last stored point)."""
        detector = self._detectors.get(partition)
        if detector is None:
            return
        for a in detector.update(ev):
            if offset < self._live_from.get(partition, 0):
                continue
            self._alert_rows[partition].append(
                msgspec.to_builtins(a) | {"partition": partition, "offset": offset}
            )
            await self._publish(a)

    async def _publish(self, a: Alert) -> None:
        await self._dlq.send_and_wait(self.alerts_topic, encode_alert(a),
                                      key=a.identity.encode())  # fmt: skip
        self.alerts_published += 1
        metrics.ALERTS_PUBLISHED.inc()
        log.info("alert", id=a.id, status=a.status, container=a.identity, metric=a.metric,
                 rule=a.rule, severity=a.severity, explanation=a.explanation)  # fmt: skip

    def _write_alert_rows(self, cut: dict[int, tuple[list[dict[str, Any]], int]]) -> None:
        """Alert rows not yet in the table, with each partition's next offset, one commit
        (none without rows)."""
        if self.alerts is not None:
            written = self.alerts.append_unwritten(cut, writer=self.group, topic=self.topic,
                                                   epoch=self.epoch)  # fmt: skip
            metrics.ROWS_WRITTEN.labels("alerts").inc(written)

    def _roll(self, partitions: list[int]) -> None:
        for table in self.rollups:
            for p in partitions:
                table.roll(p, writer=self.group, topic=self.topic)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        self.dead_lettered += 1
        await send_dead_letter(self._dlq, self.dlq_topic, record, reason)
