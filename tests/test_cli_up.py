"""`nettel up` as a user runs it: a real process, the embedded broker, real containers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Engine, free_port, require

pytestmark = [pytest.mark.engine, pytest.mark.broker]


def kcat_lines(port: int, topic: str) -> list[str]:
    out = subprocess.run(
        ["kcat", "-b", f"127.0.0.1:{port}", "-C", "-t", topic, "-e", "-q", "-f", "%k\t%s\n"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return out.stdout.splitlines() if out.returncode == 0 else []


def spawn_up(**env_overrides: str) -> subprocess.Popen[str]:
    """`nettel up` as a user starts it, with the embedded broker and JSON logs."""
    env = dict(os.environ, NETTEL_LOG_FORMAT="json", **env_overrides)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("nettel")), "up"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_serves_events_to_kcat_and_stops_cleanly(
    engine: Engine, tmp_path: Path, sig: signal.Signals
) -> None:
    require(shutil.which("kcat") is not None, "kcat is not installed (apt-get install kcat)")
    container = engine.run("sleep 3600")
    port = free_port()
    proc = spawn_up(
        DOCKER_HOST=engine.url, NETTEL_BROKER_PORT=str(port), NETTEL_SAMPLE_INTERVAL_S="0.5",
        NETTEL_DATA_DIR=str(tmp_path / "data"), NETTEL_PARTITIONS="4",
    )  # fmt: skip
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            lines = [x for x in kcat_lines(port, "nettel.stats") if x.startswith(container.name)]
            if len(lines) >= 2:
                break
            time.sleep(0.5)
        assert len(lines) >= 2, "kcat saw no events for the running container"
        event = json.loads(lines[-1].split("\t", 1)[1])
        assert event["container_id"] == container.id
        assert event["interval_ms"] > 0
        t0 = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert out == "", "stdout must stay clean (it is the MCP stdio channel)"
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert "broker_started" in events
    assert "ingest_stopped" in events
    assert events[-1] == "broker_stopped"
    stopped = next(r for r in records if r["event"] == "ingest_stopped")
    assert stopped["unsent"] == 0
    assert not [r for r in records if r["level"] == "error"]
    assert not [line for line in err.splitlines() if "Traceback" in line]
    assert (tmp_path / "data" / "broker-epoch").read_text().strip() == "1"


def test_up_without_an_engine_says_so_in_one_line_and_uses_procfs(tmp_path: Path) -> None:
    port = free_port()
    proc = spawn_up(
        DOCKER_HOST="unix:///nonexistent.sock", NETTEL_BROKER_PORT=str(port),
        NETTEL_SAMPLE_INTERVAL_S="0.5", NETTEL_DATA_DIR=str(tmp_path),
    )  # fmt: skip
    try:
        time.sleep(4)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    fallback = [r for r in records if r["event"] == "no_engine_using_procfs"]
    assert len(fallback) == 1
    assert "procfs" in fallback[0]["message"]
    started = next(r for r in records if r["event"] == "ingest_started")
    assert started["source"] == "procfs"
    stopped = next(r for r in records if r["event"] == "ingest_stopped")
    assert stopped["sent"] > 0, "the host's own namespace at least must be sampled"
