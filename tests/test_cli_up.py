"""`nettel up` as a user runs it: a real process, the embedded broker, real containers,
the stream worker filling the tables and maintenance on its schedule."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import polars as pl
import pytest

from conftest import Engine, free_port, require
from nettel.models import COUNTERS, WINDOW_MS, decode_stat_event

pytestmark = [pytest.mark.engine, pytest.mark.broker]


def kcat_lines(port: int, topic: str) -> list[str]:
    out = subprocess.run(
        ["kcat", "-b", f"127.0.0.1:{port}", "-C", "-t", topic, "-e", "-q", "-f", "%k\t%s\n"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return out.stdout.splitlines() if out.returncode == 0 else []


def spawn_up(
    stderr: IO[str] | int = subprocess.PIPE, **env_overrides: str
) -> subprocess.Popen[str]:
    """`nettel up` as a user starts it, with the embedded broker and JSON logs."""
    env = dict(os.environ, NETTEL_LOG_FORMAT="json", NETTEL_MCP_PORT=str(free_port()))
    env.update(env_overrides)
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("nettel")), "up"],
        env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )  # fmt: skip


def wait_for_log(proc: subprocess.Popen[str], path: Path, event: str, timeout_s: float) -> None:
    """Wait until `nettel up` (logging JSON to ``path``) logged ``event``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, path.read_text()[-3000:]
        if f'"event": "{event}"' in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no {event} within {timeout_s} s: {path.read_text()[-3000:]}")


