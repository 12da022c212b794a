"""Ingest CPU per container per sample, with N real Podman containers.

Runs the service's own ingest (engine source, procfs counters and TCP states, Kafka
publisher) against the embedded Tansu broker, and measures this process's CPU time
(all threads; the broker is a separate process) over a number of ticks, in three
settings: idle containers; busy ones (each fetches from itself over HTTP every 0.5 s,
so packets and sockets change in every interval and the TCP table is walked every
sample); busy ones in namespaces with their own small TCP hash table
(``net.ipv4.tcp_child_ehash_entries``, set for the run and restored).

    python bench/ingest.py [--containers 10,50,100] [--ticks 30] [--interval 1]

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
import time
from pathlib import Path
from typing import Any

import docker

from nettel.broker import EmbeddedBroker, ensure_topics, free_loopback_port
from nettel.ingest.publisher import EventPublisher
from nettel.ingest.sampler import Sampler
from nettel.ingest.sources import EngineSource
from nettel.models import encode_stat_event

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


async def measure(url: str, n: int, ticks: int, interval_s: float) -> dict[str, Any]:
    broker = EmbeddedBroker(free_loopback_port())
    await broker.start()
    await ensure_topics(broker.bootstrap_servers, {"nettel.stats": 12})
    publisher = EventPublisher(broker.bootstrap_servers, "nettel.stats")
    source = EngineSource(url)
    sent_events = 0

    def emit(ev: Any) -> None:
        nonlocal sent_events
        sent_events += 1
        publisher.publish(ev.identity.encode(), encode_stat_event(ev))

    sampler = Sampler(source, emit, host="bench", interval_s=interval_s)
    await publisher.start()
    try:
        for _ in range(3):  # warm up: inventory, baselines, producer connection
            await sampler.tick()
            await asyncio.sleep(interval_s)
        units = len([u for u in source.units() if u.name.startswith("bench-ingest-")])
        c0, w0, e0 = cpu_s(), time.monotonic(), sent_events
        tick_walls = []
        for _ in range(ticks):
            t = time.monotonic()
            await sampler.tick()
            tick_walls.append(time.monotonic() - t)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - t)))
        while publisher.buffered:  # noqa: ASYNC110 - a bench polls
            await asyncio.sleep(0.05)
        cpu, wall, samples = cpu_s() - c0, time.monotonic() - w0, sent_events - e0
    finally:
        sampler.close()
        await publisher.stop()
        source.close()
        await broker.stop()
    tick_walls.sort()
    return {
        "containers": n,
        "units_sampled": units,
        "ticks": ticks,
        "container_samples": samples,
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
    args = ap.parse_args()
    url = os.environ.get("DOCKER_HOST", "unix:///run/podman/podman.sock")
    client = docker.DockerClient(base_url=url, timeout=120)
    runs = []
    settings = [("idle", False, None), ("busy", True, None), ("busy, child ehash 1024", True, 1024)]
    with open(CHILD_EHASH, encoding="ascii") as f:
        child_ehash = f.read().strip()
    try:
        for label, busy, ehash in settings:
            with open(CHILD_EHASH, "w", encoding="ascii") as f:
                f.write(str(ehash or child_ehash))
            for n in [int(x) for x in args.containers.split(",")]:
                remove_containers()
                start_containers(client, n, busy)
                result = {"setting": label}
                result.update(asyncio.run(measure(url, n, args.ticks, args.interval)))
                print(result, flush=True)
                runs.append(result)
    finally:
        remove_containers()
        with open(CHILD_EHASH, "w", encoding="ascii") as f:
            f.write(child_ehash)
    write_result(
        "ingest",
        {
            "runs": runs,
            "target_cpu_ms_per_container_sample": 0.5,
            "tcp_ehash_entries": Path("/proc/sys/net/ipv4/tcp_ehash_entries").read_text().strip(),
        },
        "python bench/ingest.py " + " ".join(sys.argv[1:]),
    )


if __name__ == "__main__":
    main()
