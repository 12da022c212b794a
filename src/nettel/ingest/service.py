"""Ingest as one service: a source sampled on a schedule, events published to Kafka."""

from __future__ import annotations

import asyncio

import structlog

from nettel.ingest.publisher import EventPublisher
from nettel.ingest.sampler import Sampler
from nettel.ingest.sources import Source
from nettel.models import StatEvent, encode_stat_event

log = structlog.get_logger(__name__)


class IngestService:
    """Samples ``source`` every ``interval_s`` and publishes each event keyed by identity."""

    def __init__(
        self, source: Source, publisher: EventPublisher, *, host: str, interval_s: float
    ) -> None:
        self.source = source
        self.publisher = publisher
        self.sampler = Sampler(source, self._emit, host=host, interval_s=interval_s)

    def _emit(self, event: StatEvent) -> None:
        self.publisher.publish(event.identity.encode(), encode_stat_event(event))

    async def run(self, stop: asyncio.Event) -> None:
        """Sample and publish until ``stop`` is set, then flush what was accepted."""
        await self.publisher.start()
        log.info(
            "ingest_started",
            source=self.source.name,
            topic=self.publisher.topic,
            interval_s=self.sampler.interval_s,
        )
        try:
            await self.sampler.run(stop)
        finally:
            self.sampler.close()
            await self.publisher.stop()
            self.source.close()
            log.info(
                "ingest_stopped",
                events=self.sampler.events,
                sent=self.publisher.sent,
                dropped=self.publisher.dropped,
                unsent=self.publisher.buffered,
            )
