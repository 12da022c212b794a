"""`nettel up` under failure, as a user runs it: a real process, the embedded broker, real
Podman containers with real traffic, the kernel's counters as the truth.

- SIGKILL of the whole `nettel up` mid-run, then a restart on the same data dir;
- SIGKILL of the Tansu broker alone (nettel restarts it);
- a data dir on a small tmpfs filled mid-run, then freed;
- a role that fails (the MCP port taken) is restarted while the others keep working.

In each, every container's totals in ``samples`` (and in ``minute``, ``hour``, ``day``)
must equal its kernel counters over the whole span: nothing lost, nothing doubled.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from conftest import Engine, free_port, kernel_counters, require
from nettel.models import COUNTERS
from test_broker import tansu_processes_advertising
from test_cli_up import spawn_up, wait_for_log

pytestmark = [pytest.mark.engine, pytest.mark.broker]

FILE_BYTES = 100_000
#: Counters compared with the kernel's (errors and drops stay 0 on the bridge).
COMPARED = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")


@dataclass
class Traffic:
    """An httpd container and a client fetching from it until told to stop."""

    engine: Engine
    server: Any
    client: Any

    @classmethod
    def start(cls, engine: Engine) -> Traffic:
        server = engine.run(f"mkdir -p /www && dd if=/dev/zero of=/www/f bs=1000 "
                            f"count={FILE_BYTES // 1000} 2>/dev/null && "
                            "httpd -f -p 8080 -h /www")  # fmt: skip
        client = engine.run(f"sleep 1; while [ ! -e /stop ]; do wget -q -O /dev/null "
                            f"http://{engine.ip(server)}:8080/f; sleep 0.25; done; "
                            "echo fetched; sleep 3600")  # fmt: skip
        return cls(engine, server, client)

    @property
    def names(self) -> list[str]:
        return [self.server.name, self.client.name]

    def done(self) -> bool:
        return b"fetched" in self.client.logs()

    def finish(self) -> None:
        """End the traffic and wait until the counters stand still."""
        subprocess.run(["podman", "exec", self.client.id, "sh", "-c", ": > /stop"],
                       capture_output=True, timeout=60, check=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.done():
            assert time.monotonic() < deadline, "the client did not stop"
            time.sleep(0.2)
        time.sleep(2)  # samples with still counters after the last fetch

    def kernel(self) -> dict[str, dict[str, int]]:
        """Each container's counters now, from /proc (read here, not through nettel)."""
        return {c.name: kernel_counters(self.engine.pid(c)) for c in (self.server, self.client)}


def committed(table: Path) -> bool:
    """Whether the table's first commit exists (data files come before their commit)."""
    return (table / "_delta_log" / f"{0:020d}.json").exists()


def samples_of(data: Path) -> pl.DataFrame:
    return pl.scan_delta(str(data / "samples")).collect() if committed(data / "samples") else \
        pl.DataFrame()  # fmt: skip


def table_totals(data: Path, table: str, names: list[str]) -> dict[str, dict[str, int]]:
    """Per container, the sum of each counter over every row of ``table``."""
    frame = pl.scan_delta(str(data / table)).filter(pl.col("container").is_in(names)).collect()
    sums = frame.group_by("container").agg([pl.col(c).sum() for c in COUNTERS])
    return {r["container"]: {c: r[c] for c in COUNTERS} for r in sums.iter_rows(named=True)}


def traffic_written(data: Path, name: str) -> bool:
    """Whether ``samples`` holds traffic of container ``name``."""
    frame = samples_of(data)
    return not frame.is_empty() and frame.filter(
        pl.col("container") == name, pl.col("rx_bytes") > 0).height > 0  # fmt: skip


def wait_until(what: str, timeout_s: float, predicate: Any, up: subprocess.Popen[str],
               log_path: Path) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert up.poll() is None, log_path.read_text()[-3000:]
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: "
                         f"{log_path.read_text()[-3000:]}")  # fmt: skip


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead and waiting for its reaper, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def started(log_path: Path) -> int:
    """How many times ingest started (in this log)."""
    return sum(1 for e in log_events(log_path) if e["event"] == "ingest_started")


