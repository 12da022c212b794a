"""The consumer runtime with a small job: restore offsets, batches, idle partitions, a
failing job (state, re-run from the store), start/stop. Real broker."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from conftest import wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.stream.runtime import ConsumerRuntime, ConsumerSettings

pytestmark = pytest.mark.broker

TOPIC = "runtime.test"


class Recorder:
    """Keeps what it is fed; 'stored' offsets play the store; b"boom" makes it fail."""

    def __init__(self, stored: dict[int, int]) -> None:
        self.stored = stored
        self.values: list[tuple[int, int, bytes]] = []
        self.idle_seen: set[int] = set()
        self.calls: list[str] = []

    async def open(self) -> None:
        self.calls.append("open")

    async def close(self) -> None:
        self.calls.append("close")

    async def restore(self, partitions: list[int]) -> dict[int, int]:
        return {p: self.stored.get(p, 0) for p in partitions}

    async def revoked(self, partitions: list[int]) -> None:
        self.calls.append("revoked")

    async def process(self, batch: Mapping[int, Sequence[Any]], now_ms: int) -> None:
        for p, records in batch.items():
            for r in records:
                if r.value == b"boom":
                    raise ValueError("the job failed")
                self.values.append((p, r.offset, r.value))
                self.stored[p] = r.offset + 1

    def idle(self, partition: int, now_ms: int) -> None:
        self.idle_seen.add(partition)

    async def tick(self) -> None:
        self.calls.append("tick")

    async def seal(self) -> None:
        self.calls.append("seal")

    async def reset(self, epoch: int, sealed: bool) -> list[int]:
        return []

    async def finish(self) -> None:
        self.calls.append("finish")


def state_of(runtime: ConsumerRuntime) -> str:
    return runtime.state


async def send(bootstrap: str, values: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for p, v in values:
            await producer.send_and_wait(TOPIC, v, partition=p)
    finally:
        await producer.stop()


async def test_the_runtime_feeds_a_job_from_its_stored_offsets_and_survives_its_failure(
    broker: EmbeddedBroker,
) -> None:
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, {TOPIC: 2})
    await send(bootstrap, [(0, b"a0"), (0, b"a1"), (1, b"b0"), (0, b"boom"), (1, b"b1")])
    settings = ConsumerSettings(group="runtime-test", topic=TOPIC, tick_interval_s=0.2,
                                idle_timeout_s=0.5)  # fmt: skip
    job = Recorder({0: 1})  # offset 0 of partition 0 is already in "the store"
    runtime = ConsumerRuntime(bootstrap, job, settings)
    with pytest.raises(ValueError, match="the job failed"):
        await asyncio.wait_for(runtime.run(asyncio.Event()), 60)
    assert state_of(runtime) == "failed"
    assert job.calls[0] == "open"
    assert job.calls[-1] == "close"
    assert (0, 0, b"a0") not in job.values, "read from the restored offset"
    assert (0, 1, b"a1") in job.values
    # run again, as a supervisor would, past the poisoned record: nothing read twice
    job.stored[0] = 3
    async with runtime:
        await wait_for(lambda: {0, 1} <= job.idle_seen, 30, "both partitions idle")
        assert state_of(runtime) == "running"
    assert state_of(runtime) == "stopped"
    assert "finish" in job.calls
    assert "tick" in job.calls
    assert sorted(job.values) == [(0, 1, b"a1"), (1, 0, b"b0"), (1, 1, b"b1")]
