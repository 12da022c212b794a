"""A soak: ``nettel up`` as a user runs it, for a given wall time, watched every minute.

Starts ``nettel up`` (the embedded broker, the real container engine when one answers,
else procfs) with short maintenance, rollup and checkpoint intervals so every periodic
job runs many times, and ``nettel simulate`` publishing a fleet of simulated containers
in real time to it (it finds the embedded broker by itself). Every ``--every-s`` it
records:

- per table under the data dir: bytes, data files and Delta log files
  (:func:`nettel.metrics.table_sizes`, what ``/metrics`` exports);
- from ``/metrics``: events published and consumed, lag per consumer group, dead-lettered
  and late events, open alerts, the age of each periodic job;
- MCP latency: ``list_containers`` and ``get_network_stats`` (day) over HTTP.

Every ``--rss-every-s`` (5 s), in a thread of its own, the RSS (``/proc/PID/statm``) of
every process: ``nettel up``, simulate and every child of ``nettel up`` (the Tansu broker;
a maintenance pass, ``nettel store maintain``, which lives for one pass). Each pass also
logs its own peak RSS and duration (``store_maintenance_done``): the soak reports them.

At the end it stops nettel with SIGTERM and writes bench/results/soak.json (``--name``)
with every sample, each series' growth per hour after the warm-up (least squares),
whether each long-lived process's RSS stayed within +-15 % of its post-warm-up median
(over every 5-s sample), the state tables' growth once their vacuum window has passed
(10 min + one maintenance interval: the plateau), and a 30-day disk projection for 100
containers: per data table, the growth of its live files (those of its current
snapshot) per container-hour, times 100 containers, 24 h and the days the table keeps
(at most 30), plus what awaited vacuum at the end; the state tables as they ended,
scaled to 100 containers. A short run mostly measures warm-up: the long soak (an hour
and more) is the one to quote. ``--reanalyse FILE`` recomputes the figures of a
result's samples with this version of the analysis.

    python bench/soak.py [--minutes 30] [--containers 200] [--interval-s 5]
                         [--maintenance-s 120] [--checkpoint-s 10] [--every-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
from deltalake import DeltaTable
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client.parser import text_string_to_metric_families

from nettel.broker import free_loopback_port, process_rss_bytes
from nettel.config import Settings
from nettel.metrics import table_sizes

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

NETTEL = str(Path(sys.executable).with_name("nettel"))
#: tables of data that grows with the time retained; every other table holds state
DATA_TABLES = ("samples", "minute", "hour", "day", "alerts",
               "resource_minute", "resource_hour", "resource_day")  # fmt: skip
RSS_BAND = 0.15
#: the name of a maintenance pass's process in the RSS samples
MAINTENANCE = "maintenance"
#: state tables keep removed files this long (their vacuum window), in seconds: the
#: ``delta.deletedFileRetentionDuration`` of STATE_TABLE_CONFIGURATION
STATE_VACUUM_S = 600


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def rss_of(processes: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in processes.items():
        try:
            out[name] = process_rss_bytes(pid)
        except (OSError, ValueError):
            continue
    return out


def role(pid: int) -> str:
    """What a child of ``nettel up`` is: ``tansu``, ``maintenance`` or its command name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    if b"store" in argv and b"maintain" in argv:
        return MAINTENANCE
    name = comm(pid)
    return "tansu" if name.startswith("tansu") else f"{name}_{pid}"


def process_tree(up_pid: int, sim_pid: int) -> dict[str, int]:
    """The processes to watch, by name."""
    procs = {"nettel_up": up_pid, "simulate": sim_pid}
    for child in children(up_pid):
        procs[role(child)] = child
    return procs


