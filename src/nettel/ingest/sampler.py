"""The sample loop: every interval, read every unit in parallel and turn readings into events.

A unit whose reading is not back by the tick's deadline is skipped for that tick (its
next delta covers the gap, so nothing is lost) and never delays the others. A unit
that vanishes or errs is logged and skipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
from collections.abc import Callable, Mapping

import structlog

from nettel.errors import SampleError
from nettel.ingest.cgroups import ResourceDelta, ResourceTracker
from nettel.ingest.counters import CounterDelta, CounterTracker
from nettel.ingest.procfs import InterfaceCounters
from nettel.ingest.sources import Reading, Source
from nettel.ingest.units import Unit
from nettel.models import (
    COUNTERS,
    RESOURCE_COUNTERS,
    RESOURCE_GAUGES,
    CounterReading,
    DurableReading,
    ResourceEvent,
    StatEvent,
)

log = structlog.get_logger(__name__)

#: A unit unseen for this long is forgotten (bounds memory under container churn).
FORGET_AFTER_MS = 3_600_000

#: The longest gap a restart catches up on: the stream takes intervals up to a day.
MAX_CATCH_UP_MS = 86_400_000


def read_boot_id(proc_root: str = "/proc") -> str:
    """The kernel's boot id ("" if unreadable): counters of different boots never subtract.

    Examples
    --------
    >>> len(read_boot_id()) in (0, 36)
    True
    """
    try:
        with open(f"{proc_root}/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def counter_reading(counters: InterfaceCounters, netns: int, boot_id: str) -> CounterReading:
    """The cumulative reading an event carries.

    Examples
    --------
    >>> counter_reading(InterfaceCounters(rx_bytes=5, tx_bytes=3), 9, "b").counters
    (5, 3, 0, 0, 0, 0, 0, 0)
    """
    values = tuple(getattr(counters, c) for c in COUNTERS)
    return CounterReading(counters=values, netns=netns, boot_id=boot_id)


def interface_counters(reading: CounterReading) -> InterfaceCounters:
    """The inverse of :func:`counter_reading` (the kernel's field order differs).

    Examples
    --------
    >>> interface_counters(counter_reading(InterfaceCounters(tx_drops=4), 1, "b")).tx_drops
    4
    """
    return InterfaceCounters(**dict(zip(COUNTERS, reading.counters, strict=True)))


def build_event(
    unit: Unit, reading: Reading, delta: CounterDelta, host: str, boot_id: str = ""
) -> StatEvent:
    """The event for one unit: ``delta``'s counters, ``reading``'s time, sockets and
    cumulative counters.

    Examples
    --------
    >>> from nettel.ingest.procfs import InterfaceCounters
    >>> u = Unit(identity="shop/api", container_id="c1", name="api-1", pid=7)
    >>> r = Reading(ts_ms=5000, netns=1, counters=InterfaceCounters(rx_bytes=109), tcp=None,
    ...             source="procfs")
    >>> d = CounterDelta(InterfaceCounters(rx_bytes=9), interval_ms=5000, reset=False)
    >>> ev = build_event(u, r, d, "h")
    >>> (ev.identity, ev.rx_bytes, ev.interval_ms, ev.connections, ev.counter_reset)
    ('shop/api', 9, 5000, None, False)
    >>> ev.reading.value("rx_bytes"), ev.reading.netns, ev.catch_up
    (109, 1, False)
    """
    c = delta.counters
    return StatEvent(
        ts_ms=reading.ts_ms,
        host=host,
        container_id=unit.container_id,
        identity=unit.identity,
        name=unit.name,
        image=unit.image,
        compose_project=unit.compose_project,
        compose_service=unit.compose_service,
        interval_ms=delta.interval_ms,
        rx_bytes=c.rx_bytes,
        tx_bytes=c.tx_bytes,
        rx_packets=c.rx_packets,
        tx_packets=c.tx_packets,
        rx_errors=c.rx_errors,
        tx_errors=c.tx_errors,
        rx_drops=c.rx_drops,
        tx_drops=c.tx_drops,
        connections=None if reading.tcp is None else reading.tcp.connections,
        tcp=reading.tcp,
        counter_reset=delta.reset,
        source=reading.source,
        reading=counter_reading(reading.counters, reading.netns, boot_id),
        catch_up=delta.catch_up,
    )


def build_resource_event(unit: Unit, ts_ms: int, delta: ResourceDelta, gauges: object,
                         source: str, host: str) -> ResourceEvent:  # fmt: skip
    """The resource event of one unit: ``delta``'s counters and the ``gauges`` read at ``ts_ms``.

    Examples
    --------
    >>> from nettel.ingest.cgroups import ResourceCounters, ResourceGauges
    >>> u = Unit(identity="shop/api", container_id="c1", name="api-1", pid=7)
    >>> d = ResourceDelta(ResourceCounters(cpu_usage_us=500), interval_ms=5000, reset=False)
    >>> ev = build_resource_event(u, 5000, d, ResourceGauges(memory_bytes=4096), "cgroup-v1", "h")
    >>> ev.identity, ev.cpu_usage_us, ev.memory_bytes, ev.source
    ('shop/api', 500, 4096, 'cgroup-v1')
    """
    values = {name: getattr(delta.counters, name) for name in RESOURCE_COUNTERS}
    values.update((name, getattr(gauges, name)) for name in RESOURCE_GAUGES)
    return ResourceEvent(
        ts_ms=ts_ms, host=host, container_id=unit.container_id, identity=unit.identity,
        name=unit.name, image=unit.image, compose_project=unit.compose_project,
        compose_service=unit.compose_service, interval_ms=delta.interval_ms, source=source,
        counter_reset=delta.reset, **values,
    )  # fmt: skip


class Sampler:
    """Samples every unit of ``source`` each ``interval_s`` and hands events to ``emit``.

    ``emit_resources``: where the resource events go (one per unit per tick whose reading
    carries a cgroup reading, from the same read); None: none are made.
    """

    def __init__(
        self,
        source: Source,
        emit: Callable[[StatEvent], None],
        *,
        host: str,
        interval_s: float,
        deadline_fraction: float = 0.8,
        max_workers: int = 8,
        chunk_size: int = 32,
        boot_id: str | None = None,
        emit_resources: Callable[[ResourceEvent], None] | None = None,
    ) -> None:
        self.source = source
        self.emit_resources = emit_resources
        self._resources = ResourceTracker()
        self.resource_events = 0
        self.boot_id = (
            read_boot_id(getattr(source, "proc_root", "/proc")) if boot_id is None else boot_id
        )
        self._durable: dict[str, DurableReading] = {}
        self.emit = emit
        self.host = host
        self.interval_s = interval_s
        self.deadline_fraction = deadline_fraction
        self.max_workers = max_workers
        self.chunk_size = chunk_size
        self._tracker = CounterTracker()
        self._last_seen_ms: dict[str, int] = {}
        self._in_flight: set[str] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="nettel-sample"
        )
        self.ticks = 0
        self.events = 0
        self.skipped = 0
        self._watching: bool | None = None  # whether the last tick had units (None: no tick)
        self.caught_up = 0

    def resume_from(self, durable: Mapping[str, DurableReading]) -> None:
        """Count each container from its last sample that reached the store (at start).

        A container unseen so far whose first reading has the same container id, boot
        and namespace as its durable reading gets an event counting everything since
        then (``catch_up``, over the real interval); one with the same id in a new
        namespace (restarted meanwhile) counts from the namespace's start
        (``counter_reset``). Anything else starts from a baseline, as without this.
        """
        self._durable = dict(durable)

    @property
    def tracker(self) -> CounterTracker:
        """The units' last readings."""
        return self._tracker

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set; ticks keep to the wall-clock grid, missed ones skipped."""
        next_tick = time.monotonic()
        while not stop.is_set():
            await self.tick()
            next_tick += self.interval_s
            now = time.monotonic()
            if next_tick < now:
                missed = int((now - next_tick) // self.interval_s) + 1
                log.warning("sample_ticks_missed", missed=missed)
                next_tick += missed * self.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=next_tick - now)

    async def tick(self) -> list[StatEvent]:
        """Sample every unit once; returns the events emitted.

        Units read through procfs (a few file reads each, never waiting on anything
        remote) are read in chunks of :attr:`chunk_size` per job; units that need the
        engine's API get a job each, so a slow engine call delays nobody else. Jobs not
        back by the deadline are skipped this tick; their units' next deltas cover it.
        """
        loop = asyncio.get_running_loop()
        deadline = self.interval_s * self.deadline_fraction
        try:
            await asyncio.wait_for(loop.run_in_executor(self._pool, self.source.refresh), deadline)
        except TimeoutError:
            log.warning("inventory_refresh_slow", deadline_s=deadline)
        every = self.source.units()
        self._say_what_is_watched(len(every))
        units = [u for u in every if u.identity not in self._in_flight]
        fast: list[Unit] = []
        jobs: list[list[Unit]] = []
        for u in units:
            if self.source.reads_fast(u):
                fast.append(u)
            else:
                jobs.append([u])  # an engine API call: a job of its own
        jobs += [fast[i : i + self.chunk_size] for i in range(0, len(fast), self.chunk_size)]
        futures: dict[asyncio.Future[list[Reading | Exception]], list[Unit]] = {}
        for job in jobs:
            self._in_flight.update(u.identity for u in job)
            fut = loop.run_in_executor(self._pool, self._read_all, job)
            fut.add_done_callback(functools.partial(self._done, [u.identity for u in job]))
            futures[fut] = job
        events: list[StatEvent] = []
        resource_events: list[ResourceEvent] = []
        if futures:
            done, pending = await asyncio.wait(futures, timeout=deadline)
            for fut in pending:
                self.skipped += len(futures[fut])
                fut.add_done_callback(_swallow)
                names = [u.identity for u in futures[fut]][:10]
                log.warning("sample_slow", containers=names, deadline_s=deadline)
            for fut in done:
                for unit, result in zip(futures[fut], fut.result(), strict=True):
                    if isinstance(result, SampleError):
                        self.skipped += 1
                        log.info("sample_skipped", container=unit.identity, reason=str(result))
                    elif isinstance(result, Exception):  # a source bug must not stop the others
                        self.skipped += 1
                        log.error("sample_failed", container=unit.identity, error=repr(result))
                    else:
                        ev = self._event(unit, result)
                        if ev is not None:
                            events.append(ev)
                        rev = self._resource_event(unit, result)
                        if rev is not None:
                            resource_events.append(rev)
        events.sort(key=lambda e: (e.identity, e.ts_ms))
        for ev in events:
            self.emit(ev)
        self.events += len(events)
        if self.emit_resources is not None:
            resource_events.sort(key=lambda e: (e.identity, e.ts_ms))
            for rev in resource_events:
                self.emit_resources(rev)
            self.resource_events += len(resource_events)
        self.ticks += 1
        self._forget_stale()
        return events

    def _say_what_is_watched(self, count: int) -> None:
        """One log line when there comes to be nothing to sample, and one when there is again."""
        watching = count > 0
        if watching == self._watching:
            return
        if not watching:
            say = "no running container: nothing is published until one starts"
            log.info("nothing_to_watch", source=self.source.name, message=say)
        elif self._watching is not None:
            log.info("watching_again", source=self.source.name, containers=count)
        self._watching = watching

    def _read_all(self, units: list[Unit]) -> list[Reading | Exception]:
        out: list[Reading | Exception] = []
        for unit in units:
            try:
                out.append(self.source.read(unit))
            except Exception as e:
                out.append(e)
        return out

    def _done(self, identities: list[str], _fut: asyncio.Future[list[Reading | Exception]]) -> None:
        self._in_flight.difference_update(identities)

    def _seed(self, unit: Unit, reading: Reading) -> None:
        durable = self._durable.pop(unit.identity, None)
        if durable is None or unit.identity in self._tracker:
            return
        r = durable.reading
        gap_ms = reading.ts_ms - durable.ts_ms
        if (durable.container_id != unit.container_id or r.boot_id != self.boot_id
                or not self.boot_id or not 0 < gap_ms <= MAX_CATCH_UP_MS):  # fmt: skip
            log.info("catch_up_skipped", container=unit.identity, gap_ms=gap_ms,
                     reason="another container, boot or a gap past a day")  # fmt: skip
            return
        self._tracker.seed(unit.identity, netns=r.netns, counters=interface_counters(r),
                           ts_ms=durable.ts_ms)  # fmt: skip
        self.caught_up += 1
        log.info("catch_up", container=unit.identity, since_ms=durable.ts_ms, gap_ms=gap_ms,
                 same_namespace=r.netns == reading.netns)  # fmt: skip

    def _event(self, unit: Unit, reading: Reading) -> StatEvent | None:
        self._last_seen_ms[unit.identity] = reading.ts_ms
        if self._durable:
            self._seed(unit, reading)
        delta = self._tracker.update(
            unit.identity,
            netns=reading.netns,
            counters=reading.counters,
            ts_ms=reading.ts_ms,
            since_ms=unit.started_ms,
        )
        if delta is None:
            return None
        if delta.reset:
            log.info("counter_reset", container=unit.identity, container_id=unit.container_id[:12])
        return build_event(unit, reading, delta, self.host, self.boot_id)

    def _resource_event(self, unit: Unit, reading: Reading) -> ResourceEvent | None:
        res = reading.resources
        if res is None or self.emit_resources is None:
            return None
        delta = self._resources.update(unit.identity, res, ts_ms=reading.ts_ms,
                                       since_ms=unit.started_ms)  # fmt: skip
        if delta is None:
            return None
        return build_resource_event(unit, reading.ts_ms, delta, res.gauges, res.source, self.host)

    def _forget_stale(self) -> None:
        if not self._last_seen_ms:
            return
        cutoff = time.time_ns() // 1_000_000 - FORGET_AFTER_MS
        for ident in [k for k, v in self._last_seen_ms.items() if v < cutoff]:
            del self._last_seen_ms[ident]
            self._tracker.forget(ident)
            self._resources.forget(ident)

    def close(self) -> None:
        """Stop the reader threads (waits for none); safe to call twice."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _swallow(fut: asyncio.Future[list[Reading | Exception]]) -> None:
    if not fut.cancelled():
        fut.exception()
