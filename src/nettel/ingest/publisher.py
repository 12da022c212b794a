"""Send events to Kafka through a bounded buffer that rides out broker outages.

``publish`` never blocks and never raises: events go into a bounded buffer. A sender
task drains it in batches; when the broker is down it keeps the events, reconnects
with backoff (re-creating topics on a fresh broker), and sends them when it returns.
When the buffer is full the oldest events are dropped, counted and logged.

Delivery is at least once: a batch whose send timed out may still have been appended by
the broker, and is sent again, so the topic can hold an event twice. The consumers drop
such copies by time (:mod:`nettel.stream.dedupe`: an event not newer than the last one
folded for its key is a copy), which holds only if nothing newer of a key reaches the
topic before an older one. So the buffer is sent oldest first, a batch at a time (the
next only once the last one's outcome is known), small enough that each partition's
share is one producer batch (appended or refused whole; aiokafka keeps one request in
flight per broker and retries a batch ahead of the next), failed events stay ahead of
newer ones, and an event is taken as delivered only if every older event of its key in
the batch was too. (An idempotent producer would not do: Tansu refuses InitProducerId, and a new
producer after a reconnect gets a new producer id anyway.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer

from nettel import metrics
from nettel.models import StatEvent, WireFormat, encode_stat_event

log = structlog.get_logger(__name__)

Header = tuple[str, bytes]

#: The producer's batch size per partition (``max_batch_size``), and what one batch of
#: ours may hold: every partition's share of it then fits one producer batch, which the
#: broker appends or refuses whole (two producer batches of one partition could fail and
#: succeed apart, putting a newer event of a key on the topic ahead of an older one).
PRODUCER_BATCH_BYTES = 1 << 20
BATCH_BYTES = PRODUCER_BATCH_BYTES - (64 << 10)
#: What a record costs in a producer batch beyond its key and value (at most), headers aside.
RECORD_OVERHEAD_BYTES = 64


@dataclass(frozen=True, slots=True)
class _Item:
    seq: int
    key: bytes
    value: bytes


class EventPublisher:
    """At-least-once delivery of keyed records to one topic, buffered in memory.

    ``headers`` are put on every record when it is sent (the embedded broker's epoch
    goes there, so records buffered across a rotation carry the new one).
    ``wire_format``: how :meth:`publish_event` encodes events (``NETTEL_WIRE_FORMAT``).
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        max_buffer: int = 100_000,
        batch_size: int = 2000,
        request_timeout_ms: int = 5000,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        producer_factory: Callable[..., Any] = AIOKafkaProducer,
        wire_format: WireFormat = "msgpack",
    ) -> None:
        self.wire_format: WireFormat = wire_format
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.request_timeout_ms = request_timeout_ms
        self.on_connect = on_connect
        self.producer_factory = producer_factory
        self.headers: tuple[Header, ...] = ()
        self.sent = 0
        self.dropped = 0
        self._buf: deque[_Item] = deque()
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._sending = asyncio.Lock()
        self._producer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_drop_log = 0.0
        self._connected = False
        self._down_logged = False
        self._topic_seen = False

    @property
    def buffered(self) -> int:
        """Events accepted and not yet acknowledged by the broker."""
        return len(self._buf)

    @property
    def connected(self) -> bool:
        """Whether the last send attempt reached the broker."""
        return self._connected

    def publish(self, key: bytes, value: bytes) -> None:
        """Accept one record; drops the oldest buffered one if the buffer is full."""
        if len(self._buf) >= self.max_buffer:
            self._buf.popleft()
            self.dropped += 1
            now = time.monotonic()
            if now - self._last_drop_log > 10:
                self._last_drop_log = now
                log.warning(
                    "buffer_overflow",
                    topic=self.topic,
                    dropped_total=self.dropped,
                    max_buffer=self.max_buffer,
                )
        self._buf.append(_Item(next(self._seq), key, value))
        self._wake.set()

    def record(self, event: StatEvent) -> tuple[bytes, bytes]:
        """The (key, value) of ``event``: keyed by its identity, in :attr:`wire_format`."""
        return event.identity.encode(), encode_stat_event(event, self.wire_format)

    def publish_event(self, event: StatEvent) -> None:
        """Accept one stats event (see :meth:`publish`)."""
        self.publish(*self.record(event))

    def pending(self) -> list[tuple[bytes, bytes]]:
        """(key, value) of every record accepted and not yet acknowledged, oldest first."""
        return [(it.key, it.value) for it in self._buf]

    def publish_first(self, records: list[tuple[bytes, bytes]]) -> None:
        """Accept ``records`` ahead of everything buffered (they are older than it).

        Call it with sending paused (:meth:`pause`): a batch in flight would not see them.
        """
        items = [_Item(next(self._seq), key, value) for key, value in records]
        self._buf.extendleft(reversed(items))
        self._wake.set()

    async def drained(self, at_most: int = 0) -> None:
        """Wait until at most ``at_most`` events are buffered (backpressure for bulk senders)."""
        while len(self._buf) > at_most:
            self._wake.set()
            await asyncio.sleep(0.01)

    async def pause(self) -> None:
        """Hold sending (events keep buffering); returns once no batch is in flight."""
        self._running.clear()
        async with self._sending:
            pass

    def resume(self) -> None:
        """Send again after :meth:`pause`."""
        self._running.set()
        self._wake.set()

    async def start(self) -> None:
        """Start the sender task (it connects in the background)."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name=f"publisher-{self.topic}")

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Try to send what is buffered within ``flush_timeout_s``, then close; safe twice."""
        if self._task is None:
            return
        self._closing = True
        self.resume()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), flush_timeout_s)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None
        await self._close_producer()
        if self._buf:
            log.warning("publisher_stopped_with_unsent", topic=self.topic, unsent=len(self._buf))

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _connect(self) -> bool:
        producer = self.producer_factory(
            bootstrap_servers=self.bootstrap_servers,
            compression_type="zstd",
            linger_ms=5,
            request_timeout_ms=self.request_timeout_ms,
            max_batch_size=PRODUCER_BATCH_BYTES,
        )
        try:
            await asyncio.wait_for(producer.start(), self.request_timeout_ms / 1000 * 2)
            if self.on_connect is not None:
                await self.on_connect()
        except Exception as e:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)
            if not self._down_logged:
                log.warning(
                    "broker_unreachable",
                    bootstrap=self.bootstrap_servers,
                    error=str(e),
                    buffered=len(self._buf),
                )
                self._down_logged = True
            self._connected = False
            return False
        self._producer = producer
        self._down_logged = False
        if not self._connected:
            log.info("broker_connected", bootstrap=self.bootstrap_servers, buffered=len(self._buf))
        self._connected = True
        self._topic_seen = False
        return True

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            if not self._buf:
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            if self._producer is None and not await self._connect():
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            await self._running.wait()
            async with self._sending:
                delivered = self._running.is_set() and await self._send_batch()
            if not self._running.is_set():
                continue
            if not delivered:
                await self._close_producer()
                self._connected = False
                self._down_logged = False

    async def _topic_present(self) -> bool:
        """Whether the broker we talk to has our topic; creates it (``on_connect``) if not.

        A fresh memory broker on the same address (a restart, a rotation) has no topics,
        yet acknowledges records sent to them and keeps nothing: every batch is checked
        after it is acknowledged (and sent again if the topic is gone), and before it is
        sent unless the previous check found the topic.
        """
        metadata = await self._producer.client.fetch_all_metadata()
        if self.topic in metadata.topics():
            return True
        log.warning("broker_lost_topic", topic=self.topic, bootstrap=self.bootstrap_servers)
        if self.on_connect is not None:
            await self.on_connect()
        await self._producer.client.force_metadata_update()
        return False

    async def _send_batch(self) -> bool:
        header_bytes = sum(len(k) + len(v) for k, v in self.headers)
        batch = _first_batch(self._buf, self.batch_size, BATCH_BYTES, header_bytes)
        ok: set[int] = set()
        try:
            if not self._topic_seen and not await self._topic_present():
                return True  # topic re-created: send on the next pass
            futures = []
            headers = list(self.headers)
            for it in batch:
                fut = await self._producer.send(
                    self.topic, value=it.value, key=it.key, headers=headers
                )
                futures.append((it.seq, fut))
            results = await asyncio.wait_for(
                asyncio.gather(*(f for _, f in futures), return_exceptions=True),
                self.request_timeout_ms / 1000 * 2,
            )
            ok = _delivered_in_order(batch, results)
            self._topic_seen = await self._topic_present()
            if ok and not self._topic_seen:
                ok = set()  # acknowledged by a broker that lost the topic: send again
            failed = len(batch) - len(ok)
        except Exception as e:
            failed = len(batch)
            log.warning("send_failed", topic=self.topic, error=repr(e), pending=len(self._buf))
        if ok:
            self._buf = deque(it for it in self._buf if it.seq not in ok)
            self.sent += len(ok)
            metrics.EVENTS_PUBLISHED.inc(len(ok))
        if failed:
            log.warning("send_incomplete", topic=self.topic, failed=failed, buffered=len(self._buf))
            return False
        return True


