"""Ten operator questions through the MCP SDK client over stdio, against a store the real
pipeline filled from `nettel simulate`, each answer checked against the ground truth.

The store: the embedded Tansu broker; `nettel simulate` (a subprocess, with --truth)
publishes ``--containers`` containers over ``--days`` days, one sample every
``--interval-s`` (300 s) up to now; the stream worker and the detector are built by
:func:`nettel.cli.make_stream` and :func:`nettel.cli.make_detect` (what `nettel up` runs,
with its defaults) and run until they have consumed every event, then stopped as `nettel
up` stops them (the worker seals its open windows). ``--detect-hours``: the detector reads
only the last hours of the same events (see :func:`fill`). Then :func:`settle`: a
maintenance pass and a roll, as a running `nettel up` keeps the store. Then `nettel mcp`
(with a bytecode cache, as installed) serves it over stdio; after ``tools/list`` and a
pause (:data:`THINK_S`), each question gets a scripted choice of tools (made from the
tool descriptions) and a check against the truth, which is recomputed from the
simulator's events (same seed) and its spikes file.

Per question: calls, characters of each answer, correct or not, latency per call
(client side). Also the size of ``tools/list`` and the largest default answer of every
tool. Writes bench/results/agent.json.

    python bench/agent.py [--containers 500] [--days 30] [--detect-hours 48] [--rate 15000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from nettel.broker import EmbeddedBroker, ensure_topics, free_loopback_port
from nettel.cli import make_detect, make_stream
from nettel.config import Settings
from nettel.ingest.simulate import TrafficSimulator

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

NETTEL = str(Path(sys.executable).with_name("nettel"))
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
PARTITIONS = 12
BUDGET = 8_000
LAYOUT = 1  # bump when the pipeline's output changes (a cached store is rebuilt)
#: Events per second `nettel simulate` publishes at: paced, its publisher sends while
#: the simulator generates (unpaced, it buffers 200k events before the first send, and
#: on a loaded machine that first send timed out and publishing stalled).
PUBLISH_RATE = 4_000
#: Seconds between ``tools/list`` and the first question in the measured session: an
#: agent's model reads the tool list first (and clients start their servers before the
#: user asks). Meanwhile the server opens the store in the background; the first call
#: without that pause is measured on its own (``first_call_right_after_start_ms``).
THINK_S = 10.0
#: Where stores are cached between runs (outside the repository).
STORE_ROOT = "/work/agent-store"


def truth_frame(containers: int, start_ms: int, duration_ms: int, spikes: list[Any],
                interval_ms: int, tail_from_ms: int | None = None,
                tail: list[Any] | None = None) -> pl.DataFrame:  # fmt: skip
    """Every simulated event (same seed as `nettel simulate`), as columns; the events at
    or after ``tail_from_ms`` also appended to ``tail`` (as they were published)."""
    sim = TrafficSimulator(containers, seed=1, interval_ms=interval_ms)
    cols: dict[str, list[Any]] = {k: [] for k in ("ts", "container", "rx", "tx", "errors",
                                                   "drops", "time_wait")}  # fmt: skip
    for e in sim.events(start_ms, duration_ms, spikes):
        if tail is not None and tail_from_ms is not None and e.ts_ms >= tail_from_ms:
            tail.append(e)
        cols["ts"].append(e.ts_ms)
        cols["container"].append(e.identity)
        cols["rx"].append(e.rx_bytes)
        cols["tx"].append(e.tx_bytes)
        cols["errors"].append(e.rx_errors + e.tx_errors)
        cols["drops"].append(e.rx_drops + e.tx_drops)
        cols["time_wait"].append(None if e.tcp is None else e.tcp.time_wait)
    return pl.DataFrame(cols).with_columns(minute=pl.col("ts") - pl.col("ts") % MINUTE)


def store_key(containers: int, days: float, interval_s: int,
              detect_hours: float | None) -> dict[str, Any]:  # fmt: skip
    """What a cached store was built for (a rerun with the same reuses it)."""
    return {"containers": containers, "days": days, "interval_s": interval_s, "layout": LAYOUT,
            "detect_hours": detect_hours}  # fmt: skip


async def fill(data_dir: str, containers: int, days: float, interval_s: int,
               say: Callable[[str], None], *, rate: float = PUBLISH_RATE,
               detect_hours: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The store, through the shipped pipeline, as `nettel up` runs it (the embedded
    broker with its epoch; the stream worker and the detector built by make_stream and
    make_detect with the epoch and ``embedded=True``) consuming what `nettel simulate`
    published; the truth written beside it (truth.parquet). Returns the build's figures.

    ``detect_hours``: the detector sees only the last that many hours of the same events
    (regenerated with the simulator's seed, published by :func:`nettel.cli.publish_events`
    to a topic of their own, ``<stats topic>.recent``, that the detector reads); None: all.
    For stores whose full run the detector cannot finish in time (it learns a few hundred
    events a second on a loaded machine); the traffic tables hold every event either way.
    """
    from nettel.cli import publish_events
    from nettel.ingest.simulate import Spike

    took: dict[str, float] = {}
    broker = EmbeddedBroker(free_loopback_port(),
                            log_path=os.path.join(data_dir, "logs", "broker.log"),
                            epoch_path=os.path.join(data_dir, "broker-epoch"))  # fmt: skip
    await broker.start()
    bootstrap = broker.bootstrap_servers
    env_settings = {"NETTEL_DATA_DIR": data_dir, "NETTEL_PARTITIONS": str(PARTITIONS),
                    "NETTEL_SAMPLE_INTERVAL_S": str(interval_s),
                    "KAFKA_BOOTSTRAP_SERVERS": bootstrap}  # fmt: skip
    try:
        settings = Settings.from_env({**os.environ, **env_settings})
        await ensure_topics(bootstrap, {settings.topic_stats: PARTITIONS,
                                        settings.topic_alerts: PARTITIONS,
                                        settings.topic_dlq: 1})  # fmt: skip
        duration = round(days * DAY)
        now = time.time_ns() // 1_000_000
        start = (now - duration) // MINUTE * MINUTE
        duration = now - start
        truth_path = Path(data_dir) / "truth.jsonl"
        t0 = time.perf_counter()
        env = {**os.environ, **env_settings, "NETTEL_LOG_LEVEL": "warning"}
        proc = await asyncio.create_subprocess_exec(
            NETTEL, "simulate", "--containers", str(containers), "--hours", str(duration / HOUR),
            "--start-ms", str(start), "--spikes", str(max(10, int(days * 4))), "--truth",
            str(truth_path), "--rate", str(rate), env=env)  # fmt: skip
        assert await proc.wait() == 0, "nettel simulate failed"
        took["simulate_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        # what `nettel up` runs against its embedded broker (cli.up_roles), started once
        # everything is published (the broker's front shares this event loop with them)
        stream = make_stream(settings, bootstrap, epoch=broker.epoch, embedded=True)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(stream.run(stop))]
        spikes_doc = [json.loads(x) for x in truth_path.read_text().splitlines()]
        spikes = [Spike(**s) for s in spikes_doc]
        recent_from = None if detect_hours is None else now - round(detect_hours * HOUR)
        tail: list[Any] = []
        truth = await asyncio.to_thread(truth_frame, containers, start, duration, spikes,
                                        interval_s * 1000, recent_from, tail)  # fmt: skip
        truth.write_parquet(Path(data_dir) / "truth.parquet")
        say(f"published {truth.height} events in {took['simulate_s']} s")
        detect_settings, detect_events = settings, truth.height
        if recent_from is not None:
            recent = f"{settings.topic_stats}.recent"
            await ensure_topics(bootstrap, {recent: PARTITIONS})
            detect_settings = Settings.from_env({**os.environ, **env_settings,
                                                 "NETTEL_TOPIC_STATS": recent})  # fmt: skip
            detect_events = await publish_events(bootstrap, recent, tail, rate,
                                                 wire_format=settings.wire_format)  # fmt: skip
            took["detect_events"] = detect_events
            say(f"published the last {detect_hours} h again for the detector: {detect_events}")
        detect = make_detect(detect_settings, bootstrap, epoch=broker.epoch)
        tasks.append(asyncio.create_task(detect.run(stop)))
        while not (stream.stats.consumed >= truth.height
                   and detect.stats.consumed >= detect_events):  # fmt: skip
            await asyncio.sleep(5)
            if any(t.done() for t in tasks):
                raise RuntimeError("a worker stopped")
            say(
                f"stream {stream.stats.consumed} of {truth.height}, detect "
                f"{detect.stats.consumed} of {detect_events} ({time.perf_counter() - t0:.0f} s)"
            )
        await asyncio.sleep(settings.flush_interval_s + 2)  # the last closed minutes land
        stop.set()  # the stream worker seals its open windows (the broker's log goes)
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        took["pipeline_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        await asyncio.to_thread(settle, data_dir, env)
        took["maintain_and_roll_s"] = round(time.perf_counter() - t0, 1)
        return {"events": truth.height, "start_ms": start, "duration_ms": duration,
                "built_at_ms": now, "build": took, "spikes": spikes_doc}  # fmt: skip
    finally:
        await broker.stop()


def settle(data_dir: str, env: dict[str, str]) -> None:
    """The store as a running `nettel up` keeps it, which the fill's few minutes do not
    reach: a maintenance pass (`nettel store maintain`, what `nettel up` runs hourly),
    then a roll of every partition into ``hour`` and ``day`` (what the stream worker does
    every ``NETTEL_ROLLUP_INTERVAL_S``): the rollups then lag the minute table by one
    roll, not by the whole fill's last commits and the maintenance pass."""
    import subprocess

    from nettel.store.minute import MinuteTable
    from nettel.store.rollup import DAY_MS, HOUR_MS, RollupTable

    subprocess.run([NETTEL, "store", "maintain"], env=env, check=True)
    minute = MinuteTable(f"{data_dir}/minute")
    hour = RollupTable(f"{data_dir}/hour", minute, HOUR_MS)
    for table in (hour, RollupTable(f"{data_dir}/day", hour, DAY_MS)):
        for p in range(PARTITIONS):
            table.roll(p, writer="nettel-stream", topic=env.get("NETTEL_TOPIC_STATS",
                                                                "nettel.stats"))  # fmt: skip


class Asker:
    """Calls tools through the client, noting characters and latency of each."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = await self.client.call_tool(tool, args)
        ms = (time.perf_counter() - t0) * 1000
        text = " ".join(getattr(c, "text", "") for c in result.content)
        self.calls.append({"tool": tool, "args": args, "chars": len(text), "ms": round(ms, 1),
                           "error": bool(result.is_error)})  # fmt: skip
        if result.is_error:
            return {"error": text}
        assert result.structured_content is not None
        return dict(result.structured_content)


def window(truth: pl.DataFrame, length_ms: int, now_ms: int) -> pl.DataFrame:
    """Events of the last ``length_ms`` up to now (as the tools cut: whole minutes)."""
    end = now_ms - now_ms % MINUTE
    return truth.filter(pl.col("minute") >= end - length_ms)


def per_container(frame: pl.DataFrame, col: pl.Expr) -> dict[str, int]:
    rows = frame.group_by("container").agg(col.sum().alias("v"))
    return dict(zip(rows["container"].to_list(), rows["v"].to_list(), strict=True))


async def questions(ask: Asker, truth: pl.DataFrame, spikes: list[dict[str, Any]],
                    interval_s: int) -> list[dict[str, Any]]:  # fmt: skip
    """The ten questions: (question, check) in order; each check returns (ok, detail)."""
    out: list[dict[str, Any]] = []
    bytes_ = pl.col("rx") + pl.col("tx")

    async def q(text: str, body: Callable[[], Any]) -> None:
        before = len(ask.calls)
        now = time.time_ns() // 1_000_000
        ok, detail = await body()
        if time.time_ns() // 1_000_000 // MINUTE != now // MINUTE:  # straddled a minute: again
            del ask.calls[before:]
            ok, detail = await body()
        calls = ask.calls[before:]
        out.append({"question": text, "correct": bool(ok), "detail": detail, "calls": len(calls),
                    "chars": [c["chars"] for c in calls], "ms": [c["ms"] for c in calls],
                    "tools": [c["tool"] for c in calls]})  # fmt: skip

    busiest = max(per_container(truth, bytes_).items(), key=lambda kv: kv[1])[0]

    async def q1() -> tuple[bool, str]:
        now = time.time_ns() // 1_000_000
        got = await ask("get_top_consumers", {"timeframe": "week", "metric": "bytes", "limit": 3})
        want = per_container(window(truth, 7 * DAY, now), bytes_)
        top = max(want.items(), key=lambda kv: (kv[1], kv[0]))
        return got["top"][0]["container"] == top[0] and got["top"][0]["value"] == top[1], top[0]

    async def q2() -> tuple[bool, str]:
        now = time.time_ns() // 1_000_000
        got = await ask("get_network_stats", {"container": busiest, "timeframe": "day"})
        day = window(truth, DAY, now).filter(pl.col("container") == busiest)
        want = (int(day["tx"].sum()), int(day["rx"].sum()))
        have = (got["data"]["bytes_sent"], got["data"]["bytes_received"])
        return have == want, f"{have} vs truth {want}"

    day_spikes = [s for s in spikes if s["start_ms"] >= time.time_ns() // 1_000_000 - DAY]
    biggest: dict[str, Any] = {}

    async def q3() -> tuple[bool, str]:
        got = await ask("get_anomalies", {"since": "24h", "limit": 50})
        alerts = list(got.get("alerts", []))
        if got.get("next"):  # the second page, as the hint says
            more = await ask("get_anomalies", {"since": "24h", "limit": 50, "cursor": got["next"]})
            alerts += more.get("alerts", [])
        alerted = {a["container"] for a in alerts}
        want = {s["identity"] for s in day_spikes}
        if alerts:
            biggest.update(max(alerts, key=lambda a: a["score"]))
        missed = sorted(want - alerted)
        return not missed, f"spiked {len(want)}, missed {missed}; alerted {len(alerted)} containers"

    async def q4() -> tuple[bool, str]:
        if not biggest:
            got = await ask("get_anomalies", {"since": "24h", "limit": 20})
            if not got.get("alerts"):
                return not day_spikes, "no alert in the last 24 h"
            biggest.update(max(got["alerts"], key=lambda a: a["score"]))
        got = await ask("explain_anomaly", {"alert_id": biggest["id"]})
        spiked = {s["identity"] for s in spikes}
        ok = (got["alert"]["explanation"] and biggest["container"] in spiked
              and (got.get("traffic") or {}).get("summary", {}).get("max", 0)
              >= got["alert"]["peak"] * 0.99)  # fmt: skip
        return bool(ok), got["alert"]["explanation"][:160]

    async def q5() -> tuple[bool, str]:
        now = time.time_ns() // 1_000_000
        got = await ask("get_baseline", {"container": busiest, "metric": "tx_bytes"})
        band = got["hours"][0]
        hour = now // HOUR % 24
        past = truth.filter((pl.col("container") == busiest)
                            & (pl.col("ts") // HOUR % 24 == hour))  # fmt: skip
        rate = float(past["tx"].sum()) / (past.height * interval_s) if past.height else 0.0
        ok = band["hour_of_week"] == (now // HOUR + 72) % 168 and 0.33 <= band["expected"] / max(
            rate, 1e-9) <= 3  # fmt: skip
        return ok, f"expected {band['expected']}/s, mean at this hour {rate:.4g}/s"

    async def q6() -> tuple[bool, str]:
        now = time.time_ns() // 1_000_000
        got = await ask("get_traffic_timeseries", {"container": busiest, "timeframe": "day"})
        mine = window(truth, DAY, now).filter(pl.col("container") == busiest)
        as_of = int(dt.datetime.fromisoformat(got["as_of"].replace("Z", "+00:00")).timestamp())
        closed = mine.filter(pl.col("minute") < as_of * 1000)  # what the answer says it holds
        total = sum(p["value"] or 0 for p in got["points"])
        return total == int(closed.select(bytes_.sum()).item()), f"{len(got['points'])} points"

    async def q7() -> tuple[bool, str]:
        now = time.time_ns() // 1_000_000
        got = await ask("what_changed", {"since": "yesterday"})
        end = now - now % MINUTE
        minute = pl.col("minute")
        after = per_container(truth.filter(minute.is_between(end - DAY, end - 1)), bytes_)
        prior = per_container(truth.filter(minute.is_between(end - 2 * DAY, end - DAY - 1)), bytes_)
        deltas = {c: after.get(c, 0) - prior.get(c, 0) for c in after.keys() | prior.keys()}
        top = max(deltas, key=lambda c: (abs(deltas[c]), c)) if deltas else None
        ok = (got["bytes_now"] == sum(after.values()) and got["bytes_before"] == sum(prior.values())
              and got["containers"][0]["delta"] == deltas.get(top or "", 0))  # fmt: skip
        return ok, f"now {got['bytes_now']} before {got['bytes_before']}"

    async def q8() -> tuple[bool, str]:
        daily = float(truth.filter(pl.col("container") == busiest).select(bytes_.sum()).item()) / (
            (truth["ts"].max() - truth["ts"].min()) / DAY)  # fmt: skip
        limit_gb = round(daily * 1.5 / 1e9, 3)
        got = await ask("forecast_traffic", {"container": busiest, "horizon": 7})
        if "error" in got:
            return False, got["error"]
        exceeds = any(d["expected"] > limit_gb * 1e9 for d in got["days"])
        return not exceeds, f"limit {limit_gb} GB/day (1.5x its mean); exceeds: {exceeds}"

    async def q9() -> tuple[bool, str]:
        now = time.time_ns() // 1_000_000
        day = window(truth, DAY, now)
        ok, detail = True, []
        for metric, col in (("errors", "errors"), ("drops", "drops")):
            got = await ask("get_top_consumers", {"timeframe": "day", "metric": metric, "limit": 5})
            want = per_container(day, pl.col(col))
            order = sorted((c for c in want if want[c]), key=lambda c: (-want[c], c))[:5]
            ok = ok and [t["container"] for t in got["top"] if t["value"]] == order
            detail.append(f"{metric}: {order[:3]}")
        return ok, "; ".join(detail)

    async def q10() -> tuple[bool, str]:
        now = time.time_ns() // 1_000_000
        got = await ask("get_top_consumers", {"timeframe": "day", "metric": "tcp_syn_recv",
                                              "aggregation": "max", "limit": 5})  # fmt: skip
        flood = [t for t in got.get("top", []) if (t["value"] or 0) > 100]
        tw = window(truth, DAY, now).group_by("container").agg(pl.col("time_wait").max())
        odd = tw.filter(pl.col("time_wait") > 100).height
        return not flood and odd == 0, f"syn_recv over 100: {len(flood)}; truth: none simulated"

    for text, body in (
        ("who used the most bandwidth this week", q1),
        (f"how much did {busiest} send and receive today", q2),
        ("any anomalies in the last 24 h", q3),
        ("why was the biggest one raised", q4),
        (f"what is normal for {busiest} at this hour", q5),
        (f"show {busiest}'s traffic today", q6),
        ("what changed since yesterday", q7),
        (f"will {busiest} exceed 1.5x its mean GB/day next week", q8),
        ("which containers have errors or drops", q9),
        ("is any container under a SYN flood or odd connection states", q10),
    ):
        try:
            await q(text, body)
        except Exception as e:  # a wrong shape is a wrong answer, reported as such
            out.append({"question": text, "correct": False, "detail": f"{type(e).__name__}: {e}",
                        "calls": 0, "chars": [], "ms": [], "tools": []})  # fmt: skip
    return out


async def largest_defaults(ask: Asker, container: str) -> dict[str, int]:
    """Every tool with its default arguments (required ones filled in): characters."""
    tools = (await ask.client.list_tools()).tools
    alerts = await ask("get_anomalies", {"since": "30d"})
    required = {"container": container, "verdict": "confirmed",
                "alert_id": (alerts.get("alerts") or [{"id": "0" * 20}])[0]["id"]}  # fmt: skip
    sizes: dict[str, int] = {}
    for t in tools:
        if t.name == "mark_alert":
            continue  # the one write: not part of a read-only walk
        await ask(t.name, {k: required[k] for k in t.input_schema.get("required", [])})
        sizes[t.name] = ask.calls[-1]["chars"]
    return sizes


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[max(0, -(-95 * len(s) // 100) - 1)] if s else 0.0


async def first_call_after_start(env: dict[str, str]) -> float:
    """Milliseconds of the first question (q1's call) asked right after ``tools/list``
    of a server just started: while it still opens the store and imports the forecast
    layer in the background."""
    async with Client(StdioServerParameters(command=NETTEL, args=["mcp"], env=env),
                      read_timeout_seconds=120) as client:  # fmt: skip
        await client.list_tools()
        t0 = time.perf_counter()
        await client.call_tool("get_top_consumers", {"timeframe": "week", "limit": 3})
        return round((time.perf_counter() - t0) * 1000, 1)


def server_env(data_dir: str, pycache: str | None) -> dict[str, str]:
    """The environment `nettel mcp` runs in. ``pycache``: with a bytecode cache there (as
    an installed nettel has one: pip compiles at install, the Dockerfile sets
    ``UV_COMPILE_BYTECODE``), even where ``PYTHONDONTWRITEBYTECODE`` is set and the venv
    holds no ``.pyc``, as on the test machines; None: every module compiled from source
    at each start, as there."""
    env = {**os.environ, "NETTEL_DATA_DIR": data_dir, "NETTEL_PARTITIONS": str(PARTITIONS),
           "NETTEL_LOG_LEVEL": "warning"}  # fmt: skip
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


async def initialize_times(env: dict[str, str], runs: int) -> dict[str, Any]:
    """Wall time from spawning `nettel mcp` to its answer to ``initialize`` (``runs``
    times, after one unmeasured start that fills a bytecode cache if ``env`` has one),
    and what the server has imported by then (``python -X importtime`` of the modules
    `nettel mcp` loads before serving: the costliest, and whether the store layer is
    among them)."""
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        async with Client(StdioServerParameters(command=NETTEL, args=["mcp"], env=env),
                          read_timeout_seconds=120):  # fmt: skip
            if i:
                times.append(time.perf_counter() - t0)
    probe = (
        "import sys, nettel.cli, nettel.mcp.server; print(sorted(m for m in ('polars', "
        "'deltalake', 'river', 'numpy', 'nettel.store.query') if m in sys.modules))"
    )
    out = await asyncio.create_subprocess_exec(sys.executable, "-X", "importtime", "-c", probe,
                                               env=env, stdout=asyncio.subprocess.PIPE,
                                               stderr=asyncio.subprocess.PIPE)  # fmt: skip
    stdout, stderr = await out.communicate()
    top = []
    for line in stderr.decode().splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("   "):
            top.append((int(parts[1]), parts[2].strip()))
    loaded = json.loads(stdout.decode().strip().replace("'", '"') or "[]")
    return {"median_s": round(sorted(times)[len(times) // 2], 2),
            "runs_s": [round(t, 2) for t in times], "store_modules_loaded": loaded,
            "top_imports_ms": {n: round(us / 1000) for us, n in sorted(top)[-6:]}}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=500)
    parser.add_argument("--days", type=float, default=30)
    parser.add_argument("--interval-s", type=int, default=300, help="seconds between samples")
    parser.add_argument("--store-root", default=os.path.join(tempfile.gettempdir(),
                                                             "nettel-agent-store"),
                        help="where stores are cached (one folder per size; reused)")  # fmt: skip
    parser.add_argument("--build-only", action="store_true", help="build (or find) the store")
    parser.add_argument("--rate", type=float, default=PUBLISH_RATE, help="events/s published")
    parser.add_argument(
        "--detect-hours",
        type=float,
        default=None,
        help="the detector sees only the last that many hours (default: all)",
    )
    args = parser.parse_args()
    key = store_key(args.containers, args.days, args.interval_s, args.detect_hours)
    data_dir = os.path.join(args.store_root,
                            f"{args.containers}x{args.days:g}d-{args.interval_s}s")  # fmt: skip
    meta_path = Path(data_dir) / "store.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if {k: meta.get(k) for k in key} != key:
        if await asyncio.to_thread(lambda: os.path.isdir(data_dir) and bool(os.listdir(data_dir))):
            sys.exit(f"{data_dir} holds an unfinished or other store: remove it")
        await asyncio.to_thread(os.makedirs, data_dir, exist_ok=True)
        meta = {**key, **await fill(data_dir, args.containers, args.days, args.interval_s,
                                    lambda m: print(m, file=sys.stderr, flush=True),
                                    rate=args.rate, detect_hours=args.detect_hours)}  # fmt: skip
        meta_path.write_text(json.dumps(meta))
    if args.build_only:
        return
    truth = pl.read_parquet(Path(data_dir) / "truth.parquet")
    spikes = meta["spikes"]
    load_before = os.getloadavg()
    env = server_env(data_dir, os.path.join(args.store_root, "pycache"))
    initialize = await initialize_times(env, 5)
    initialize_no_pyc = await initialize_times(server_env(data_dir, None), 3)
    cold = [await first_call_after_start(env) for _ in range(3)]
    t0 = time.perf_counter()
    async with Client(StdioServerParameters(command=NETTEL, args=["mcp"], env=env),
                      read_timeout_seconds=120) as client:  # fmt: skip
        initialized_s = time.perf_counter() - t0
        listing = (await client.list_tools()).tools
        tools_list_chars = len(json.dumps(
            [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listing],
            separators=(",", ":")))  # fmt: skip
        await asyncio.sleep(THINK_S)
        ask = Asker(client)
        answers = await questions(ask, truth, spikes, args.interval_s)
        asked = list(ask.calls)
        busiest = answers[1]["question"].split()[3]  # "how much did X send ..."
        defaults = await largest_defaults(ask, busiest)
    ms = [c["ms"] for c in asked]
    write_result(
        "agent",
        {
            "containers": args.containers,
            "days": args.days,
            "events": meta["events"],
            "spikes": len(spikes),
            "build": meta["build"],
            "store_built_at": dt.datetime.fromtimestamp(
                meta["built_at_ms"] / 1000, dt.UTC
            ).strftime("%Y-%m-%dT%H:%MZ"),
            "sample_interval_s": args.interval_s,
            "initialize_s": round(initialized_s, 2),
            "initialize": initialize,
            "initialize_without_bytecode_cache": initialize_no_pyc,
            "think_s": THINK_S,
            "first_call_right_after_start_ms": cold,
            "load_average": {
                "before": [round(x, 1) for x in load_before],
                "after": [round(x, 1) for x in os.getloadavg()],
            },
            "tools_list_chars": tools_list_chars,
            "correct": sum(a["correct"] for a in answers),
            "questions": answers,
            "max_calls": max(a["calls"] for a in answers),
            "largest_answer_chars": max((c["chars"] for c in asked), default=0),
            "tool_latency_ms": {
                "median": sorted(ms)[len(ms) // 2] if ms else 0,
                "p95": p95(ms),
                "max": max(ms, default=0),
            },
            "default_answer_chars": defaults,
            "default_answer_errors": [c["tool"] for c in ask.calls[len(asked) :] if c["error"]],
            "budget_chars": BUDGET,
        },
        " ".join(["python", "bench/agent.py", *sys.argv[1:]]),
    )


if __name__ == "__main__":
    asyncio.run(main())
