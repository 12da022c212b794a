"""The stream worker: events from Kafka into the ``minute`` table, exactly once.

It consumes ``nettel.stats`` in the consumer group ``nettel-stream``, decodes and
validates each fetched batch as columns (invalid events go to the dead-letter topic with
the reason in a header, counted), folds the valid ones into each partition's event-time
windows with one group-by per batch (:func:`~nettel.stream.windows.fold_events`), and every
``flush_interval_s`` writes the closed windows together with every partition's
:class:`~nettel.models.ReplayPoint` in one Delta commit; then, at most every
``rollup_interval_s``, rolls its partitions' new minute rows into ``hour`` and those
into ``day`` (:mod:`nettel.store.rollup`). On assignment it resumes each
partition from the point stored in the table, never from Kafka's committed offsets, so
a crash or a rebalance neither loses a window nor counts one twice. Kafka offsets are
committed too, after the write, for lag tools only.

With a ``samples`` table it also writes every valid event, in its own commit (before
the windows') carrying its own per-partition points: a replay adds no sample twice.

The publisher delivers at least once, so the topic may hold an event twice (a resend
after a send timeout): an event not newer than the last one folded for its container is
a copy and is dropped before windows and samples see it, counted and logged
(:mod:`nettel.stream.dedupe`). What was folded before a partition's resume point is read
back from ``samples`` on assignment, so copies are dropped across a restart too.

The embedded broker's log does not outlive it (a rotation swaps in an empty one, a
stop ends it), yet open windows hold events that only that log has. So before it goes
the worker is asked :meth:`StreamWorker.drained`: it reads to the log's end, writes its
open windows as partial rows (rows are additive: a window's later samples make another
row) with replay points at the end, and only then answers True. After
:meth:`StreamWorker.rotated` it reads the new log from offset 0 under the new epoch,
whose replay points are kept apart (:meth:`~nettel.store.minute.MinuteTable.app_id`).
With ``seal_on_stop`` it does the same when stopped.

A partition that receives nothing closes its windows by the wall clock (the idle
watermark, :meth:`~nettel.stream.windows.PartitionWindows.advance`); one whose log was
lost with a killed nettel has its open windows rebuilt from ``samples``
(:mod:`nettel.stream.recovery`). The consumer itself (membership, rebalances, the
barrier, the loop) is :class:`~nettel.stream.runtime.ConsumerRuntime`'s: the worker is
the job it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import structlog
from aiokafka import AIOKafkaProducer

from nettel import metrics
from nettel.models import ReplayPoint, decode_stat_batch, event_row
from nettel.store.directory import ContainerDirectory
from nettel.store.minute import MinuteTable, PartitionPoint
from nettel.store.rollup import RollupTable
from nettel.store.samples import SamplesTable, events_frame
from nettel.stream.dedupe import DEDUPE_HORIZON_MS, LastFolded, copies, note_frame
from nettel.stream.recovery import recover_lost_logs
from nettel.stream.runtime import ConsumerRuntime, ConsumerSettings, completed, record_epoch
from nettel.stream.validation import (
    MAX_EVENT_BYTES,
    invalid_events,
    read_event,
    send_dead_letter,
    validate,
)
from nettel.stream.windows import PartitionWindows, fold_events

__all__ = ["StreamWorker", "WorkerStats", "record_epoch", "validate"]

log = structlog.get_logger(__name__)

#: How far back (event time) a restored partition looks in ``samples`` for what it folded:
#: a copy of an older event that arrives after a restart is not recognised.
RESTORE_LOOKBACK_MS = 86_400_000


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
    idle_advances: int = 0
    recovered_samples: int = 0
    duplicates: int = 0


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
    the log of every epoch :meth:`rotated` announces. With ``fresh_log`` the windows
    earlier epochs' logs left open are first rebuilt from ``samples``.
    ``idle_timeout_s``: how long a partition read to its end must receive nothing
    before the wall clock closes its windows. ``directory``: the container directory
    this worker keeps, from the windows of each flush (:mod:`nettel.store.directory`).
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
        idle_timeout_s: float = 2.0,
        directory: ContainerDirectory | None = None,
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
        self.samples = samples
        self.fresh_log = fresh_log
        self.directory = directory
        self._next_roll = 0.0
        self.stats = WorkerStats()
        self._windows: dict[int, PartitionWindows] = {}
        self._positions: dict[int, int] = {}  # next offset to read, every record counted
        #: valid events read since the last samples write (events frames, one per batch)
        self._samples_buf: list[pl.DataFrame] = []
        self._samples_done: dict[int, int] = {}  # next offset the samples table lacks
        self._fresh_epochs = {epoch} if fresh_log else set()  # logs that began with us
        # (epoch, partition) this worker has stored points for, per table
        self._written: dict[str, set[tuple[int, int]]] = {"minute": set(), "samples": set()}
        self._recovery_checked: set[int] = set()
        #: per partition, each container's newest folded time (copies are dropped)
        self._seen: dict[int, LastFolded] = {}
        self._dlq: Any = None
        self._flush_lock = asyncio.Lock()
        self.runtime = ConsumerRuntime(
            bootstrap_servers, self,
            ConsumerSettings(
                group=group, topic=topic, max_records=max_records,
                tick_interval_s=flush_interval_s, idle_timeout_s=idle_timeout_s,
                seal_on_stop=seal_on_stop, seal_timeout_s=seal_timeout_s,
                consumer_options={"max_partition_fetch_bytes": 4 << 20,
                                  "fetch_max_bytes": 32 << 20},
            ),
            epoch=epoch,
        )  # fmt: skip

    @property
    def assigned(self) -> list[int]:
        """Partitions this worker owns now."""
        return sorted(self._windows)

    def open_windows(self) -> int:
        """How many windows are open on this worker's partitions."""
        return sum(pw.open_windows() for pw in self._windows.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Consume, window and write until ``stop``; flushes what closed before returning
        (and, with ``seal_on_stop``, reads to the end and writes the open windows too)."""
        await self.runtime.run(stop)

    async def drained(self) -> bool:
        """Whether everything the broker holds is durably written (the rotation barrier,
        :meth:`~nettel.stream.runtime.ConsumerRuntime.drained`): once every partition
        is read to the end, the open windows are written as partial rows with replay
        points at the log's end."""
        return await self.runtime.drained()

    async def rotated(self, epoch: int) -> None:
        """The broker's log was replaced by an empty one of ``epoch``: read it from 0.

        If the rotation did not wait for :meth:`drained` (forced), what was read is
        written first, under the old epoch; what was not is gone with the old log.
        """
        await self.runtime.rotated(epoch)

    # -- the job the runtime runs ------------------------------------------------------

    async def open(self) -> None:
        """Start the dead-letter producer. A run after a failed one (a supervisor's
        restart) begins with no partition: each is restored again when assigned."""
        for state in (self._windows, self._positions, self._samples_done, self._seen):
            state.clear()
        self._samples_buf.clear()
        self._dlq = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers)
        await self._dlq.start()
        log.info("stream_started", group=self.group, topic=self.topic, epoch=self.epoch)
        # the modules and state loaded so far live as long as the process: keep them out
        # of the full collections that the fetched batches trigger (~10% of the CPU)
        gc.freeze()

    async def close(self) -> None:
        """Stop the dead-letter producer."""
        if self._dlq is not None:
            await self._dlq.stop()
            self._dlq = None
        log.info("stream_stopped", consumed=self.stats.consumed,
                 windows_written=self.stats.windows_written,
                 samples_written=self.stats.samples_written,
                 dead_lettered=self.stats.dead_lettered, late=self.stats.late)  # fmt: skip

    async def restore(self, partitions: list[int]) -> dict[int, int]:
        """Restore ``partitions`` from their stored points (after rebuilding what a lost
        log left open); the offset to read each from."""
        async with self._flush_lock:
            unchecked = [p for p in partitions if p not in self._recovery_checked]
            if self.fresh_log and unchecked:  # the log began with us: was another lost?
                await asyncio.to_thread(self._recover, unchecked)
                self._recovery_checked.update(unchecked)
            points, done = await asyncio.to_thread(self._stored, partitions)
            seen = await asyncio.to_thread(self._folded_before, points, partitions)
            offsets: dict[int, int] = {}
            for p in partitions:
                point = points.get(p)
                self._seen[p] = LastFolded(seen.get(p))
                self._windows[p] = PartitionWindows(self.grace_ms, replay=point)
                offsets[p] = self._positions[p] = 0 if point is None else point.resume_offset
                self._drop_samples(p)
                self._samples_done[p] = done.get(p, 0)
            log.info("partitions_assigned", group=self.group, partitions=partitions,
                     epoch=self.epoch,
                     resumed={p: pt.resume_offset for p, pt in points.items()})  # fmt: skip
            return offsets

    async def revoked(self, partitions: list[int]) -> None:
        """Write what closed, then forget ``partitions``."""
        await self._flush()
        for p in partitions:
            self._forget(p)

    async def tick(self) -> None:
        """Write what closed (every ``flush_interval_s``)."""
        await self._flush()

    async def finish(self) -> None:
        """Write what closed before stopping."""
        await self._flush()

    async def seal(self) -> None:
        """Write every open window too (the log is about to go)."""
        await self._flush(seal=True)

    def idle(self, partition: int, now_ms: int) -> None:
        """The idle watermark: close the windows of ``partition`` the clock has passed."""
        pw = self._windows.get(partition)
        if pw is not None and pw.advance(now_ms):
            self.stats.idle_advances += 1
            log.debug("stream_idle_watermark", partition=partition, event_time_ms=now_ms)

    async def reset(self, epoch: int, sealed: bool) -> list[int]:
        """Reset every owned partition for the empty log of ``epoch``."""
        async with self._flush_lock:
            if not sealed:
                log.warning("stream_rotated_unsealed", epoch=self.epoch, new_epoch=epoch)
                await self._flush_locked(seal=True)
            old, self.epoch = self.epoch, epoch
            self._fresh_epochs.add(epoch)  # the new log is empty: nothing in it is written
            partitions = list(self._windows)
            for p in partitions:
                self._windows[p] = PartitionWindows(self.grace_ms)
                self._positions[p] = 0
                self._samples_done[p] = 0
            self._samples_buf.clear()
            log.info("stream_rotated", old_epoch=old, epoch=epoch, partitions=partitions)
            return partitions

    async def process(self, batch: Mapping[int, Sequence[Any]], now_ms: int) -> None:
        """Decode, validate and fold in the whole batch, columnar (a batch the compact
        decoder refuses is read one record at a time, each with its own error); refused
        records go to the dead-letter topic before any write can cover them."""
        self.stats.stale_skipped = self.runtime.stale_skipped
        async with self._flush_lock:  # a flush or a rebalance waits for the whole batch
            with _collector_paused():
                refused = self._fold(batch, now_ms)
            if refused:
                by_offset = {(p, r.offset): r for p, recs in batch.items() for r in recs}
                for p, offset, reason in sorted(refused):
                    await self._dead_letter(by_offset[(p, offset)], reason)

    def _fold(self, batch: Mapping[int, Sequence[Any]], now_ms: int) -> list[tuple[int, int, str]]:
        """Fold ``batch`` into the windows and the samples buffer; returns the refused
        records' (partition, offset, reason)."""
        refused: list[tuple[int, int, str]] = []
        rows: list[tuple[Any, ...]] = []
        partitions: list[int] = []
        offsets: list[int] = []
        for partition, records in batch.items():
            if partition not in self._windows:
                continue  # revoked meanwhile
            self.stats.consumed += len(records)
            self._positions[partition] = records[-1].offset + 1
            values = [r.value for r in records]
            decoded = None
            if None not in values and max(map(len, values)) <= MAX_EVENT_BYTES:
                decoded = decode_stat_batch(values)
            if decoded is not None:
                rows.extend(decoded)
                partitions.extend([partition] * len(decoded))
                offsets.extend([r.offset for r in records])
                continue
            for record in records:  # one by one: each refused record with its reason
                ev, reason = read_event(record.value, now_ms)
                if ev is None:
                    refused.append((partition, record.offset, reason or "refused"))
                else:
                    rows.append(event_row(ev))
                    partitions.append(partition)
                    offsets.append(record.offset)
        frame = events_frame(rows, partitions, offsets)
        invalid = invalid_events(frame, now_ms)
        if invalid:
            frame = _without(frame, invalid)
        frame, passed = self._drop_copies(frame)
        too_large = fold_events(self._windows, frame)
        for partition, offset in passed.items():
            self._windows[partition].passed(offset)
        if too_large:
            frame = _without(frame, too_large)
        note_frame(frame, self._seen)
        if self.samples is not None:
            self._buffer_samples(frame)
        return refused + invalid + too_large

    # -- internals -----------------------------------------------------------------------

    def _drop_copies(self, frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, int]]:
        """``frame`` without the copies of events already folded (a publisher's resend),
        and each partition's last offset of a dropped copy."""
        if not frame.height:
            return frame, {}
        copy = copies(frame, self._seen)
        dropped = int(copy.sum())
        if not dropped:
            return frame, {}
        self.stats.duplicates += dropped
        metrics.DUPLICATES_DROPPED.labels("stream").inc(dropped)
        first = frame.filter(copy).row(0, named=True)
        log.warning("duplicates_dropped", worker="stream", topic=self.topic, count=dropped,
                    total=self.stats.duplicates, partition=first["partition"],
                    offset=first["offset"], container=first["container"])  # fmt: skip
        passed = frame.filter(copy).group_by("partition").agg(pl.col("offset").max())
        return frame.filter(~copy), dict(passed.iter_rows())

    def _folded_before(self, points: Mapping[int, ReplayPoint],
                       partitions: list[int]) -> dict[int, dict[str, int]]:  # fmt: skip
        """Each container's newest time folded before each partition's resume point, from
        ``samples`` (at most :data:`RESTORE_LOOKBACK_MS` back from the partition's event
        time, or the wall clock; containers within the dedupe horizon of the newest)."""
        if self.samples is None:
            return {}
        now_ms = time.time_ns() // 1_000_000
        times = [now_ms, *(points[p].event_time_ms for p in partitions
                           if p in points and points[p].event_time_ms >= 0)]  # fmt: skip
        resumes = {p: 0 if p not in points else points[p].resume_offset for p in partitions}
        return self.samples.newest_times(self.epoch, resumes,
                                         since_ms=min(times) - RESTORE_LOOKBACK_MS,
                                         horizon_ms=DEDUPE_HORIZON_MS)  # fmt: skip

    def _buffer_samples(self, frame: pl.DataFrame) -> None:
        """Keep the batch's valid events the samples table does not hold yet."""
        done = {p: d for p, d in self._samples_done.items() if d}
        if done:
            first = pl.col("partition").replace_strict(done, default=0, return_dtype=pl.Int64)
            frame = frame.filter(pl.col("offset") >= first)
        if frame.height:
            self._samples_buf.append(frame)

    def _drop_samples(self, partition: int) -> None:
        """Forget the buffered events of ``partition``."""
        self._samples_buf = [f for f in (f.filter(pl.col("partition") != partition)
                                         for f in self._samples_buf) if f.height]  # fmt: skip

    def _forget(self, partition: int) -> None:
        for state in (self._windows, self._positions, self._samples_done, self._seen):
            state.pop(partition, None)
        self._drop_samples(partition)

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

    def _recover(self, partitions: list[int]) -> None:
        """Write the windows earlier logs had open, from ``samples`` (see
        :mod:`nettel.stream.recovery`), then roll them into ``hour`` and ``day``."""
        if self.samples is None:
            return
        recovered = recover_lost_logs(self.table, self.samples, writer=self.group,
                                      topic=self.topic, epoch=self.epoch,
                                      partitions=partitions, grace_ms=self.grace_ms)  # fmt: skip
        self.stats.recovered_samples += sum(r.samples for r in recovered)
        rolled = sorted({p for r in recovered for p in r.partitions})
        if rolled:
            self._roll(rolled)

    async def _flush(self, *, seal: bool = False) -> None:
        async with self._flush_lock:
            await completed(self._flush_locked(seal=seal))

    async def _flush_locked(self, *, seal: bool) -> None:
        """Write what closed (every open window too if ``seal``), samples first."""
        rows = []
        points = []
        parts: dict[int, int] = {}  # partition -> the next offset samples then holds
        for partition, pw in self._windows.items():
            seen = self._seen.get(partition)
            if seen is not None:
                seen.forget_gone()
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
                parts[partition] = position
        if parts and self.samples is not None:
            # the table's points are re-read at the write (narrowing any overlap with a
            # previous owner) but for those of an earlier log (see ``fresh_log``)
            known = {p: self._samples_done.get(p, 0) for p in parts
                     if self._stale("samples", p)}  # fmt: skip
            buffered = self._samples_buf
            frame = pl.concat(buffered) if buffered else events_frame([], [], [])
            written = await asyncio.to_thread(
                self.samples.append_events, frame, parts, topic=self.topic,
                writer=self.group, epoch=self.epoch, known=known,
            )  # fmt: skip
            self.stats.samples_written += written
            metrics.ROWS_WRITTEN.labels("samples").inc(written)
            for p, next_offset in parts.items():
                self._written["samples"].add((self.epoch, p))
                self._samples_done[p] = next_offset
            # every buffered event is below its partition's position: all written now
            self._samples_buf = []
        if not points:
            return
        await asyncio.to_thread(
            self.table.append, rows, points, writer=self.group, epoch=self.epoch
        )
        self._written["minute"].update((self.epoch, p.partition) for p in points)
        if self.directory is not None:  # derived from what was just written; never fails
            await asyncio.to_thread(self.directory.record, rows)
        self.stats.windows_written += len(rows)
        self.stats.flushes += 1
        self.stats.seals += seal
        if time.monotonic() >= self._next_roll:
            await asyncio.to_thread(self._roll, [p.partition for p in points])
            self._next_roll = time.monotonic() + self.rollup_interval_s
        late = sum(pw.late for pw in self._windows.values())
        metrics.LATE_EVENTS.inc(max(0, late - self.stats.late))
        self.stats.late = late
        metrics.ROWS_WRITTEN.labels("minute").inc(len(rows))
        metrics.JOBS.done("stream_flush", self.flush_interval_s)
        # for lag tools only (the store is the truth), bounded: a broker being replaced
        # must not hold the flush lock for long
        await self.runtime.commit({p.partition: p.point.next_offset for p in points})

    def _roll(self, partitions: list[int]) -> None:
        for table in self.rollups:  # hour from minute, then day from hour
            for p in partitions:
                table.roll(p, writer=self.group, topic=self.topic)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        self.stats.dead_lettered += 1
        await send_dead_letter(self._dlq, self.dlq_topic, record, reason)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection meanwhile: a fetched batch decodes to tens of
    thousands of tuples, each allocation counting towards a collection that would scan
    them all again (it tripled the cost of building the batch's columns)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _without(frame: pl.DataFrame, refused: Sequence[tuple[int, int, str]]) -> pl.DataFrame:
    """``frame`` without the events at the (partition, offset) of ``refused``."""
    keys = pl.DataFrame({"partition": [p for p, _, _ in refused],
                         "offset": [o for _, o, _ in refused]},
                        schema={"partition": pl.Int64(), "offset": pl.Int64()})  # fmt: skip
    return frame.join(keys, on=["partition", "offset"], how="anti", maintain_order="left")
