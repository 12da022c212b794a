"""Windows close by time too: a container that goes quiet gets its last minute written.

Real Podman containers, real ingest, a real broker, the stream worker as `nettel up`
builds it, and the MCP tools' answers checked against the kernel's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import murmur2

from conftest import IMAGE, Engine, kernel_counters, start_ingest
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.cli import make_stream, topic_partitions
from nettel.config import Settings
from nettel.ingest.sources import EngineSource, Reading
from nettel.ingest.units import Unit
from nettel.mcp.tools import TelemetryTools

pytestmark = [pytest.mark.engine, pytest.mark.broker]

PARTITIONS = 8


class OnlyThese:
    """The real engine source, limited to this test's containers (others share the engine)."""

    def __init__(self, source: EngineSource, names: set[str]) -> None:
        self.source = source
        self.names = names
        self.name = source.name

    def refresh(self) -> None:
        self.source.refresh()

    def units(self) -> list[Unit]:
        return [u for u in self.source.units() if u.name in self.names]

    def read(self, unit: Unit) -> Reading:
        return self.source.read(unit)

    def reads_fast(self, unit: Unit) -> bool:
        return self.source.reads_fast(unit)

    def close(self) -> None:
        self.source.close()


def partition_of(identity: str) -> int:
    return int(murmur2(identity.encode()) & 0x7FFFFFFF) % PARTITIONS


def names_on_separate_partitions(count: int) -> list[str]:
    """Container names whose events land on ``count`` different partitions."""
    names: list[str] = []
    while len(names) < count:
        name = f"nt-idle-{uuid.uuid4().hex[:8]}"
        if partition_of(name) not in {partition_of(n) for n in names}:
            names.append(name)
    return names


@contextlib.contextmanager
def own_network(engine: Engine) -> Iterator[str]:
    """A bridge of this test's own: other tests' broadcasts (ARP) do not reach it."""
    name = f"nt-idle-{uuid.uuid4().hex[:8]}"
    network = engine.client.networks.create(name, driver="bridge")
    try:
        yield name
    finally:
        engine.cleanup()
        engine.created.clear()
        with contextlib.suppress(Exception):
            network.remove()


def run_on(engine: Engine, network: str, name: str, command: str) -> Any:
    c = engine.client.containers.run(IMAGE, ["sh", "-c", command], name=name, detach=True,
                                     network=network)  # fmt: skip
    assert c.id is not None
    engine.created.append(c.id)
    c.reload()
    return c


def nettel_counts(tools: TelemetryTools, name: str) -> dict[str, Any]:
    try:
        data = tools.network_stats(name, "hour", "sum").data
    except Exception:  # not in the tables yet
        return {}
    return {"rx_bytes": data.bytes_received, "tx_bytes": data.bytes_sent,
            "rx_packets": data.packets_received, "tx_packets": data.packets_sent}  # fmt: skip


async def test_a_paused_and_a_removed_container_reach_their_kernel_counters_within_90_s(
    engine: Engine, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    with own_network(engine) as network:
        await quiet_containers_are_written(engine, network, tmp_path / "data",
                                           broker.bootstrap_servers)  # fmt: skip


async def quiet_containers_are_written(
    engine: Engine, network: str, data: Path, bootstrap: str
) -> None:
    server_name, paused_name, removed_name = names_on_separate_partitions(3)
    serve = "mkdir -p /www && dd if=/dev/zero of=/www/f bs=1000 count=50 2>/dev/null"
    server = run_on(engine, network, server_name, f"{serve} && httpd -f -p 8080 -h /www")
    settings = Settings.from_env({
        "NETTEL_DATA_DIR": str(data), "NETTEL_PARTITIONS": str(PARTITIONS),
        "NETTEL_WINDOW_GRACE_S": "2", "NETTEL_FLUSH_INTERVAL_S": "1",
        "NETTEL_ROLLUP_INTERVAL_S": "0",
    })  # fmt: skip
    await ensure_topics(bootstrap, topic_partitions(settings))
    # the source is made before the clients start: they count from zero
    source = OnlyThese(EngineSource(engine.url, inventory_interval_s=1.0),
                       {server_name, paused_name, removed_name})  # fmt: skip
    ingest = await start_ingest(source, bootstrap, 0.5, partitions=PARTITIONS)
    worker = make_stream(settings, bootstrap)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    # a fixed amount of traffic, then quiet: the kernel's counters are then final
    burst = (f"sleep 2; for i in $(seq 15); do wget -q -O /dev/null "
             f"http://{engine.ip(server)}:8080/f; sleep 0.2; done; sleep 3600")  # fmt: skip
    paused = run_on(engine, network, paused_name, burst)
    removed = run_on(engine, network, removed_name, burst)
    tools = TelemetryTools.for_data_dir(settings.data_dir, partitions=PARTITIONS)
    compared = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
    try:
        # the kernel's counters from the end of the traffic to the pause (or removal):
        # a stray packet (neighbour discovery) may still move them, and nettel's total
        # must equal one of these readings exactly (its last sample's)
        truth: dict[str, list[dict[str, int]]] = {}
        pids = {c.name: engine.pid(c) for c in (paused, removed)}
        for c in (paused, removed):  # wait until its traffic is over and sampled
            last: dict[str, int] = {}
            while (now := kernel_counters(pids[c.name])) != last or now["tx_packets"] == 0:
                last = now
                await asyncio.sleep(1.5)
            truth[c.name] = [{k: now[k] for k in compared}]
        truth[removed_name].append({k: kernel_counters(pids[removed_name])[k] for k in compared})
        await asyncio.to_thread(removed.remove, force=True)
        truth[paused_name].append({k: kernel_counters(pids[paused_name])[k] for k in compared})
        await asyncio.to_thread(paused.pause)
        truth[paused_name].append({k: kernel_counters(pids[paused_name])[k] for k in compared})
        quiet_since = time.monotonic()
        got: dict[str, dict[str, Any]] = {}
        while time.monotonic() - quiet_since < 90:
            got = {n: nettel_counts(tools, n) for n in truth}
            if all(got[n] in truth[n] for n in truth):
                break
            await asyncio.sleep(1.0)
        assert all(got[n] in truth[n] for n in truth), (
            f"after {time.monotonic() - quiet_since:.0f} s", got, truth)  # fmt: skip
        assert got[paused_name]["rx_bytes"] > 500_000, "the burst was counted"
        assert worker.stats.idle_advances >= 1, "closed by the wall clock, not by events"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await ingest.finish()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(paused.unpause)
