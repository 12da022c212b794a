"""The resource-monitor MCP server through the SDK's real client: stdio (`nettel mcp
--server resource-monitor`), streamable HTTP (`nettel mcp --http`, beside network-telemetry
on the same port) and in process for the answer budget, over resource tables written by
the real table writer and rollup from a known event set (500 containers, the budget's
shape)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import msgspec
import numpy as np
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from conftest import engine_url, free_port, require
from nettel.detect.alerts import Alert
from nettel.mcp.resources import ProcessEntry, ResourceTools, build_resource_server
from nettel.mcp.tools import window
from nettel.models import ResourceAggregate, ResourceEvent, window_start
from nettel.store.alerts import AlertTable
from nettel.store.minute import PartitionPoint
from nettel.store.resources import RESOURCE_ROLLUP, ResourceMinuteTable
from nettel.store.rollup import HOUR_MS, RollupTable
from nettel.stream.windows import ReplayPoint
from test_mcp import nettel_http

NETTEL = str(Path(sys.executable).with_name("nettel"))
CONTAINERS = 500
MINUTES = 70
MiB = 1 << 20
BUDGET = 8_000
#: the container restart_container may restart over HTTP (none such runs: never called)
ACTS_ON = "nt-never-created"
#: containers whose memory does not grow / has no limit (the others': a staircase)
FLAT, NO_LIMIT = 6, 5
#: the resource alerts the store holds: a leak and an OOM kill of svc-3, and throttling
#: of svc-10 .. svc-309 (scores 10 .. 309); and two that are not resource alerts
THROTTLED = range(10, 310)
LEAK_TTL_S = 1234.0


def alert_rows(now_ms: int) -> list[dict[str, Any]]:
    """The alerts table's rows (as the detectors and actions write them)."""
    made = [
        ("svc-3", "memory_memory_leak", "memory_leak", "critical", 5.0, LEAK_TTL_S),
        ("svc-3", "oom_kills", "oom_kill", "warning", 1.0, None),
        ("svc-3", "rx_bytes", "", "critical", 9.0, None),
        ("svc-4", "restart", "restart_container", "warning", 0.0, None),
    ]
    made += [(f"svc-{c}", "cpu_throttled", "cpu_throttling", "info", float(c), None)
             for c in THROTTLED]  # fmt: skip
    rows = []
    for i, (who, metric, rule, severity, score, ttl) in enumerate(made):
        a = Alert(id=f"{i:020x}", status="open", identity=who, metric=metric, rule=rule,
                  started_ms=now_ms - 600_000, updated_ms=now_ms - 60_000, observed=score,
                  peak=score, expected=0.0, band_low=0.0, band_high=0.0, score=score,
                  severity=severity, time_to_limit_s=ttl,  # type: ignore[arg-type]
                  explanation=f"{rule or 'traffic'} of {who}: " + "why " * 20)  # fmt: skip
        rows.append(msgspec.to_builtins(a) | {"partition": -1, "offset": -1})
    return rows


