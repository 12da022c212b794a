"""Every table stays bounded: the detector's state tables hold what a restart needs after
many checkpoints (the detector vacuums ``detect_state`` itself) and a maintenance pass,
and an idle service commits nothing (neither the stream worker, the detector nor
maintenance)."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from conftest import wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.cli import cmd_store_maintain, maintenance_plan, make_stream
from nettel.config import Settings
from nettel.detect.checkpoint import decode_checkpoint
from nettel.detect.fleet import FleetDetector
from nettel.ingest.simulate import TrafficSimulator
from nettel.models import ReplayPoint, StatEvent
from nettel.store.alerts import DetectState, DetectStateTable, FeedbackTable
from nettel.store.bands import STATE_TABLE_CONFIGURATION, BandTable
from nettel.store.maintenance import TABLE_RULES, maintain_table
from nettel.store.minute import MinuteTable, PartitionPoint
from nettel.store.reports import ReportsTable
from nettel.stream.detector import DetectWorker, _Partition
from test_store_minute import window
from test_stream_worker import publish

PARTITIONS = 3
STATE_TABLES = ("detect_state", "bands", "alerts")


def versions(data: str) -> dict[str, int]:
    return {name: DeltaTable(f"{data}/{name}").version() for name in STATE_TABLES}


def service_versions(data: str) -> dict[str, int]:
    """The version of every table the stream worker and the detector have written."""
    return {p.name: DeltaTable(str(p)).version() for p in Path(data).iterdir()
            if (p / "_delta_log").is_dir()}  # fmt: skip


async def settled(data: str, quiet_s: float = 1.0) -> dict[str, int]:
    """The tables' versions once none has changed for ``quiet_s`` (five flush, roll and
    checkpoint intervals: a job committing at every one of them never settles)."""
    seen, since = service_versions(data), time.monotonic()
    while time.monotonic() - since < quiet_s:
        await asyncio.sleep(0.1)
        now = service_versions(data)
        if now != seen:
            seen, since = now, time.monotonic()
    return seen


def on_disk(uri: str) -> tuple[int, int]:
    """Parquet files and their bytes under a table's folder (live or not)."""
    files = [p for p in Path(uri).rglob("*.parquet") if "_delta_log" not in p.parts]
    return len(files), sum(p.stat().st_size for p in files)


def live_bytes(uri: str) -> int:
    return sum(DeltaTable(uri).get_add_actions(flatten=True).column("size_bytes").to_pylist())