def log_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@contextlib.contextmanager
def nettel_up(log_path: Path, **env: str) -> Iterator[subprocess.Popen[str]]:
    """`nettel up` logging JSON to ``log_path``; killed if the test leaves it running."""
    with log_path.open("a") as log_file:
        proc = spawn_up(log_file, **env)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def stop_up(proc: subprocess.Popen[str], log_path: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 0, log_path.read_text()[-3000:]


def up_env(engine: Engine, data: Path, port: int) -> dict[str, str]:
    return {"DOCKER_HOST": engine.url, "NETTEL_SOURCE": "engine",
            "NETTEL_BROKER_PORT": str(port), "NETTEL_SAMPLE_INTERVAL_S": "0.5",
            "NETTEL_DATA_DIR": str(data), "NETTEL_PARTITIONS": "2",
            "NETTEL_WINDOW_GRACE_S": "2", "NETTEL_FLUSH_INTERVAL_S": "1",
            "NETTEL_ROLLUP_INTERVAL_S": "0", "NETTEL_DETECT_CHECKPOINT_S": "5"}  # fmt: skip


def assert_exact(data: Path, traffic: Traffic, *, windows: bool = True) -> pl.DataFrame:
    """samples (and minute, hour, day) hold exactly what the kernel counted; the samples."""
    kernel = traffic.kernel()
    samples = samples_of(data).sort("ts")
    for name in traffic.names:
        mine = samples.filter(pl.col("container") == name)
        assert mine.height >= 8, f"{name}: only {mine.height} samples"
        got = {c: int(mine[c].sum()) for c in COUNTERS}
        last = mine.row(-1, named=True)
        # the deltas add up to the last cumulative reading: no gap, nothing doubled
        assert got == {c: last[f"reading_{c}"] for c in COUNTERS}, (name, got, last)
        for c in COMPARED:  # and that reading is the kernel's (the traffic is over)
            assert kernel[name][c] - 2_000 <= got[c] <= kernel[name][c], (name, c, got, kernel)
        assert got["tx_bytes" if name == traffic.server.name else "rx_bytes"] > 5 * FILE_BYTES
    if windows:
        # minute, hour and day agree with samples: every event in exactly one window
        expected = {n: {c: int(samples.filter(pl.col("container") == n)[c].sum())
                        for c in COUNTERS} for n in traffic.names}  # fmt: skip
        for table in ("minute", "hour", "day"):
            assert table_totals(data, table, traffic.names) == expected, table
    return samples


def test_sigkill_of_nettel_up_loses_nothing_and_leaves_no_broker(
    engine: Engine, tmp_path: Path
) -> None:
    data, log_path, port = tmp_path / "data", tmp_path / "up.log", free_port()
    env = up_env(engine, data, port)
    with nettel_up(log_path, **env) as first:
        wait_for_log(first, log_path, "ingest_started", 60)
        time.sleep(1)  # containers started after ingest watches count from zero
        traffic = Traffic.start(engine)
        wait_until("durable traffic", 60, lambda: traffic_written(data, traffic.client.name),
                   first, log_path)  # fmt: skip
        time.sleep(2)
        broker_pid = int((data / "broker.pid").read_text().split()[0])
        first.kill()  # SIGKILL: no flush, no seal, no broker stop
        first.communicate()
    deadline = time.monotonic() + 5
    while tansu_processes_advertising(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tansu_processes_advertising(port) == [], "Tansu outlived the SIGKILLed nettel up"
    assert not running(broker_pid), "the broker must be dead (at most a zombie)"
    assert not traffic.done(), "the kill must come mid-traffic"
    time.sleep(2)  # traffic while nettel is down
    with nettel_up(log_path, **env) as second:
        wait_until("the second start", 60, lambda: started(log_path) == 2, second, log_path)
        time.sleep(3)
        traffic.finish()
        stop_up(second, log_path)
    assert tansu_processes_advertising(port) == [], "no broker left behind"
    catch_ups = [e for e in log_events(log_path) if e["event"] == "catch_up"]
    assert {e["container"] for e in catch_ups} >= set(traffic.names), catch_ups
    samples = assert_exact(data, traffic, windows=False)
    gap = samples.filter(pl.col("catch_up"), pl.col("container").is_in(traffic.names))
    assert gap.height == 2, gap
    assert gap["interval_ms"].min() >= 2_000, gap  # type: ignore[operator]
    assert gap["rx_bytes"].sum() > 0, "the catch-up counted the traffic of the gap"
    # minute/hour/day agree with samples only with the stream's rebuild of open windows
    # from durable samples (branch h-stream): the windows open at the kill lived only in
    # the memory broker
    assert_exact(data, traffic)


def test_sigkill_of_the_broker_alone_is_survived_exactly(engine: Engine, tmp_path: Path) -> None:
    data, log_path, port = tmp_path / "data", tmp_path / "up.log", free_port()
    with nettel_up(log_path, **up_env(engine, data, port)) as up:
        wait_for_log(up, log_path, "ingest_started", 60)
        time.sleep(1)
        traffic = Traffic.start(engine)
        wait_until("durable traffic", 60, lambda: traffic_written(data, traffic.client.name),
                   up, log_path)  # fmt: skip
        time.sleep(1.5)
        broker_pid = int((data / "broker.pid").read_text().split()[0])
        os.kill(broker_pid, signal.SIGKILL)
        wait_for_log(up, log_path, "broker_restarted", 30)
        assert not traffic.done(), "the kill must come mid-traffic"
        new_pid = int((data / "broker.pid").read_text().split()[0])
        assert new_pid != broker_pid
        assert tansu_processes_advertising(port) == [new_pid]
        time.sleep(2)
        traffic.finish()
        stop_up(up, log_path)
    assert tansu_processes_advertising(port) == []
    assert (data / "broker-epoch").read_text().strip() == "2"
    events = log_events(log_path)
    assert [e["event"] for e in events].count("broker_died") == 1
    assert_exact(data, traffic)


def test_a_role_that_fails_is_restarted_while_the_others_keep_working(
    engine: Engine, tmp_path: Path
) -> None:
    """The MCP port is taken: the mcp role fails and is retried with backoff while ingest
    publishes and the stream writes; once the port is free, MCP serves."""
    data, log_path = tmp_path / "data", tmp_path / "up.log"
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    mcp_port = blocker.getsockname()[1]
    env = {**up_env(engine, data, free_port()), "NETTEL_MCP_PORT": str(mcp_port)}
    try:
        with nettel_up(log_path, **env) as up:
            wait_for_log(up, log_path, "ingest_started", 60)
            time.sleep(1)
            traffic = Traffic.start(engine)
            wait_until("two failures of mcp", 60, lambda: mcp_failures(log_path) >= 2, up, log_path)
            rows = samples_of(data).height
            wait_until("the stream to write on", 30, lambda: samples_of(data).height > rows,
                       up, log_path)  # fmt: skip
            blocker.close()
            wait_until("MCP to serve", 60, lambda: mcp_answers(mcp_port), up, log_path)
            traffic.finish()
            stop_up(up, log_path)
    finally:
        blocker.close()
    events = log_events(log_path)
    failed = [e for e in events if e["event"] == "role_failed"]
    assert {e["role"] for e in failed} == {"mcp"}, "only the mcp role failed"
    assert "port in use" in failed[0]["error"]
    restarted = [e["restarts"] for e in events if e["event"] == "role_restarted"]
    assert restarted == list(range(1, len(restarted) + 1))
    assert len(restarted) >= 2
    assert_exact(data, traffic)


def mcp_failures(log_path: Path) -> int:
    return sum(
        1 for e in log_events(log_path) if e["event"] == "role_failed" and e["role"] == "mcp"
    )


def mcp_answers(port: int) -> bool:
    """Whether the MCP endpoint answers HTTP at all (any status)."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/mcp", timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs (root only), unmounted afterwards."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    require(out.returncode == 0, f"cannot mount a tmpfs: {out.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk) or 0
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                return written


def test_a_full_disk_loses_nothing_and_work_resumes_when_space_returns(
    engine: Engine, tmp_path: Path, small_tmpfs: Path
) -> None:
    data, log_path = small_tmpfs / "data", tmp_path / "up.log"
    with nettel_up(log_path, **up_env(engine, data, free_port())) as up:
        wait_for_log(up, log_path, "ingest_started", 60)
        time.sleep(1)
        traffic = Traffic.start(engine)
        wait_until("durable traffic", 60, lambda: traffic_written(data, traffic.client.name),
                   up, log_path)  # fmt: skip
        filler = small_tmpfs / "filler"
        assert fill(filler) > 0
        wait_until("a write to fail", 30, lambda: any(
            e["event"] == "role_failed" and e.get("cause") == "disk full"
            for e in log_events(log_path)), up, log_path)  # fmt: skip
        time.sleep(3)
        assert not traffic.done(), "the disk must be full mid-traffic"
        filler.unlink()
        rows = samples_of(data).height
        wait_until("writes to resume", 60, lambda: samples_of(data).height > rows, up, log_path)
        time.sleep(2)
        traffic.finish()
        stop_up(up, log_path)
    failed = [e for e in log_events(log_path) if e["event"] == "role_failed"]
    assert "stream" in {e["role"] for e in failed}
    assert_exact(data, traffic)