class RssSampler(threading.Thread):
    """The RSS of every watched process every ``every_s`` (a thread: the per-minute table
    scans and MCP calls never delay it)."""

    def __init__(self, up_pid: int, sim_pid: int, every_s: float, started: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.up_pid, self.sim_pid, self.every_s, self.started = up_pid, sim_pid, every_s, started
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            t = round(time.monotonic() - self.started, 1)
            procs = process_tree(self.up_pid, self.sim_pid)
            sample = {"t_s": t, "rss": rss_of(procs)}
            if MAINTENANCE in procs:  # its own memory: without the library pages it shares
                with contextlib.suppress(OSError, ValueError, StopIteration):
                    sample["maintenance_anon"] = anon_bytes(procs[MAINTENANCE])
            self.samples.append(sample)


def anon_bytes(pid: int) -> int:
    """Anonymous resident memory of ``pid`` (RssAnon): what it does not share with the
    page cache (the Polars and deltalake libraries are mapped by ``nettel up`` too)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        line = next(ln for ln in f if ln.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def live_bytes(uri: str) -> int | None:
    """Bytes of the files in the table's current snapshot (the rest awaits vacuum)."""
    try:
        actions = DeltaTable(uri).get_add_actions(flatten=True)
        return int(sum(actions.column("size_bytes").to_pylist()))
    except Exception:  # created or vacuumed meanwhile: next sample
        return None


def disk_bytes(path: str) -> int:
    """Bytes of every file under ``path``."""
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def scrape(port: int) -> dict[str, Any]:
    """The figures of ``/metrics`` the soak follows."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[str, Any] = {"lag": {}, "job_age_s": {}, "consumed": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "nettel_partition_lag":
                group = s.labels["group"]
                out["lag"][group] = out["lag"].get(group, 0) + int(s.value)
            elif s.name == "nettel_last_run_age_seconds":
                out["job_age_s"][s.labels["job"]] = round(s.value, 1)
            elif s.name == "nettel_events_consumed_total":
                out["consumed"][s.labels["group"]] = int(s.value)
            elif s.name in ("nettel_events_published_total", "nettel_dead_lettered_total",
                            "nettel_late_events_total", "nettel_alerts_open",
                            "nettel_broker_rss_bytes"):  # fmt: skip
                out[s.name.removeprefix("nettel_")] = int(s.value)
    return out


async def mcp_latency(port: int) -> dict[str, float]:
    """Seconds each of two MCP tools takes over HTTP (a fresh session, as an agent's)."""
    out = {}
    async with httpx.AsyncClient(timeout=120) as http:
        transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)
        async with Client(transport, read_timeout_seconds=120) as client:
            for tool, args in (("list_containers", {}),
                               ("get_network_stats", {"timeframe": "day"})):  # fmt: skip
                t0 = time.perf_counter()
                result = await client.call_tool(tool, args)
                out[tool] = round(time.perf_counter() - t0, 3)
                if result.is_error:
                    out[f"{tool}_error"] = 1
    return out


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(t for t, _ in points)
    my = statistics.fmean(v for _, v in points)
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600


def series(samples: list[dict[str, Any]], key: str, name: str, field: str | None = None
           ) -> list[tuple[float, float]]:  # fmt: skip
    out = []
    for s in samples:
        v = s.get(key, {}).get(name)
        if v is not None and field is not None:
            v = v.get(field)
        if v is not None:
            out.append((s["t_s"], float(v)))
    return out


def rss_bands(rss_samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Per long-lived process: median after warm-up, largest deviation from it, growth."""
    after = [s for s in rss_samples if s["t_s"] >= warmup_s]
    out: dict[str, Any] = {}
    for p in sorted({p for s in rss_samples for p in s["rss"]} - {MAINTENANCE}):
        points = series(after, "rss", p)
        if not points:
            continue
        values = [v for _, v in points]
        median = statistics.median(values)
        devs = sorted(abs(v - median) / median for v in values) if median else [0.0]
        out[p] = {"samples": len(values), "median_mb": round(median / 2**20, 1),
                  "min_mb": round(min(values) / 2**20, 1),
                  "max_mb": round(max(values) / 2**20, 1),
                  "max_dev_pct": round(100 * devs[-1], 1),
                  "p99_dev_pct": round(100 * devs[int(0.99 * (len(devs) - 1))], 1),
                  "within_15pct": devs[-1] <= RSS_BAND,
                  "growth_mb_per_h": round((slope_per_hour(points) or 0) / 2**20, 2)}  # fmt: skip
    return out


def maintenance_passes(log_lines: list[str], rss_samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The maintenance passes: each child's own peak RSS and duration (its log line), and
    the largest RSS the sampler saw of one."""
    done, codes = [], []
    for line in log_lines:
        if '"store_maintenance_' not in line:
            continue
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "store_maintenance_done":
                done.append(record)
            elif record.get("event") == "store_maintenance_pass":
                codes.append(record["exit_code"])
    seen = [s["rss"][MAINTENANCE] for s in rss_samples if MAINTENANCE in s["rss"]]
    anon = [s["maintenance_anon"] for s in rss_samples if "maintenance_anon" in s]
    peaks = [r["peak_rss_bytes"] / 2**20 for r in done]
    seconds = [r["seconds"] for r in done]
    return {
        "passes": len(codes), "exit_codes": sorted(set(codes)),
        "peak_rss_mb": {"median": round(statistics.median(peaks), 1) if peaks else None,
                        "max": round(max(peaks), 1) if peaks else None},
        "seconds": {"median": round(statistics.median(seconds), 2) if seconds else None,
                    "max": max(seconds) if seconds else None},
        "rss_samples_of_a_pass": len(seen),
        "max_rss_sampled_mb": round(max(seen) / 2**20, 1) if seen else None,
        "max_anon_sampled_mb": round(max(anon) / 2**20, 1) if anon else None,
    }  # fmt: skip


def analyse(samples: list[dict[str, Any]], warmup_s: float, containers: int,
            settings: Settings, rss_samples: list[dict[str, Any]] | None = None,
            log_lines: list[str] | None = None,
            state_vacuum_s: float = STATE_VACUUM_S) -> dict[str, Any]:  # fmt: skip
    """Growth per hour after warm-up, RSS bands, the state tables' plateau, and the 30-day
    projection. Without ``rss_samples`` (a result of an older soak), the per-minute RSS."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    tables = sorted({t for s in samples for t in s["tables"]})
    growth: dict[str, Any] = {}
    for t in tables:
        growth[t] = {f: slope_per_hour(series(after, "tables", t, f))
                     for f in ("bytes", "live_bytes", "files", "log_files")}  # fmt: skip
        last = samples[-1]["tables"].get(t)
        growth[t]["end"] = last
    keep_days = {"samples": settings.retention_samples_days,
                 "minute": settings.retention_minute_days, "hour": settings.retention_hour_days,
                 "day": settings.retention_day_days, "alerts": 0,
                 "resource_minute": settings.retention_minute_days,
                 "resource_hour": settings.retention_hour_days,
                 "resource_day": settings.retention_day_days}  # fmt: skip
    projected: dict[str, float] = {}
    for t in tables:
        end = growth[t]["end"] or {}
        scale = 100 / containers
        if t in DATA_TABLES:
            # live data grows with the hours retained; files awaiting vacuum and the log
            # are bounded by the vacuum and log retentions: as they ended
            rate = max(growth[t]["live_bytes"] or 0.0, 0.0) * scale  # per hour, 100 containers
            days = min(30, keep_days.get(t) or 30)
            overhead = end.get("bytes", 0) - (end.get("live_bytes") or 0)
            projected[t] = rate * 24 * days + overhead * scale
        else:  # state: holds what restart needs, scaled to 100 containers
            projected[t] = end.get("bytes", 0) * scale
    # the plateau: once removed files older than the vacuum window have gone (and one
    # more maintenance pass), a state table's bytes on disk stay flat
    plateau_s = state_vacuum_s + settings.maintenance_interval_s
    late = [s for s in samples if s["t_s"] >= plateau_s]
    long_enough = len(late) >= 10
    state: dict[str, Any] = {}
    for t in tables:
        if t in DATA_TABLES:
            continue
        state[t] = {
            "end_bytes": (growth[t]["end"] or {}).get("bytes"),
            "bytes_per_h": growth[t]["bytes"],
            "log_files_per_h": growth[t]["log_files"],
        }
        if long_enough:
            sizes = [v for _, v in series(late, "tables", t, "bytes")]
            slope = slope_per_hour(series(late, "tables", t, "bytes")) or 0.0
            mean = statistics.fmean(sizes) if sizes else 0.0
            state[t] |= {"plateau_bytes_mean": round(mean), "plateau_bytes_per_h": round(slope),
                         "plateau_min_max": [min(sizes), max(sizes)] if sizes else None,
                         "flat": bool(mean) and abs(slope) <= 0.10 * mean}  # fmt: skip
            # what the table holds beyond its current snapshot (files awaiting vacuum):
            # flat once the vacuum keeps up, even while the live state itself still grows
            live = series(late, "tables", t, "live_bytes")
            if live:
                by_t = dict(series(late, "tables", t, "bytes"))
                extra = [(ts, by_t[ts] - v) for ts, v in live if ts in by_t]
                extra_mean = statistics.fmean(v for _, v in extra) if extra else 0.0
                extra_slope = slope_per_hour(extra) or 0.0
                state[t] |= {
                    "plateau_live_bytes_per_h": round(slope_per_hour(live) or 0.0),
                    "plateau_live_min_max": [min(v for _, v in live), max(v for _, v in live)],
                    "plateau_awaiting_vacuum_mean": round(extra_mean),
                    "plateau_awaiting_vacuum_per_h": round(extra_slope),
                    "awaiting_vacuum_flat": bool(extra_mean)
                    and abs(extra_slope) <= 0.10 * extra_mean,
                }
                # the same in copies of the live snapshot: what the vacuum window holds
                # (window / checkpoint interval), flat even while each copy grows
                live_at = dict(live)
                copies = [(ts, v / live_at[ts]) for ts, v in extra if live_at[ts] > 0]
                if copies:
                    copies_mean = statistics.fmean(v for _, v in copies)
                    copies_slope = slope_per_hour(copies) or 0.0
                    state[t] |= {
                        "plateau_copies_awaiting_vacuum_mean": round(copies_mean, 1),
                        "plateau_copies_awaiting_vacuum_per_h": round(copies_slope, 1),
                        "copies_flat": abs(copies_slope) <= 0.10 * copies_mean,
                    }
    disk: dict[str, Any] = {"after_warmup_bytes_per_h": slope_per_hour(
        [(s["t_s"], float(s["disk_bytes"])) for s in after if "disk_bytes" in s])}  # fmt: skip
    if long_enough:
        live = [(s["t_s"], float(sum((s["tables"].get(t) or {}).get("live_bytes") or 0
                                     for t in DATA_TABLES))) for s in late]  # fmt: skip
        disk |= {
            "after_plateau_bytes_per_h": slope_per_hour(
                [(s["t_s"], float(s["disk_bytes"])) for s in late if "disk_bytes" in s]),
            "data_live_after_plateau_bytes_per_h": slope_per_hour(live),
            "state_after_plateau_bytes_per_h": sum(
                state[t].get("plateau_bytes_per_h", 0) for t in state),
        }  # fmt: skip
    other = [(s["t_s"], float(s["other_files_bytes"])) for s in after if "other_files_bytes" in s]
    rss = samples if rss_samples is None else rss_samples
    return {
        "warmup_s": warmup_s,
        "plateau_after_s": plateau_s,
        "other_files_bytes_per_h": slope_per_hour(other),
        "disk_bytes_per_h": disk["after_warmup_bytes_per_h"],
        "disk": disk,
        "disk_bytes_end": samples[-1].get("disk_bytes"),
        "growth_per_hour": growth,
        "rss_sampling": {
            "every_s": round(rss[1]["t_s"] - rss[0]["t_s"], 1) if len(rss) > 1 else None,
            "source": "/proc/PID/statm",
            "processes": sorted({p for s in rss for p in s["rss"]}),
        },
        "rss": rss_bands(rss, warmup_s),
        "maintenance_passes": maintenance_passes(log_lines or [], rss_samples or []),
        "state_tables": state,
        "projection_30d_100_containers_mb": {t: round(b / 2**20, 1) for t, b in projected.items()},
        "projection_30d_100_containers_total_mb": round(sum(projected.values()) / 2**20, 1),
    }


def soak(args: argparse.Namespace, data_dir: str) -> dict[str, Any]:
    broker_port, mcp_port = free_loopback_port(), free_loopback_port()
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(NETTEL_DATA_DIR=data_dir, NETTEL_BROKER_PORT=str(broker_port),
               NETTEL_MCP_PORT=str(mcp_port), NETTEL_LOG_FORMAT="json",
               NETTEL_MAINTENANCE_INTERVAL_S=str(args.maintenance_s),
               NETTEL_DETECT_CHECKPOINT_S=str(args.checkpoint_s),
               NETTEL_ROLLUP_INTERVAL_S=str(args.rollup_s),
               NETTEL_SAMPLE_INTERVAL_S=str(args.interval_s))  # fmt: skip
    log_path = Path(data_dir).parent / "soak-up.log"
    with log_path.open("w") as log_file:
        up = subprocess.Popen([NETTEL, "up"], env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    deadline = time.monotonic() + 120
    while '"mcp_http_listening"' not in log_path.read_text():
        if up.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nettel up did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    hours = args.minutes / 60 + 0.05
    sim = subprocess.Popen(
        [NETTEL, "simulate", "--containers", str(args.containers), "--hours", str(hours),
         "--start-ms", str(time.time_ns() // 1_000_000), "--spikes", str(args.spikes),
         "--rate", str(args.containers / args.interval_s)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started = time.monotonic()
    sampler = RssSampler(up.pid, sim.pid, args.rss_every_s, started)
    sampler.start()
    samples: list[dict[str, Any]] = []
    try:
        while True:
            t = time.monotonic() - started
            sample: dict[str, Any] = {"t_s": round(t, 1),
                                      "rss": rss_of(process_tree(up.pid, sim.pid))}  # fmt: skip
            sample["tables"] = {
                n: {"bytes": s.bytes, "files": s.files, "log_files": s.log_files,
                    "live_bytes": live_bytes(os.path.join(data_dir, n))}
                for n, s in table_sizes(data_dir).items()
            }  # fmt: skip
            in_tables = sum(t["bytes"] for t in sample["tables"].values())
            sample["disk_bytes"] = disk_bytes(data_dir)
            sample["other_files_bytes"] = sample["disk_bytes"] - in_tables  # logs, reports/
            try:
                sample["metrics"] = scrape(mcp_port)
                sample["mcp_s"] = asyncio.run(mcp_latency(mcp_port))
            except Exception as e:  # recorded, the soak goes on
                sample["error"] = repr(e)
            samples.append(sample)
            print(json.dumps(sample), flush=True)
            if up.poll() is not None:
                raise SystemExit(f"nettel up died: {log_path.read_text()[-3000:]}")
            if t >= args.minutes * 60:
                break
            time.sleep(max(0.0, args.every_s - (time.monotonic() - started - t)))
    finally:
        sampler.done.set()
        sim.terminate()
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            up.kill()
    lines = log_path.read_text().splitlines()
    errors = [line for line in lines if '"level": "error"' in line]
    settings = Settings.from_env(env)
    warmup = min(600.0, args.minutes * 60 / 3)
    return {
        "minutes": args.minutes,
        "containers_simulated": args.containers,
        "sample_interval_s": args.interval_s,
        "maintenance_interval_s": args.maintenance_s,
        "detect_checkpoint_s": args.checkpoint_s,
        "rollup_interval_s": args.rollup_s,
        "state_vacuum_s": STATE_VACUUM_S,
        "up_exit_code": up.returncode,
        "error_log_lines": len(errors),
        "first_errors": errors[:5],
        **analyse(samples, warmup, args.containers, settings, sampler.samples, lines),
        "samples": samples,
        "rss_samples": sampler.samples,
        "maintenance_log": [line for line in lines if '"store_maintenance_' in line],
    }


#: what a soak's result keeps of its run (the rest is the analysis, recomputed)
RUN_KEYS = ("minutes", "containers_simulated", "sample_interval_s", "maintenance_interval_s",
            "detect_checkpoint_s", "rollup_interval_s", "state_vacuum_s", "up_exit_code",
            "error_log_lines", "first_errors", "samples", "rss_samples",
            "maintenance_log")  # fmt: skip


def reanalyse(path: str) -> None:
    """Recompute the figures of the soak result at ``path`` from its samples (in place)."""
    doc = json.loads(Path(path).read_text())
    run = {k: v for k, v in doc["figures"].items() if k in RUN_KEYS}
    settings = Settings.from_env(
        {"NETTEL_MAINTENANCE_INTERVAL_S": str(run["maintenance_interval_s"])}
    )
    warmup = min(600.0, run["minutes"] * 60 / 3)
    figures = analyse(run["samples"], warmup, run["containers_simulated"], settings,
                      run.get("rss_samples"), run.get("maintenance_log"),
                      run.get("state_vacuum_s", STATE_VACUUM_S))  # fmt: skip
    kept = ("samples", "rss_samples", "maintenance_log")
    doc["figures"] = {k: v for k, v in run.items() if k not in kept}
    doc["figures"] |= figures | {k: run[k] for k in kept if k in run}
    doc["reanalysed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--containers", type=int, default=200)
    parser.add_argument("--interval-s", dest="interval_s", type=float, default=5.0)
    parser.add_argument("--maintenance-s", dest="maintenance_s", type=float, default=120.0)
    parser.add_argument("--checkpoint-s", dest="checkpoint_s", type=float, default=10.0)
    parser.add_argument("--rollup-s", dest="rollup_s", type=float, default=60.0)
    parser.add_argument("--spikes", type=int, default=5)
    parser.add_argument("--every-s", dest="every_s", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the data dir")
    parser.add_argument(
        "--name",
        default="soak",
        help="writes bench/results/NAME.json (a short run beside the long one)",
    )
    parser.add_argument("--rss-every-s", dest="rss_every_s", type=float, default=5.0)
    parser.add_argument("--reanalyse", metavar="FILE",
                        help="recompute the figures of a soak result from its samples")  # fmt: skip
    args = parser.parse_args()
    if args.reanalyse:
        reanalyse(args.reanalyse)
        return
    root = tempfile.mkdtemp(prefix="nettel-soak-")
    try:
        figures = soak(args, os.path.join(root, "data"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    command = " ".join(["python bench/soak.py", *sys.argv[1:]])
    write_result(args.name, figures, command)


if __name__ == "__main__":
    main()
