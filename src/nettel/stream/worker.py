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

With a ``samples`` table it also writes every valid event, in its own commit (before
the windows') carrying its own per-partition points: a replay adds no sample twice.

The embedded broker's log does not outlive it (a rotation swaps in an empty one, a
stop ends it), yet open windows hold events that only that log has. So before it goes
the worker is asked :meth:`StreamWorker.drained`: it reads to the log's end, writes its
open windows as partial rows (rows are additive: a window's later samples make another
row) with replay points at the end, and only then answers True. After
:meth:`StreamWorker.rotated` it reads the new log from offset 0 under the new epoch,
whose replay points are kept apart (:meth:`~nettel.store.minute.MinuteTable.app_id`).
With ``seal_on_stop`` it does the same when stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from nettel.broker import EPOCH_HEADER
from nettel.models import COUNTERS, ReplayPoint, StatEvent, decode_stat_event
from nettel.store.minute import MinuteTable, PartitionPoint
from nettel.store.rollup import RollupTable
from nettel.store.samples import PartitionSamples, SamplesTable
from nettel.stream.windows import PartitionWindows

log = structlog.get_logger(__name__)

DAY_MS = 86_400_000

_counters_of = attrgetter(*COUNTERS)

#: How long the broker holds a fetch with nothing to return: a fetch answered later
#: than this after a moment was sent after it, so its high watermark is that late.
#: Short, so a barrier (a rotation, a stop) waits little; idle, it costs ten small
#: fetches a second.
FETCH_MAX_WAIT_MS = 100


def record_epoch(headers: Sequence[tuple[str, bytes]] | None) -> int | None:
    """The embedded broker epoch a record was published in (None: not stamped).

    Examples
    --------
    >>> record_epoch([("nettel-epoch", b"4")]), record_epoch([]), record_epoch(None)
    (4, None, None)
    """
    for key, value in headers or ():
        if key == EPOCH_HEADER:
            with contextlib.suppress(ValueError):
                return int(value)
    return None


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
    counters = _counters_of(ev)
    if min(counters) < 0:
        for name, value in zip(COUNTERS, counters, strict=True):
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
    samples_written: int = 0
    seals: int = 0
    stale_skipped: int = 0


@dataclass
class _Barrier:
    """A request to have everything the broker holds durably written (see ``drained``)."""

    since_ms: int  # wall clock of the request: only fetches answered later count
    expires: float  # monotonic: the request lapses when nobody asks any more
    whole_topic: bool = True  # every partition of the topic must be this worker's
    sealed: bool = False


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.worker._flush()
        for tp in revoked:
            self.worker._forget(tp.partition)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.worker._resume(list(assigned))


