"""One metric's normal traffic, learned online: a River anomaly detector.

:class:`TrafficBaseline` scores how far a value lies outside everything this metric has
done so far, at several time scales, and outside what it usually does at this time of
day and week. The evidence that matters on bursty traffic (and on NAB) is not a distance
from a mean but novelty: a level never reached before, a moving average never reached
before, a value this hour has never had. So the score is the size of that excess as a
fraction of the metric's whole range: 0 for anything already seen, about 1 for a jump
the size of the range. A repeat of a detection right after it scores 0 unless it is at
least ``refire_ratio`` times larger (:attr:`TrafficBaseline.last_raw` keeps the evidence
for as long as it lasts, for alert lifecycles). A seasonal slot's level and spread give
the expected band at any hour (:meth:`TrafficBaseline.band`).

Lengths are durations and the sampling interval is learned from the timestamps, so the
same defaults serve the service's 5-second samples and NAB's 5-minute ones. Samples are
gathered into 5-minute buckets (a slower sample is a bucket of its own, so for hourly
data the averages below span 6 and 24 samples): the level is checked at the sample itself and at
30-minute and 2-hour moving averages of buckets, and the 30-minute average against its
15-minute slot of the day and hour of the week (a season scores only once the history
spans it: the week's after two weeks). An excess over a slot is measured in units of the
metric's usual cycle (2.5 times the span of its slot levels) where that is less than its
whole range: one past spike, learned into the range, would otherwise hide a level shift
at a quiet hour. When samples come faster than buckets, two more
checks apply to single samples: a new record must beat the old one by more than the
sample noise, and a sample far from its slot's level (in units of the noise at that
level) is unusual too (a few seconds' burst at a quiet hour, which no average shows).

What River lacks, and why this is hand-written: ``river.stats`` has running and rolling
statistics (``Max``, ``RollingMean``, ``EWMean``) but one Python object per statistic,
with no time-of-day slots; ``river.anomaly`` has no novelty-of-extremes scorer and its
filters (``ThresholdFilter``) count no run of flagged points. A container has eleven of
these models, so the state lives in compact typed arrays (per-slot EW mean and mean
absolute deviation, float32) and a few plain numbers.

:class:`LearningGuard` wraps any detector so that it does not learn from what it flags
(like ``river.anomaly.ThresholdFilter``), and gives up protecting after
``max_protected_run`` flagged points in a row so that a lasting new level is learned.
:meth:`TrafficBaseline.score_learn` also learns a flagged point when one was flagged at
the same time of a previous day or week: what recurs (a nightly job) is normal.

``x`` is ``{"value": float, "ts_ms": int}`` and may carry ``"counter_reset": True``: such
a point (a restart, re-created interface) scores 0 and is not learned.

Examples
--------
>>> model = TrafficBaseline(warmup=10)
>>> for i in range(200):
...     model.learn_one({"value": 100.0 + (i % 7), "ts_ms": i * 60_000})
>>> model.score_one({"value": 104.0, "ts_ms": 200 * 60_000})
0.0
>>> model.score_one({"value": 2_000.0, "ts_ms": 200 * 60_000}) > 0.5
True
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river.base import AnomalyDetector, AnomalyFilter

from nettel.detect.store import (
    BUCKET_MS,
    DAY_MS,
    DEFAULT_SEASONS,
    HOUR_MS,
    MINUTE_MS,
    MONDAY_OFFSET_MS,
    RECURRING_AFTER,
    WEEK_MS,
    BaselineStore,
    Floats,
    Ints,
)

__all__ = [
    "BUCKET_MS", "DAY_MS", "DEFAULT_SEASONS", "HOUR_MS", "MINUTE_MS", "MONDAY_OFFSET_MS",
    "RECURRING_AFTER", "WEEK_MS", "Band", "Features", "LearningGuard", "TrafficBaseline",
    "band_of", "bands_of", "slot_of",
]  # fmt: skip

#: What River detectors take: a dict of features.
Features = dict[Hashable, Any]


def slot_of(ts_ms: int, period_ms: int, slot_ms: int) -> int:
    """Index of the slot of ``ts_ms`` in its period (slot 0 of a week: Monday 00:00 UTC).

    Examples
    --------
    >>> slot_of(0, WEEK_MS, HOUR_MS)  # Thursday 1970-01-01 00:00 UTC
    72
    >>> slot_of(5 * HOUR_MS + 1, DAY_MS, HOUR_MS)
    5
    """
    return ((ts_ms + MONDAY_OFFSET_MS) % period_ms) // slot_ms


@dataclass(frozen=True, slots=True)
class Band:
    """What a metric usually does in one time slot: ``expected`` within ``low``..``high``.

    ``basis`` says what it was learned from: ``"week"`` (this hour on this weekday),
    ``"day"`` (this hour of the day), ``"recent"`` (the last day or so), ``""`` (nothing).
    """

    low: float
    expected: float
    high: float
    basis: str

    @property
    def seen(self) -> bool:
        """Whether the band comes from this time slot."""
        return self.basis in ("week", "day")


class TrafficBaseline(AnomalyDetector):
    """Novelty of one metric's level, at several time scales and for its time slot.

    Lengths are durations, so one set of defaults serves 5-second samples and
    5-minute ones alike: the sampling interval is learned from the timestamps. Samples
    are gathered into buckets of about ``bucket_ms`` (one sample per bucket when samples
    are that far apart or further); the moving averages, the seasonal smoothing and the
    rest period count whole buckets plus the one being filled.

    Parameters
    ----------
    scales_ms
        Moving-average lengths whose values are checked against the extremes that moving
        average ever had (the sample itself is always checked too).
    bucket_ms
        How much time one bucket of samples covers.
    seasons
        ``(period_ms, slot_ms)`` pairs: 15-minute slots of the day and hours of the
        week by default. A value is unusual for its time if it is for every season in use.
    seasonal_smoothing_ms
        How long a moving average is compared with the slot's level.
    seasonal_rate
        How much one visit of a slot moves its level (an exponential weight per visit).
    seasonal_weight
        Weight of the seasonal evidence against the level evidence.
    seasonal_warmup
        Residuals to see before a season scores; besides, a season scores only once the
        history spans its period (a period longer than a day: two periods).
    rest_ms
        After a detection, a repeat within this time must beat it ``refire_ratio`` times
        to score.
    refire_ratio
        See ``rest_ms``.
    warmup
        Samples learned before any score (score 0 meanwhile), flagged or not.
    quiet_ms, quiet_below
        How long a history must span before any evidence scores, and the evidence that
        scores before that (a jump the size of the range seen so far): the first day of a
        metric establishes its range, and every new high of a rising daily cycle is no
        alert. Flagged points are not learned meanwhile (after ``warmup``).
    learn_recurring
        Whether a point that :meth:`score_learn` would not learn (its evidence reaches
        ``learn_below``) is learned all the same when one was flagged at the same time
        of a previous period (its slot or a neighbour): what recurs daily is normal.
    noise_margin
        When samples come faster than buckets, a sample passes the highest (lowest) value
        ever learned only by more than this many times its noise (the mean absolute
        difference between a sample and the recent level): single fast samples are noisy
        where bucket means are not.
    noise_ms
        How long the recent level, its spread and the noise are averaged over.
    fine_margin
        When samples come faster than buckets, two samples in a row are also checked
        against their time slot's level: unusual when both are further from it than this
        many times the sample noise (as a fraction of the level) plus three times the
        slot's spread.

    Examples
    --------
    A nightly backup that happens every night is normal; the same burst at noon is not.
    (``last_raw`` is the evidence, which lasts as long as the anomaly; the score fires
    once and then only for a point at least ``refire_ratio`` times stronger.)

    >>> m = TrafficBaseline(warmup=0)
    >>> def rate(ts, odd=()):
    ...     hour = (ts % DAY_MS) // HOUR_MS
    ...     return 5_000.0 if hour == 2 or hour in odd else 100.0 + (ts // 60_000) % 5
    >>> for ts in range(0, 10 * DAY_MS, 5 * 60_000):
    ...     m.learn_one({"value": rate(ts), "ts_ms": ts})
    >>> evidence = {}
    >>> for ts in range(10 * DAY_MS, 11 * DAY_MS, 5 * 60_000):
    ...     _ = m.score_learn({"value": rate(ts, odd=(12,)), "ts_ms": ts}, learn_below=0.05)
    ...     hour = (ts % DAY_MS) // HOUR_MS
    ...     evidence[hour] = max(evidence.get(hour, 0.0), m.last_raw)
    >>> evidence[2], evidence[12] > 0.3
    (0.0, True)
    >>> m.band(12 * HOUR_MS).high < 1_000 < m.band(2 * HOUR_MS).expected
    True
    """

    def __init__(
        self,
        scales_ms: Sequence[int] = (30 * MINUTE_MS, 2 * HOUR_MS),
        bucket_ms: int = BUCKET_MS,
        seasons: Sequence[tuple[int, int]] = DEFAULT_SEASONS,
        seasonal_smoothing_ms: int = 30 * MINUTE_MS,
        seasonal_rate: float = 0.15,
        seasonal_weight: float = 0.5,
        seasonal_warmup: int = 288,
        rest_ms: int = 125 * MINUTE_MS,
        refire_ratio: float = 2.0,
        warmup: int = 60,
        learn_recurring: bool = True,
        noise_margin: float = 3.0,
        noise_ms: int = DAY_MS,
        fine_margin: float = 10.0,
        quiet_ms: int = DAY_MS,
        quiet_below: float = 1.0,
    ) -> None:
        self.scales_ms = tuple(scales_ms)
        self.bucket_ms = bucket_ms
        self.seasons = tuple(seasons)
        self.seasonal_smoothing_ms = seasonal_smoothing_ms
        self.seasonal_rate = seasonal_rate
        self.seasonal_weight = seasonal_weight
        self.seasonal_warmup = seasonal_warmup
        self.rest_ms = rest_ms
        self.refire_ratio = refire_ratio
        self.warmup = warmup
        self.learn_recurring = learn_recurring
        self.noise_margin = noise_margin
        self.noise_ms = noise_ms
        self.fine_margin = fine_margin
        self.quiet_ms = quiet_ms
        self.quiet_below = quiet_below
        # The state: a row of a store (its own one-row store, made when first needed, or
        # a row of a partition's store: see on_row).
        self._store: BaselineStore | None = None
        self._row = 0

    @classmethod
    def on_row(cls, store: BaselineStore, row: int) -> TrafficBaseline:
        """The model held in ``row`` of ``store`` (a view: it reads and writes that row).

        Examples
        --------
        >>> store = TrafficBaseline(warmup=3).new_store()
        >>> m = TrafficBaseline.on_row(store, store.add_row())
        >>> m.warmup, m.n_learned
        (3, 0)
        """
        view = cls.__new__(cls)
        view.__dict__.update(store.params)
        view._store, view._row = store, row
        return view

    def new_store(self) -> BaselineStore:
        """An empty store for rows of this model's parameters."""
        return BaselineStore(self._get_params())

    def _state(self) -> tuple[BaselineStore, int]:
        if self._store is None:
            self._store = self.new_store()
            self._row = self._store.add_row()
        return self._store, self._row

    # -- the River contract -------------------------------------------------------------

    def learn_one(self, x: Features) -> None:
        """Learn one point (a counter reset is skipped)."""
        self.score_learn(x, learn_below=math.inf)

    def score_one(self, x: Features) -> float:
        """Anomaly score of one point: 0 for what was seen, ~1 for a range-sized jump."""
        if x.get("counter_reset"):
            return 0.0
        store, row = self._state()
        rows = np.array([row])
        score = store.score_only(rows, np.array([float(x["value"])]), np.array([int(x["ts_ms"])]))
        return float(score[0])

    def score_learn(self, x: Features, learn_below: float = math.inf) -> float:
        """Score ``x``, then learn it if its score is below ``learn_below``; one pass.

        Examples
        --------
        >>> m = TrafficBaseline(warmup=3)
        >>> [round(m.score_learn({"value": v, "ts_ms": i * 300_000}, learn_below=1.0), 3)
        ...  for i, v in enumerate([1, 2, 1, 2, 9, 9])]
        [0.0, 0.0, 0.0, 0.0, 7.0, 0.0]
        >>> m.last_raw, m.n_learned
        (7.0, 4)
        """
        if x.get("counter_reset"):
            return 0.0
        return self.score_learn_value(float(x["value"]), int(x["ts_ms"]), learn_below)

    def score_learn_value(self, value: float, ts_ms: int, learn_below: float = math.inf) -> float:
        """:meth:`score_learn` without the dict (the caller skips counter resets)."""
        store, row = self._state()
        score, _ = store.score_learn(np.array([row]), np.array([value], dtype=np.float64),
                                     np.array([ts_ms], dtype=np.int64), learn_below)  # fmt: skip
        return float(score[0])

    # -- what it knows ------------------------------------------------------------------

    @property
    def last_raw(self) -> float:
        """The evidence of the last :meth:`score_learn` before de-duplication: it stays high
        for as long as an anomaly lasts, where the score fires once."""
        store, row = self._state()
        return store.value("last_raw", row)

    def counts(self, evidence: float, ts_ms: int) -> bool:
        """Whether ``evidence`` at ``ts_ms`` scores: once the history learned spans
        ``quiet_ms``, and before that only from ``quiet_below`` (the evidence,
        :attr:`last_raw`, keeps what is flagged from being learned either way).

        Examples
        --------
        >>> m = TrafficBaseline(quiet_ms=HOUR_MS, quiet_below=1.0)
        >>> m.learn_one({"value": 1.0, "ts_ms": 0})
        >>> m.counts(0.5, HOUR_MS - 1), m.counts(2.0, HOUR_MS - 1), m.counts(0.5, HOUR_MS)
        (False, True, True)
        """
        store, row = self._state()
        return store.counts(row, evidence, ts_ms)

    @property
    def highest(self) -> float:
        """The highest value learned (-inf before any)."""
        store, row = self._state()
        return store.value("hi", row)

    @property
    def n_learned(self) -> int:
        """Points learned so far."""
        store, row = self._state()
        return int(store.value("n", row))

    @property
    def sample_interval_ms(self) -> float:
        """The sampling interval learned from the timestamps (0 before two samples)."""
        store, row = self._state()
        return store.value("dt", row)

    def band(self, ts_ms: int, width: float = 3.0) -> Band:
        """Expected value and band at ``ts_ms``'s slot: the longest period's slot that was
        seen (hour of the week, else of the day), else the recent level; ``width`` times the
        slot's mean absolute deviation either side.

        Examples
        --------
        >>> m = TrafficBaseline()
        >>> m.band(0).seen
        False
        """
        store, row = self._state()
        return band_of(store, row, ts_ms, width)

    def warm_start(self, rows: Iterable[tuple[int, float, float, float]]) -> None:
        """Start warm from stored rollups: ``(slot_start_ms, mean, low, high)`` rows in time
        order (e.g. the ``hour`` table's mean rate, ``rate_min`` and ``rate_max``).

        Examples
        --------
        >>> m = TrafficBaseline(warmup=5)
        >>> m.warm_start([(h * HOUR_MS, 100.0, 80.0, 130.0) for h in range(24 * 8)])
        >>> m.score_one({"value": 120.0, "ts_ms": 24 * 8 * HOUR_MS})
        0.0
        >>> m.score_one({"value": 900.0, "ts_ms": 24 * 8 * HOUR_MS}) > 1
        True
        >>> round(m.band(0).expected)
        100
        """
        store, row = self._state()
        store.warm_start(row, list(rows))

    def accept(self, value: float, ts_ms: int) -> None:
        """Feedback: ``value`` at ``ts_ms`` was normal (an alert marked false positive).
        It is learned, and its slot's band widened so that it falls inside.

        Examples
        --------
        >>> m = TrafficBaseline(warmup=2)
        >>> for i in range(100):
        ...     m.learn_one({"value": 10.0 + i % 2, "ts_ms": i * 60_000})
        >>> m.score_one({"value": 50.0, "ts_ms": 100 * 60_000}) > 0
        True
        >>> m.accept(50.0, 100 * 60_000)
        >>> m.score_one({"value": 50.0, "ts_ms": 100 * 60_000}), m.band(100 * 60_000).high >= 50
        (0.0, True)
        """
        store, row = self._state()
        store.accept(row, value, ts_ms)

    def prior(self) -> TrafficBaseline:
        """A copy of what this model learned, to start a new container of the same image or
        service warm (its recent values and detections are not carried over).

        Examples
        --------
        >>> old = TrafficBaseline(warmup=2)
        >>> for i in range(50):
        ...     old.learn_one({"value": 10.0 + i % 3, "ts_ms": i * 5000})
        >>> new = old.prior()
        >>> usual, odd = {"value": 11.0, "ts_ms": 0}, {"value": 99.0, "ts_ms": 0}
        >>> new.score_one(usual), new.score_one(odd) > 1
        (0.0, True)
        """
        store, row = self._state()
        twin = self.clone()
        mine, at = twin._state()
        mine.copy_row(at, row, source=store)
        mine.forget_recent(at)
        return twin


def band_of(store: BaselineStore, row: int, ts_ms: int, width: float = 3.0) -> Band:
    """The :class:`Band` of ``row`` of ``store`` at ``ts_ms`` (see
    :meth:`TrafficBaseline.band`).

    Examples
    --------
    >>> store = TrafficBaseline().new_store()
    >>> band_of(store, store.add_row(), 0)
    Band(low=0.0, expected=0.0, high=0.0, basis='')
    """
    level, spread, basis = store.band(row, ts_ms)
    return Band(max(0.0, level - width * spread), level, level + width * spread, basis)


def bands_of(
    store: BaselineStore, rows: Ints, ts_ms: Ints, width: float = 3.0
) -> tuple[Floats, Floats]:
    """(low, expected) of :func:`band_of` for each of ``rows`` at its ``ts_ms``, at once.

    Examples
    --------
    >>> store = TrafficBaseline().new_store()
    >>> low, expected = bands_of(store, np.array([store.add_row()]), np.array([0]))
    >>> low.tolist(), expected.tolist()
    ([0.0], [0.0])
    """
    level, spread = store.bands(rows, ts_ms)
    low = level - width * spread
    return np.where(low > 0.0, low, 0.0), level  # max(0.0, low): NaN gives 0.0 as there


class LearningGuard(AnomalyFilter):
    """Do not learn from what is flagged: points scoring ``threshold`` or more are skipped,
    unless ``max_protected_run`` of them came in a row (then the new level is learned).

    Examples
    --------
    >>> g = LearningGuard(TrafficBaseline(warmup=3, rest_ms=0), threshold=0.5)
    >>> for i, v in enumerate([1, 2, 1, 2, 50]):
    ...     g.learn_one({"value": v, "ts_ms": i})
    >>> g.anomaly_detector.n_learned  # the 50 was flagged, not learned
    4
    """

    def __init__(
        self,
        anomaly_detector: AnomalyDetector,
        threshold: float,
        max_protected_run: int = 12,
        protect_anomaly_detector: bool = True,
    ) -> None:
        super().__init__(anomaly_detector, protect_anomaly_detector)
        self.threshold = threshold
        self.max_protected_run = max_protected_run
        self._run = 0

    def classify(self, score: float) -> bool:
        """Whether ``score`` is flagged."""
        return score >= self.threshold

    def learn_one(self, x: Features) -> None:
        """Learn ``x`` unless it is flagged (and the flagged run is still short)."""
        self.score_learn(x)

    def score_learn(self, x: Features) -> float:
        """Score ``x`` and learn it unless flagged; one pass where the detector allows."""
        limit = self.threshold if self._protecting() else math.inf
        det = self.anomaly_detector
        if isinstance(det, TrafficBaseline):
            score = det.score_learn(x, learn_below=limit)
            self._run = self._run + 1 if self.classify(det.last_raw) else 0
            return score
        score = det.score_one(x)
        if score < limit:
            det.learn_one(x)
        self._run = self._run + 1 if self.classify(score) else 0
        return score

    @property
    def n_learned(self) -> int:
        """Points the wrapped detector learned (when it counts them), else -1."""
        return int(getattr(self.anomaly_detector, "n_learned", -1))

    def _protecting(self) -> bool:
        return self.protect_anomaly_detector and self._run < self.max_protected_run
