"""Maintenance changes no answer: retention drops only expired days, compaction and
vacuum are invisible to readers and to the change data feed the rollups read."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
from deltalake import DeltaTable

from nettel.models import ReplayPoint
from nettel.store.maintenance import maintain_table
from nettel.store.minute import MinuteTable, PartitionPoint
from nettel.store.rollup import HOUR_MS, RollupTable
from test_store_minute import window

DAY_MS = 86_400_000
TODAY = dt.date(2026, 11, 26)
T0 = 1_795_651_200_000  # 2026-11-26T00:00Z


def fill(table: MinuteTable, days_back: int, commits: int, t0: int = T0) -> None:
    for d in range(days_back, -1, -1):
        for c in range(commits):
            rows = [window(f"svc{i}", t0 - d * DAY_MS + c * 60_000, 100 * i + c) for i in range(3)]
            for r in rows:
                r.partition = 0
            point = ReplayPoint(c, -1, c + 1, -1)
            table.append(rows, [PartitionPoint("nettel.stats", 0, point)], writer="w", epoch=0)


def totals(uri: str, since: str) -> dict[str, int]:
    frame = (
        pl.scan_delta(uri).filter(pl.col("date") >= since).group_by("container")
        .agg(pl.col("rx_bytes").sum()).collect()
    )  # fmt: skip
    return dict(frame.iter_rows())


def test_retention_compaction_vacuum_keep_every_answer(tmp_path: Path) -> None:
    minute = MinuteTable(str(tmp_path / "minute"))
    fill(minute, days_back=20, commits=4)
    hour = RollupTable(str(tmp_path / "hour"), minute, HOUR_MS)
    hour.roll(0, writer="w", topic="nettel.stats")
    keep_from = (TODAY - dt.timedelta(days=14)).isoformat()
    before = totals(minute.uri, keep_from)
    hour_before = totals(hour.uri, "0000")
    files_before = len(DeltaTable(minute.uri).file_uris())
    answers: list[dict[str, int]] = []
    stop = threading.Event()

    def reader() -> None:  # a query running during maintenance
        while not stop.is_set():
            answers.append(totals(minute.uri, keep_from))

    t = threading.Thread(target=reader)
    t.start()
    try:
        report = maintain_table(minute.uri, "minute", retention_days=14, today=TODAY)
    finally:
        stop.set()
        t.join()
    assert report.partitions_deleted == 6  # 20 .. 15 days back
    assert min(p["date"] for p in DeltaTable(minute.uri).partitions()) == keep_from
    assert totals(minute.uri, keep_from) == before
    assert answers, "the reader ran"
    assert all(a == before for a in answers), "a query during maintenance saw a partial state"
    assert len(DeltaTable(minute.uri).file_uris()) < files_before
    # the rollup reads the change data feed: compaction must not look like new rows
    hour.roll(0, writer="w", topic="nettel.stats")
    assert totals(hour.uri, "0000") == hour_before


def test_the_command_maintains_every_table_and_logs_each(tmp_path: Path) -> None:
    today_ms = time.time_ns() // 1_000_000 // DAY_MS * DAY_MS
    minute = MinuteTable(str(tmp_path / "minute"))
    fill(minute, days_back=3, commits=2, t0=today_ms)
    env = dict(os.environ, NETTEL_DATA_DIR=str(tmp_path), NETTEL_RETENTION_MINUTE_DAYS="2",
               NETTEL_LOG_FORMAT="json")  # fmt: skip
    nettel = str(Path(sys.executable).with_name("nettel"))
    out = subprocess.run([nettel, "store", "maintain"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    # the progress bar is for terminals only: here, one log line per table
    done = [json.loads(x) for x in out.stderr.splitlines() if '"store_maintained"' in x]
    assert [r["table"] for r in done] == [  # every table nettel writes (maintenance_plan)
        "samples", "minute", "hour", "day", "alerts", "alert_feedback", "reports_table",
        "bands", "detect_state", "resource_minute", "resource_hour", "resource_day",
        "directory", "health",
    ]  # fmt: skip
    assert out.stdout == ""
    dates = sorted(p["date"] for p in DeltaTable(minute.uri).partitions())
    assert len(dates) == 3, dates  # today and the two days before it


def test_on_a_terminal_the_command_shows_a_progress_bar(tmp_path: Path) -> None:
    minute = MinuteTable(str(tmp_path / "minute"))
    fill(minute, days_back=1, commits=1, t0=time.time_ns() // 1_000_000 // DAY_MS * DAY_MS)
    env = dict(os.environ, NETTEL_DATA_DIR=str(tmp_path), NETTEL_LOG_FORMAT="json",
               COLUMNS="100", TERM="xterm")  # fmt: skip
    leader, follower = pty.openpty()  # stderr is a terminal: rich draws the bar there
    chunks: list[bytes] = []

    def read_terminal() -> None:  # as it is written, so the child never blocks on a full pty
        with contextlib.suppress(OSError):  # EIO once the terminal's other end is closed
            while chunk := os.read(leader, 65536):
                chunks.append(chunk)

    reader = threading.Thread(target=read_terminal)
    reader.start()
    try:
        proc = subprocess.run([str(Path(sys.executable).with_name("nettel")), "store", "maintain"],
                              env=env, stdout=subprocess.PIPE, stderr=follower, timeout=120,
                              check=False)  # fmt: skip
    finally:
        os.close(follower)
        reader.join(10)
        os.close(leader)
    drawn = b"".join(chunks)
    assert proc.returncode == 0, drawn[-2000:]
    text = drawn.decode(errors="replace")
    assert ": done" in text  # the last table's step (rich may elide its name)
    assert "100%" in text
