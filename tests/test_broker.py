"""The embedded broker: Debian's kcat reads it, and rotation bounds memory losing nothing."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from structlog.testing import capture_logs

from conftest import free_port, require, wait_for
from nettel import broker as broker_module
from nettel.broker import (
    EPOCH_HEADER,
    BrokerRotation,
    EmbeddedBroker,
    ensure_topics,
    process_start_ticks,
    reap_orphan_broker,
    tansu_binary,
)
from nettel.ingest.publisher import EventPublisher

pytestmark = pytest.mark.broker

TOPICS = {"nettel.stats": 3}


async def test_debian_kcat_reads_what_nettel_publishes(broker: EmbeddedBroker) -> None:
    require(shutil.which("kcat") is not None, "kcat is not installed (apt-get install kcat)")
    publisher = EventPublisher(broker.bootstrap_servers, "other-topic")
    await ensure_topics(broker.bootstrap_servers, {"other-topic": 2})
    async with publisher:
        for i in range(5):
            publisher.publish(f"c{i}".encode(), f'{{"n": {i}}}'.encode())
        await wait_for(lambda: publisher.sent == 5, 20, "5 records sent")
    out = await asyncio.to_thread(
        subprocess.run,
        ["kcat", "-b", broker.bootstrap_servers, "-C", "-t", "other-topic", "-e", "-q",
         "-f", "%k=%s\n"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == [f'c{i}={{"n": {i}}}' for i in range(5)]


class EpochAwareReader:
    """A consumer that follows the embedded broker across rotations.

    A record whose epoch header is newer than the partition's means the broker was
    replaced: the new log started empty, so the partition is read again from offset 0.
    """

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.epoch = dict.fromkeys(self.tps, 0)
        self.values: list[bytes] = []
        self.epochs_seen: set[int] = set()

    async def rotated(self, epoch: int) -> None:
        """The broker was replaced: every partition starts again at offset 0."""
        for tp in self.tps:
            self.consumer.seek(tp, 0)
            self.epoch[tp] = epoch

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.start()
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(timeout_ms=200)
                for tp, msgs in batch.items():
                    for m in msgs:
                        epoch = int(dict(m.headers)[EPOCH_HEADER])
                        if epoch < self.epoch[tp]:
                            continue  # fetched from the old log before the switch
                        if epoch > self.epoch[tp]:
                            first = self.epoch[tp] == 0
                            self.epoch[tp] = epoch
                            if not first and m.offset > 0:
                                self.consumer.seek(tp, 0)
                                break
                        self.epochs_seen.add(epoch)
                        self.values.append(m.value)
        finally:
            await self.consumer.stop()


async def test_rotation_replaces_the_broker_and_loses_no_event(tmp_path: Path) -> None:
    broker = EmbeddedBroker(free_port(), epoch_path=tmp_path / "epoch")
    await broker.start(topics=TOPICS)
    publisher = EventPublisher(broker.bootstrap_servers, "nettel.stats")
    reader = EpochAwareReader(broker.bootstrap_servers, "nettel.stats", 3)
    stop = asyncio.Event()

    async def drained() -> bool:
        return len(set(reader.values)) >= publisher.sent

    rotation = BrokerRotation(
        broker, TOPICS, [publisher], max_rss_bytes=1, drained=drained,
        on_rotated=[reader.rotated], check_interval_s=0.5, drain_timeout_s=20,
    )  # fmt: skip
    first_epoch = broker.epoch
    reader_task = asyncio.create_task(reader.run(stop))
    rotation_task = asyncio.create_task(rotation.run(stop))
    total = 3000
    try:
        await publisher.start()
        for i in range(total):
            publisher.publish(f"c{i % 17}".encode(), f"event-{i}".encode())
            if i % 100 == 0:
                await asyncio.sleep(0.05)
        await wait_for(lambda: broker.rotations >= 2, 60, "two rotations")
        await wait_for(lambda: publisher.buffered == 0, 60, "everything sent")
        try:
            await wait_for(lambda: len(set(reader.values)) >= total, 30, "everything read")
        except AssertionError:
            raise AssertionError(
                f"read {len(set(reader.values))} of {total}, sent {publisher.sent}, "
                f"rotations {broker.rotations}, epochs {reader.epoch}"
            ) from None
    finally:
        stop.set()
        await asyncio.gather(reader_task, rotation_task, return_exceptions=True)
        await publisher.stop()
        await broker.stop()
    assert set(reader.values) == {f"event-{i}".encode() for i in range(total)}
    assert publisher.dropped == 0
    assert broker.epoch >= first_epoch + 2
    assert len(reader.epochs_seen) >= 2
    assert int((tmp_path / "epoch").read_text()) == broker.epoch


async def test_a_second_start_gets_the_next_epoch_and_a_full_log_is_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each start takes the next epoch; the broker log (appended to across starts) is
    moved to ``broker.log.1`` once past its bound, so it holds at most two files."""
    monkeypatch.setattr(broker_module, "BROKER_LOG_MAX_BYTES", 512)
    log = tmp_path / "logs" / "broker.log"
    log.parent.mkdir()
    log.write_bytes(b"an earlier run's lines\n" * 30)
    epochs = []
    for _ in range(2):
        b = EmbeddedBroker(free_port(), epoch_path=tmp_path / "epoch", log_path=log)
        await b.start()
        epochs.append(b.epoch)
        await b.stop()
    assert epochs[1] == epochs[0] + 1
    assert sorted(p.name for p in log.parent.iterdir()) == ["broker.log", "broker.log.1"]
    assert log.with_name("broker.log.1").read_bytes().startswith(b"an earlier run's")
    assert b"an earlier run's" not in log.read_bytes()
    assert log.read_bytes().count(b"tansu broker") == 2  # under the bound: appended


