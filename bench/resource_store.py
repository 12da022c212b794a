"""Bytes per stored value of the ``resource_minute`` table, on realistic resource samples.

Simulates containers sampled every 5 s: a third busy (CPU around a per-container load
with noise and bursts, memory creeping up and dropping back like a garbage-collected
heap, page cache that grows, disk writes in bursts), the rest mostly idle (a little CPU,
memory that moves now and then), as on a typical host; a few processes, limits constant,
folds them into minute windows and writes them (a commit per 10 minutes of samples)
with the windows and table of the resource stream worker that ``nettel up`` runs, built
by ``nettel.cli.make_resource_stream`` with the default settings, then runs the
maintenance pass ``nettel up`` runs on the table (``nettel.cli.maintain_one``). Bytes
per value: the table's Parquet bytes over rows x value columns (all but ``date`` and ``container``).

    python bench/resource_store.py [--containers 100] [--hours 24]

Writes bench/results/resource_store.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from typing import Any

from deltalake import DeltaTable

from nettel.cli import maintain_one, maintenance_plan, make_resource_stream
from nettel.config import Settings
from nettel.models import ResourceAggregate, ResourceEvent
from nettel.store.minute import PartitionPoint
from nettel.store.resources import resource_minute_schema

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

MiB = 1 << 20
INTERVAL_MS = 5000


def live_bytes(uri: str) -> int:
    """Bytes of the Parquet files the table's latest version holds."""
    return int(sum(DeltaTable(uri).get_add_actions(flatten=True).column("size_bytes").to_pylist()))


class Container:
    """One simulated container's cgroup readings."""

    def __init__(self, i: int, rng: random.Random) -> None:
        self.rng = rng
        self.identity = f"shop/svc-{i}"
        self.busy = i % 3 == 0
        self.load = rng.choice([0.05, 0.2, 0.6]) if self.busy else 0.002  # cores
        self.heap = rng.randint(20, 200) * MiB
        self.cache = rng.randint(1, 50) * MiB
        self.limit = rng.choice([0, 256 * MiB, 512 * MiB, 1024 * MiB])
        self.pids = rng.randint(1, 12)

    def event(self, ts_ms: int) -> ResourceEvent:
        r = self.rng
        cores = max(0.0, r.gauss(self.load, self.load / 4))
        if r.random() < 0.01:
            cores *= 4  # a burst
        cpu_us = int(cores * INTERVAL_MS * 1000)
        if self.busy or r.random() < 0.02:
            self.heap += r.randint(0, 64) * 4096
        if r.random() < 0.005:
            self.heap = self.heap * 3 // 5 // 4096 * 4096  # collected
        self.cache += r.randint(0, 4) * 4096 if r.random() < (0.2 if self.busy else 0.01) else 0
        writes = r.randint(1, 256) * 4096 if self.busy and r.random() < 0.1 else 0
        if r.random() < 0.002:
            self.pids += r.choice([-1, 1]) if self.pids > 1 else 1
        return ResourceEvent(
            ts_ms=ts_ms, host="bench", container_id=f"{hash(self.identity) & (2**64 - 1):064x}",
            identity=self.identity, name=self.identity.replace("/", "-"), image="shop:1.4",
            compose_project="shop", compose_service=self.identity.split("/")[1],
            interval_ms=INTERVAL_MS, source="cgroup-v2", cpu_usage_us=cpu_us,
            cpu_user_us=cpu_us * 3 // 4, cpu_system_us=cpu_us - cpu_us * 3 // 4,
            cpu_periods=50 if self.limit else 0,
            cpu_throttled_periods=r.randint(0, 3) if self.limit and cores > 0.5 else 0,
            io_write_bytes=writes, io_writes=writes // 65536,
            io_read_bytes=4096 * r.randint(1, 16) if r.random() < 0.01 else 0,
            memory_bytes=self.heap + self.cache + 2 * MiB, memory_limit_bytes=self.limit,
            memory_anon_bytes=self.heap, memory_file_bytes=self.cache,
            memory_kernel_bytes=2 * MiB, pids=self.pids, pids_limit=4096,
        )  # fmt: skip


def run(containers: int, hours: float) -> dict[str, Any]:
    rng = random.Random(7)
    fleet = [Container(i, rng) for i in range(containers)]
    start_ms = 1_800_000_000_000 // 86_400_000 * 86_400_000
    steps = int(hours * 3_600_000 // INTERVAL_MS)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env({"NETTEL_DATA_DIR": tmp})
        worker = make_resource_stream(settings, "127.0.0.1:9")  # never connects: fed here
        table = worker.table
        uri = table.uri
        windows = worker.new_windows()
        offset = 0
        rows = 0
        t0 = time.perf_counter()
        for step in range(steps):
            ts = start_ms + step * INTERVAL_MS
            for c in fleet:
                windows.add(c.event(ts), offset)
                offset += 1
            if (step + 1) % 120 == 0 or step == steps - 1:  # 10 minutes of samples
                if step == steps - 1:
                    windows.seal()
                closed: list[ResourceAggregate] = windows.close_ready()
                for row in closed:
                    row.partition = 0
                point = windows.replay_point()
                assert point is not None
                table.append(closed, [PartitionPoint(worker.topic, 0, point)],
                             writer=worker.group, epoch=worker.epoch)  # fmt: skip
                rows += len(closed)
        write_s = time.perf_counter() - t0
        values = rows * (len(resource_minute_schema()) - 2)
        written = live_bytes(uri)
        days = dict(maintenance_plan(settings))["resource_minute"]
        maintain_one(settings, "resource_minute", days)
        maintained = live_bytes(uri)
    return {
        "containers": containers,
        "hours": hours,
        "samples": offset,
        "rows": rows,
        "value_columns": len(resource_minute_schema()) - 2,
        "bytes": written,
        "bytes_per_stored_value": round(written / max(values, 1), 3),
        "bytes_per_stored_value_after_maintenance": round(maintained / max(values, 1), 3),
        "write_s": round(write_s, 1),
        "built_by": "nettel.cli.make_resource_stream (default settings): its windows "
        "(new_windows) and table; maintained by nettel.cli.maintain_one",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--containers", type=int, default=100)
    ap.add_argument("--hours", type=float, default=24)
    args = ap.parse_args()
    result = run(args.containers, args.hours)
    print(result, flush=True)
    write_result("resource_store", {**result, "target_bytes_per_value": 1.0},
                 "python bench/resource_store.py " + " ".join(sys.argv[1:]))  # fmt: skip


if __name__ == "__main__":
    main()
