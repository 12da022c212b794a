"""Query latency over 30 days x 500 containers of minute data, in the worker's layout.

The store is built once under ``--data`` (reused when its ``bench.json`` matches) with
nettel's own write paths, so it looks like what ``nettel up`` leaves behind:

- older days: minute rows appended in hourly commits, then compacted by
  :func:`~nettel.store.maintenance.maintain_table`; ``hour`` and ``day`` hold the partial
  rows the worker's 5-minute rolls write (one per container, partition and roll: built
  with :func:`~nettel.store.rollup.rollup_frame` per roll and committed with the same
  app transactions :meth:`~nettel.store.rollup.RollupTable.roll` writes);
- today: one minute commit per minute (what 30 s flushes leave), every 5 minutes a real
  :meth:`RollupTable.roll` of every partition into ``hour`` then ``day``, every hour a
  maintenance pass; the last minutes are not rolled yet (the rollups lag).

Values follow daily cycles with per-container levels, phases and noise. Then it times
``stats`` (every container), ``top(n=10)`` and ``timeseries(max_points=100)`` over the
last day, week and month (rolling ranges ending at the data's last whole minute, as the
MCP tool asks) and over an aligned calendar day, with a fresh ``TrafficQuery`` per run
and with one long-lived (warm) one, as the MCP server keeps.

Then the tool path: the MCP server built as ``nettel mcp`` builds it (``TelemetryTools.
for_data_dir`` and ``build_server``, what :func:`nettel.cli.mcp_server` calls; only the
clock is pinned to the data's last minute, so a reused store answers the same), each call
through ``MCPServer.call_tool``: argument validation, name resolution, the store query, the
thread hop and the result's conversion; everything but the transport.

Bytes per stored value are reported over every value column (the schema less ``date``,
the Hive partition, and ``partition``) and over the columns that carry information: those
that take more than one value within some container (per-container
constants such as the image, and columns that stay zero, are left out): for ``minute``
within its last whole day, for ``hour`` and ``day`` over the whole table.

    python bench/query.py [--data DIR] [--containers 500] [--days 30] [--runs 30]

Writes bench/results/query.json. Targets (issue 3): day < 20 ms, week and month < 50 ms;
(issue 16) the tool ``get_network_stats`` p95 <= 50 ms over a month, named container and
all, and <= 1.0 byte per value over all value columns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from deltalake import DeltaTable, Transaction

from nettel.mcp.server import build_server
from nettel.mcp.tools import TelemetryTools
from nettel.models import COUNTERS, TCP_STATES, TOTALS
from nettel.store.directory import ContainerDirectory, DirectoryEntry
from nettel.store.maintenance import maintain_table
from nettel.store.minute import MinuteTable, minute_schema
from nettel.store.query import TrafficQuery
from nettel.store.rollup import DAY_MS, HOUR_MS, RollupTable, rollup_frame

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

MINUTE_MS = 60_000
ROLL_MS = 5 * MINUTE_MS  # NETTEL_ROLLUP_INTERVAL_S default
WRITER, TOPIC, PARTITIONS = "nettel-stream", "nettel.stats", 12
LAYOUT = 3  # bump when the build (or maintenance's layout) changes


def containers_frame(n: int, seed: int) -> pl.DataFrame:
    """Per-container constants: identity, partition, level, phase, noise."""
    rng = np.random.default_rng(seed)
    names = [f"svc-{i:03d}" for i in range(n)]
    return pl.DataFrame({
        "container": names,
        "partition": [zlib.crc32(c.encode()) % PARTITIONS for c in names],
        "host": ["bench-host"] * n,
        "container_id": [f"{zlib.crc32(c.encode()):08x}{i:056x}" for i, c in enumerate(names)],
        "name": names,
        "image": [f"registry.local/app{i % 17}:1.{i % 5}" for i in range(n)],
        "compose_project": [f"proj{i % 9}" for i in range(n)],
        "compose_service": [f"service{i}" for i in range(n)],
        "_level": rng.lognormal(10.0, 1.5, n),  # bytes/s
        "_phase": rng.uniform(0, 2 * np.pi, n),
        "_tx_ratio": rng.uniform(0.2, 3.0, n),
        "_conn": rng.lognormal(2.0, 1.0, n),
    })  # fmt: skip


def minute_rows(cs: pl.DataFrame, start_ms: int, minutes: int, seed: int) -> pl.DataFrame:
    """``minutes`` minute rows per container from ``start_ms``, sorted by (container, ts)."""
    n = cs.height
    rng = np.random.default_rng(seed)
    size = n * minutes
    t_ms = start_ms + np.tile(np.arange(minutes, dtype=np.int64) * MINUTE_MS, n)
    day_frac = (t_ms % DAY_MS) / DAY_MS
    level = np.repeat(cs["_level"].to_numpy(), minutes)
    phase = np.repeat(cs["_phase"].to_numpy(), minutes)
    ratio = np.repeat(cs["_tx_ratio"].to_numpy(), minutes)
    conn = np.repeat(cs["_conn"].to_numpy(), minutes)
    cycle = 1.0 + 0.7 * np.sin(2 * np.pi * day_frac + phase)
    rate = level * cycle * rng.lognormal(0.0, 0.3, size)
    rx = (rate * 60).astype(np.int64)
    tx = (rate * ratio * 60).astype(np.int64)
    cols: dict[str, Any] = {
        "ts": t_ms * 1000,
        "window_ms": np.full(size, MINUTE_MS, np.int64),
        "samples": np.full(size, 12, np.int64),
        "interval_ms": np.full(size, MINUTE_MS, np.int64),
        "resets": (rng.random(size) < 1e-5).astype(np.int64),
        "rx_bytes": rx,
        "tx_bytes": tx,
        "rx_packets": rx // 900 + 1,
        "tx_packets": tx // 700 + 1,
        "rx_errors": rng.poisson(0.02, size).astype(np.int64),
        "tx_errors": rng.poisson(0.01, size).astype(np.int64),
        "rx_drops": rng.poisson(0.05, size).astype(np.int64),
        "tx_drops": rng.poisson(0.02, size).astype(np.int64),
    }
    for c in COUNTERS:
        per_s = cols[c] / 60.0
        cols[f"{c}_rate_min"] = per_s * rng.uniform(0.3, 1.0, size)
        cols[f"{c}_rate_max"] = per_s * rng.uniform(1.0, 3.0, size)
    for t, (a, b) in TOTALS.items():
        per_s = (cols[a] + cols[b]) / 60.0
        cols[f"{t}_rate_min"] = per_s * rng.uniform(0.3, 1.0, size)
        cols[f"{t}_rate_max"] = per_s * rng.uniform(1.0, 3.0, size)
    c_mean = conn * cycle
    cols["connections_last"] = rng.poisson(c_mean).astype(np.int64)
    cols["connections_max"] = cols["connections_last"] + rng.poisson(2, size)
    cols["connections_min"] = np.maximum(cols["connections_last"] - rng.poisson(2, size), 0)
    cols["connections_samples"] = np.full(size, 12, np.int64)
    cols["connections_sum"] = cols["connections_last"] * 12
    for i, s in enumerate(TCP_STATES):
        cols[f"tcp_{s}_max"] = rng.poisson(c_mean if i == 0 else 0.3, size).astype(np.int64)
    ident = cs.drop("_level", "_phase", "_tx_ratio", "_conn").select(
        pl.all().repeat_by(minutes).explode()
    )
    frame = pl.concat([ident, pl.DataFrame(cols)], how="horizontal").with_columns(
        ts=pl.col("ts").cast(pl.Datetime("us", "UTC"))
    )
    frame = frame.with_columns(date=pl.col("ts").dt.strftime("%Y-%m-%d"))
    schema = minute_schema()
    return frame.select([pl.col(c).cast(t) for c, t in schema.items()]).sort("container", "ts")


def roll_partials(minutes: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """What 5-minute rolls of ``minutes`` leave in ``hour`` and ``day``.

    Each roll writes one partial row per container, partition and period (``hour`` from
    the minute rows it consumed, ``day`` from those hour rows): ``rollup_frame`` per
    roll, vectorised by carrying the roll's index in ``partition``.
    """
    roll = pl.col("ts").dt.epoch("ms") // ROLL_MS
    keyed = minutes.with_columns(partition=roll * 1000 + pl.col("partition"))
    hourly = rollup_frame(keyed, HOUR_MS)
    daily = rollup_frame(hourly, DAY_MS)
    plain = pl.col("partition") % 1000
    return (hourly.with_columns(partition=plain).sort("container", "ts"),
            daily.with_columns(partition=plain).sort("container", "ts"))  # fmt: skip


def txns(version: int) -> list[Transaction]:
    return [Transaction(RollupTable.app_id(WRITER, TOPIC, p, 0, "source"), version)
            for p in range(PARTITIONS)]  # fmt: skip


def build(data: str, n: int, days: int, now_ms: int, say: Callable[[str], None]) -> None:
    """The store under ``data`` as the worker and hourly maintenance leave it at ``now_ms``."""
    minute = MinuteTable(f"{data}/minute")
    hour = RollupTable(f"{data}/hour", minute, HOUR_MS)
    day = RollupTable(f"{data}/day", hour, DAY_MS)
    cs = containers_frame(n, seed=1)
    today = now_ms // DAY_MS * DAY_MS

    def maintain() -> None:
        for t in (minute, hour, day):
            maintain_table(t.uri, t.uri.rsplit("/", 1)[1], retention_days=None)

    for d in range(days, 0, -1):
        d0 = today - d * DAY_MS
        t0 = time.perf_counter()
        rows = minute_rows(cs, d0, 1440, seed=d)
        for h in range(24):  # hourly commits; compacted below
            part = rows.filter(pl.col("ts").dt.hour() == h)
            minute.append_frame(part, [])
        hourly, daily = roll_partials(rows)
        hour.append_frame(hourly, txns(DeltaTable(minute.uri).version()))
        day.append_frame(daily, txns(DeltaTable(hour.uri).version()))
        say(f"day -{d}: {rows.height} minute rows in {time.perf_counter() - t0:.1f} s")
    maintain()
    # today: a commit per minute, rolls every 5 minutes, maintenance every hour
    last = now_ms - MINUTE_MS  # the window closing at now is still open
    rows = minute_rows(cs, today, (last - today) // MINUTE_MS + 1, seed=0)
    by_minute = rows.partition_by("ts", as_dict=True, maintain_order=True)
    t0 = time.perf_counter()
    for (ts,), part in sorted(by_minute.items()):
        minute.append_frame(part, [])
        t_ms = int(ts.timestamp() * 1000) + MINUTE_MS
        if t_ms % ROLL_MS == 0 and t_ms <= last - 2 * MINUTE_MS:
            for table in (hour, day):
                for p in range(PARTITIONS):
                    table.roll(p, writer=WRITER, topic=TOPIC)
        if t_ms % HOUR_MS == 30 * MINUTE_MS:  # maintenance runs hourly, at some minute
            maintain()
        if t_ms % HOUR_MS == 0:
            took = time.perf_counter() - t0
            say(f"today: {(t_ms - today) // MINUTE_MS} min written ({took:.0f} s)")


def write_directory(data: str, n: int, days: int, now_ms: int) -> None:
    """The ``directory`` table as the stream worker leaves it (one row per container,
    first seen at the first day's start, last seen at the last minute): written through
    :class:`~nettel.store.directory.ContainerDirectory`, as the worker writes it."""
    cs = containers_frame(n, seed=1)
    first = now_ms // DAY_MS * DAY_MS - days * DAY_MS
    directory = ContainerDirectory(f"{data}/directory")
    directory.observe(
        DirectoryEntry(partition=r["partition"], container=r["container"], name=r["name"],
                 container_id=r["container_id"], image=r["image"],
                 compose_project=r["compose_project"], compose_service=r["compose_service"],
                 host=r["host"], first_seen_ms=first, last_seen_ms=now_ms)
        for r in cs.iter_rows(named=True)
    )  # fmt: skip
    directory.write(now_ms)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, -(-round(q * len(s)) // 1) - 1))]


def timed(fn: Callable[[], object], runs: int) -> dict[str, float]:
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(ms), 1), "p95_ms": round(percentile(ms, 0.95), 1)}


def measure(data: str, meta: dict[str, Any], runs: int) -> dict[str, Any]:
    now = meta["now_ms"]
    today = now // DAY_MS * DAY_MS
    ranges = {
        "day": (now - DAY_MS, now),
        "week": (now - 7 * DAY_MS, now),
        "month": (now - 30 * DAY_MS, now),
        "calendar_day": (today - DAY_MS, today),
    }
    warm = TrafficQuery(data, partitions=PARTITIONS)
    one = "svc-007"
    queries: dict[str, Callable[[TrafficQuery, int, int], object]] = {
        "stats": lambda q, s, e: q.stats(s, e),
        "top10": lambda q, s, e: q.top(s, e, n=10),
        "timeseries": lambda q, s, e: q.timeseries(one, s, e, max_points=100),
    }
    out: dict[str, Any] = {}
    for rname, (s, e) in ranges.items():
        for qname, fn in queries.items():
            key = f"{qname}_{rname}"
            fn(warm, s, e)  # warm-up

            def cold(f: Callable[[TrafficQuery, int, int], object] = fn, s: int = s,
                     e: int = e) -> object:  # fmt: skip
                return f(TrafficQuery(data, partitions=PARTITIONS), s, e)

            def hot(f: Callable[[TrafficQuery, int, int], object] = fn, s: int = s,
                    e: int = e) -> object:  # fmt: skip
                return f(warm, s, e)

            out[key] = {"cold": timed(cold, runs), "warm": timed(hot, runs)}
            print(key, out[key], flush=True)
    return out


def measure_tools(data: str, meta: dict[str, Any], runs: int) -> dict[str, Any]:
    """Median/p95 of MCP tool calls on a long-lived server, as ``nettel mcp`` serves them."""
    tools = TelemetryTools.for_data_dir(data, partitions=PARTITIONS, topic=TOPIC)
    tools.clock = lambda: meta["now_ms"] / 1000  # the data ends at the build's "now"
    server = build_server(tools)
    one = "svc-007"
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    for tf in ("hour", "day", "week", "month"):
        calls[f"get_network_stats_one_{tf}"] = (
            "get_network_stats",
            {"container": one, "timeframe": tf},
        )
        calls[f"get_network_stats_all_{tf}"] = ("get_network_stats", {"timeframe": tf})
    for tf in ("day", "month"):
        calls[f"get_top_consumers_{tf}"] = ("get_top_consumers", {"timeframe": tf})
        calls[f"get_traffic_timeseries_{tf}"] = (
            "get_traffic_timeseries",
            {"container": one, "timeframe": tf},
        )
    calls["list_containers"] = ("list_containers", {})
    calls["forecast_traffic"] = ("forecast_traffic", {"container": one})
    loop = asyncio.new_event_loop()
    out: dict[str, Any] = {}
    try:
        for key, (name, args) in calls.items():

            def call(name: str = name, args: dict[str, Any] = args) -> object:
                result = loop.run_until_complete(server.call_tool(name, args))
                assert not getattr(result, "is_error", False), (name, args, result)
                return result

            call()  # warm-up: the server is long-lived
            out[key] = timed(call, runs)
            print(key, out[key], flush=True)
    finally:
        loop.close()
    return out


#: columns that are not values: the Hive partition (not in the files) and the Kafka one
NOT_VALUES = ("date", "partition")


def value_columns(uri: str, day: str | None) -> dict[str, Any]:
    """All value columns of a table, and those that vary within a container on ``day``
    (None: over the whole table)."""
    names = [c for c in minute_schema() if c not in NOT_VALUES]
    scan = pl.scan_delta(uri)
    frame = (scan if day is None else scan.filter(pl.col("date") == day)).select(names).collect()
    per_container = frame.group_by("container").agg(pl.exclude("container").n_unique())
    varying = [c for c in names if c != "container" and per_container[c].max() > 1]
    return {"all": names, "informative": varying,
            "left_out": [c for c in names if c not in varying]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "nettel-query-bench"))
    ap.add_argument("--containers", type=int, default=500)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    meta_path = Path(args.data) / "bench.json"
    want = {"containers": args.containers, "days": args.days, "layout": LAYOUT}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if {k: meta.get(k) for k in want} != want:
        if Path(args.data).exists() and any(Path(args.data).iterdir()):
            sys.exit(f"{args.data} holds another store: remove it or pick another --data")
        now_ms = time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
        t0 = time.perf_counter()
        build(args.data, args.containers, args.days, now_ms, lambda m: print(m, flush=True))
        meta = {**want, "now_ms": now_ms, "build_s": round(time.perf_counter() - t0, 1)}
        meta_path.write_text(json.dumps(meta))
    if not (Path(args.data) / "directory").exists():  # stores built before the directory
        write_directory(args.data, args.containers, args.days, meta["now_ms"])
    store: dict[str, Any] = {}
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(meta["now_ms"] // 1000 - 86_400))
    for t in ("minute", "hour", "day"):
        uri = f"{args.data}/{t}"
        dtab = DeltaTable(uri)
        rows = pl.scan_delta(uri).select(pl.len()).collect().item()
        size = sum(Path(f).stat().st_size for f in dtab.file_uris())
        # minute: the last whole day (a month of minute rows would not fit the group-by in
        # memory); hour and day: every row (day holds one row per container and day)
        columns = value_columns(uri, yesterday if t == "minute" else None)
        store[t] = {
            "version": dtab.version(),
            "files": len(dtab.file_uris()),
            "rows": rows,
            "bytes": size,
            "value_columns": len(columns["all"]),
            "bytes_per_value": round(size / max(rows * len(columns["all"]), 1), 3),
            "informative_columns": len(columns["informative"]),
            "bytes_per_informative_value": round(
                size / max(rows * len(columns["informative"]), 1), 3
            ),
            "left_out": columns["left_out"],
        }
    print(store, flush=True)
    figures = {**meta, "store": store, "latency": measure(args.data, meta, args.runs),
               "tools": measure_tools(args.data, meta, args.runs),
               "targets_ms": {"day": 20, "week": 50, "month": 50,
                              "get_network_stats_month_p95": 50}}  # fmt: skip
    write_result("query", figures, "python bench/query.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
