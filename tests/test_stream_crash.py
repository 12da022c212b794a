"""`nettel stream` killed with SIGKILL at random points and restarted: the tables end exact."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from conftest import wait_for
from nettel.broker import EmbeddedBroker
from nettel.store.minute import MinuteTable
from nettel.store.samples import SamplesTable
from test_store_samples import sample_rows, table_sample_rows
from test_stream_recovery import stop
from test_stream_worker import assert_exact, expected_windows, publish, scenario, table_windows

pytestmark = pytest.mark.broker


def spawn_stream(bootstrap: str, data_dir: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, NETTEL_DATA_DIR=str(data_dir),
        NETTEL_FLUSH_INTERVAL_S="0.3", NETTEL_PARTITIONS="4", NETTEL_LOG_FORMAT="json",
        NETTEL_ROLLUP_INTERVAL_S="0",
    )  # fmt: skip
    return subprocess.Popen([str(Path(sys.executable).with_name("nettel")), "stream"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


async def test_sigkill_at_random_points_changes_nothing(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events, _, cutoff = await scenario(broker.bootstrap_servers, 10, 2, seed=3)
    expected = expected_windows(events, cutoff)
    table = MinuteTable(str(tmp_path / "minute"))
    rng = random.Random(11)
    kills = 0
    # the events arrive in three parts while the worker is being killed
    parts = [events[: len(events) // 3], events[len(events) // 3 : 2 * len(events) // 3],
             events[2 * len(events) // 3 :]]  # fmt: skip
    proc = spawn_stream(broker.bootstrap_servers, tmp_path)
    try:
        for i in range(6):
            if i < len(parts):
                await publish(broker.bootstrap_servers, parts[i])
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            if i < 5:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                proc = spawn_stream(broker.bootstrap_servers, tmp_path)
        deadline = time.monotonic() + 150
        got: dict[tuple[str, int], list[int]] = {}
        while time.monotonic() < deadline:
            # the first commit, not just the folder (data files come before their commit)
            if (tmp_path / "minute" / "_delta_log" / f"{0:020d}.json").exists():
                got = table_windows(table, cutoff)
                if got == expected:
                    break
            await asyncio.sleep(1.0)
    finally:
        stop(proc)
    assert kills == 5
    missing = {k for k in expected if k not in got}
    wrong = {k: (got[k], v) for k, v in expected.items() if k in got and got[k] != v}
    extra = {k for k in got if k not in expected}
    assert not missing, f"{len(missing)} windows missing"
    assert not wrong, list(wrong.items())[:3]
    assert not extra, extra
    # after a clean stop everything is still exact, and the rollups are too
    assert_exact(table, events, cutoff)
    # the samples went through the same crashes: a last run reads to the end
    samples = SamplesTable(str(tmp_path / "samples"))
    proc = spawn_stream(broker.bootstrap_servers, tmp_path)
    try:
        await wait_for(lambda: samples.scan().select(pl.len()).collect().item() >= len(events),
                       60, "every sample written")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert table_sample_rows(samples) == sample_rows(events), "none missing, none doubled"
