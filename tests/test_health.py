"""nettel says how it is: `nettel up` serves /metrics (Prometheus exposition, read with
prometheus-client's own parser) and /healthz on its MCP port, and `nettel doctor` run
beside it recognises it instead of reporting a port clash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from nettel import version
from test_cli_up import spawn_up, wait_for_log

pytestmark = [pytest.mark.broker]

NETTEL = str(Path(sys.executable).with_name("nettel"))
TOKEN = secrets.token_hex(32)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    r = httpx.get(f"http://127.0.0.1:{port}/metrics",
                  headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float | None:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))))


async def send_garbage(bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait("nettel.stats", b"not json", key=b"bad", partition=0)
    finally:
        await producer.stop()


def test_up_exports_metrics_and_health_and_doctor_recognises_it(tmp_path: Path) -> None:
    broker_port, mcp_port = free_port(), free_port()
    env = {"DOCKER_HOST": "unix:///nonexistent.sock", "NETTEL_BROKER_PORT": str(broker_port),
           "NETTEL_MCP_PORT": str(mcp_port), "NETTEL_DATA_DIR": str(tmp_path / "data"),
           "NETTEL_PARTITIONS": "4", "NETTEL_SAMPLE_INTERVAL_S": "0.5",
           "NETTEL_FLUSH_INTERVAL_S": "1", "NETTEL_DETECT_CHECKPOINT_S": "1",
           "NETTEL_WINDOW_GRACE_S": "0", "NETTEL_MCP_TOKEN": TOKEN}  # fmt: skip
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log_file:
        proc = spawn_up(log_file, **env)
        try:
            wait_for_log(proc, log_path, "mcp_http_listening", 60)
            # simulate finds the embedded broker by itself (no KAFKA_BOOTSTRAP_SERVERS)
            sim_env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
            sim_env.update(env, NETTEL_SAMPLE_INTERVAL_S="5", NETTEL_LOG_FORMAT="json")
            sim = subprocess.run([NETTEL, "simulate", "--containers", "3", "--hours", "0.05",
                                  "--spikes", "0"], env=sim_env, capture_output=True, text=True,
                                 timeout=120, check=False)  # fmt: skip
            assert sim.returncode == 0, sim.stderr[-2000:]
            simulated = json.loads(sim.stderr.splitlines()[-1])["events"]
            asyncio.run(send_garbage(f"127.0.0.1:{broker_port}"))

            base = f"http://127.0.0.1:{mcp_port}"
            assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401  # token needed
            health = httpx.get(f"{base}/healthz", timeout=10)  # no token needed
            assert health.status_code == 200, health.text
            assert health.json()["service"] == "nettel"
            assert health.json()["version"] == version()

            deadline = time.monotonic() + 60
            while True:
                got = scrape(mcp_port)
                written = value(got, "nettel_rows_written_total", table="minute") or 0
                consumed = value(got, "nettel_events_consumed_total", group="nettel-stream") or 0
                dead = value(got, "nettel_dead_lettered_total") or 0
                checkpointed = value(got, "nettel_last_run_age_seconds", job="detect_checkpoint")
                done = written > 0 and consumed > simulated and dead >= 1 and checkpointed
                if done or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert consumed > simulated  # the simulated ones, the host's own, the bad one
            assert dead == 1
            assert written > 0
            assert (value(got, "nettel_rows_written_total", table="samples") or 0) >= simulated
            assert (value(got, "nettel_events_published_total") or 0) > 0  # ingest (procfs)
            detect = value(got, "nettel_events_consumed_total", group="nettel-detect") or 0
            assert detect > 0
            lags = [value(got, "nettel_partition_lag", group="nettel-stream", partition=str(p))
                    for p in range(4)]  # fmt: skip
            assert all(lag is not None and lag >= 0 for lag in lags), lags
            assert (value(got, "nettel_table_bytes", table="minute") or 0) > 0
            assert (value(got, "nettel_table_log_files", table="samples") or 0) >= 1
            assert (value(got, "nettel_broker_rss_bytes") or 0) > 1 << 20
            flush_age = value(got, "nettel_last_run_age_seconds", job="stream_flush")
            assert flush_age is not None
            assert flush_age < 30
            assert checkpointed is not None
            assert value(got, "nettel_alerts_open") is not None
            assert value(got, "nettel_alerts_published_total") is not None
            assert value(got, "nettel_late_events_total") is not None
            assert (value(got, "process_resident_memory_bytes") or 0) > 0

            doctor = subprocess.run([NETTEL, "doctor"], env={**os.environ, **env},
                                    capture_output=True, text=True, timeout=60,
                                    check=False)  # fmt: skip
            assert doctor.returncode == 0, doctor.stdout
            assert f"port {broker_port} is held by a running nettel" in doctor.stdout
            assert "ok   running   nettel is running and healthy" in doctor.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, log_path.read_text()[-3000:]
