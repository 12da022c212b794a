"""The health-check MCP server through the SDK's real client: stdio (`nettel mcp --server
health-check`), streamable HTTP (`nettel mcp --http`, at /health-check/mcp beside the
others on one port) and in process for the answer budget, over a ``health`` table
written by its real writer: 500 containers over 30 days, every one calling ``db`` (a
fan-in of 500) and its neighbour; db died and restarted, ten callers turned unhealthy;
``legacy`` lost its only client three hours ago.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from conftest import free_port
from nettel.mcp.health import HealthTools, build_health_server
from nettel.models import HealthRecord
from nettel.store.health import HealthTable
from test_mcp import nettel_http

NETTEL = str(Path(sys.executable).with_name("nettel"))
CONTAINERS = 500
BUDGET = 8_000
#: the container restart_container may restart over HTTP (none such runs: never called)
ACTS_ON = "hc-never-created"
DAY_MS = 86_400_000


def records(now_ms: int) -> list[HealthRecord]:
    """Starts 30 days ago, db's death and restart 12 and 11 minutes ago, every 50th
    caller unhealthy 10 minutes ago, and 20 minutes of edges (the last 30 minutes)."""
    out = []
    names = [f"svc-{i}" for i in range(CONTAINERS - 1)]
    for i, name in enumerate([*names, "db"]):
        out.append(HealthRecord(ts_ms=now_ms - 30 * DAY_MS + i * 60_000, host="h", kind="start",
                                container=name, container_id=f"{i:064x}", status="running",
                                health="healthy"))  # fmt: skip
    out.append(HealthRecord(ts_ms=now_ms - 12 * 60_000, host="h", kind="die", container="db",
                            status="exited", health="healthy", exit_code=137))  # fmt: skip
    out.append(HealthRecord(ts_ms=now_ms - 11 * 60_000, host="h", kind="start", container="db",
                            status="running", health="healthy", restarts=1))  # fmt: skip
    for i in range(0, CONTAINERS - 1, 50):
        out.append(HealthRecord(ts_ms=now_ms - 10 * 60_000, host="h", kind="health",
                                container=f"svc-{i}", status="running", health="unhealthy",
                                output="connect to db:5432 refused"))  # fmt: skip
    gone = now_ms - 3 * 3_600_000  # legacy's only client left 3 hours ago
    out.append(HealthRecord(ts_ms=gone, host="h", kind="edge", container="old-client",
                            server="legacy", port=9000, connections=1, samples=4,
                            first_seen_ms=gone, last_seen_ms=gone))  # fmt: skip
    first = now_ms - now_ms % 60_000 - 30 * 60_000
    for m in range(20):
        ts = first + m * 60_000
        for i, name in enumerate(names):
            for server, port, n in (("db", 5432, i % 5 + 1),
                                    (names[(i + 1) % len(names)], 8080, 1)):  # fmt: skip
                out.append(HealthRecord(ts_ms=ts, host="h", kind="edge", container=name,
                                        server=server, port=port, connections=n, samples=4,
                                        first_seen_ms=ts, last_seen_ms=ts + 59_000))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The health table filled through its writer."""
    base = str(tmp_path_factory.mktemp("mcp-health"))
    rows = records(time.time_ns() // 1_000_000)
    HealthTable(f"{base}/health").append([(r, 0, i) for i, r in enumerate(rows)], {0: len(rows)},
                                         writer="test", topic="nettel.health", epoch=0)  # fmt: skip
    return base


async def call(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert not result.is_error, (tool, args, text)
    assert len(text) <= BUDGET, (tool, args, len(text))
    doc: dict[str, Any] | None = result.structured_content
    assert doc is not None
    assert "as_of" in doc
    return doc


async def check_tools(client: Client, actions: str = "") -> None:
    """Every tool's answers match the records written; bad input is refused on one line.
    ``actions``: the container NETTEL_ACTIONS_CONTAINERS names (else restart_container
    and stop_container, the tools shared with resource-monitor, are absent)."""
    assert client.server_info is not None
    assert client.server_info.name == "health-check"
    names = {t.name for t in (await client.list_tools()).tools}
    reading = {"get_health", "get_dependencies", "get_incidents"}
    assert names == (reading | {"restart_container", "stop_container"} if actions else reading)
    if actions:  # the shared guard: refused before anything happens
        for tool in ("restart_container", "stop_container"):
            for args in ({"container": "db", "confirm": True}, {"container": actions}):
                refused = await client.call_tool(tool, args)
                text = " ".join(getattr(c, "text", "") for c in refused.content)
                assert refused.is_error
                assert "not in NETTEL_ACTIONS_CONTAINERS" in text or "confirm=true" in text, text
    doc = await call(client, "get_health", {"container": "svc-50"})
    (entry,) = doc["containers"]
    assert (entry["status"], entry["output"]) == ("unhealthy", "connect to db:5432 refused")
    doc = await call(client, "get_health", {"container": "db"})
    (entry,) = doc["containers"]
    assert (entry["status"], entry["restarts"], entry["last_exit"]["code"]) == ("healthy", 1, 137)
    doc = await call(client, "get_health", {"limit": 10})
    assert doc["total"] == CONTAINERS
    assert {e["container"] for e in doc["containers"]} == {f"svc-{i}" for i in range(0, 499, 50)}
    doc = await call(client, "get_dependencies", {"container": "svc-7", "depth": 1})
    assert sorted((e["server"], e["port"], e["connections"]) for e in doc["upstream"]) == [
        ("db", 5432, 3), ("svc-8", 8080, 1)]  # fmt: skip
    assert [(e["client"], e["depth"]) for e in doc["downstream"]] == [("svc-6", 1)]
    doc = await call(client, "get_dependencies", {"container": "db"})
    assert doc["total"] == CONTAINERS - 1
    assert [e["connections"] for e in doc["downstream"][:2]] == [5, 5]  # busiest first
    assert "cursor=" in doc["hint"]
    doc = await call(client, "get_incidents", {"since": "hour"})
    incident, abandoned = doc["incidents"]  # newest first
    assert abandoned["containers"] == ["legacy"]
    assert abandoned["explanation"].startswith("legacy lost all its clients (old-client): ")
    assert (incident["root"], incident["count"]) == ("db", 11)
    assert incident["explanation"].startswith("svc-0, svc-100, svc-150 and 7 more unhealthy; ")
    assert "all depend on db:5432, which died (exit 137) at " in incident["explanation"]
    bad = await client.call_tool("get_health", {"container": "svc-nope"})
    text = " ".join(getattr(c, "text", "") for c in bad.content)
    assert bad.is_error
    assert "closest known" in text
    assert "\n" not in text
    bad = await client.call_tool("get_dependencies", {"container": "db", "depth": 9})
    assert bad.is_error
    assert "depth" in " ".join(getattr(c, "text", "") for c in bad.content)


async def test_health_check_over_stdio(data_dir: str) -> None:
    env = {**os.environ, "NETTEL_DATA_DIR": data_dir, "NETTEL_LOG_FORMAT": "json"}
    params = StdioServerParameters(command=NETTEL, args=["mcp", "--server", "health-check"],
                                   env=env)  # fmt: skip
    async with Client(params, read_timeout_seconds=60) as client:
        await check_tools(client)


@pytest.fixture
def http_server(data_dir: str) -> Iterator[tuple[str, str]]:
    port = free_port()
    token = "a-test-token-of-at-least-32-characters"
    env = {**os.environ, "NETTEL_DATA_DIR": data_dir, "NETTEL_MCP_TOKEN": token,
           "NETTEL_MCP_PORT": str(port), "NETTEL_ACTIONS_CONTAINERS": ACTS_ON}  # fmt: skip
    with nettel_http(env, port):
        yield f"http://127.0.0.1:{port}", token


async def test_health_check_over_http(http_server: tuple[str, str]) -> None:
    base, token = http_server
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as h:
        transport = streamable_http_client(f"{base}/health-check/mcp", http_client=h)
        async with Client(transport, read_timeout_seconds=60) as client:
            await check_tools(client, actions=ACTS_ON)
    async with httpx.AsyncClient(timeout=10) as anonymous:  # the same guard on every path
        assert (await anonymous.post(f"{base}/health-check/mcp")).status_code == 401


async def test_every_health_answer_fits_the_budget(data_dir: str) -> None:
    """Default answers, the largest pages and every timeframe at 500 containers."""
    server = build_health_server(HealthTools.for_data_dir(data_dir))
    async with Client(server) as client:
        calls: list[tuple[str, dict[str, Any]]] = [
            ("get_health", {}), ("get_health", {"limit": 50}), ("get_dependencies", {}),
            ("get_dependencies", {"limit": 50}), ("get_incidents", {}),
            ("get_incidents", {"limit": 50}),
        ]  # fmt: skip
        for tf in ("hour", "day", "week", "month"):
            calls.append(("get_incidents", {"since": tf}))
            calls.append(("get_dependencies", {"container": "db", "depth": 3, "timeframe": tf,
                                               "limit": 50}))  # fmt: skip
        calls.append(("get_dependencies", {"container": "svc-1", "depth": 3, "limit": 50}))
        for tool, args in calls:
            await call(client, tool, args)
        paged = await call(client, "get_health", {"limit": 50})
        second = await call(client, "get_health", {"limit": 50, "cursor": paged["next"]})
        first = {e["container"] for e in paged["containers"]}
        assert first.isdisjoint(e["container"] for e in second["containers"])