def tansu_processes_advertising(port: int) -> list[int]:
    """PIDs of Tansu brokers advertising ``127.0.0.1:port`` (read from /proc)."""
    needle = f"tcp://127.0.0.1:{port}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and b"tansu" in Path(os.fsdecode(args[0])).name.encode() and needle in args:
                found.append(int(entry.name))
    return found


def test_a_sigkilled_parent_leaves_no_broker_behind(tmp_path: Path) -> None:
    """The kernel kills Tansu with the process that spawned it (PR_SET_PDEATHSIG)."""
    port = free_port()
    script = (
        "import asyncio, sys\n"
        "from nettel.broker import EmbeddedBroker\n"
        "async def main():\n"
        f"    b = EmbeddedBroker({port}, pid_path={str(tmp_path / 'broker.pid')!r})\n"
        "    await b.start()\n"
        "    print('PID', b.pid, flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = ""
        while not line.startswith("PID "):  # structlog's default output comes first
            line = parent.stdout.readline()
            assert line, "the parent ended before its broker started"
        pid = int(line.split()[1])
        assert tansu_processes_advertising(port) == [pid]
        assert (tmp_path / "broker.pid").read_text().split()[0] == str(pid)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 10
    while tansu_processes_advertising(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tansu_processes_advertising(port) == [], "Tansu outlived its SIGKILLed parent"


async def test_an_orphan_named_in_the_pid_file_is_reaped_at_start(tmp_path: Path) -> None:
    """A broker an older nettel left running (no PDEATHSIG) is killed by the next start."""
    orphan_port = free_port()
    orphan = subprocess.Popen(
        [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{free_port()}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{orphan_port}",
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    pid_file = tmp_path / "broker.pid"
    pid_file.write_text(f"{orphan.pid} {process_start_ticks(orphan.pid)}\n")
    # a PID file naming a process that is not Tansu is left alone
    bystander = tmp_path / "other.pid"
    bystander.write_text(f"{os.getpid()} {process_start_ticks(os.getpid())}\n")
    assert reap_orphan_broker(bystander) is None
    broker = EmbeddedBroker(free_port(), pid_path=pid_file)
    try:
        with capture_logs() as logs:
            await broker.start()
        assert await asyncio.to_thread(orphan.wait, 10) == -signal.SIGKILL
        assert [e["pid"] for e in logs if e["event"] == "broker_orphan_reaped"] == [orphan.pid]
        assert pid_file.read_text().split()[0] == str(broker.pid), "the new broker is recorded"
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        await broker.stop()
    assert not pid_file.exists(), "a clean stop removes the PID file"


async def test_a_dead_broker_is_replaced_and_the_producers_resume(tmp_path: Path) -> None:
    broker = EmbeddedBroker(free_port(), epoch_path=tmp_path / "epoch")
    await broker.start(topics=TOPICS)
    publisher = EventPublisher(broker.bootstrap_servers, "nettel.stats")
    epochs: list[int] = []

    async def rotated(epoch: int) -> None:
        epochs.append(epoch)

    rotation = BrokerRotation(broker, TOPICS, [publisher], max_rss_bytes=1 << 40,
                              on_rotated=[rotated], on_restarted=[rotated],
                              liveness_interval_s=0.1)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(rotation.run(stop))
    try:
        async with publisher:
            publisher.publish(b"k", b"before")
            await wait_for(lambda: publisher.sent == 1, 20, "a record sent")
            dead = broker.pid
            assert dead is not None
            os.kill(dead, signal.SIGKILL)
            await wait_for(lambda: rotation.restarts == 1, 30, "the broker restarted")
            assert broker.pid != dead
            assert broker.epoch == 2
            assert epochs == [2, 2]
            assert publisher.headers == ((EPOCH_HEADER, b"2"),)
            publisher.publish(b"k", b"after")
            await wait_for(lambda: publisher.sent == 2, 30, "a record sent to the new broker")
    finally:
        stop.set()
        await task
        await broker.stop()
