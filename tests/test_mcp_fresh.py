"""Freshness: traffic a real Podman container made shows in get_network_stats' totals
within 15 s of the kernel counting it (closed minutes from the tables, the open minute
from the ``samples`` table), with the default sample interval (5 s) and the stream
worker flushing every 5 s (``NETTEL_FLUSH_INTERVAL_S=5``; the default 30 s adds up to
25 s)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Engine, kernel_counters, start_ingest
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.ingest.sources import EngineSource
from nettel.mcp.server import build_server
from nettel.mcp.tools import TelemetryTools
from nettel.store.minute import MinuteTable
from nettel.store.samples import SamplesTable
from nettel.stream.worker import StreamWorker
from test_stream_worker import rollups

pytestmark = [pytest.mark.engine, pytest.mark.broker]

SAMPLE_INTERVAL_S = 5.0  # NETTEL_SAMPLE_INTERVAL_S's default
FLUSH_INTERVAL_S = 5.0
BLOB_BYTES = 1_000_000


async def received(client: Any, name: str) -> int | None:
    """bytes_received of the last hour for ``name``, through the MCP client."""
    result = await client.call_tool("get_network_stats", {"container": name})
    if result.is_error:  # not in the store yet
        return None
    value = result.structured_content["data"]["bytes_received"]
    return None if value is None else int(value)


async def test_latest_traffic_shows_within_15_s_of_the_kernel_counting_it(
    engine: Engine, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    from mcp import Client

    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, {"nettel.stats": 3, "nettel.stats.dlq": 1})
    server_c = engine.run(f"mkdir /www; dd if=/dev/zero of=/www/blob bs={BLOB_BYTES} count=1; "
                          "httpd -f -p 8080 -h /www")  # fmt: skip
    talker = engine.run("sleep 3600")
    pid = engine.pid(talker)
    ingest = await start_ingest(EngineSource(engine.url, inventory_interval_s=2.0), bootstrap,
                                SAMPLE_INTERVAL_S, partitions=3)  # fmt: skip
    data = tmp_path / "data"
    table = MinuteTable(f"{data}/minute")
    samples = SamplesTable(f"{data}/samples")
    worker = StreamWorker(bootstrap, table, flush_interval_s=FLUSH_INTERVAL_S,
                          rollups=rollups(table), samples=samples)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    server = build_server(TelemetryTools.for_data_dir(str(data), partitions=3))
    try:
        async with Client(server) as client:
            # quiet first: the store has caught up with the kernel's counter
            last: list[tuple[int | None, int]] = []

            async def settled() -> bool:
                last.append((await received(client, talker.name),
                             kernel_counters(pid)["rx_bytes"]))  # fmt: skip
                window = last[-3:]
                return (len(window) == 3 and window[0][0] is not None
                        and len(set(window)) == 1)  # fmt: skip

            deadline = time.monotonic() + 150
            while not await settled():
                assert time.monotonic() < deadline, f"the store never settled: {last[-3:]}"
                await asyncio.sleep(SAMPLE_INTERVAL_S / 2)
            stored_before, kernel_before = last[-1]
            assert stored_before is not None
            fetch = await asyncio.to_thread(
                talker.exec_run,
                ["wget", "-q", "-O", "/dev/null", f"http://{engine.ip(server_c)}:8080/blob"],
            )
            assert fetch.exit_code == 0, fetch.output
            kernel_after = kernel_counters(pid)["rx_bytes"]
            counted_at = time.monotonic()
            assert kernel_after - kernel_before > BLOB_BYTES
            seen: list[int | None] = []

            async def arrived() -> bool:
                seen.append(await received(client, talker.name))
                return (seen[-1] or 0) - stored_before >= kernel_after - kernel_before

            while not await arrived():
                assert time.monotonic() - counted_at <= 15, (
                    f"not in get_network_stats after 15 s: {seen[-1]} vs "
                    f"{stored_before} + {kernel_after - kernel_before}")  # fmt: skip
                await asyncio.sleep(0.5)
            lag_s = time.monotonic() - counted_at
            assert lag_s <= 15, lag_s
            print(f"kernel -> get_network_stats: {lag_s:.1f} s")
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await ingest.finish()
