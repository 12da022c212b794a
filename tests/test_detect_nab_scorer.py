"""The NAB scorer on hand-made series whose score is computed here by hand."""

from __future__ import annotations

import math

import pytest

from nettel.detect.nab import (
    LOW_FN,
    LOW_FP,
    STANDARD,
    NabSeries,
    corpus_score,
    probation_rows,
    scaled_sigmoid,
    series_raw_score,
)


def sig(x: float) -> float:
    return 2 / (1 + math.exp(5 * x)) - 1


def test_sigmoid_and_probation() -> None:
    assert scaled_sigmoid(-1) == pytest.approx(sig(-1))
    assert scaled_sigmoid(0.5) == pytest.approx(sig(0.5))
    assert probation_rows(1000) == 150
    assert probation_rows(20_000) == 750


# 40 rows, probation 4 (rows 0..3 are not scored). Windows: rows 10..19 (w = 10) and
# 30..33 (w = 4).
WINDOWS = [(10, 19), (30, 33)]


def series(scores: dict[int, float]) -> NabSeries:
    return NabSeries("f", [scores.get(i, 0.0) for i in range(40)], WINDOWS, probation=4)


def test_one_series_by_hand() -> None:
    s = series({
        2: 0.9,   # probation: ignored
        6: 0.7,   # before any window: a full false positive
        12: 0.8,  # first detection in window 1, 3rd row of 10
        15: 0.95, # a later detection in the same window: worth nothing
        21: 0.6,  # just after window 1: x = (21 - 19) / (10 - 1)
        27: 0.9,  # x = 8 / 9
    })  # fmt: skip
    # Threshold 0.5: window 2 is missed.
    tp = sig(-(19 - 12 + 1) / 10) / sig(-1)
    fp = -0.11 + 0.11 * sig(2 / 9) + 0.11 * sig(8 / 9)
    assert series_raw_score(s, 0.5, STANDARD) == pytest.approx(tp + fp - 1.0)
    # Threshold 0.85: only rows 15 (TP, 6th row) and 27 (FP) count; the probation's 0.9
    # still does not.
    tp85 = sig(-(19 - 15 + 1) / 10) / sig(-1)
    assert series_raw_score(s, 0.85, STANDARD) == pytest.approx(tp85 + 0.11 * sig(8 / 9) - 1.0)
    # Low FN doubles the cost of the missed window; low FP doubles the false positives.
    assert series_raw_score(s, 0.5, LOW_FN) == pytest.approx(tp + fp - 2.0)
    assert series_raw_score(s, 0.5, LOW_FP) == pytest.approx(tp + 2 * fp - 1.0)


def test_corpus_normalisation_and_sweep_by_hand() -> None:
    a = series({12: 0.8, 31: 0.4, 6: 0.6})
    b = NabSeries("g", [0.0] * 10 + [0.3] + [0.0] * 9, [(10, 12)], probation=0)
    # Candidate thresholds, computed by hand (3 windows: null = -3, perfect = 3):
    #  0.8: a's window 1 at row 12; others missed      -> tp12 - 2
    #  0.6: + a false positive at row 6 (full cost)     -> tp12 - 2 - 0.11
    #  0.4: + a's window 2 at its 2nd row              -> tp12 + tp31 - 1 - 0.11
    #  0.3: + b's window at its first row               -> tp12 + tp31 + 1 - 0.11
    tp12 = sig(-8 / 10) / sig(-1)
    tp31 = sig(-3 / 4) / sig(-1)
    best = tp12 + tp31 + 1 - 0.11
    r = corpus_score([a, b], STANDARD)
    assert r.threshold == 0.3
    assert r.raw == pytest.approx(best)
    assert r.score == pytest.approx(100 * (best + 3) / 6)
    assert (r.tp, r.fp, r.fn) == (3, 1, 0)
    # Every threshold gives what the per-series scorer says; the sweep takes the best.
    for t in (0.8, 0.6, 0.4, 0.3, 0.0):
        raw = series_raw_score(a, t, STANDARD) + series_raw_score(b, t, STANDARD)
        assert raw <= r.raw + 1e-12


def test_null_and_perfect_detectors() -> None:
    null = series({})
    assert series_raw_score(null, 0.5, STANDARD) == -2.0  # never detects: both windows missed
    # A constant score is one detection per row at threshold 0: first rows of both windows
    # and every other scored row a false positive; the sweep prefers that to nothing.
    everything = corpus_score([null], STANDARD)
    assert everything.threshold == 0.0
    assert (everything.tp, everything.fp) == (2, 22)
    perfect = series({10: 1.0, 30: 1.0})
    assert corpus_score([perfect], STANDARD).score == pytest.approx(100.0)
    assert corpus_score([perfect], LOW_FN).score == pytest.approx(100.0)
