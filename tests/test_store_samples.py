"""The samples table: raw events exactly once (a replay adds nothing), date partitions,
sorted files, and kept only as long as its retention says."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable

from conftest import wait_for
from nettel.broker import EmbeddedBroker
from nettel.cli import maintain_one
from nettel.config import Settings
from nettel.models import COUNTERS, StatEvent, TcpStates
from nettel.store.minute import MinuteTable
from nettel.store.samples import PartitionSamples, SamplesTable
from nettel.stream.worker import StreamWorker
from test_stream_worker import publish, scenario

MIDNIGHT = 1_795_651_200_000  # 2026-11-26T00:00Z


def sample_rows(events: list[StatEvent]) -> list[tuple[object, ...]]:
    """What the samples table must hold, one tuple per event, sorted."""
    return sorted(
        (
            ev.identity,
            ev.ts_ms,
            ev.interval_ms,
            ev.connections,
            ev.counter_reset,
            *(getattr(ev, c) for c in COUNTERS),
            None if ev.tcp is None else ev.tcp.established,
        )
        for ev in events
    )


def table_sample_rows(table: SamplesTable) -> list[tuple[object, ...]]:
    """The samples table's rows as :func:`sample_rows` makes them, sorted."""
    frame = (
        table.scan()
        .select(
            "container",
            pl.col("ts").dt.epoch("ms"),
            "interval_ms",
            "connections",
            "counter_reset",
            *COUNTERS,
            "tcp_established",
        )
        .collect()
    )
    return sorted(frame.iter_rows())


def events_around_midnight(n: int, midnight_ms: int = MIDNIGHT) -> list[StatEvent]:
    """Events of three containers, every 5 s, half before and half after midnight."""
    return [
        StatEvent(
            ts_ms=midnight_ms + (i - n // 2) * 5000,
            host="h",
            container_id=f"c{i % 3}",
            identity=f"svc{i % 3}",
            name=f"svc{i % 3}",
            interval_ms=5000,
            rx_bytes=1000 + i,
            tx_bytes=7 * i,
            connections=i % 4,
            tcp=TcpStates(established=i % 4),
            counter_reset=i % 11 == 0,
        )
        for i in range(n)
    ]


def parts(events: list[StatEvent], lo: int, hi: int) -> list[PartitionSamples]:
    """Offsets [lo, hi) of two partitions (even events on 0, odd on 1; offset = index // 2)."""
    out = []
    for p in (0, 1):
        mine = [(i // 2, ev) for i, ev in enumerate(events) if i % 2 == p]
        out.append(PartitionSamples("nettel.stats", p, [x for x in mine if lo <= x[0] < hi], hi))
    return out


def test_a_replay_adds_nothing_and_the_rows_are_the_events(tmp_path: Path) -> None:
    events = events_around_midnight(400)  # offsets 0..199 on each partition
    table = SamplesTable(str(tmp_path / "samples"))
    assert table.append_samples(parts(events, 0, 120), writer="w", epoch=1) == 240
    version = DeltaTable(table.uri).version()
    # the same events again (a restart before the next write): nothing is committed
    assert table.append_samples(parts(events, 0, 120), writer="w", epoch=1) == 0
    assert DeltaTable(table.uri).version() == version
    # a replay from an earlier offset with new events after it: only the new ones land
    assert table.append_samples(parts(events, 50, 200), writer="w", epoch=1) == 160
    assert table.stored_offsets("w", "nettel.stats", [0, 1, 2], epoch=1) == {0: 200, 1: 200}
    assert table.stored_offsets("w", "nettel.stats", [0], epoch=2) == {}, "epochs are apart"
    assert table_sample_rows(table) == sample_rows(events)
    dtable = DeltaTable(table.uri)
    assert dtable.metadata().partition_columns == ["date"]
    assert sorted(p["date"] for p in dtable.partitions()) == ["2026-11-25", "2026-11-26"]
    for uri in dtable.file_uris():
        frame = pl.read_parquet(uri, hive_partitioning=False)
        assert frame.select("container", "ts").equals(frame.select("container", "ts").sort(
            "container", "ts")), "rows sorted by (container, ts) within files"  # fmt: skip
    assert table.scan().collect_schema()["ts"] == pl.Datetime("us", "UTC")


def test_maintenance_expires_old_samples_and_keeps_the_rest(tmp_path: Path) -> None:
    today = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    settings = Settings.from_env({"NETTEL_DATA_DIR": str(tmp_path)})
    table = SamplesTable(str(tmp_path / "samples"))
    day_ms = int(today.timestamp() * 1000)
    # 40 events either side of the midnight ten days ago: two expired date partitions
    old = [(i, ev) for i, ev in enumerate(events_around_midnight(40, day_ms - 10 * 86_400_000))]
    recent = [
        StatEvent(
            ts_ms=day_ms + i * 1000,
            host="h",
            container_id="c",
            identity="svc",
            name="svc",
            interval_ms=1000,
            rx_bytes=i,
        )
        for i in range(30)
    ]
    for chunk in range(3):  # several small files to compact
        mine = [(chunk * 10 + i, ev) for i, ev in enumerate(recent[chunk * 10 : chunk * 10 + 10])]
        table.append_samples([PartitionSamples("nettel.stats", 1, mine, chunk * 10 + 10)],
                             writer="w", epoch=1)  # fmt: skip
    table.append_samples([PartitionSamples("nettel.stats", 0, old, 40)], writer="w", epoch=1)
    report = maintain_one(settings, "samples", settings.retention_samples_days)
    assert report.partitions_deleted == 2
    assert report.files_after < report.files_before
    assert table_sample_rows(table) == sample_rows(recent)
    assert table.stored_offsets("w", "nettel.stats", [0, 1], epoch=1) == {0: 40, 1: 30}


@pytest.mark.broker
async def test_the_worker_replaying_the_whole_log_adds_no_sample(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    events, _, _ = await scenario(broker.bootstrap_servers, 6, 1, seed=5)
    await publish(broker.bootstrap_servers, events)
    samples = SamplesTable(str(tmp_path / "samples"))
    for minute in ("minute", "minute-again"):  # the second has no points: it reads from 0
        worker = StreamWorker(broker.bootstrap_servers, MinuteTable(str(tmp_path / minute)),
                              flush_interval_s=0.5, samples=samples)  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            await wait_for(lambda w=worker: w.stats.consumed >= len(events)
                           and w.stats.flushes >= 2, 120, "the worker to read all")  # fmt: skip
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
        if minute == "minute":
            version = DeltaTable(samples.uri).version()
            assert worker.stats.samples_written == len(events)
        else:
            assert worker.stats.samples_written == 0
            assert DeltaTable(samples.uri).version() == version, "a replay commits nothing"
        assert table_sample_rows(samples) == sample_rows(events)