def events_for(now_ms: int) -> list[ResourceEvent]:
    """One sample a minute for the last ``MINUTES`` minutes of ``CONTAINERS`` containers."""
    out = []
    first = window_start(now_ms) - MINUTES * 60_000
    for m in range(MINUTES):
        for c in range(CONTAINERS):
            out.append(ResourceEvent(
                ts_ms=first + m * 60_000 + 30_000, host="h", container_id=f"{c:064x}",
                identity=f"svc-{c}", name=f"svc-{c}", interval_ms=60_000,
                cpu_usage_us=(c + 1) * 1000 * (1 + m % 3), io_write_bytes=4096 * c * (m % 2),
                io_read_bytes=512 * m,
                memory_bytes=MiB * (10 + c % 7 + (m // 10) * (c != FLAT)),
                memory_limit_bytes=0 if c == NO_LIMIT else 256 * MiB, pids=1 + m % 4,
                oom_kills=int(m == 5 and c == 3),
                source="cgroup-v2"))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[ResourceEvent]]:
    """Resource tables filled through their writer and rollup."""
    data_dir = str(tmp_path_factory.mktemp("mcp-resources"))
    events = events_for(time.time_ns() // 1_000_000)
    windows: dict[tuple[str, int], ResourceAggregate] = {}
    for ev in events:
        key = (ev.identity, window_start(ev.ts_ms))
        agg = windows.setdefault(key, ResourceAggregate.first(ev))
        agg.partition = 0
        agg.add(ev)
    table = ResourceMinuteTable(f"{data_dir}/resource_minute")
    point = ReplayPoint(len(events), -1, len(events), -1)
    table.append(list(windows.values()), [PartitionPoint("nettel.resources", 0, point)],
                 writer="test", epoch=0)  # fmt: skip
    hour = RollupTable(f"{data_dir}/resource_hour", table, HOUR_MS, spec=RESOURCE_ROLLUP)
    hour.roll(0, writer="test", topic="nettel.resources")
    AlertTable(f"{data_dir}/alerts").append(alert_rows(events[-1].ts_ms), {}, writer="test",
                                            topic="nettel.alerts", epoch=0)  # fmt: skip
    return data_dir, events


def expected(events: list[ResourceEvent], identity: str, now_ms: int) -> dict[str, Any]:
    start, end = window("hour", now_ms)
    mine = [e for e in events if e.identity == identity and start <= window_start(e.ts_ms) < end]
    mine.sort(key=lambda e: e.ts_ms)
    seconds = sum(e.interval_ms for e in mine) / 1000
    cpu_us = sum(e.cpu_usage_us for e in mine)
    return {"cpu_seconds": cpu_us / 1e6, "cpu_percent": 100 * cpu_us / (seconds * 1e6),
            "disk_write_bytes": sum(e.io_write_bytes for e in mine),
            "disk_read_bytes": sum(e.io_read_bytes for e in mine),
            "memory_bytes": mine[-1].memory_bytes, "memory_limit_bytes": 256 * MiB,
            "pids": mine[-1].pids}  # fmt: skip


def close(a: Any, b: float) -> bool:
    return bool(abs(float(a) - b) <= 5e-4 * max(1e-9, abs(b)))


async def check_tools(client: Client, events: list[ResourceEvent], actions: str = "") -> None:
    """Every tool's answers equal values computed from the events; bad input is refused.
    ``actions``: the container NETTEL_ACTIONS_CONTAINERS names (else restart_container is
    absent); calls that name another or lack confirm are refused (the permitted restart:
    tests/test_resources.py, with a real engine)."""
    assert client.server_info is not None
    assert client.server_info.name == "resource-monitor"
    names = {t.name for t in (await client.list_tools()).tools}
    reading = {
        "get_resource_stats",
        "get_top_resource_consumers",
        "get_resource_timeseries",
        "get_resource_anomalies",
        "forecast_memory",
        "list_processes",
    }
    acting = {"restart_container", "stop_container"}
    assert names == (reading | acting if actions else reading)
    if actions:
        for tool in sorted(acting):
            for args in ({"container": "svc-3", "confirm": True}, {"container": actions}):
                refused = await client.call_tool(tool, args)
                assert refused.is_error
                text = " ".join(getattr(c, "text", "") for c in refused.content)
                assert "not in NETTEL_ACTIONS_CONTAINERS" in text or "confirm=true" in text, text
                assert len(text) <= BUDGET
    await check_anomalies_and_forecast(client, events)
    for _ in range(3):  # the expected window is known only within one minute
        t0 = time.time_ns() // 1_000_000
        one = await client.call_tool("get_resource_stats", {"container": "svc-3"})
        if t0 // 60_000 == time.time_ns() // 60_000_000:
            break
    assert not one.is_error, one.content
    doc = one.structured_content
    assert doc is not None
    assert doc["container"] == "svc-3"
    assert doc["timeframe"] == "hour"
    for field, value in expected(events, "svc-3", t0).items():
        assert close(doc["data"][field], value), (field, doc["data"][field], value)
    for _ in range(3):
        t0 = time.time_ns() // 1_000_000
        series = await client.call_tool("get_resource_timeseries", {
            "container": "svc-3", "timeframe": "hour", "metric": "disk_write_bytes"})  # fmt: skip
        if t0 // 60_000 == time.time_ns() // 60_000_000:
            break
    assert not series.is_error, series.content
    doc = series.structured_content
    assert doc is not None
    assert doc["bucket_seconds"] == 60
    assert sum(p["value"] for p in doc["points"]) == expected(events, "svc-3", t0)[
        "disk_write_bytes"]  # fmt: skip
    top = await client.call_tool("get_top_resource_consumers",
                                 {"timeframe": "hour", "resource": "cpu", "limit": 3})  # fmt: skip
    assert not top.is_error
    assert top.structured_content is not None
    ranked = [e["container"] for e in top.structured_content["top"]]
    assert ranked == ["svc-499", "svc-498", "svc-497"]
    everyone = await client.call_tool("get_resource_stats", {"aggregation": "max"})
    assert everyone.structured_content is not None
    assert everyone.structured_content["container"] == "*"
    assert everyone.structured_content["total"] == CONTAINERS
    bad = await client.call_tool("get_resource_stats", {"container": "svc-nope"})
    text = " ".join(getattr(c, "text", "") for c in bad.content)
    assert bad.is_error
    assert "closest known" in text
    assert "\n" not in text
    bad = await client.call_tool("get_top_resource_consumers", {"resource": "gpu"})
    assert bad.is_error


async def check_anomalies_and_forecast(client: Client, events: list[ResourceEvent]) -> None:
    """get_resource_anomalies: only resource alerts, most severe first, then by score, the
    leak with its time to the limit; forecast_memory: the least-squares line through the
    container's minute peaks (numpy's fit over the same events), each outlook."""
    found = await client.call_tool("get_resource_anomalies", {})
    assert not found.is_error, found.content
    doc = found.structured_content
    assert doc is not None
    got = [(a["container"], a["rule"], a.get("time_to_limit_s")) for a in doc["alerts"]]
    assert got == [("svc-3", "memory_leak", LEAK_TTL_S), ("svc-3", "oom_kill", None)] + [
        (f"svc-{c}", "cpu_throttling", None) for c in (309, 308, 307, 306, 305, 304, 303, 302)
    ]
    assert doc["omitted"] == 2 + len(THROTTLED) - 10
    assert doc["alerts"][0]["explanation"].startswith("memory_leak of svc-3")
    later = await client.call_tool("get_resource_anomalies", {"cursor": doc["next"]})
    assert later.structured_content is not None
    assert later.structured_content["alerts"][0]["container"] == "svc-301"
    mine = await client.call_tool("get_resource_anomalies", {"container": "svc-3",
                                                             "status": "resolved"})  # fmt: skip
    assert mine.structured_content is not None
    assert mine.structured_content["alerts"] == []
    mine = await client.call_tool("get_resource_anomalies", {"container": "svc-3"})
    assert mine.structured_content is not None
    assert [a["rule"] for a in mine.structured_content["alerts"]] == ["memory_leak", "oom_kill"]
    for bad in ({"since": "yesterday-ish"}, {"container": "svc-nope"}, {"status": "closed"}):
        refused = await client.call_tool("get_resource_anomalies", bad)
        assert refused.is_error, bad
    fc = await client.call_tool("forecast_memory", {"container": "svc-3"})
    assert not fc.is_error, fc.content
    f = fc.structured_content
    assert f is not None
    assert f["outlook"] == "reaches limit"
    assert 58 <= f["minutes"] <= 61
    mine_ev = sorted((e for e in events if e.identity == "svc-3"), key=lambda e: e.ts_ms)
    fitted = mine_ev[-f["minutes"] :]
    slope = np.polyfit([e.ts_ms / 1000 for e in fitted], [e.memory_bytes for e in fitted], 1)[0]
    assert abs(f["slope_bytes_per_s"] - slope) <= 1e-3 * slope
    assert f["memory_bytes"] == fitted[-1].memory_bytes
    assert f["memory_limit_bytes"] == 256 * MiB
    eta = (256 * MiB - fitted[-1].memory_bytes) / slope
    assert abs(f["time_to_limit_s"] - eta) <= 1e-3 * eta
    flat = await client.call_tool("forecast_memory", {"container": f"svc-{FLAT}"})
    unlimited = await client.call_tool("forecast_memory", {"container": f"svc-{NO_LIMIT}"})
    assert flat.structured_content is not None
    assert unlimited.structured_content is not None
    assert (flat.structured_content["outlook"], unlimited.structured_content["outlook"]) == (
        "not growing", "no limit")  # fmt: skip
    assert "time_to_limit_s" not in flat.structured_content
    assert "memory_limit_bytes" not in unlimited.structured_content
    assert (await client.call_tool("forecast_memory", {"container": "svc-nope"})).is_error


async def test_resource_monitor_over_stdio(store: tuple[str, list[ResourceEvent]]) -> None:
    data_dir, events = store
    env = {**os.environ, "NETTEL_DATA_DIR": data_dir, "NETTEL_LOG_FORMAT": "json"}
    params = StdioServerParameters(command=NETTEL, args=["mcp", "--server", "resource-monitor"],
                                   env=env)  # fmt: skip
    async with Client(params, read_timeout_seconds=60) as client:
        await check_tools(client, events)


@pytest.fixture
def http_server(store: tuple[str, list[ResourceEvent]]) -> Iterator[tuple[str, str]]:
    socket = engine_url().removeprefix("unix://")  # list_processes reads the engine
    require(os.path.exists(socket), f"a container engine at {socket}")
    port = free_port()
    token = "a-test-token-of-at-least-32-characters"
    env = {**os.environ, "NETTEL_DATA_DIR": store[0], "NETTEL_MCP_TOKEN": token,
           "NETTEL_MCP_PORT": str(port), "NETTEL_ACTIONS_CONTAINERS": ACTS_ON,
           "DOCKER_HOST": engine_url()}  # fmt: skip
    with nettel_http(env, port):
        yield f"http://127.0.0.1:{port}", token


async def test_both_servers_over_http_on_one_port(
    http_server: tuple[str, str], store: tuple[str, list[ResourceEvent]]
) -> None:
    base, token = http_server
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as h:
        transport = streamable_http_client(f"{base}/resource-monitor/mcp", http_client=h)
        async with Client(transport, read_timeout_seconds=60) as client:
            await check_tools(client, store[1], actions=ACTS_ON)
            # list_processes reaches the engine over HTTP too: a name no container has is
            # answered with the running ones (one engine list; no container of our own:
            # a real one's processes are checked over stdio in tests/test_resources.py)
            listed = await client.call_tool("list_processes", {"container": ACTS_ON})
            text = " ".join(getattr(c, "text", "") for c in listed.content)
            assert listed.is_error
            assert f"no container '{ACTS_ON}'; running: " in text, text
            assert len(text) <= BUDGET
        async with Client(streamable_http_client(f"{base}/mcp", http_client=h)) as client:
            assert client.server_info is not None
            assert client.server_info.name == "network-telemetry"
        assert (await h.get(f"{base}/nowhere/mcp")).status_code == 404
    async with httpx.AsyncClient(timeout=10) as anonymous:  # the same guard on every path
        assert (await anonymous.post(f"{base}/resource-monitor/mcp")).status_code == 401


async def test_every_resource_answer_fits_the_budget(
    store: tuple[str, list[ResourceEvent]],
) -> None:
    """Default answers (and every aggregation, timeframe and resource) at 500 containers;
    list_processes at 50 of 5,000 processes with the longest commands (JSON-escaped
    twice over: the processes come from a stand-in here, the real ones in
    tests/test_resources.py)."""
    many = [
        ProcessEntry(
            pid=4_000_000 + i,
            command='"\\' * 50,
            state="S",
            cpu_seconds=1e6 + i / 7,
            rss_bytes=2**40 + i,
        )
        for i in range(5000)
    ]
    server = build_resource_server(ResourceTools.for_data_dir(store[0]),
                                   processes=lambda name: (name, many))  # fmt: skip
    async with Client(server) as client:
        calls: list[tuple[str, dict[str, Any]]] = [("get_resource_stats", {}),
                                                   ("get_top_resource_consumers", {})]  # fmt: skip
        for tf in ("hour", "day", "week", "month"):
            for agg in ("sum", "avg", "max", "min"):
                calls.append(("get_resource_stats", {"timeframe": tf, "aggregation": agg}))
        for resource in ("cpu", "memory", "disk_read", "disk_write", "pids"):
            calls.append(("get_top_resource_consumers", {"resource": resource, "limit": 50}))
        for tf in ("hour", "month"):
            calls.append(("get_resource_timeseries", {"container": "svc-1", "timeframe": tf,
                                                      "max_points": 200}))  # fmt: skip
        calls.append(("list_processes", {"container": "svc-1", "limit": 50}))
        calls += [("get_resource_anomalies", {"limit": 50}),
                  ("forecast_memory", {"container": "svc-1"})]  # fmt: skip
        for tool, args in calls:
            result = await client.call_tool(tool, args)
            text = " ".join(getattr(c, "text", "") for c in result.content)
            assert not result.is_error, (tool, args, text)
            assert len(text) <= BUDGET, (tool, args, len(text))
            assert result.structured_content is not None
            assert "as_of" in result.structured_content or tool == "get_resource_anomalies"
        month = await client.call_tool("get_resource_stats", {"timeframe": "month"})
        assert month.structured_content is not None
        assert month.structured_content["total"] == CONTAINERS  # from resource_hour
