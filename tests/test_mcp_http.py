"""`nettel mcp --http` bound to 0.0.0.0 resists abuse: Host and Origin allowlists, a rate
limit before the token, strong tokens only, a body limit, an audit line per tool call.
Requests go to 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import free_port
from test_mcp import NETTEL, nettel_http

TOKEN = "http-guard-test-token-0123456789abcdef"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "t", "version": "1"}}}  # fmt: skip
ACCEPT = {"Accept": "application/json, text/event-stream"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETTEL_MCP_")}
    return env | {"NETTEL_DATA_DIR": str(tmp_path), "NETTEL_MCP_HOST": "0.0.0.0",
                  "NETTEL_LOG_FORMAT": "json", **extra}  # fmt: skip


@pytest.fixture
def open_server(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """`nettel mcp --http` on 0.0.0.0 (a fresh port), its stderr in a file."""
    port = free_port()
    log_path = tmp_path / "stderr.log"
    env = _env(tmp_path, NETTEL_MCP_TOKEN=TOKEN, NETTEL_MCP_PORT=str(port))
    with log_path.open("wb") as err, nettel_http(env, port, stderr=err):
        yield f"http://127.0.0.1:{port}/mcp", port, log_path


async def test_open_bind_checks_host_origin_body_and_throttles_token_guessing(
    open_server: tuple[str, int, Path],
) -> None:
    url, port, log_path = open_server
    good = {**ACCEPT, "Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(url, json=INIT, headers={**good, "Host": f"evil.example:{port}"})
        assert r.status_code in (421, 403), r.status_code
        r = await http.post(url, json=INIT, headers={**good, "Origin": "http://evil.example"})
        assert r.status_code == 403, r.status_code
        r = await http.post(url, content=b"x" * (5 << 20),
                            headers={**good, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 413, r.status_code
        r = await http.post(url, json=INIT, headers={**good, "Origin": f"http://127.0.0.1:{port}"})
        assert r.status_code == 200, r.text

    # one tool call through the SDK's client: one audit line on stderr (JSON)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        httpx.AsyncClient(headers=auth, timeout=30) as h,
        Client(streamable_http_client(url, http_client=h)) as client,
    ):
        result = await client.call_tool("list_containers", {"limit": 3})
        assert not result.is_error
        bad = await client.call_tool("get_network_stats", {"timeframe": "x" * 10_000})
        assert bad.is_error
        text = getattr(bad.content[0], "text", "")
        assert len(text) <= 300
        assert "x" * 101 not in text
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    audit = [x for x in lines if x.get("event") == "mcp_tool_call"]
    assert [(a["tool"], a["outcome"]) for a in audit] == [
        ("list_containers", "ok"), ("get_network_stats", "error")]  # fmt: skip
    assert all(a["client"] == "127.0.0.1" and len(a["args_digest"]) == 16 for a in audit)
    assert "x" * 100 not in log_path.read_text()  # the digest, never the arguments

    async with httpx.AsyncClient(timeout=10) as http:
        codes = []
        for i in range(200):
            guess = {**ACCEPT, "Authorization": f"Bearer guess-{i}"}
            r = await http.post(url, json=INIT, headers=guess)
            codes.append(r.status_code)
            if r.status_code == 429:
                break
        assert codes[-1] == 429, codes
        assert len(codes) < 200
        assert set(codes[:-1]) == {401}
        r = await http.post(url, json=INIT, headers=good)  # the right token too, for a while
        assert r.status_code == 429


@pytest.mark.parametrize("token", ["change-me", "short-but-not-the-example"])
def test_a_weak_or_example_token_is_refused_at_start(tmp_path: Path, token: str) -> None:
    env = _env(tmp_path, NETTEL_MCP_TOKEN=token, NETTEL_MCP_PORT=str(free_port()))
    proc = subprocess.run([NETTEL, "mcp", "--http"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode != 0
    assert "NETTEL_MCP_TOKEN" in proc.stderr
    assert "at least 32 characters" in proc.stderr
    assert token not in proc.stderr
