"""A Kafka-protocol front for the embedded broker: relays frames, mends one response.

Tansu 0.6 answers ApiVersions v3+ with top-level tagged fields at their default values
(SupportedFeatures, FinalizedFeaturesEpoch=-1, ...). That is valid Kafka, but
librdkafka before 2.1 (Debian bookworm's kcat, librdkafka 2.0.2) misreads them and
drops the connection. The front sits on the embedded broker's public port, relays
every frame unchanged except those responses, which it re-encodes without the
optional tagged fields, and lets the broker behind it be swapped (rotation): new
connections go to the new upstream, old ones are closed so clients reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

API_VERSIONS = 18


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _put_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _skip_tags(buf: bytes, pos: int) -> int:
    count, pos = _uvarint(buf, pos)
    for _ in range(count):
        _, pos = _uvarint(buf, pos)
        size, pos = _uvarint(buf, pos)
        pos += size
    return pos


def strip_api_versions_tags(body: bytes) -> bytes:
    """ApiVersions v3+ response ``body`` (from the correlation id on) without tagged fields.

    Returns ``body`` unchanged if it does not parse as such a response.

    Examples
    --------
    >>> body = bytes.fromhex("00000001" "0000" "02" "001200000003" "00" "00000000"
    ...                      "02" "000101" "0108ffffffffffffffff")
    >>> strip_api_versions_tags(body).hex()
    '00000001000002001200000003000000000000'
    >>> strip_api_versions_tags(b"junk") == b"junk"
    True
    """
    try:
        pos = 6
        n, pos = _uvarint(body, pos)
        out = bytearray(body[:6]) + _put_uvarint(n)
        for _ in range(max(n - 1, 0)):
            out += body[pos : pos + 6]
            pos = _skip_tags(body, pos + 6)
            out += b"\x00"
        out += body[pos : pos + 4]
        pos = _skip_tags(body, pos + 4)
        if pos != len(body):
            return body
        out += b"\x00"
        return bytes(out)
    except IndexError:
        return body


class KafkaFront:
    """Listens on ``host:port`` and relays each connection to the current upstream."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int]) -> None:
        self.host = host
        self.port = port
        self.upstream = upstream
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and close every relayed connection; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self.drop_connections()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)

    async def switch(self, upstream: tuple[str, int]) -> None:
        """Send new connections to ``upstream`` and close the old ones."""
        self.upstream = upstream
        await self.drop_connections()

    async def drop_connections(self) -> None:
        """Close every relayed connection (clients reconnect)."""
        conns, self._conns = list(self._conns), set()
        for pair in conns:
            for w in pair:
                w.transport.abort()
        await asyncio.sleep(0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_writer: asyncio.StreamWriter | None = None
        pair = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            pair = (writer, up_writer)
            self._conns.add(pair)
            pending: set[int] = set()
            requests = functools.partial(self._note_api_versions, pending)
            responses = functools.partial(self._mend_api_versions, pending)
            pumps = [
                asyncio.create_task(self._relay(reader, up_writer, requests)),
                asyncio.create_task(self._relay(up_reader, writer, responses)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                for p in pumps:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await p
        except OSError as e:
            log.debug("front_upstream_unreachable", upstream=self.upstream, error=str(e))
        finally:
            if pair is not None:
                self._conns.discard(pair)
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    @staticmethod
    async def _relay(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mend: Callable[[bytes], bytes],
    ) -> None:
        """Copy length-prefixed Kafka frames from ``reader`` to ``writer``, through ``mend``."""
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:
                head = await reader.readexactly(4)
                body = mend(await reader.readexactly(int.from_bytes(head, "big")))
                writer.write(len(body).to_bytes(4, "big") + body)
                await writer.drain()

    @staticmethod
    def _note_api_versions(pending: set[int], body: bytes) -> bytes:
        api_key, version, correlation = struct.unpack_from(">hhi", body)
        if api_key == API_VERSIONS and version >= 3:
            pending.add(correlation)
        return body

    @staticmethod
    def _mend_api_versions(pending: set[int], body: bytes) -> bytes:
        if pending:
            (correlation,) = struct.unpack_from(">i", body)
            if correlation in pending:
                pending.discard(correlation)
                return strip_api_versions_tags(body)
        return body
