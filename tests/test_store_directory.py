"""The container directory: written only when something changed, merged so that no writer
moves a row backwards, bounded by maintenance, and what the MCP tools resolve names from."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from nettel.mcp.answers import ToolInputError
from nettel.mcp.tools import TelemetryTools
from nettel.store.directory import ContainerDirectory, DirectoryEntry
from nettel.store.maintenance import maintain_table
from nettel.store.query import TrafficQuery

HOUR = 3_600_000
T0 = 1_796_000_000_000  # 2026-11-30T00:53:20Z
WEB = DirectoryEntry(partition=0, container="shop/web", name="shop-web-1",
                     container_id="ab12cd34ef56", image="nginx:1.27", compose_project="shop",
                     compose_service="web", host="h1", first_seen_ms=T0,
                     last_seen_ms=T0 + 60_000)  # fmt: skip
DB = WEB._replace(partition=1, container="shop/db", name="shop-db-1", container_id="99ffee00aa11",
                  image="postgres:17", compose_service="db")  # fmt: skip


def rows(uri: str) -> dict[str, dict[str, object]]:
    return {r["container"]: r for r in pl.read_delta(uri).iter_rows(named=True)}


def test_only_changes_are_written(tmp_path: Path) -> None:
    directory = ContainerDirectory(str(tmp_path / "directory"))
    directory.observe([WEB, DB])
    assert directory.write(now_ms=T0 + 60_000) == 2  # new containers
    version = DeltaTable(directory.uri).version()
    for minute in range(1, 30):  # still sending: last_seen moves by minutes, nothing written
        t = T0 + minute * 60_000
        directory.observe([WEB._replace(first_seen_ms=t, last_seen_ms=t + 60_000),
                           DB._replace(first_seen_ms=t, last_seen_ms=t + 60_000)])  # fmt: skip
        assert directory.write(now_ms=t + 60_000) == 0
    assert DeltaTable(directory.uri).version() == version
    # web goes on for an hour (written once), db stops (quiet: its last window written)
    t = T0 + HOUR
    directory.observe([WEB._replace(first_seen_ms=t, last_seen_ms=t + 60_000)])
    assert directory.write(now_ms=t + 60_000) == 2
    assert directory.write(now_ms=t + 120_000) == 0
    # re-created: a new id is written at once
    directory.observe(
        [WEB._replace(container_id="0123456789ab", first_seen_ms=t, last_seen_ms=t + 60_000)]
    )
    assert directory.write(now_ms=t + 60_000) == 1
    got = rows(directory.uri)
    assert got["shop/web"]["container_id"] == "0123456789ab"
    assert got["shop/db"]["last_seen"] == dt.datetime.fromtimestamp(
        (T0 + 30 * 60_000) / 1000, dt.UTC
    )
    assert got["shop/web"]["first_seen"] == dt.datetime.fromtimestamp(T0 / 1000, dt.UTC)


def test_a_stale_writer_never_moves_a_row_backwards(tmp_path: Path) -> None:
    uri = str(tmp_path / "directory")
    current, stale = ContainerDirectory(uri), ContainerDirectory(uri)
    later = WEB._replace(name="shop-web-2", first_seen_ms=T0 + HOUR, last_seen_ms=T0 + 2 * HOUR)
    current.observe([later])
    current.write()
    # a writer that saw the container earlier, under its old name (a partition moved)
    stale.observe([WEB._replace(first_seen_ms=T0 - HOUR)])
    assert stale.write() == 1
    got = rows(uri)["shop/web"]
    assert got["name"] == "shop-web-2"  # the newest sighting names it
    assert got["first_seen"] == dt.datetime.fromtimestamp((T0 - HOUR) / 1000, dt.UTC)
    assert got["last_seen"] == dt.datetime.fromtimestamp((T0 + 2 * HOUR) / 1000, dt.UTC)
    assert len(rows(uri)) == 1


def test_maintenance_drops_containers_unseen_for_the_retention(tmp_path: Path) -> None:
    directory = ContainerDirectory(str(tmp_path / "directory"))
    old = DB._replace(first_seen_ms=T0 - 500 * 24 * HOUR, last_seen_ms=T0 - 450 * 24 * HOUR)
    directory.observe([WEB, old])
    directory.write()
    today = dt.datetime.fromtimestamp(T0 / 1000, dt.UTC).date()
    report = maintain_table(directory.uri, "directory", retention_days=400, today=today)
    assert report.rows_deleted == 1
    assert list(rows(directory.uri)) == ["shop/web"]


def test_the_tools_resolve_names_from_the_directory_alone(tmp_path: Path) -> None:
    """No window table at all: every name is answered from the directory (no scan)."""
    directory = ContainerDirectory(str(tmp_path / "directory"))
    directory.observe([WEB, DB])
    directory.write()
    tools = TelemetryTools(TrafficQuery(str(tmp_path), partitions=2), directory=directory,
                           clock=lambda: (T0 + 120_000) / 1000)  # fmt: skip
    assert tools.resolve("shop-web-1") == "shop/web"
    assert tools.resolve("db") == "shop/db"  # compose service
    assert tools.resolve("99ffee00") == "shop/db"  # id prefix
    with pytest.raises(ToolInputError, match="matches several: shop/db, shop/web"):
        tools.resolve("shop")
    # a container written after the server loaded the directory is found (reloaded)
    reader = TelemetryTools(TrafficQuery(str(tmp_path), partitions=2),
                            directory=ContainerDirectory(directory.uri))  # fmt: skip
    reader.resolve("shop/web")
    directory.observe(
        [
            WEB._replace(
                container="shop/cache",
                name="shop-cache-1",
                container_id="cafe00000000",
                compose_service="cache",
            )
        ]
    )
    directory.write()
    assert reader.resolve("shop-cache-1") == "shop/cache"
    listed = reader.list_containers(limit=5)  # (tools keeps its copy up to 2 s)
    assert [c.container for c in listed.containers] == ["shop/cache", "shop/db", "shop/web"]
    assert listed.containers[0].first_seen == "2026-11-30T00:53:20Z"


def test_nettel_mcp_imports_no_store_layer_before_serving() -> None:
    """`nettel mcp` answers initialize before polars, deltalake or River are imported."""
    probe = (
        "import sys, nettel.cli, nettel.mcp.server; print(sorted(m for m in ('polars', "
        "'deltalake', 'river', 'nettel.store.query') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "[]"
