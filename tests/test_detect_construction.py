"""One detector, one construction path: what `nettel up` / `nettel detect` run is what the
NAB bench measures (same function, same defaults, same scores on the same series)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from nettel.cli import make_detect
from nettel.config import Settings
from nettel.detect.container import ContainerDetector, make_detector
from nettel.detect.fleet import FleetDetector

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ is run as `python -m bench.nab` from the repo root

from bench import nab as nab_bench  # noqa: E402


def series(n: int, step_ms: int) -> list[tuple[int, float]]:
    """A daily cycle with a spike every 500 samples."""
    out = []
    for i in range(n):
        ts = 1_795_392_000_000 + i * step_ms
        value = 100.0 + 40.0 * math.sin(2 * math.pi * (ts % 86_400_000) / 86_400_000)
        out.append((ts, value * (6.0 if i % 500 == 499 else 1.0) + (i * 7919) % 13))
    return out


def test_bench_and_service_build_equal_detectors(tmp_path: Path) -> None:
    worker = make_detect(Settings(data_dir=str(tmp_path)), "127.0.0.1:1")
    service = worker.fleet_factory().template
    bench = nab_bench.detector_for_series()
    assert type(service) is type(bench) is ContainerDetector
    assert service._get_params() == bench._get_params() == make_detector()._get_params()
    assert FleetDetector().template._get_params() == bench._get_params()
    # Equal in behaviour too: the same series gives the same scores, at 5 s and at 5 min.
    for step_ms in (5_000, 300_000):
        a, b = service.clone(), nab_bench.detector_for_series()
        scores_a = [a.update_metric("value", v, ts).score for ts, v in series(2000, step_ms)]
        scores_b = [b.update_metric("value", v, ts).score for ts, v in series(2000, step_ms)]
        assert scores_a == scores_b
        assert max(scores_a) >= 1.0  # the spikes alert at the shipped threshold


def test_the_sampling_interval_comes_from_the_timestamps() -> None:
    fast, slow = make_detector(), make_detector()
    for ts, v in series(300, 5_000):
        fast.update_metric("value", v, ts)
    for ts, v in series(300, 300_000):
        slow.update_metric("value", v, ts)
    assert fast._models["value"].sample_interval_ms == 5_000
    assert slow._models["value"].sample_interval_ms == 300_000
