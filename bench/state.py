"""What the detector's state costs on disk: checkpoint size and time, bands written, and the
files and bytes ``detect_state`` and ``bands`` hold before and after a maintenance pass.

The checkpoint path is the worker's (``DetectWorker._snapshot`` and its writes):
:func:`~nettel.detect.checkpoint.encode_checkpoint` of each partition's
:class:`~nettel.detect.fleet.FleetDetector` (built as ``make_detect`` builds it, no custom
rules), :meth:`~nettel.detect.bands.BandTracker.changes`, ``DetectStateTable.save`` and
``BandTable.upsert`` (here at every checkpoint; the worker writes bands every
``bands_interval_s``, 300 s), then :func:`~nettel.store.maintenance.maintain_table` with each
table's rule. ``--containers`` simulated containers (5 s samples) are spread over
``--partitions`` partitions by the producer's key hash, learned for ``--warm-hours``, then
checkpointed ``--checkpoints`` times, 30 s of traffic apart (the default interval).
Without broker: the Kafka side of the checkpoint (offsets) costs nothing here.

    python -m bench.state --containers 120
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from bench.common import write_result

from nettel.detect.bands import BandTracker
from nettel.detect.checkpoint import encode_checkpoint
from nettel.detect.fleet import FleetDetector
from nettel.ingest.simulate import TrafficSimulator
from nettel.store.alerts import DetectState, DetectStateTable
from nettel.store.bands import BandTable
from nettel.store.maintenance import maintain_table
from nettel.stream.detector import DetectWorker

CHECKPOINT_S = 30
#: the state tables' vacuum window (their delta.deletedFileRetentionDuration) and the
#: default interval of maintenance passes, in seconds
STATE_WINDOW_S = 600
MAINTENANCE_S = 3600
#: ``DetectWorker``'s default: bands are written at most this often (and at a stop).
BANDS_INTERVAL_S = DetectWorker.__init__.__kwdefaults__["bands_interval_s"]


def disk(uri: str) -> dict[str, int]:
    """Data files, their bytes, and log files of a table's folder."""
    root = Path(uri)
    data = [p for p in root.rglob("*.parquet") if "_delta_log" not in p.parts]
    logs = list((root / "_delta_log").glob("*"))
    return {"data_files": len(data), "data_bytes": sum(p.stat().st_size for p in data),
            "log_files": len(logs)}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--containers", type=int, default=120)
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--warm-hours", type=float, default=1.0)
    ap.add_argument("--checkpoints", type=int, default=10)
    args = ap.parse_args(argv)
    sim = TrafficSimulator(args.containers, seed=1, interval_ms=5000)
    start = 1_795_392_000_000
    warm_ms = int(args.warm_hours * 3_600_000)
    span = warm_ms + args.checkpoints * CHECKPOINT_S * 1000
    events = list(sim.events(start, span, []))
    hasher = DefaultPartitioner()
    parts = list(range(args.partitions))
    partition_of = {i: hasher(i.encode(), parts, parts) for i in {e.identity for e in events}}
    fleets = {p: FleetDetector() for p in parts}
    trackers = {p: BandTracker() for p in parts}
    tmp = tempfile.mkdtemp(prefix="nettel-bench-state-")
    state, bands = DetectStateTable(f"{tmp}/detect_state"), BandTable(f"{tmp}/bands")
    rounds: list[dict[str, Any]] = []
    i = 0
    for k in range(args.checkpoints + 1):
        cut = start + warm_ms + k * CHECKPOINT_S * 1000
        while i < len(events) and events[i].ts_ms < cut:
            fleets[partition_of[events[i].identity]].process(events[i])
            i += 1
        t0 = time.perf_counter()
        blobs = {p: encode_checkpoint(f) for p, f in fleets.items()}
        t1 = time.perf_counter()
        rows = [r | {"partition": p} for p in parts for r in trackers[p].changes(fleets[p])]
        t2 = time.perf_counter()
        state.save([DetectState(p, 0, k, 0, -1, b) for p, b in blobs.items()])
        t3 = time.perf_counter()
        bands.upsert(rows)
        for p in parts:
            trackers[p].written([r for r in rows if r["partition"] == p])
        t4 = time.perf_counter()
        rounds.append({"encode_s": t1 - t0, "bands_s": t2 - t1, "save_s": t3 - t2,
                       "upsert_s": t4 - t3, "blob_bytes": sum(map(len, blobs.values())),
                       "band_rows": len(rows)})  # fmt: skip
    steady = rounds[1:]  # the first writes every band

    def mean(key: str) -> float:
        return sum(r[key] for r in steady) / len(steady)

    before = {"detect_state": disk(state.uri), "bands": disk(bands.uri)}
    for name, uri in (("detect_state", state.uri), ("bands", bands.uri)):
        maintain_table(uri, name, retention_days=None, vacuum_retention_hours=0)
    after = {"detect_state": disk(state.uri), "bands": disk(bands.uri)}
    # bytes one write adds (every version's files stay until vacuum)
    per_write = {n: before[n]["data_bytes"] / (args.checkpoints + 1) for n in before}
    writes_per_h = {"detect_state": 3600 / CHECKPOINT_S, "bands": 3600 / BANDS_INTERVAL_S}
    # how long a removed file waits: the state tables' vacuum window, then until the next
    # vacuum: the detector's own (every few checkpoints) for detect_state, a maintenance
    # pass (hourly by default) for bands
    vacuum_every = DetectWorker.__init__.__kwdefaults__["state_vacuum_every"]
    hold_h = {"detect_state": (STATE_WINDOW_S + vacuum_every * CHECKPOINT_S) / 3600,
              "bands": (STATE_WINDOW_S + MAINTENANCE_S) / 3600}  # fmt: skip
    dead = sum(per_write[n] * writes_per_h[n] * hold_h[n] for n in per_write)
    figures = {
        "containers": args.containers,
        "partitions": args.partitions,
        "checkpoints": args.checkpoints,
        "checkpoint_interval_s": CHECKPOINT_S,
        "blob_bytes_per_container": round(mean("blob_bytes") / args.containers),
        "encode_ms_per_checkpoint": round(1000 * mean("encode_s"), 1),
        "band_changes_ms_per_checkpoint": round(1000 * mean("bands_s"), 1),
        "band_rows_changed_per_checkpoint": round(mean("band_rows")),
        "detect_state_save_ms": round(1000 * mean("save_s"), 1),
        "bands_upsert_ms": round(1000 * mean("upsert_s"), 1),
        "disk_before_maintenance": before,
        "disk_after_maintenance": after,
        "detect_state_bytes_per_checkpoint": round(per_write["detect_state"]),
        "bands_bytes_per_write": round(per_write["bands"]),
        "bands_interval_s": BANDS_INTERVAL_S,
        "removed_bytes_bound_est": round(dead),
        "removed_bytes_bound_note": f"bytes written per hour x hours held {hold_h} (vacuum "
        "window 10 min + the detector's vacuum every few checkpoints for detect_state, + "
        "NETTEL_MAINTENANCE_INTERVAL_S 1 h for bands): the most removed files wait for vacuum",
        "note": "2 shared cores; wall-clock times; no broker (offsets cost nothing here)",
    }
    write_result("state", figures, "python -m bench.state " + " ".join(argv or sys.argv[1:]))
    print(figures)


if __name__ == "__main__":
    main()