def test_up_serves_events_to_kcat_and_stops_cleanly_on_sigterm(
    engine: Engine, tmp_path: Path
) -> None:
    require(shutil.which("kcat") is not None, "kcat is not installed (apt-get install kcat)")
    container = engine.run("sleep 3600")
    port = free_port()
    proc = spawn_up(
        DOCKER_HOST=engine.url, NETTEL_BROKER_PORT=str(port), NETTEL_SAMPLE_INTERVAL_S="0.5",
        NETTEL_DATA_DIR=str(tmp_path / "data"), NETTEL_PARTITIONS="4",
        NETTEL_WIRE_FORMAT="json",  # what kcat users set to read the events
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
        out, err = stop_cleanly(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert_stopped_cleanly(out, err)
    assert (tmp_path / "data" / "broker-epoch").read_text().strip() == "1"


def stop_cleanly(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[str, str]:
    """Send ``sig``; `nettel up` must exit 0 within 5 s. Its stdout and stderr."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=15)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, (err or "")[-2000:]
    assert elapsed < 5, f"took {elapsed:.1f} s to stop on {sig.name}"
    return out, err


def assert_stopped_cleanly(out: str, err: str) -> None:
    """A clean stop: nothing on stdout, producers stopped first, nothing left unsent."""
    assert out == "", "stdout must stay clean (it is the MCP stdio channel)"
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert "broker_started" in events
    assert "ingest_stopped" in events
    assert "stream_started" in events, "`nettel up` runs the stream worker too"
    assert events.index("ingest_stopped") < events.index("stream_stopped"), "producers first"
    assert events[-1] == "broker_stopped"
    stopped = next(r for r in records if r["event"] == "ingest_stopped")
    assert stopped["unsent"] == 0
    assert not [r for r in records if r["level"] == "error"]
    assert not [line for line in err.splitlines() if "Traceback" in line]


def test_up_without_an_engine_says_so_in_one_line_uses_procfs_and_stops_cleanly_on_sigint(
    tmp_path: Path,
) -> None:
    port = free_port()
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log_file:
        proc = spawn_up(
            log_file, DOCKER_HOST="unix:///nonexistent.sock", NETTEL_BROKER_PORT=str(port),
            NETTEL_SAMPLE_INTERVAL_S="0.5", NETTEL_DATA_DIR=str(tmp_path / "data"),
        )  # fmt: skip
        try:
            wait_for_log(proc, log_path, "ingest_started", 60)
            time.sleep(2)  # a few samples
            out, _ = stop_cleanly(proc, signal.SIGINT)  # Ctrl-C, as `make up` is stopped
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    err = log_path.read_text()
    assert_stopped_cleanly(out, err)
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    fallback = [r for r in records if r["event"] == "no_engine_using_procfs"]
    assert len(fallback) == 1
    assert "procfs" in fallback[0]["message"]
    started = next(r for r in records if r["event"] == "ingest_started")
    assert started["source"] == "procfs"
    stopped = next(r for r in records if r["event"] == "ingest_stopped")
    assert stopped["sent"] > 0, "the host's own namespace at least must be sampled"


def windows_of(frame: pl.DataFrame) -> dict[tuple[str, int], list[int]]:
    """(container, window start ms) -> counter sums and sample count, rows added up."""
    agg = (
        frame.with_columns(start=pl.col("ts").dt.epoch("ms") // WINDOW_MS * WINDOW_MS)
        .group_by("container", "start")
        .agg([pl.col(c).sum() for c in COUNTERS] + [pl.len().alias("n")])
    )
    return {(r[0], r[1]): list(r[2:]) for r in agg.iter_rows()}


def minute_windows(data: Path) -> dict[tuple[str, int], list[int]]:
    """The minute table's windows, rows of a window added up (samples as the count)."""
    if not (data / "minute" / "_delta_log" / f"{0:020d}.json").exists():
        return {}  # no commit yet (data files come before their commit)
    frame = pl.scan_delta(str(data / "minute")).collect()
    agg = (
        frame.with_columns(start=pl.col("ts").dt.epoch("ms"))
        .group_by("container", "start")
        .agg([pl.col(c).sum() for c in COUNTERS] + [pl.col("samples").sum().alias("n")])
    )
    return {(r[0], r[1]): list(r[2:]) for r in agg.iter_rows()}


def test_up_fills_the_tables_from_real_traffic_exactly(engine: Engine, tmp_path: Path) -> None:
    """While `nettel up` runs, closed minute windows of real containers' traffic equal
    the events on the topic; after a stop every event is in the tables (samples = minute)."""
    require(shutil.which("kcat") is not None, "kcat is not installed (apt-get install kcat)")
    server = engine.run("mkdir -p /www && dd if=/dev/zero of=/www/f bs=1000 count=200 "
                        "2>/dev/null && httpd -f -p 8080 -h /www")  # fmt: skip
    client = engine.run(f"while true; do wget -q -O /dev/null http://{engine.ip(server)}:8080/f;"
                        " sleep 0.3; done")  # fmt: skip
    port = free_port()
    data = tmp_path / "data"
    log_file = (tmp_path / "up.log").open("w")  # a pipe nobody reads could fill and block it
    proc = spawn_up(
        log_file, DOCKER_HOST=engine.url, NETTEL_BROKER_PORT=str(port),
        NETTEL_SAMPLE_INTERVAL_S="0.5",
        NETTEL_DATA_DIR=str(data), NETTEL_PARTITIONS="4", NETTEL_WINDOW_GRACE_S="5",
        NETTEL_FLUSH_INTERVAL_S="1", NETTEL_ROLLUP_INTERVAL_S="0",
        NETTEL_MAINTENANCE_INTERVAL_S="5", NETTEL_WIRE_FORMAT="json",  # kcat reads it
    )  # fmt: skip
    try:
        # a window closes once event time passes its minute's end plus the grace
        deadline = time.monotonic() + 100
        table: dict[tuple[str, int], list[int]] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            table = minute_windows(data)  # read first: its windows' events are on the topic
            if any(k[0] == client.name and v[0] > 0 for k, v in table.items()):
                break
            time.sleep(1)
        assert any(k[0] == client.name for k in table), "no minute row for the client"
        lines = kcat_lines(port, "nettel.stats")
        events = [decode_stat_event(line.split("\t", 1)[1].encode()) for line in lines]
        topic = windows_of(pl.DataFrame({
            "container": [e.identity for e in events],
            "ts": pl.Series([e.ts_ms * 1000 for e in events]).cast(pl.Datetime("us", "UTC")),
            **{c: [getattr(e, c) for e in events] for c in COUNTERS},
        }))  # fmt: skip
        assert table == {k: topic.get(k) for k in table}, "closed windows equal the topic's events"
        assert table[next(k for k in table if k[0] == client.name)][0] > 0, "traffic counted"
        # at least one whole maintenance pass (every 5 s; it has usually run by now)
        wait_for_log(proc, tmp_path / "up.log", "store_maintenance_pass", 60)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        log_file.close()
    err = (tmp_path / "up.log").read_text()
    assert proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert not [r for r in records if r["level"] == "error"]
    maintained = {r["table"] for r in records if r["event"] == "store_maintained"}
    assert maintained == {
        "samples",
        "minute",
        "hour",
        "day",
        "alerts",
        "alert_feedback",
        "reports_table",
        "bands",
        "detect_state",
        "resource_minute",
        "resource_hour",
        "resource_day",
        "directory",
        "health",
    }  # every table nettel writes
    # each pass ran in a child process of its own, which said its peak memory
    passes = [r for r in records if r["event"] == "store_maintenance_pass"]
    assert passes
    assert all(r["exit_code"] == 0 and r["pid"] != proc.pid for r in passes)
    done = [r for r in records if r["event"] == "store_maintenance_done"]
    # a pass stopped (SIGTERM) before its child could take the signal says began=False
    assert len(done) == len([r for r in passes if r["began"]])
    assert all(r["peak_rss_bytes"] > 0 for r in done)
    # stopped: the open windows were sealed, so samples and minute hold every event
    samples = pl.scan_delta(str(data / "samples")).collect()
    assert samples.height >= len(events)
    assert windows_of(samples) == minute_windows(data)
    # the resources role: the same containers' cgroup readings, in their own table
    resources = pl.scan_delta(str(data / "resource_minute")).collect()
    mine = resources.filter(pl.col("container") == client.name)
    assert mine["samples"].sum() > 0
    assert mine["cpu_usage_us"].sum() > 0