class StreamWorker:
    """One member of the ``nettel-stream`` group (any number may run).

    ``samples``: also write every valid event there. ``epoch``: the embedded broker's
    log epoch (0 for an external broker); records stamped with an older one are from a
    log already replaced and are skipped. ``seal_on_stop``: the log dies with the
    process (the embedded broker), so on stop read it to the end and write the open
    windows as partial rows (for at most ``seal_timeout_s``). ``fresh_log``: the log
    began empty with this worker (the embedded broker again), so points stored for its
    epoch before this worker wrote any belong to an earlier log that had the same epoch
    number (a data dir on S3 keeps no epoch file) and are ignored; the same holds for
    the log of every epoch :meth:`rotated` announces.
    """

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
        samples: SamplesTable | None = None,
        seal_on_stop: bool = False,
        seal_timeout_s: float = 10.0,
        fresh_log: bool = False,
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
        self.samples = samples
        self.seal_on_stop = seal_on_stop
        self.seal_timeout_s = seal_timeout_s
        self._next_roll = 0.0
        self.stats = WorkerStats()
        self._windows: dict[int, PartitionWindows] = {}
        self._positions: dict[int, int] = {}  # next offset to read, every record counted
        self._samples_buf: dict[int, list[tuple[int, StatEvent]]] = {}
        self._samples_done: dict[int, int] = {}  # next offset the samples table lacks
        self._barrier: _Barrier | None = None
        self._fresh_epochs = {epoch} if fresh_log else set()  # logs that began with us
        # (epoch, partition) this worker has stored points for, per table
        self._written: dict[str, set[tuple[int, int]]] = {"minute": set(), "samples": set()}
        self._consumer: Any = None
        self._dlq: Any = None
        self._flush_lock = asyncio.Lock()

    @property
    def assigned(self) -> list[int]:
        """Partitions this worker owns now."""
        return sorted(self._windows)

    def _forget(self, partition: int) -> None:
        for state in (self._windows, self._positions, self._samples_buf, self._samples_done):
            state.pop(partition, None)

    def _stale(self, table: str, partition: int) -> bool:
        """Whether ``table``'s point for ``partition`` in this epoch is an earlier log's."""
        return (self.epoch in self._fresh_epochs
                and (self.epoch, partition) not in self._written[table])  # fmt: skip

    def _stored(self, partitions: list[int]) -> tuple[dict[int, ReplayPoint], dict[int, int]]:
        points = self.table.replay_points(self.group, self.topic, partitions, epoch=self.epoch)
        done = {} if self.samples is None else self.samples.stored_offsets(
            self.group, self.topic, partitions, epoch=self.epoch)  # fmt: skip
        stale = sorted({p for p in points if self._stale("minute", p)}
                       | {p for p in done if self._stale("samples", p)})  # fmt: skip
        if stale:
            log.warning("stream_stale_points_ignored", epoch=self.epoch, partitions=stale,
                        reason="the log began with this worker: an earlier log had the "
                        "same epoch number")  # fmt: skip
        points = {p: v for p, v in points.items() if not self._stale("minute", p)}
        done = {p: v for p, v in done.items() if not self._stale("samples", p)}
        return points, done

    async def _resume(self, tps: list[TopicPartition]) -> None:
        async with self._flush_lock:
            partitions = [tp.partition for tp in tps]
            points, done = await asyncio.to_thread(self._stored, partitions)
            for tp in tps:
                point = points.get(tp.partition)
                self._windows[tp.partition] = PartitionWindows(self.grace_ms, replay=point)
                offset = 0 if point is None else point.resume_offset
                self._positions[tp.partition] = offset
                self._samples_buf[tp.partition] = []
                self._samples_done[tp.partition] = done.get(tp.partition, 0)
                self._consumer.seek(tp, offset)
            log.info("partitions_assigned", group=self.group, partitions=partitions,
                     epoch=self.epoch,
                     resumed={p: pt.resume_offset for p, pt in points.items()})  # fmt: skip

    async def _flush(self, *, seal: bool = False) -> None:
        async with self._flush_lock:
            await self._flush_locked(seal=seal)

    async def _flush_locked(self, *, seal: bool) -> None:
        """Write what closed (every open window too if ``seal``), samples first."""
        rows = []
        points = []
        parts = []
        for partition, pw in self._windows.items():
            if seal:
                pw.seal()
            closed = pw.close_ready()
            for row in closed:
                row.partition = partition
            rows.extend(closed)
            point = pw.replay_point()
            if point is not None:
                points.append(PartitionPoint(self.topic, partition, point))
            position = self._positions.get(partition, 0)
            if self.samples is not None and position > self._samples_done.get(partition, 0):
                buf = self._samples_buf.get(partition, [])
                parts.append(PartitionSamples(self.topic, partition, buf, position))
        if parts and self.samples is not None:
            # the table's points are re-read at the write (narrowing any overlap with a
            # previous owner) but for those of an earlier log (see ``fresh_log``)
            known = {p.partition: self._samples_done.get(p.partition, 0) for p in parts
                     if self._stale("samples", p.partition)}  # fmt: skip
            written = await asyncio.to_thread(
                self.samples.append_samples, parts, writer=self.group, epoch=self.epoch,
                known=known,
            )  # fmt: skip
            self.stats.samples_written += written
            for part in parts:
                self._written["samples"].add((self.epoch, part.partition))
                self._samples_done[part.partition] = part.next_offset
                self._samples_buf[part.partition] = []
        if not points:
            return
        await asyncio.to_thread(
            self.table.append, rows, points, writer=self.group, epoch=self.epoch
        )
        self._written["minute"].update((self.epoch, p.partition) for p in points)
        self.stats.windows_written += len(rows)
        self.stats.flushes += 1
        self.stats.seals += seal
        if time.monotonic() >= self._next_roll:
            await asyncio.to_thread(self._roll, [p.partition for p in points])
            self._next_roll = time.monotonic() + self.rollup_interval_s
        self.stats.late = sum(pw.late for pw in self._windows.values())
        with contextlib.suppress(Exception):  # for lag tools only; the store is the truth
            offsets = {TopicPartition(self.topic, p.partition): p.point.next_offset for p in points}
            # bounded: a broker being replaced must not hold the flush lock for long
            await asyncio.wait_for(self._consumer.commit(offsets), 5.0)

    async def drained(self) -> bool:
        """Whether everything the broker holds is durably written (the rotation barrier).

        Ask with the producers paused, and keep asking (a request lapses two seconds
        after the last ask). The first ask makes the worker read every partition to the
        end its broker reports after the ask, then write its open windows as partial
        rows with replay points at the log's end; from then on, until it reads anything
        new, the answer is True. Every partition of the topic must be this worker's.
        """
        now = time.monotonic()
        barrier = self._barrier
        if barrier is None or now > barrier.expires:
            barrier = self._barrier = _Barrier(since_ms=time.time_ns() // 1_000_000,
                                               expires=now)  # fmt: skip
            log.info("stream_barrier_requested", partitions=self.assigned, epoch=self.epoch)
        barrier.expires = now + 2.0
        return barrier.sealed

    async def rotated(self, epoch: int) -> None:
        """The broker's log was replaced by an empty one of ``epoch``: read it from 0.

        If the rotation did not wait for :meth:`drained` (forced), what was read is
        written first, under the old epoch; what was not is gone with the old log.
        """
        async with self._flush_lock:
            if self._barrier is None or not self._barrier.sealed:
                log.warning("stream_rotated_unsealed", epoch=self.epoch, new_epoch=epoch)
                await self._flush_locked(seal=True)
            old, self.epoch, self._barrier = self.epoch, epoch, None
            self._fresh_epochs.add(epoch)  # the new log is empty: nothing in it is written
            partitions = list(self._windows)
            for p in partitions:
                self._windows[p] = PartitionWindows(self.grace_ms)
                self._positions[p] = 0
                self._samples_buf[p] = []
                self._samples_done[p] = 0
                with contextlib.suppress(Exception):  # not assigned any more: resumed later
                    self._consumer.seek(TopicPartition(self.topic, p), 0)
            log.info("stream_rotated", old_epoch=old, epoch=epoch, partitions=partitions)

    def _caught_up(self, barrier: _Barrier) -> bool:
        """Whether every partition was read to an end reported after ``barrier`` began."""
        consumer = self._consumer
        if not self._windows:
            return not barrier.whole_topic
        if barrier.whole_topic:
            partitions = consumer.partitions_for_topic(self.topic) or set()
            if not partitions or set(partitions) - set(self._windows):
                return False
        assigned = consumer.assignment()
        for p in self._windows:
            tp = TopicPartition(self.topic, p)
            if tp not in assigned:
                return False
            polled = consumer.last_poll_timestamp(tp)
            end = consumer.highwater(tp)
            if polled is None or end is None or polled < barrier.since_ms + FETCH_MAX_WAIT_MS:
                return False
            if self._positions.get(p, 0) < end:
                return False
        return True

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

    async def _poll(self) -> None:
        """Fetch one batch, fold it in, and seal if a barrier asks and the end is read."""
        batch = await self._consumer.getmany(timeout_ms=200, max_records=self.max_records)
        now_ms = time.time_ns() // 1_000_000
        read = False
        stats = self.stats
        positions = self._positions
        keep_samples = self.samples is not None
        for tp, records in batch.items():
            partition = tp.partition
            pw = self._windows.get(partition)
            if pw is None:
                continue  # revoked meanwhile
            add = pw.add
            buf = self._samples_buf.setdefault(partition, [])
            done = self._samples_done.get(partition, 0)
            for record in records:
                if self.epoch:
                    stamped = record_epoch(record.headers)
                    if stamped is not None and stamped < self.epoch:
                        stats.stale_skipped += 1  # fetched from the replaced log
                        continue
                stats.consumed += 1
                offset = record.offset
                positions[partition] = offset + 1
                read = True
                try:
                    ev = decode_stat_event(record.value)
                    reason = validate(ev, now_ms)
                except (msgspec.ValidationError, msgspec.DecodeError) as e:
                    reason = f"invalid event: {e}"
                if reason is not None:
                    await self._dead_letter(record, reason)
                    # a rebalance or a flush may have run meanwhile: a partition revoked
                    # (or assigned again, from its stored point) drops the rest of this
                    # batch; a flushed samples buffer is looked up again
                    if self._windows.get(partition) is not pw:
                        break
                    buf = self._samples_buf.setdefault(partition, [])
                    done = self._samples_done.get(partition, 0)
                    continue
                add(ev, offset)
                if keep_samples and offset >= done:
                    buf.append((offset, ev))
        barrier = self._barrier
        if barrier is None or time.monotonic() > barrier.expires:
            return
        if read:
            barrier.sealed = False  # something new arrived: seal again once it is read
        if not barrier.sealed and self._caught_up(barrier):
            await self._flush(seal=True)
            barrier.sealed = True
            log.info("stream_sealed", epoch=self.epoch, positions=dict(self._positions))

    async def _seal_before_stop(self) -> None:
        """Read this worker's partitions to the end and write every open window."""
        if not self._windows:
            return
        deadline = time.monotonic() + self.seal_timeout_s
        self._barrier = _Barrier(since_ms=time.time_ns() // 1_000_000, expires=math.inf,
                                 whole_topic=False)  # fmt: skip
        while not self._barrier.sealed and time.monotonic() < deadline:
            await self._poll()
        if not self._barrier.sealed:
            log.warning("stream_stopped_behind", positions=dict(self._positions),
                        seal_timeout_s=self.seal_timeout_s)  # fmt: skip
            await self._flush(seal=True)

    def _drop_unwritten(self) -> None:
        """Forget every partition's unwritten state: the next assignment resumes each one
        from the points stored in the tables (what a restarted process would do)."""
        for state in (self._windows, self._positions, self._samples_buf, self._samples_done):
            state.clear()
        self._barrier = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, window and write until ``stop``; flushes what closed before returning
        (and, with ``seal_on_stop``, reads to the end and writes the open windows too).

        After a failure (a write refused: disk full) the worker may be run again: it
        drops what it had not written and resumes from the stored points, keeping which
        points it wrote itself (see ``fresh_log``).
        """
        self._drop_unwritten()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=self.group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 << 20, fetch_max_bytes=32 << 20,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )  # fmt: skip
        self._dlq = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers)
        await self._dlq.start()
        await self._consumer.start()
        self._consumer.subscribe([self.topic], listener=_Rebalance(self))
        log.info("stream_started", group=self.group, topic=self.topic, epoch=self.epoch)
        # the modules and state loaded so far live as long as the process: keep them out
        # of the full collections that the fetched batches trigger (~10% of the CPU)
        gc.freeze()
        next_flush = time.monotonic() + self.flush_interval_s
        try:
            while not stop.is_set():
                await self._poll()
                if time.monotonic() >= next_flush:
                    await self._flush()
                    next_flush = time.monotonic() + self.flush_interval_s
            if self.seal_on_stop:
                await self._seal_before_stop()
            else:
                await self._flush()
        except BaseException:
            self._drop_unwritten()  # a flush on the way out would write a broken state
            raise
        finally:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            with contextlib.suppress(Exception):
                await self._dlq.stop()
            log.info("stream_stopped", consumed=self.stats.consumed,
                     windows_written=self.stats.windows_written,
                     samples_written=self.stats.samples_written,
                     dead_lettered=self.stats.dead_lettered, late=self.stats.late)  # fmt: skip
