"""The package's shape: the MCP SDK is not shadowed, layers point one way, CLI basics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from nettel.cli import configure_logging, main

ROOT = Path(__file__).resolve().parents[1]


def test_import_mcp_is_the_installed_sdk() -> None:
    import mcp
    import mcp.server

    assert mcp.__file__ is not None
    path = Path(mcp.__file__).resolve()
    assert "site-packages" in path.parts, path
    assert hasattr(mcp.server, "MCPServer"), "mcp 2.x exposes mcp.server.MCPServer"
    assert not (ROOT / "mcp" / "__init__.py").exists()


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "broken" not in out.stdout.lower().replace("0 broken", "")


def test_bad_setting_fails_at_start_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["up", "--sample-interval", "-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "NETTEL_SAMPLE_INTERVAL_S=-1.0 is not valid" in err
    assert "(0, 3600]" in err


def test_bad_env_value_fails_in_a_real_process() -> None:
    env = dict(os.environ, NETTEL_PARTITIONS="many")
    out = subprocess.run(
        [sys.executable, "-m", "nettel.cli", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 2
    assert "NETTEL_PARTITIONS='many' is not valid: expected a whole number" in out.stderr
    assert out.stdout == ""


def test_logs_go_to_stderr_as_json_never_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    structlog.get_logger("t").info("sample_taken", container="web", partition=3)
    out, err = capsys.readouterr()
    assert out == ""
    record = json.loads(err.strip().splitlines()[-1])
    assert record["event"] == "sample_taken"
    assert record["container"] == "web"
    assert record["level"] == "info"


def test_ingest_needs_a_broker_address(capsys: pytest.CaptureFixture[str]) -> None:
    os.environ.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    assert main(["ingest", "--log-format", "json"]) == 1
    assert "KAFKA_BOOTSTRAP_SERVERS" in capsys.readouterr().err
