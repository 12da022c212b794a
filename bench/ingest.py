"""Ingest CPU per container per sample, with N real Podman containers.

Runs ingest as ``nettel up`` builds it (``nettel.cli.open_source`` and ``make_ingest``
with the default settings but the sample interval: engine source with its cgroup reader,
procfs counters and TCP states, the stats and resources publishers) against the embedded
Tansu broker, ticking its sampler as its run loop does, and measures this process's CPU time
(all threads; the broker is a separate process) over a number of ticks, in three
settings: idle containers; busy ones (each fetches from itself over HTTP every 0.5 s,
so packets and sockets change in every interval and the TCP table is walked every
sample); busy ones in namespaces with their own small TCP hash table
(``net.ipv4.tcp_child_ehash_entries``, set for the run and restored).

    python bench/ingest.py [--containers 10,50,100] [--ticks 30] [--interval 1]
                           [--settings idle,busy,ehash] [--resources on,off]

Resources (each container's cgroup files, read in the same job as its network counters
and published on ``nettel.resources``) are on as in ``nettel up``; ``--resources on,off``
measures both to give their cost (off: the same service without its cgroup reader and
resource events).

Needs root, Podman's API socket (DOCKER_HOST) and the local test image
(scripts/setup-engine.sh). Writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

from nettel.broker import EmbeddedBroker, free_loopback_port
from nettel.cli import make_ingest, open_source
from nettel.config import Settings
from nettel.ingest.service import IngestService
from nettel.ingest.sources import EngineSource

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

IMAGE = "localhost/nettel-test:latest"
LABEL = "nettel-bench=ingest"


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


SERVE = "mkdir -p /w && echo x > /w/i && httpd -p 8080 -h /w"
BUSY = "; while true; do wget -q -O /dev/null http://127.0.0.1:8080/i; sleep 0.5; done"
IDLE = "; sleep 100000"
CHILD_EHASH = "/proc/sys/net/ipv4/tcp_child_ehash_entries"


def start_containers(client: docker.DockerClient, n: int, busy: bool) -> list[str]:
    ids = []
    for i in range(n):
        c = client.containers.run(
            IMAGE, ["sh", "-c", SERVE + (BUSY if busy else IDLE)],
            detach=True, name=f"bench-ingest-{i}", labels={"nettel-bench": "ingest"},
        )  # fmt: skip
        assert c.id is not None
        ids.append(c.id)
    return ids


def remove_containers() -> None:
    subprocess.run(
        f"podman ps -aq --filter label={LABEL} | xargs -r podman rm -f -t 0",
        shell=True, capture_output=True, check=False, timeout=600,
    )  # fmt: skip


def cgroup_read_cost(source: EngineSource, passes: int = 20) -> float | None:
    """CPU ms (this thread) of one read of a container's cgroup files, over every unit
    ``passes`` times: what resources add to a container-sample, apart from the noise
    of the whole process."""
    reader = source.cgroups
    units = [u for u in source.units() if u.pid is not None]
    if reader is None or not units:
        return None
    t0 = time.thread_time()
    for _ in range(passes):
        for u in units:
            reader.read(u.container_id, u.pid or 0)
    return round((time.thread_time() - t0) * 1000 / (passes * len(units)), 4)


async def measure(url: str, n: int, ticks: int, interval_s: float,
                  resources: bool = True) -> dict[str, Any]:  # fmt: skip
    broker = EmbeddedBroker(free_loopback_port())
    await broker.start()
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings.from_env({"DOCKER_HOST": url, "NETTEL_SOURCE": "engine",
                                      "NETTEL_DATA_DIR": data_dir,
                                      "NETTEL_SAMPLE_INTERVAL_S": str(interval_s)})  # fmt: skip
        source = open_source(settings)
        service = make_ingest(settings, broker.bootstrap_servers, source)
        try:
            return await _measure(service, n, ticks, interval_s, resources)
        finally:
            await service.close()
            await broker.stop()


async def _measure(service: IngestService, n: int, ticks: int, interval_s: float,
                   resources: bool) -> dict[str, Any]:  # fmt: skip
    """Ticks of ``service``'s sampler (as its run loop does) with its publishers started;
    resources off: the same service without its cgroup reader and resource events."""
    source = service.source
    assert isinstance(source, EngineSource)
    if not resources:
        assert source.cgroups is not None
        source.cgroups.close()
        source.cgroups = None
        service.sampler.emit_resources = None
    publisher, resource_publisher = service.publisher, service.resource_publisher
    assert resource_publisher is not None
    await publisher.start()
    await resource_publisher.start()
    sampler = service.sampler
    for _ in range(3):  # warm up: inventory, baselines, producer connection
        await sampler.tick()
        await asyncio.sleep(interval_s)
    units = len([u for u in source.units() if u.name.startswith("bench-ingest-")])
    c0, w0 = cpu_s(), time.monotonic()
    e0 = publisher.sent + publisher.buffered
    r0 = resource_publisher.sent + resource_publisher.buffered
    tick_walls = []
    for _ in range(ticks):
        t = time.monotonic()
        await sampler.tick()
        tick_walls.append(time.monotonic() - t)
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t)))
    while publisher.buffered or resource_publisher.buffered:  # noqa: ASYNC110 - a bench polls
        await asyncio.sleep(0.05)
    cpu, wall, samples = cpu_s() - c0, time.monotonic() - w0, publisher.sent - e0
    resource_samples = resource_publisher.sent - r0
    cgroup_read_ms = cgroup_read_cost(source) if resources else None
    tick_walls.sort()
    return {
        "containers": n,
        "units_sampled": units,
        "ticks": ticks,
        "container_samples": samples,
        "resources": resources,
        "resource_samples": resource_samples,
        "cgroup_read_cpu_ms_per_container": cgroup_read_ms,
        "cpu_s": round(cpu, 3),
        "cpu_ms_per_container_sample": round(cpu * 1000 / max(samples, 1), 4),
        "cpu_percent_of_one_core": round(100 * cpu / wall, 2),
        "tick_wall_ms_p50": round(tick_walls[len(tick_walls) // 2] * 1000, 2),
        "tick_wall_ms_max": round(tick_walls[-1] * 1000, 2),
        "interval_s": interval_s,
        "tcp_states_via": source.netns.method + " or procfs, the cheaper per namespace",
        "tcp_table_walks": source.netns.walks,
        "tcp_table_walks_skipped": source.netns.skips,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--containers", default="10,50,100")
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--settings", default="idle,busy,ehash", help="which of idle,busy,ehash")
    ap.add_argument("--resources", default="on", help="on, off or on,off")
    ap.add_argument("--result", default="ingest", help="name of the bench/results file")
    args = ap.parse_args()
    chosen = set(args.settings.split(","))
    with_resources = [r == "on" for r in args.resources.split(",")]
    url = os.environ.get("DOCKER_HOST", "unix:///run/podman/podman.sock")
    client = docker.DockerClient(base_url=url, timeout=120)
    runs = []
    settings = [s for key, s in (("idle", ("idle", False, None)), ("busy", ("busy", True, None)),
                                 ("ehash", ("busy, child ehash 1024", True, 1024)))
                if key in chosen]  # fmt: skip
    with open(CHILD_EHASH, encoding="ascii") as f:
        child_ehash = f.read().strip()
    try:
        for label, busy, ehash in settings:
            with open(CHILD_EHASH, "w", encoding="ascii") as f:
                f.write(str(ehash or child_ehash))
            for n in [int(x) for x in args.containers.split(",")]:
                remove_containers()
                start_containers(client, n, busy)
                for resources in with_resources:
                    result: dict[str, Any] = {"setting": label}
                    result.update(asyncio.run(measure(url, n, args.ticks, args.interval,
                                                      resources)))  # fmt: skip
                    print(result, flush=True)
                    runs.append(result)
    finally:
        remove_containers()
        with open(CHILD_EHASH, "w", encoding="ascii") as f:
            f.write(child_ehash)
    write_result(
        args.result,
        {
            "runs": runs,
            "target_cpu_ms_per_container_sample": 0.5,
            "tcp_ehash_entries": Path("/proc/sys/net/ipv4/tcp_ehash_entries").read_text().strip(),
        },
        "python bench/ingest.py " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
