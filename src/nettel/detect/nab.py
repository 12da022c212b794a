"""The Numenta Anomaly Benchmark's scoring rules, as pure functions.

Written from the rules in NAB's documentation: windows of rows around each labelled
anomaly, a scaled sigmoid that rewards early detections and forgives false positives
just after a window, a probationary period that is not scored, one threshold per corpus
and profile chosen by sweeping every distinct score, and normalisation between the null
detector (never detects) and the perfect one.

Scores and windows are given per series as row indices: a window ``(l, r)`` holds rows
``l..r`` inclusive. Reading files is the caller's job (``bench/nab.py``).

Examples
--------
One series of 10 rows, one window on rows 5..6, no probation, and one detection on the
window's first row: the perfect score.

>>> s = NabSeries("f", scores=[0, 0, 0, 0, 0, 1, 0, 0, 0, 0], windows=[(5, 6)], probation=0)
>>> round(corpus_score([s], STANDARD).score, 6)
100.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final


@dataclass(frozen=True, slots=True)
class Profile:
    """The cost weights of one NAB scoring profile."""

    name: str
    tp_weight: float
    fn_weight: float
    fp_weight: float


STANDARD: Final = Profile("standard", 1.0, 1.0, 0.11)
LOW_FP: Final = Profile("reward_low_FP_rate", 1.0, 1.0, 0.22)
LOW_FN: Final = Profile("reward_low_FN_rate", 1.0, 2.0, 0.11)
PROFILES: Final = (STANDARD, LOW_FP, LOW_FN)


def probation_rows(n_rows: int, fraction: float = 0.15, max_rows: int = 750) -> int:
    """Rows at the start of a series that are not scored: 15 % of them, at most 750.

    Examples
    --------
    >>> probation_rows(4032), probation_rows(10_000), probation_rows(10)
    (604, 750, 1)
    """
    return min(math.floor(fraction * n_rows), max_rows)


def scaled_sigmoid(x: float) -> float:
    """NAB's ``2 / (1 + e^(5x)) - 1``: near 1 for x <= -1, 0 at 0, -1 for x >= 3.

    Examples
    --------
    >>> round(scaled_sigmoid(-1.0), 4), scaled_sigmoid(0.0), scaled_sigmoid(5.0)
    (0.9866, 0.0, -1.0)
    """
    if x > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * x)) - 1.0


@dataclass(frozen=True, slots=True)
class NabSeries:
    """One scored series: a score per row, its anomaly windows, its probationary rows."""

    name: str
    scores: Sequence[float]
    windows: Sequence[tuple[int, int]]
    probation: int


@dataclass(frozen=True, slots=True)
class CorpusScore:
    """The best threshold of one profile over a corpus and what it scores."""

    profile: str
    threshold: float
    score: float
    raw: float
    tp: int = 0
    fp: int = 0
    fn: int = 0
    per_series: dict[str, float] = field(default_factory=dict)


def series_raw_score(series: NabSeries, threshold: float, profile: Profile) -> float:
    """The raw NAB score of one series at one threshold (detection: score >= threshold).

    Examples
    --------
    A detection on the window's last row earns little; one 6 rows after a 2-row window
    (x = 6 / 1 > 3) costs the full false-positive weight.

    >>> s = NabSeries("f", scores=[0, 0, 0, 1, 0, 0, 0, 0, 0, 1], windows=[(2, 3)],
    ...               probation=0)
    >>> tp = scaled_sigmoid(-1 / 2) / scaled_sigmoid(-1)
    >>> round(series_raw_score(s, 0.5, STANDARD) - (tp - 0.11), 12)
    0.0
    """
    return series_tally(series, threshold, profile)[0]


def series_tally(
    series: NabSeries, threshold: float, profile: Profile
) -> tuple[float, int, int, int]:
    """The raw score of one series at one threshold, with its true positives, false
    positives and false negatives.

    Examples
    --------
    >>> s = NabSeries("f", scores=[0, 0, 1, 0, 0, 0, 0, 0, 0, 1], windows=[(2, 3)],
    ...               probation=0)
    >>> series_tally(s, 0.5, STANDARD)[1:]
    (1, 1, 0)
    """
    total, tp, fp, fn = 0.0, 0, 0, 0
    windows = sorted(series.windows)
    top = scaled_sigmoid(-1.0)
    for lo, hi in windows:
        first = next(
            (i for i in range(max(lo, series.probation), hi + 1) if series.scores[i] >= threshold),
            None,
        )
        if first is None:
            total -= profile.fn_weight
            fn += 1
        else:
            total += profile.tp_weight * scaled_sigmoid(-(hi - first + 1) / (hi - lo + 1)) / top
            tp += 1
    for i in range(series.probation, len(series.scores)):
        if series.scores[i] < threshold or _window_of(windows, i) is not None:
            continue
        fp += 1
        total += _fp_value(windows, i, profile)
    return total, tp, fp, fn


def _window_of(windows: Sequence[tuple[int, int]], i: int) -> tuple[int, int] | None:
    for lo, hi in windows:
        if lo <= i <= hi:
            return (lo, hi)
    return None


def _fp_value(windows: Sequence[tuple[int, int]], i: int, profile: Profile) -> float:
    prev = [(lo, hi) for lo, hi in windows if hi < i]
    if not prev:
        return -profile.fp_weight
    lo, hi = prev[-1]
    width = hi - lo + 1
    if width <= 1:
        return -profile.fp_weight
    return profile.fp_weight * scaled_sigmoid((i - hi) / (width - 1))


def _sweep_events(series: NabSeries, profile: Profile) -> tuple[list[float], list[float]]:
    """(threshold, change of raw score when the threshold drops to it) pairs of one series."""
    thresholds: list[float] = []
    deltas: list[float] = []
    windows = sorted(series.windows)
    top = scaled_sigmoid(-1.0)
    for lo, hi in windows:
        # The window's value is set by its earliest row at or above the threshold: as the
        # threshold drops, it changes only at rows that beat every earlier row's score.
        # The highest of those records fires first as the threshold drops.
        records: list[tuple[float, int]] = []
        for i in range(max(lo, series.probation), hi + 1):
            s = float(series.scores[i])
            if not records or s > records[-1][0]:
                records.append((s, i))
        value = -profile.fn_weight
        for s, i in reversed(records):
            new = profile.tp_weight * scaled_sigmoid(-(hi - i + 1) / (hi - lo + 1)) / top
            thresholds.append(s)
            deltas.append(new - value)
            value = new
    for i in range(series.probation, len(series.scores)):
        if _window_of(windows, i) is None:
            thresholds.append(float(series.scores[i]))
            deltas.append(_fp_value(windows, i, profile))
    return thresholds, deltas


def corpus_score(corpus: Sequence[NabSeries], profile: Profile) -> CorpusScore:
    """Sweep every distinct score for the one threshold that maximises the corpus score.

    Examples
    --------
    A detector that fires once per window on its first row, and once far outside
    any window, loses just the false positive's cost: 100 * (2 - 0.11 + 2) / 4.

    >>> a = NabSeries("a", scores=[0, 0, .9, 0, 0, 0, 0, 0, 0, .9], windows=[(2, 3)],
    ...               probation=0)
    >>> b = NabSeries("b", scores=[0, 0, 0, 0, .8, 0], windows=[(4, 5)], probation=0)
    >>> r = corpus_score([a, b], STANDARD)
    >>> r.threshold, round(r.score, 4), (r.tp, r.fp, r.fn)
    (0.8, 97.25, (2, 1, 0))
    """
    events: list[tuple[float, float]] = []
    n_windows = 0
    for series in corpus:
        levels, deltas = _sweep_events(series, profile)
        events.extend(zip(levels, deltas, strict=True))
        n_windows += len(series.windows)
    null = -profile.fn_weight * n_windows
    perfect = profile.tp_weight * n_windows
    events.sort(key=lambda e: -e[0])
    best_raw, best_t = null, math.inf
    raw = null
    k = 0
    while k < len(events):
        t = events[k][0]
        while k < len(events) and events[k][0] == t:
            raw += events[k][1]
            k += 1
        if raw > best_raw + 1e-12:
            best_raw, best_t = raw, t
    tp = fp = fn = 0
    per_series: dict[str, float] = {}
    for series in corpus:
        s, a, b, c = series_tally(series, best_t, profile)
        per_series[series.name] = s
        tp, fp, fn = tp + a, fp + b, fn + c
    span = perfect - null
    score = 100.0 * (best_raw - null) / span if span else 0.0
    return CorpusScore(profile.name, best_t, score, best_raw, tp, fp, fn, per_series)