def _first_batch(buf: deque[_Item], count: int, max_bytes: int, header_bytes: int) -> list[_Item]:
    """The oldest items of ``buf``: at most ``count``, and (but for a first one larger
    alone) at most ``max_bytes`` as records with ``header_bytes`` of headers each.

    Examples
    --------
    >>> buf = deque(_Item(i, b"k", b"v" * 100) for i in range(10))
    >>> len(_first_batch(buf, 5, 10_000, 0)), len(_first_batch(buf, 50, 700, 0))
    (5, 4)
    """
    out: list[_Item] = []
    size = 0
    for item in itertools.islice(buf, count):
        size += len(item.key) + len(item.value) + header_bytes + RECORD_OVERHEAD_BYTES
        if out and size > max_bytes:
            break
        out.append(item)
    return out


def _delivered_in_order(batch: list[_Item], results: list[Any]) -> set[int]:
    """The ``seq`` of each event of ``batch`` (sent in order) taken as delivered: its own
    send succeeded, and every older event's of its key did too (a failed one is sent
    again, ahead of the younger ones of its key, which are then sent again as well: their
    copies are dropped downstream, a younger event ahead of an older one would not be).

    Examples
    --------
    >>> items = [_Item(i, k, b"") for i, k in enumerate([b"a", b"b", b"a", b"b"])]
    >>> sorted(_delivered_in_order(items, [None, RuntimeError("timeout"), None, None]))
    [0, 2]
    """
    failed: set[bytes] = set()
    ok: set[int] = set()
    for item, result in zip(batch, results, strict=True):
        if isinstance(result, BaseException) or item.key in failed:
            failed.add(item.key)
        else:
            ok.add(item.seq)
    return ok
