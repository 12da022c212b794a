"""Detector cost: scoring throughput per core and model memory per container.

    python -m bench.detect [--containers N] [--hours H] [--measure-hours M]

Simulated events (``nettel.ingest.simulate.TrafficSimulator``, 5-second samples) for N
containers: the first H hours teach the models, the next M hours are timed. The detector
is built as the service builds it (``FleetDetector()``, whose template is
``nettel.detect.container.make_detector()``). Every metric of every event is scored and
learned (11 metrics where the event has TCP states). Two figures: the detector alone
(``ContainerDetector.update``, from the event's features) and the whole pure pipeline
(``FleetDetector.process``: features, models, alert lifecycle). CPU time is
``time.process_time`` of this one process, so events/s is per core. Memory per
container: the Python heap a copy of its detector holds (tracemalloc).
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

from nettel.detect.container import ContainerDetector, event_features
from nettel.detect.fleet import FleetDetector
from nettel.ingest.simulate import TrafficSimulator

START_MS = 1_795_392_000_000  # a Monday 00:00 UTC


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.detect", description=__doc__)
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--hours", type=float, default=24.0, help="hours learned first")
    parser.add_argument("--measure-hours", type=float, default=2.0)
    args = parser.parse_args(argv)
    sim = TrafficSimulator(args.containers, seed=11)
    learn_ms = int(args.hours * 3_600_000)
    measure_ms = int(args.measure_hours * 3_600_000)
    fleet = FleetDetector()
    for ev in sim.events(START_MS, learn_ms):
        fleet.process(ev)
    events = list(sim.events(START_MS + learn_ms, measure_ms))
    features = [event_features(ev) for ev in events]
    metrics_per_event = sum(len([k for k in f if k not in ("ts_ms", "counter_reset")])
                            for f in features) / len(features)  # fmt: skip

    # The detector alone: a copy of the learned models scores and learns every metric.
    dets = {i: copy.deepcopy(fleet.detector(i)) for i in fleet.identities}
    gc.collect()
    t0 = time.process_time()
    for ev, x in zip(events, features, strict=True):
        dets[ev.identity].update(x)
    detector_s = time.process_time() - t0

    gc.collect()
    t0 = time.process_time()
    alerts = 0
    for ev in events:
        alerts += len(fleet.process(ev))
    pipeline_s = time.process_time() - t0

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    clones = [copy.deepcopy(fleet.detector(i)) for i in fleet.identities]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    heap = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert all(isinstance(c, ContainerDetector) for c in clones)
    n = len(events)
    figures = {
        "containers": args.containers,
        "learned_hours": args.hours,
        "measured_events": n,
        "metrics_per_event": round(metrics_per_event, 1),
        "detector_events_per_s_per_core": round(n / detector_s),
        "detector_us_per_event": round(1e6 * detector_s / n, 1),
        "pipeline_events_per_s_per_core": round(n / pipeline_s),
        "pipeline_us_per_event": round(1e6 * pipeline_s / n, 1),
        "alerts_during_measure": alerts,
        "model_heap_bytes_per_container": round(heap / len(clones)),
        "targets": {"events_per_s_per_core": 50_000, "heap_bytes_per_container": 50_000},
        "load_average_at_end": os.getloadavg(),
        "note": "CPU shared with other work while measured (2 cores); process CPU time used",
    }
    write_result("detect", figures, "python -m bench.detect " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
