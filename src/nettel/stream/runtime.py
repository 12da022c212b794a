"""One Kafka consumer runtime; the stream worker and the detector are jobs it runs.

The runtime owns what every consumer of ``nettel.stats`` needs, written once: group
membership and rebalances (a job saves and forgets revoked partitions, restores assigned
ones and says where to read them from), the run loop, skipping records of a replaced
broker log (epoch header), the idle watermark (a partition read to its end that has
received nothing for a while is announced to the job with the wall clock), the drained
barrier and the switch to a rotated log, and a start/stop lifecycle that supervision can
watch (:attr:`ConsumerRuntime.state`, :attr:`ConsumerRuntime.heartbeat`).

A job (:class:`Job`) is a small object the runtime feeds: ``process`` a batch, ``tick``
(flush or checkpoint) every ``tick_interval_s``, ``seal`` (make everything read durable)
for a barrier, ``rotated`` for a new log, ``finish`` on stop. See quix-streams'
``Application`` running any ``StreamingDataFrame`` for the same split.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from nettel import metrics
from nettel.broker import EPOCH_HEADER

log = structlog.get_logger(__name__)

#: How long the broker holds a fetch with nothing to return: a fetch answered later
#: than this after a moment was sent after it, so its high watermark is that late.
#: Short, so a barrier (a rotation, a stop) waits little; idle, it costs ten small
#: fetches a second.
FETCH_MAX_WAIT_MS = 100

T = TypeVar("T")

State = Literal["new", "running", "stopping", "stopped", "failed"]


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


async def completed(work: Coroutine[Any, Any, T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile, then pass the
    cancellation on: a cancelled job never leaves a store write running in a thread
    behind it (a restarted job would race that orphan and write the same rows again).

    Examples
    --------
    >>> async def main() -> list[str]:
    ...     done: list[str] = []
    ...     async def write() -> None:
    ...         await asyncio.sleep(0.05)
    ...         done.append("written")
    ...     task = asyncio.ensure_future(completed(write()))
    ...     await asyncio.sleep(0.01)
    ...     task.cancel()
    ...     with contextlib.suppress(asyncio.CancelledError):
    ...         await task
    ...     return done
    >>> asyncio.run(main())
    ['written']
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


class Job(Protocol):
    """What :class:`ConsumerRuntime` runs. Every method may await I/O."""

    async def open(self) -> None:
        """Start the job's own clients (producers); called before the consumer joins."""

    async def close(self) -> None:
        """Stop them; called last, also after a failure. Safe to call twice."""

    async def restore(self, partitions: list[int]) -> dict[int, int]:
        """``partitions`` were assigned: restore them from the store; the offset to read
        each from."""

    async def revoked(self, partitions: list[int]) -> None:
        """Make what ``partitions`` hold durable, then forget them."""

    async def process(self, batch: Mapping[int, Sequence[Any]], now_ms: int) -> None:
        """Handle fetched records (per partition, in offset order, current log only)."""

    def idle(self, partition: int, now_ms: int) -> None:
        """``partition`` is read to its end and got nothing for a while (watermark)."""

    async def tick(self) -> None:
        """Periodic durability: flush, checkpoint."""

    async def seal(self) -> None:
        """Make everything read so far durable (a barrier: the log is about to go)."""

    async def reset(self, epoch: int, sealed: bool) -> list[int]:
        """The log was replaced by an empty one of ``epoch`` (``sealed``: after a
        barrier); reset the owned partitions and return them (read again from 0)."""

    async def finish(self) -> None:
        """The runtime is stopping and will not :meth:`seal` first: save what is due."""


@dataclass
class Barrier:
    """A request to have everything the broker holds durably written."""

    since_ms: int  # wall clock of the request: only fetches answered later count
    expires: float  # monotonic: the request lapses when nobody asks any more
    whole_topic: bool = True  # every partition of the topic must be this member's
    sealed: bool = False


@dataclass
class ConsumerSettings:
    """How the runtime's consumer reads."""

    group: str
    topic: str = "nettel.stats"
    max_records: int = 10_000
    tick_interval_s: float = 30.0
    idle_timeout_s: float = 2.0
    #: the log dies with the process (the embedded broker): read to its end and
    #: :meth:`Job.seal` before stopping, for at most ``seal_timeout_s``
    seal_on_stop: bool = False
    seal_timeout_s: float = 10.0
    consumer_options: dict[str, Any] = field(default_factory=dict)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self.runtime._revoked([tp.partition for tp in revoked])

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self.runtime._assigned([tp.partition for tp in assigned])


