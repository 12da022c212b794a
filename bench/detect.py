"""Detector cost: scoring throughput per core and state per container, as the service runs.

    python -m bench.detect [--containers N] [--hours H] [--measure-hours M] [--batch B]

Simulated events (``nettel.ingest.simulate.TrafficSimulator``, 5-second samples) for N
containers on one partition: the first H hours teach the models, the next M hours are
timed. The detector is built as the service builds it (``FleetDetector()``, whose
template is ``nettel.detect.container.make_detector()``; ``DetectWorker``'s default
``fleet_factory``) and fed as ``DetectWorker`` feeds it: a partition's fetched records at
once (``FleetDetector.process_indexed``), B events per batch (a full fetch of 10,000
records spread over the 12 default partitions is ~830). Every metric of every event is
scored and learned (11 metrics where the event has TCP states), with the alert lifecycle.
CPU time is ``time.process_time`` of this one process, so events/s is per core; the
one-event path (``FleetDetector.process``) is timed too, for comparison.

State per container: the Python heap (tracemalloc) of a copy of the whole fleet (its
partition store with the growth room it has, containers, alert lifecycles), divided by N.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Sequence

from bench.common import write_result

from nettel.detect.fleet import FleetDetector
from nettel.ingest.simulate import TrafficSimulator
from nettel.models import StatEvent

START_MS = 1_795_392_000_000  # a Monday 00:00 UTC


def feed(fleet: FleetDetector, events: Sequence[StatEvent], batch: int) -> int:
    """Feed ``events`` in batches as the worker does; the alerts raised."""
    alerts = 0
    for i in range(0, len(events), batch):
        alerts += len(fleet.process_indexed(events[i : i + batch]))
    return alerts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.detect", description=__doc__)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--hours", type=float, default=24.0, help="hours learned first")
    parser.add_argument("--measure-hours", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=830, help="events per partition batch")
    args = parser.parse_args(argv)
    sim = TrafficSimulator(args.containers, seed=11)
    learn_ms = int(args.hours * 3_600_000)
    measure_ms = int(args.measure_hours * 3_600_000)
    fleet = FleetDetector()
    feed(fleet, list(sim.events(START_MS, learn_ms)), args.batch)
    events = list(sim.events(START_MS + learn_ms, measure_ms))
    metrics_per_event = sum(
        6 + (e.connections is not None) + 4 * (e.tcp is not None) for e in events
    ) / len(events)
    twin = copy.deepcopy(fleet)  # the same state, for the one-event path

    gc.collect()
    t0 = time.process_time()
    alerts = feed(fleet, events, args.batch)
    batch_s = time.process_time() - t0

    single = events[: max(1, len(events) // 10)]
    gc.collect()
    t0 = time.process_time()
    for ev in single:
        twin.process(ev)
    single_s = time.process_time() - t0

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    clone = copy.deepcopy(fleet)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    heap = sum(s.size_diff for s in after.compare_to(before, "filename"))
    store = clone._store
    store_bytes = sum(a.nbytes for a in store.cols.values()) + sum(
        a.nbytes for a in (store.levels, store.spreads, store.flags)
    )  # with its growth room
    n = len(events)
    figures = {
        "containers": args.containers,
        "learned_hours": args.hours,
        "measured_events": n,
        "events_per_batch": args.batch,
        "metrics_per_event": round(metrics_per_event, 1),
        "events_per_s_per_core": round(n / batch_s),
        "us_per_event": round(1e6 * batch_s / n, 1),
        "one_event_path_events_per_s_per_core": round(len(single) / single_s),
        "alerts_during_measure": alerts,
        "heap_bytes_per_container": round(heap / args.containers),
        "store_array_bytes_per_container": round(store_bytes / args.containers),
        "store_rows": store.rows,
        "store_rows_with_slot_levels": store.pooled_rows("level_row"),
        "store_rows_with_flag_marks": store.pooled_rows("flag_row"),
        "targets": {"events_per_s_per_core": 50_000, "heap_bytes_per_container": 50_000},
        "load_average_at_end": os.getloadavg(),
        "note": "CPU shared with other work while measured (2 cores); process CPU time used",
    }
    write_result("detect", figures, "python -m bench.detect " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
