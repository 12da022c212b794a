"""notebooks/explore.ipynb runs end to end on a data dir built by the real pipeline.

Simulated traffic goes through a real broker and the stream worker into Delta tables on
disk; the notebook is executed in a real Jupyter kernel (nbclient), and what it shows is
checked against the published events.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from nettel.broker import EmbeddedBroker
from nettel.models import COUNTERS, StatEvent
from nettel.store.minute import MinuteTable
from nettel.store.rollup import DAY_MS, HOUR_MS
from test_stream_worker import TOPICS, publish, run_worker, scenario

pytestmark = pytest.mark.broker

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"

# Appended to a copy of the notebook: prints what the notebook computed, as JSON.
READ_BACK = """\
import json, sys
print(json.dumps({
    "prefix": sys.prefix,
    "table": TABLE,
    "container": CONTAINER,
    "containers": sorted(containers["container"]),
    "top": top.select("container", "rx_bytes", "tx_bytes").rows(),
    "series": series.select(
        pl.col("ts").dt.epoch("ms"), "rx_bytes", "tx_bytes", "rx_per_s", "tx_per_s"
    ).rows(),
    "exact": exact.select("container", *COUNTERS).rows(),
}))
"""


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat()


def sums(events: list[StatEvent], start_ms: int, end_ms: int) -> dict[str, list[int]]:
    """Counter sums per container over the events in [start, end)."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0] * len(COUNTERS))
    for ev in events:
        if start_ms <= ev.ts_ms < end_ms:
            a = acc[ev.identity]
            for i, c in enumerate(COUNTERS):
                a[i] += getattr(ev, c)
    return dict(acc)


async def test_the_notebook_shows_the_traffic_the_pipeline_stored(
    broker: EmbeddedBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bootstrap = broker.bootstrap_servers
    events, start, cutoff = await scenario(bootstrap, 6, 2, seed=5)
    await publish(bootstrap, events)
    table = MinuteTable(str(tmp_path / "data" / "minute"))
    await run_worker(
        bootstrap, table, lambda w: w.stats.consumed >= len(events) and w.stats.flushes >= 2
    )

    # the kernel inherits this process's environment
    monkeypatch.setenv("NETTEL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NETTEL_END", iso(cutoff))
    monkeypatch.setenv("NETTEL_PARTITIONS", str(TOPICS["nettel.stats"]))
    monkeypatch.delenv("NETTEL_CONTAINER", raising=False)
    expected = sums(events, start, cutoff)
    ranked = sorted(expected.items(), key=lambda kv: (-(kv[1][0] + kv[1][1]), kv[0]))
    busiest = ranked[0][0]
    rx, tx = COUNTERS.index("rx_bytes"), COUNTERS.index("tx_bytes")

    # two hours: read from minute; three days (nothing before the data): read from hour
    ranges = [(start, "minute", 60_000), (start - 3 * DAY_MS, "hour", HOUR_MS)]
    for range_start, table_name, period_ms in ranges:
        monkeypatch.setenv("NETTEL_START", iso(range_start))
        shown = await execute_notebook(tmp_path)
        assert shown["prefix"] == sys.prefix, "the kernel runs this venv's Python"
        assert shown["table"] == table_name
        assert shown["containers"] == sorted(expected)
        assert shown["top"] == [[k, v[rx], v[tx]] for k, v in ranked]
        # whole hours (and days): TrafficQuery answers from hour and day (+ unrolled rows)
        assert shown["exact"] == [[k, *v] for k, v in sorted(expected.items())]
        assert shown["container"] == busiest
        assert shown["series"] == expected_series(events, busiest, start, cutoff, period_ms)


async def execute_notebook(cwd: Path) -> dict[str, Any]:
    """Run the notebook in a fresh kernel; check it; return what it computed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)  # type: ignore[no-untyped-call]
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit the notebook with its outputs cleared"
    )
    nb.cells.append(nbformat.v4.new_code_cell(READ_BACK))  # type: ignore[no-untyped-call]
    # kernelspec "python3" runs `python`, which jupyter_client maps to sys.executable
    client = NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(cwd)}})  # fmt: skip
    await client.async_execute()  # raises CellExecutionError if a cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    charts = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(charts) == 2, "the top consumers bar chart and the container's traffic"
    shown: dict[str, Any] = json.loads(nb.cells[-1].outputs[-1].text)
    return shown


def expected_series(
    events: list[StatEvent], container: str, start_ms: int, end_ms: int, period_ms: int
) -> list[list[Any]]:
    """[window start, rx, tx, rx/s, tx/s] per window: bytes over the time samples cover."""
    acc: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for ev in events:
        if ev.identity == container and start_ms <= ev.ts_ms < end_ms:
            w = acc[ev.ts_ms - ev.ts_ms % period_ms]
            w[0] += ev.rx_bytes
            w[1] += ev.tx_bytes
            w[2] += ev.interval_ms
    return [
        [ts, rx, tx, pytest.approx(rx / (ms / 1000)), pytest.approx(tx / (ms / 1000))]
        for ts, (rx, tx, ms) in sorted(acc.items())
    ]