class ConsumerRuntime:
    """Runs one :class:`Job` as a member of ``settings.group`` on ``settings.topic``.

    ``epoch``: the embedded broker's log epoch (0 for an external broker); records
    stamped with an older one are from a log already replaced and are skipped.

    Examples
    --------
    >>> rt = ConsumerRuntime("127.0.0.1:1", object(), ConsumerSettings(group="g"))
    >>> rt.state, rt.positions, rt.stale_skipped
    ('new', {}, 0)
    """

    def __init__(self, bootstrap_servers: str, job: Job, settings: ConsumerSettings, *,
                 epoch: int = 0) -> None:  # fmt: skip
        self.bootstrap_servers = bootstrap_servers
        self.job = job
        self.settings = settings
        self.epoch = epoch
        self.state: State = "new"
        #: monotonic time of the run loop's last turn (a supervisor's liveness signal)
        self.heartbeat = time.monotonic()
        #: next offset to read per owned partition, every delivered record counted
        self.positions: dict[int, int] = {}
        self.stale_skipped = 0
        self.barrier: Barrier | None = None
        self.consumer: Any = None
        self._last_read: dict[int, float] = {}
        self._next_idle_check = 0.0
        self._generation: dict[int, int] = {}  # +1 at every assignment of a partition
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def assigned(self) -> list[int]:
        """Partitions this member owns now."""
        return sorted(self.positions)

    async def _assigned(self, partitions: list[int]) -> None:
        offsets = await self.job.restore(partitions)
        now = time.monotonic()
        for p in partitions:
            self._generation[p] = self._generation.get(p, 0) + 1
            offset = offsets.get(p, 0)
            self.positions[p] = offset
            self._last_read[p] = now
            self.consumer.seek(TopicPartition(self.settings.topic, p), offset)

    async def _revoked(self, partitions: list[int]) -> None:
        await self.job.revoked(partitions)
        for p in partitions:
            metrics.set_lag(self.settings.group, p, None)
            self.positions.pop(p, None)
            self._last_read.pop(p, None)

    async def drained(self) -> bool:
        """Whether everything the broker holds is durably written (the rotation barrier).

        Ask with the producers paused, and keep asking (a request lapses two seconds
        after the last ask). The first ask makes the runtime read every partition to the
        end its broker reports after the ask, then :meth:`Job.seal`; from then on, until
        it reads anything new, the answer is True. Every partition of the topic must be
        this member's.
        """
        now = time.monotonic()
        barrier = self.barrier
        if barrier is None or now > barrier.expires:
            barrier = self.barrier = Barrier(since_ms=time.time_ns() // 1_000_000,
                                             expires=now)  # fmt: skip
            log.info("consumer_barrier_requested", group=self.settings.group,
                     partitions=self.assigned, epoch=self.epoch)  # fmt: skip
        barrier.expires = now + 2.0
        return barrier.sealed

    async def rotated(self, epoch: int) -> None:
        """The broker's log was replaced by an empty one of ``epoch``: read it from 0."""
        sealed = self.barrier is not None and self.barrier.sealed
        partitions = await self.job.reset(epoch, sealed)
        old, self.epoch, self.barrier = self.epoch, epoch, None
        for p in partitions:
            self.positions[p] = 0
            with contextlib.suppress(Exception):  # not assigned any more: resumed later
                self.consumer.seek(TopicPartition(self.settings.topic, p), 0)
        log.info("consumer_rotated", group=self.settings.group, old_epoch=old, epoch=epoch,
                 partitions=partitions)  # fmt: skip

    def caught_up(self, barrier: Barrier) -> bool:
        """Whether every owned partition was read to an end reported after ``barrier``
        began (and, for a whole-topic barrier, every partition is owned)."""
        consumer = self.consumer
        topic = self.settings.topic
        if not self.positions:
            return not barrier.whole_topic
        if barrier.whole_topic:
            partitions = consumer.partitions_for_topic(topic) or set()
            if not partitions or set(partitions) - set(self.positions):
                return False
        assigned = consumer.assignment()
        for p, position in self.positions.items():
            tp = TopicPartition(topic, p)
            if tp not in assigned:
                return False
            polled = consumer.last_poll_timestamp(tp)
            end = consumer.highwater(tp)
            if polled is None or end is None or polled < barrier.since_ms + FETCH_MAX_WAIT_MS:
                return False
            if position < end:
                return False
        return True

    async def poll(self) -> None:
        """Fetch one batch, hand it to the job, announce idle partitions, and seal if a
        barrier asks and the end is read."""
        self.heartbeat = time.monotonic()
        fetched = await self.consumer.getmany(timeout_ms=200,
                                              max_records=self.settings.max_records)  # fmt: skip
        now_ms = time.time_ns() // 1_000_000
        batch: dict[int, list[Any]] = {}
        for tp, records in fetched.items():
            if tp.partition not in self.positions:
                continue  # revoked meanwhile
            if self.epoch:
                fresh = [r for r in records if not _stale(r, self.epoch)]
                self.stale_skipped += len(records) - len(fresh)
                records = fresh
            if records:
                batch[tp.partition] = records
        if batch:
            generations = {p: self._generation.get(p) for p in batch}
            await self.job.process(batch, now_ms)
            for p, records in batch.items():
                # a partition revoked or assigned again meanwhile starts from its own seek
                if p in self.positions and self._generation.get(p) == generations[p]:
                    self.positions[p] = max(self.positions[p], records[-1].offset + 1)
        self._measure(batch)
        self._announce_idle(now_ms, batch)
        barrier = self.barrier
        if barrier is None or time.monotonic() > barrier.expires:
            return
        if batch:
            barrier.sealed = False  # something new arrived: seal again once it is read
        if not barrier.sealed and self.caught_up(barrier):
            await self.job.seal()
            barrier.sealed = True
            log.info("consumer_sealed", group=self.settings.group, epoch=self.epoch,
                     positions=dict(self.positions))  # fmt: skip

    def _measure(self, batch: Mapping[int, Sequence[Any]]) -> None:
        """Events consumed, and each partition's lag: its last fetch's high watermark past
        the position (``/metrics``)."""
        group, topic = self.settings.group, self.settings.topic
        if batch:
            metrics.EVENTS_CONSUMED.labels(group).inc(sum(len(r) for r in batch.values()))
        for p, position in self.positions.items():
            end = self.consumer.highwater(TopicPartition(topic, p))
            if end is not None:
                metrics.set_lag(group, p, end - position)

    def _announce_idle(self, now_ms: int, batch: Mapping[int, Sequence[Any]]) -> None:
        now = time.monotonic()
        for p in batch:
            self._last_read[p] = now
        if now < self._next_idle_check:
            return
        self._next_idle_check = now + min(0.5, self.settings.idle_timeout_s)
        topic = self.settings.topic
        for p, position in self.positions.items():
            if now - self._last_read.get(p, now) < self.settings.idle_timeout_s:
                continue
            end = self.consumer.highwater(TopicPartition(topic, p))
            if end is None or position < end:
                continue  # not read to its end: its events, not the clock, move its time
            self.job.idle(p, now_ms)

    async def _seal_before_stop(self) -> None:
        """Read the owned partitions to the end and seal (for at most seal_timeout_s)."""
        if not self.positions:
            return
        deadline = time.monotonic() + self.settings.seal_timeout_s
        self.barrier = Barrier(since_ms=time.time_ns() // 1_000_000, expires=math.inf,
                               whole_topic=False)  # fmt: skip
        while not self.barrier.sealed and time.monotonic() < deadline:
            await self.poll()
        if not self.barrier.sealed:
            log.warning("consumer_stopped_behind", group=self.settings.group,
                        positions=dict(self.positions),
                        seal_timeout_s=self.settings.seal_timeout_s)  # fmt: skip
            await self.job.seal()

    async def run(self, stop: asyncio.Event) -> None:
        """Join the group and run the job until ``stop``; then seal (``seal_on_stop``) or
        finish, leave the group and close the job. Raises what the job raised."""
        s = self.settings
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=s.group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS, **s.consumer_options,
        )  # fmt: skip
        self.state = "running"
        self.positions.clear()  # a run after a failed one starts from the store again
        self.barrier = None
        try:
            await self.job.open()
            await self.consumer.start()
            self.consumer.subscribe([s.topic], listener=_Rebalance(self))
            log.info("consumer_started", group=s.group, topic=s.topic, epoch=self.epoch)
            next_tick = time.monotonic() + s.tick_interval_s
            while not stop.is_set():
                await self.poll()
                if time.monotonic() >= next_tick:
                    await self.job.tick()
                    next_tick = time.monotonic() + s.tick_interval_s
            self.state = "stopping"
            if s.seal_on_stop:
                await self._seal_before_stop()
            else:
                await self.job.finish()
        except BaseException:
            self.state = "failed"
            raise
        finally:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            with contextlib.suppress(Exception):
                await self.job.close()
            if self.state != "failed":
                self.state = "stopped"

    async def start(self) -> None:
        """Run in the background until :meth:`stop` (or use ``async with``)."""
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self.run(self._stop))

    async def stop(self) -> None:
        """Stop a background run and wait for it (raises what it raised); safe twice."""
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            await task

    async def __aenter__(self) -> ConsumerRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def commit(self, offsets: Mapping[int, int]) -> None:
        """Commit ``offsets`` to Kafka (for lag tools only: the store is the truth);
        bounded, so that a broker being replaced cannot hold the caller for long."""
        tps = {TopicPartition(self.settings.topic, p): o for p, o in offsets.items()}
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.consumer.commit(tps), 5.0)


def _stale(record: Any, epoch: int) -> bool:
    stamped = record_epoch(record.headers)
    return stamped is not None and stamped < epoch
