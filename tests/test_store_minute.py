"""The minute table on disk: rows and replay points land in one Delta commit."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from deltalake import DeltaTable

from nettel.models import ReplayPoint, StatEvent, TcpStates, WindowAggregate
from nettel.store.minute import MinuteTable, PartitionPoint


def window(identity: str, start_ms: int, rx: int) -> WindowAggregate:
    ev = StatEvent(ts_ms=start_ms + 5000, host="h", container_id="c-" + identity,
                   identity=identity, name=identity, interval_ms=5000, rx_bytes=rx,
                   connections=2, tcp=TcpStates(established=2))  # fmt: skip
    w = WindowAggregate.first(ev)
    w.add(ev)
    return w


def test_rows_and_points_are_one_commit_and_read_back(tmp_path: Path) -> None:
    table = MinuteTable(str(tmp_path / "minute"))
    assert table.replay_points("w", "nettel.stats", [0, 1], epoch=1) == {}
    day = 1_795_651_200_000  # 2026-11-26T00:00Z
    rows = [window("web", day + 60_000, 500), window("api", day, 100), window("web", day, 50)]
    p0 = ReplayPoint(resume_offset=7, event_time_ms=day, next_offset=9, written_through_ms=day)
    table.append(rows, [PartitionPoint("nettel.stats", 0, p0)], writer="w", epoch=1)
    dt = DeltaTable(str(tmp_path / "minute"))
    assert dt.version() == 0, "rows and points must be a single commit"
    assert table.replay_points("w", "nettel.stats", [0, 1], epoch=1) == {0: p0}
    assert table.replay_points("w", "nettel.stats", [0], epoch=2) == {}, "epochs are apart"
    frame = table.scan().collect()
    assert frame["container"].to_list() == ["api", "web", "web"], "sorted by (container, ts)"
    assert frame["rx_bytes"].to_list() == [100, 50, 500]
    assert frame["date"].unique().to_list() == ["2026-11-26"]
    assert frame.schema["ts"] == pl.Datetime("us", "UTC")
    assert frame["tcp_established_max"].to_list() == [2, 2, 2]
    # a later commit moves the point forward
    p0b = ReplayPoint(resume_offset=9, event_time_ms=day, next_offset=12, written_through_ms=day)
    table.append([], [PartitionPoint("nettel.stats", 0, p0b)], writer="w", epoch=1)
    assert table.replay_points("w", "nettel.stats", [0], epoch=1) == {0: p0b}
    assert table.scan().collect().height == 3
    assert dt.metadata().partition_columns == ["date"]
