"""Ingest as one service: a source sampled on a schedule, events published to Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import msgspec
import structlog

from nettel.ingest.publisher import EventPublisher
from nettel.ingest.sampler import MAX_CATCH_UP_MS, Sampler, counter_reading
from nettel.ingest.sources import Source
from nettel.models import (
    COUNTERS,
    DurableReading,
    ResourceEvent,
    StatEvent,
    decode_stat_event,
    encode_resource_event,
)

log = structlog.get_logger(__name__)

#: Where the newest durable reading of every container comes from (the samples table).
DurableReadings = Callable[[], Mapping[str, DurableReading]]


def bridging_event(before: StatEvent, durable: DurableReading) -> StatEvent | None:
    """The event counting what lies between ``durable`` and the reading ``before`` counts
    from (None when nothing does, or the two readings do not subtract).

    ``before`` is the oldest event of a container still to be sent: its own reading
    minus its deltas is where it starts.

    Examples
    --------
    >>> from nettel.models import CounterReading
    >>> ev = StatEvent(ts_ms=70_000, host="h", container_id="c", identity="web", name="web",
    ...                interval_ms=5000, rx_bytes=50,
    ...                tx_bytes=5, reading=CounterReading(counters=(1000, 80, 0, 0, 0, 0, 0, 0),
    ...                                                   netns=1, boot_id="b"))
    >>> d = DurableReading("web", "c", 20_000, CounterReading(counters=(400, 60, 0, 0, 0, 0, 0, 0),
    ...                                                        netns=1, boot_id="b"))
    >>> gap = bridging_event(ev, d)
    >>> gap.rx_bytes, gap.tx_bytes, gap.ts_ms, gap.interval_ms, gap.catch_up
    (550, 15, 65000, 45000, True)
    >>> gap.reading.counters[:2]
    (950, 75)
    """
    reading = before.reading
    if reading is None or before.counter_reset or before.container_id != durable.container_id:
        return None
    if not reading.same_interface(durable.reading):
        return None
    start_ms = before.ts_ms - before.interval_ms
    gap_ms = start_ms - durable.ts_ms
    if not 0 < gap_ms <= MAX_CATCH_UP_MS:
        return None
    start = [c - d for c, d in zip(reading.counters, _event_counters(before), strict=True)]
    diffs = [c - d for c, d in zip(start, durable.reading.counters, strict=True)]
    if any(d < 0 for d in diffs):
        return None
    rxb, txb, rxp, txp, rxe, txe, rxd, txd = diffs
    return StatEvent(
        ts_ms=start_ms, host=before.host, container_id=before.container_id,
        identity=before.identity, name=before.name, image=before.image,
        compose_project=before.compose_project, compose_service=before.compose_service,
        interval_ms=gap_ms, rx_bytes=rxb, tx_bytes=txb, rx_packets=rxp, tx_packets=txp,
        rx_errors=rxe, tx_errors=txe, rx_drops=rxd, tx_drops=txd, source=before.source,
        reading=msgspec.structs.replace(reading, counters=tuple(start)), catch_up=True,
    )  # fmt: skip


def _event_counters(ev: StatEvent) -> tuple[int, ...]:
    return tuple(getattr(ev, name) for name in COUNTERS)


class IngestService:
    """Samples ``source`` every ``interval_s`` and publishes each event keyed by identity.

    ``durable_readings``: the newest sample of each container that reached the store.
    At start, each container counts from there (:meth:`Sampler.resume_from`); after the
    embedded broker died, :meth:`make_up_for_lost_log` counts what its log lost.
    ``resource_publisher``: where the resource events of the same ticks go (their own
    topic, so the network events and their consumers stay as they are); None: none.
    """

    def __init__(
        self,
        source: Source,
        publisher: EventPublisher,
        *,
        host: str,
        interval_s: float,
        durable_readings: DurableReadings | None = None,
        resource_publisher: EventPublisher | None = None,
    ) -> None:
        self.source = source
        self.publisher = publisher
        self.resource_publisher = resource_publisher
        self.durable_readings = durable_readings
        self.sampler = Sampler(
            source, self._emit, host=host, interval_s=interval_s,
            emit_resources=None if resource_publisher is None else self._emit_resources,
        )  # fmt: skip
        self._resumed = False
        self._closed = False

    def _emit(self, event: StatEvent) -> None:
        self.publisher.publish_event(event)

    def _emit_resources(self, event: ResourceEvent) -> None:
        if self.resource_publisher is not None:
            self.resource_publisher.publish(event.identity.encode(), encode_resource_event(event))

    async def _durable(self) -> Mapping[str, DurableReading]:
        if self.durable_readings is None:
            return {}
        try:
            return await asyncio.to_thread(self.durable_readings)
        except Exception as e:  # nothing readable: start from baselines, as without it
            log.error("durable_readings_unreadable", error=repr(e))
            return {}

    async def run(self, stop: asyncio.Event) -> None:
        """Sample and publish until ``stop`` is set, then flush what was accepted.

        If sampling fails, the error propagates but the publisher keeps sending what it
        holds and the counters' baselines are kept: running again (a supervisor's
        restart) carries on where it failed, losing nothing that was accepted.
        """
        if not self._resumed:
            durable = await self._durable()
            self.sampler.resume_from(durable)
            self._resumed = True
            log.info("ingest_resuming", containers=len(durable))
        await self.publisher.start()
        if self.resource_publisher is not None:
            await self.resource_publisher.start()
        log.info(
            "ingest_started",
            source=self.source.name,
            topic=self.publisher.topic,
            interval_s=self.sampler.interval_s,
        )
        try:
            await self.sampler.run(stop)
        except Exception:
            if not stop.is_set():
                raise
        except BaseException:  # cancelled: release everything
            await self.close()
            raise
        await self.close()

    async def make_up_for_lost_log(self, epoch: int) -> int:
        """After the broker's log was lost: count, per container, what lies between its
        newest durable sample and its oldest event still to be sent (or its last reading),
        in one ``catch_up`` event sent ahead of the rest. Call it with the publisher
        paused, once the consumers wrote what they had read. Returns the events added.
        """
        durable = await self._durable()
        oldest: dict[str, StatEvent] = {}
        for _, value in self.publisher.pending():
            ev = decode_stat_event(value)
            oldest.setdefault(ev.identity, ev)
        bridges: list[StatEvent] = []
        for identity in self.sampler.tracker.keys():  # noqa: SIM118 - a method, not a dict
            d = durable.get(identity)
            if d is None:
                continue
            before = oldest.get(identity) or self._next_event_start(identity)
            bridge = None if before is None else bridging_event(before, d)
            if bridge is not None:
                bridges.append(bridge)
        bridges.sort(key=lambda e: e.ts_ms)
        self.publisher.publish_first([self.publisher.record(ev) for ev in bridges])
        log.info("lost_log_made_up", epoch=epoch, containers=len(bridges),
                 bytes=sum(ev.rx_bytes + ev.tx_bytes for ev in bridges))  # fmt: skip
        return len(bridges)

    def _next_event_start(self, identity: str) -> StatEvent | None:
        """A zero event at the unit's last reading: what its next event will count from."""
        last = self.sampler.tracker.last(identity)
        unit = next((u for u in self.source.units() if u.identity == identity), None)
        if last is None or unit is None:
            return None
        netns, counters, ts_ms = last
        return StatEvent(
            ts_ms=ts_ms, host=self.sampler.host, container_id=unit.container_id,
            identity=identity, name=unit.name, image=unit.image,
            compose_project=unit.compose_project, compose_service=unit.compose_service,
            interval_ms=0, reading=counter_reading(counters, netns, self.sampler.boot_id),
        )  # fmt: skip

    async def close(self) -> None:
        """Stop sampling, flush what was accepted, release the source; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.sampler.close()
        await self.publisher.stop()
        if self.resource_publisher is not None:
            await self.resource_publisher.stop()
        self.source.close()
        log.info(
            "ingest_stopped",
            events=self.sampler.events,
            sent=self.publisher.sent,
            dropped=self.publisher.dropped,
            unsent=self.publisher.buffered,
        )