@pytest.mark.broker
async def test_state_tables_stay_bounded_and_an_idle_service_commits_nothing(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, {"nettel.stats": PARTITIONS, "nettel.alerts": PARTITIONS})
    sim = TrafficSimulator(8, seed=4, interval_ms=5000)
    start = 1_795_392_000_000
    spikes = sim.spikes(2, start + 600_000, 600_000, factor=40.0)
    events = list(sim.events(start, 1_500_000, spikes))
    data = str(tmp_path)
    # bands at every checkpoint too (default: every 5 minutes), so both tables churn
    worker = DetectWorker(bootstrap, data, checkpoint_interval_s=0.2, bands_interval_s=0.0)
    # the stream worker as `nettel up` builds it (samples, minute, hour, day, directory),
    # flushing and rolling every 0.2 s: idle, it must commit nothing either
    settings = Settings.from_env({"NETTEL_DATA_DIR": data, "NETTEL_FLUSH_INTERVAL_S": "0.2",
                                  "NETTEL_ROLLUP_INTERVAL_S": "0.2",
                                  "NETTEL_WINDOW_GRACE_S": "0"})  # fmt: skip
    stream = make_stream(settings, bootstrap)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    stream_task = asyncio.create_task(stream.run(stop))
    chunks = 8
    for i in range(chunks):  # traffic in bursts: a checkpoint after each
        part = events[i * len(events) // chunks : (i + 1) * len(events) // chunks]
        await publish(bootstrap, part)
        done = (i + 1) * len(events) // chunks
        await wait_for(lambda: worker.stats.consumed >= done, 60, "the burst read")  # noqa: B023
        checkpoints = worker.stats.checkpoints
        await wait_for(lambda: worker.stats.checkpoints > checkpoints, 30, "a checkpoint")  # noqa: B023
    assert worker.stats.alerts_published, "the spikes raised no alert"
    # every window closed (the last ones by the wall clock: the events are days old)
    windows = len({(e.identity, e.ts_ms // 60_000) for e in events})
    await wait_for(lambda: stream.stats.windows_written == windows, 60, "every window")
    before, checkpoints = service_versions(data), worker.stats.checkpoints
    assert before["detect_state"] >= chunks - 1
    before = await settled(data)  # a roll of the last flush may still be on its way
    await asyncio.sleep(2.0)  # ten flush, roll and checkpoint intervals with nothing to read
    assert service_versions(data) == before, "an idle service committed"
    assert worker.stats.checkpoints == checkpoints
    stop.set()
    await asyncio.wait_for(asyncio.gather(task, stream_task), 30)
    assert versions(data) == {t: before[t] for t in STATE_TABLES}, "a stop committed"

    # a maintenance pass (an hour later: vacuum with no retention) leaves what a restart
    # needs: one file per partition of detect_state, and nothing not live in any table
    for name in STATE_TABLES:
        uri = f"{data}/{name}"
        files_before, bytes_before = on_disk(uri)
        maintain_table(uri, name, retention_days=None, vacuum_retention_hours=0)
        files, size = on_disk(uri)
        assert size == live_bytes(uri), f"{name}: removed files were not vacuumed"
        assert files <= (PARTITIONS if name != "alerts" else 2), (name, files)
        assert files < files_before, name
        assert size < bytes_before, name
        conf = DeltaTable(uri).metadata().configuration
        for key, value in TABLE_RULES[name].properties.items():
            assert conf[key] == value, (name, key)
    states = DetectStateTable(f"{data}/detect_state").load(range(PARTITIONS))
    assert sorted(states) == list(range(PARTITIONS))
    assert all(decode_checkpoint(s.blob, FleetDetector).identities for s in states.values())
    band = BandTable(f"{data}/bands")
    rows = pl.read_delta(band.uri)
    keys = rows.select("container", "metric", "slot")
    assert keys.height == keys.unique().height == rows["container"].n_unique() * 168 * 11

    # a second pass on the idle store commits nothing on any table
    before = versions(data)
    for name in STATE_TABLES:
        maintain_table(f"{data}/{name}", name, retention_days=None, vacuum_retention_hours=0)
    assert versions(data) == before


async def test_ticks_merge_bands_only_every_bands_interval(tmp_path: Path) -> None:
    """Each tick checkpoints a changed detector, but the bands (a merge that takes
    seconds and ~250 MB) only once ``bands_interval_s`` has passed, and at a stop. Ticks
    are called directly: no broker is involved in what a checkpoint writes."""
    data = str(tmp_path)
    worker = DetectWorker("127.0.0.1:1", data, checkpoint_interval_s=0.1)
    part = worker._parts[0] = _Partition(FleetDetector(), 0, 0)
    events = list(TrafficSimulator(4, seed=3, interval_ms=60_000).events(1_795_392_000_000,
                                                                       3 * 3_600_000))  # fmt: skip
    chunks = [events[i * len(events) // 4 : (i + 1) * len(events) // 4] for i in range(4)]

    def feed(chunk: list[StatEvent]) -> None:
        for ev in chunk:
            part.fleet.process(ev)
            part.next_offset += 1
        part.changed = True

    for chunk in chunks[:3]:
        feed(chunk)
        await worker.tick()
    assert DeltaTable(f"{data}/detect_state").version() == 2  # one commit per tick
    assert DeltaTable(f"{data}/bands").version() == 0, "bands merged before their interval"
    feed(chunks[3])
    await worker.finish()
    assert DeltaTable(f"{data}/bands").version() == 1, "a stop writes the bands"


async def test_the_detector_vacuums_its_state_every_few_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between maintenance passes (an hour by default) ``detect_state`` stays bounded:
    every ``state_vacuum_every`` checkpoints the detector deletes the files its
    checkpoints replaced more than the table's window ago (minutes; none here), so the
    table holds its live files and at most the last checkpoints' ones. A tick with
    nothing changed commits nothing, a vacuum included."""
    monkeypatch.setitem(STATE_TABLE_CONFIGURATION, "delta.deletedFileRetentionDuration",
                        "interval 0 seconds")  # fmt: skip
    data = str(tmp_path)
    uri = f"{data}/detect_state"
    worker = DetectWorker("127.0.0.1:1", data, checkpoint_interval_s=0.1,
                          bands_interval_s=3600.0, state_vacuum_every=3)  # fmt: skip
    parts = [_Partition(FleetDetector(), 0, 0) for _ in range(2)]
    worker._parts = dict(enumerate(parts))
    events = list(TrafficSimulator(4, seed=3, interval_ms=60_000).events(1_795_392_000_000,
                                                                       3_600_000))  # fmt: skip
    for i in range(12):
        for part in parts:
            for ev in events[i * 20 : (i + 1) * 20]:
                part.fleet.process(ev)
                part.next_offset += 1
            part.changed = True
        await worker.tick()
        files, size = on_disk(uri)
        # each checkpoint replaces 2 files: at most 2 checkpoints' since the last vacuum
        assert files <= 2 + 2 * ((i + 1) % 3), (i, files)
        if i % 3 == 2:
            assert (files, size) == (2, live_bytes(uri)), "a vacuum left replaced files"
    assert worker.stats.checkpoints == 12
    version = DeltaTable(uri).version()
    for _ in range(4):  # idle ticks: no checkpoint, no vacuum
        await worker.tick()
    assert DeltaTable(uri).version() == version
    states = DetectStateTable(uri).load([0, 1])
    assert {p: s.next_offset for p, s in states.items()} == {0: 240, 1: 240}


def test_feedback_reports_and_bands_lose_only_expired_rows(tmp_path: Path) -> None:
    """Row retention of the tables that are not date-partitioned."""
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    ms = int(now.timestamp() * 1000)
    feedback = FeedbackTable(str(tmp_path / "alert_feedback"))
    for age_days in (200, 10):
        feedback.append("a", "confirmed", "", container="c", metric="rx_bytes",
                        started_ms=ms, peak=1.0, now_ms=ms - age_days * 86_400_000)  # fmt: skip
    reports = ReportsTable(str(tmp_path / "reports_table"))
    for day in ("2024-01-01", "2026-11-30"):
        reports.write(day, "UTC", ms, "complete", b"{}", "# r")
    bands = BandTable(str(tmp_path / "bands"))
    row = {"container": "old", "metric": "rx_bytes", "partition": 0, "slot": 0, "low": 0.0,
           "expected": 1.0, "high": 2.0, "basis": "day", "learned_samples": 1}  # fmt: skip
    # "live" has a slot that never changed since (a constant metric): it stays
    bands.upsert([row, row | {"container": "live", "slot": 1}], now_ms=ms - 60 * 86_400_000)
    bands.upsert([row | {"container": "live"}], now_ms=ms)
    settings = Settings.from_env({"NETTEL_DATA_DIR": str(tmp_path)})
    plan = dict(maintenance_plan(settings))
    for name in ("alert_feedback", "reports_table", "bands"):
        report = maintain_table(str(tmp_path / name), name, retention_days=plan[name],
                                today=now.date())  # fmt: skip
        assert report.rows_deleted == 1, name
    assert pl.read_delta(feedback.uri)["ts"].dt.date().to_list() == [dt.date(2026, 11, 21)]
    assert reports.dates() == ["2026-11-30"]
    kept = pl.read_delta(bands.uri).sort("slot")
    assert (kept["container"].to_list(), kept["slot"].to_list()) == (["live", "live"], [0, 1])
    versions_after = {n: DeltaTable(str(tmp_path / n)).version() for n in plan if
                      (tmp_path / n).exists()}  # fmt: skip
    for name in versions_after:  # nothing more expired: no commit
        maintain_table(str(tmp_path / name), name, retention_days=plan[name], today=now.date())
    assert versions_after == {n: DeltaTable(str(tmp_path / n)).version() for n in versions_after}


def test_an_idle_flush_of_the_minute_table_commits_nothing(tmp_path: Path) -> None:
    """The stream worker flushes every interval; with no closed window and the same
    replay points as its last commit, the table is not committed again."""
    table = MinuteTable(str(tmp_path / "minute"))
    point = PartitionPoint("nettel.stats", 0, ReplayPoint(5, 1000, 6, 900))
    table.append([window("web", 1_795_392_000_000, 10)], [point], writer="w", epoch=0)
    version = DeltaTable(table.uri).version()
    for _ in range(3):
        table.append([], [point], writer="w", epoch=0)
    assert DeltaTable(table.uri).version() == version
    moved = PartitionPoint("nettel.stats", 0, ReplayPoint(5, 2000, 6, 900))
    table.append([], [moved], writer="w", epoch=0)  # the watermark moved: recorded
    assert DeltaTable(table.uri).version() == version + 1
    assert table.replay_points("w", "nettel.stats", [0], epoch=0)[0] == moved.point


def test_detect_state_of_the_earlier_layout_is_replaced_whole(tmp_path: Path) -> None:
    """The earlier ``detect_state`` (one unpartitioned file of pickles) becomes the
    partitioned table at the first save; its pickles are gone with it."""
    uri = str(tmp_path / "detect_state")
    old = pl.DataFrame({"partition": [0, 1], "epoch": [0, 0], "next_offset": [5, 6],
                        "alerts_offset": [0, 0], "feedback_version": [-1, -1],
                        "blob": [b"\x80\x04K\x01.", b"\x80\x04K\x02."]})  # fmt: skip
    old.write_delta(uri)
    table = DetectStateTable(uri)
    table.save([DetectState(0, 0, 9, 0, -1, b"NTCK\x01")])
    assert DeltaTable(uri).metadata().partition_columns == ["partition"]
    assert {p: s.next_offset for p, s in table.load([0, 1]).items()} == {0: 9}
    table.save([DetectState(1, 0, 7, 0, -1, b"NTCK\x01")])
    assert {p: s.next_offset for p, s in table.load([0, 1]).items()} == {0: 9, 1: 7}


async def test_a_maintenance_pass_deletes_the_files_of_expired_reports(tmp_path: Path) -> None:
    """The report files beside ``reports_table`` go with its retention (a pass of
    ``nettel store maintain``, as ``nettel up`` runs it, on a data dir without tables)."""
    folder = tmp_path / "reports"
    folder.mkdir()
    today = dt.datetime.now(dt.UTC).date()
    days = [(today - dt.timedelta(days=n)).isoformat() for n in (401, 1)]
    for day in days:
        for fmt in ("json", "md", "html"):
            (folder / f"{day}.{fmt}").write_text("report")
    settings = Settings.from_env({"NETTEL_DATA_DIR": str(tmp_path)})
    assert settings.retention_reports_days == 400
    assert await cmd_store_maintain(settings) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"{days[1]}.{f}" for f in
                                                        ("html", "json", "md")]  # fmt: skip
