"""The detector's tables on disk: alert versions, checkpoints, feedback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nettel.store.alerts import AlertTable, DetectState, DetectStateTable, FeedbackTable


def alert(id_: str, status: str, updated_ms: int, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": id_, "status": status, "identity": "shop/web", "metric": "tx_bytes", "rule": "",
        "host": "h", "container_id": "c", "started_ms": 1_000_000, "updated_ms": updated_ms,
        "resolved_ms": updated_ms if status == "resolved" else None, "observed": 5.0,
        "peak": 6.0, "expected": 1.0, "band_low": 0.5, "band_high": 1.5, "band_basis": "day",
        "score": 4.0, "severity": "warning", "related": {"connections": 12.0}, "restarts": 0,
        "explanation": "x", "partition": 0, "offset": updated_ms // 1000,
    }  # fmt: skip
    return row | kw


def test_latest_version_per_alert_and_points(tmp_path: Path) -> None:
    table = AlertTable(str(tmp_path / "alerts"))
    assert table.latest().height == 0
    assert table.written_through("w", "t", 0, 1) == 0
    table.append([alert("a", "open", 1_000_000), alert("b", "open", 1_005_000)], {0: 7},
                 writer="w", topic="t", epoch=1)  # fmt: skip
    table.append([alert("a", "resolved", 1_060_000)], {0: 9, 1: 3}, writer="w", topic="t",
                 epoch=1)  # fmt: skip
    latest = table.latest()
    assert latest["id"].to_list() == ["a", "b"]
    assert latest["status"].to_list() == ["resolved", "open"]
    assert latest.row(0, named=True)["related"] == '{"connections": 12.0}'
    assert table.written_through("w", "t", 0, 1) == 9
    assert table.written_through("w", "t", 1, 1) == 3
    assert table.written_through("w", "t", 0, 2) == 0
    assert table.latest(since_ms=1_010_000)["id"].to_list() == ["a"]


def test_incident_metrics_are_queryable_and_old_rows_stay_readable(tmp_path: Path) -> None:
    """Rows written before incidents (no direction, no metrics) and new ones in one table."""
    import polars as pl

    from nettel.store.alerts import alert_rows_frame

    table = AlertTable(str(tmp_path / "alerts"))
    old = alert_rows_frame([alert("a", "open", 1_000_000)]).drop("direction", "metrics")
    old.write_delta(table.uri, mode="append", delta_write_options={"partition_by": ["date"]})
    evidence = [
        {"metric": m, "direction": "spike", "started_ms": 1_000_000, "peak_ms": 1_005_000,
         "peak": peak, "expected": 1.0, "band_low": 0.5, "band_high": 1.5, "band_basis": "day",
         "observed": 2.0, "score": 4.0}
        for m, peak in (("tx_bytes", 6.0), ("tx_packets", 9.0))
    ]  # fmt: skip
    table.append([alert("b", "open", 1_070_000, direction="spike", metrics=evidence)], {0: 3},
                 writer="w", topic="t", epoch=1)  # fmt: skip
    latest = table.latest()
    assert latest["id"].to_list() == ["b", "a"]
    assert latest["direction"].to_list() == ["spike", None]
    per_metric = (
        pl.scan_delta(table.uri).filter(pl.col("id") == "b").explode("metrics")
        .select(pl.col("metrics").struct.field("metric", "peak", "peak_at")).collect()
    )  # fmt: skip
    assert per_metric.select("metric", "peak").rows() == [("tx_bytes", 6.0), ("tx_packets", 9.0)]
    assert per_metric["peak_at"][0].timestamp() == 1005.0


def test_state_rows_are_replaced_per_partition(tmp_path: Path) -> None:
    table = DetectStateTable(str(tmp_path / "state"))
    assert table.load([0, 1]) == {}
    table.save([DetectState(0, 1, 10, 2, -1, b"zero"), DetectState(1, 1, 5, 0, -1, b"one")])
    table.save([DetectState(0, 1, 20, 4, 3, b"zero2")])
    got = table.load([0, 1, 2])
    assert got[0] == DetectState(0, 1, 20, 4, 3, b"zero2")
    assert got[1] == DetectState(1, 1, 5, 0, -1, b"one")
    assert set(got) == {0, 1}


def test_feedback_rows(tmp_path: Path) -> None:
    table = FeedbackTable(str(tmp_path / "fb"))
    assert table.version() == -1
    table.append("a", "false_positive", "backup", container="shop/web", metric="tx_bytes",
                 started_ms=1_000_000, peak=5e6, now_ms=2_000_000)  # fmt: skip
    rows = table.rows()
    assert rows.height == 1
    assert rows.row(0, named=True)["verdict"] == "false_positive"
    assert table.version() == 0
