"""One contract over every detector: clone, pickle, prequential AUC, no learning from flags.

Every detector the service runs (the NAB bench builds the same one) gets the same checks,
on our own synthetic stream (a daily cycle with noise and injected spikes of known position).
"""

from __future__ import annotations

import copy
import math
import pickle
import random
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest

from nettel.detect.baseline import DAY_MS, MINUTE_MS, LearningGuard, TrafficBaseline
from nettel.detect.container import GUARD_THRESHOLD, make_detector

STEP_MS = 5 * MINUTE_MS
START_MS = 1_795_392_000_000  # a Monday 00:00 UTC

# (name, factory, how a (ts, value) point is given to it)
Point = Callable[[int, float], dict[Hashable, Any]]


def univariate(ts_ms: int, value: float) -> dict[Hashable, Any]:
    return {"value": value, "ts_ms": ts_ms}


def container_event(ts_ms: int, value: float) -> dict[Hashable, Any]:
    return {"ts_ms": ts_ms, "rx_bytes": value, "tx_bytes": value / 3}


DETECTORS: list[tuple[str, Callable[[], Any], Point]] = [
    ("baseline", TrafficBaseline, univariate),
    ("guarded-baseline", lambda: LearningGuard(TrafficBaseline(), GUARD_THRESHOLD, 3), univariate),
    ("container", make_detector, container_event),
]
#: The deployed forms, which must not learn from what they flag.
GUARDED = [d for d in DETECTORS if d[0].startswith("guarded") or d[0] == "container"]


def stream(days: int = 14, spikes: int = 12, seed: int = 3) -> Iterator[tuple[int, float, bool]]:
    """A daily cycle (5-minute samples) with noise and ``spikes`` single-sample spikes."""
    rng = random.Random(seed)
    n = days * DAY_MS // STEP_MS
    at = set(rng.sample(range(n // 4, n), spikes))
    for i in range(n):
        ts = START_MS + i * STEP_MS
        hour = (ts % DAY_MS) / 3_600_000
        value = 1e6 * (1.0 + 0.6 * math.sin(2 * math.pi * hour / 24)) * rng.lognormvariate(0, 0.1)
        if i in at:
            value *= 6.0
        yield ts, value, i in at


def auc(scores: list[float], labels: list[bool]) -> float:
    """Exact ROC AUC (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def learn(det: Any, point: Point, days: int = 3) -> None:
    for ts, value, _ in stream(days=days, spikes=0):
        det.learn_one(point(ts, value))


@pytest.mark.parametrize(("name", "make", "point"), DETECTORS, ids=[d[0] for d in DETECTORS])
def test_clone_is_fresh_with_same_parameters(name: str, make: Callable[[], Any],
                                             point: Point) -> None:  # fmt: skip
    det = make()
    learn(det, point)
    twin = det.clone()
    assert type(twin) is type(det)
    assert twin._get_params() == det._get_params()
    fresh = make()
    probe = point(START_MS + 4 * DAY_MS, 9e6)
    assert twin.score_one(probe) == fresh.score_one(probe) == 0.0  # both still warming up
    assert det.score_one(probe) > 0


@pytest.mark.parametrize(("name", "make", "point"), DETECTORS, ids=[d[0] for d in DETECTORS])
def test_pickle_round_trip_keeps_every_score(name: str, make: Callable[[], Any],
                                             point: Point) -> None:  # fmt: skip
    det = make()
    learn(det, point)
    restored = pickle.loads(pickle.dumps(det))
    for ts, value, _ in stream(days=5, spikes=6, seed=9):
        if ts < START_MS + 3 * DAY_MS:
            continue
        x = point(ts, value)
        assert restored.score_one(x) == det.score_one(x)
        restored.learn_one(x)
        det.learn_one(x)


@pytest.mark.parametrize(("name", "make", "point"), DETECTORS, ids=[d[0] for d in DETECTORS])
def test_prequential_auc_on_injected_spikes(name: str, make: Callable[[], Any],
                                            point: Point) -> None:  # fmt: skip
    det = make()
    scores: list[float] = []
    labels: list[bool] = []
    for i, (ts, value, spike) in enumerate(stream()):
        x = point(ts, value)
        s = det.score_one(x)  # test, then train: prequential
        det.learn_one(x)
        if i >= 2 * DAY_MS // STEP_MS:
            scores.append(s)
            labels.append(spike)
    assert sum(labels) >= 8
    # Measured: 0.96 for the service's settings, 0.75 for NAB's (its guard lets a spike
    # with evidence below 1 be learned, which widens the range later spikes are judged
    # against). The contract's bar: clearly better than chance for every detector.
    assert auc(scores, labels) >= 0.7, name


@pytest.mark.parametrize(("name", "make", "point"), GUARDED, ids=[d[0] for d in GUARDED])
def test_no_learning_from_flagged_points(name: str, make: Callable[[], Any],
                                         point: Point) -> None:  # fmt: skip
    det = make()
    learn(det, point)
    before = det.n_learned
    spike = point(START_MS + 3 * DAY_MS, 50e6)
    assert det.score_one(spike) > 1.0
    probe = copy.deepcopy(det)
    det.learn_one(spike)
    assert det.n_learned == before
    # The spike stays in the moving averages for a while; then normal points are learned.
    for i in range(1, 40):
        det.learn_one(point(START_MS + 3 * DAY_MS + i * STEP_MS, 1.1e6))
    assert det.n_learned > before
    # The unguarded model would have learned it: the guard is what protects.
    inner = getattr(probe, "anomaly_detector", None)
    if isinstance(inner, TrafficBaseline):
        inner.learn_one(spike)
        assert inner.n_learned == before + 1
