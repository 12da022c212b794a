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
spans it: the week's after two weeks). When samples come faster than buckets, two more
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

import copy
import math
from array import array
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from river.base import AnomalyDetector, AnomalyFilter

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
WEEK_MS: Final = 7 * DAY_MS
#: 1970-01-01 was a Thursday: shifting by 3 days puts slot 0 of a week on Monday 00:00 UTC.
MONDAY_OFFSET_MS: Final = 3 * DAY_MS

#: Points learned before flags count as events that can recur (the range is still being
#: learned before that).
RECURRING_AFTER: Final = 100

#: What River detectors take: a dict of features.
Features = dict[Hashable, Any]

#: 15-minute slots of the day, hours of the week: a value is unusual for its time
#: if it is for every season that scores (the week's once two weeks were seen).
DEFAULT_SEASONS: Final = ((DAY_MS, 15 * MINUTE_MS), (WEEK_MS, HOUR_MS))
#: Samples are gathered into buckets of this length for the moving averages.
BUCKET_MS: Final = 5 * MINUTE_MS


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


class _Season:
    """Per-slot level (EW mean and mean absolute deviation, float32) of one period."""

    __slots__ = (
        "count", "flagged", "hi", "lo", "mean", "period_ms", "residuals", "slot_ms", "spread",
    )  # fmt: skip

    def __init__(self, period_ms: int, slot_ms: int) -> None:
        n = max(1, period_ms // slot_ms)
        self.period_ms = period_ms
        self.slot_ms = slot_ms
        self.mean = array("f", [math.nan]) * n
        self.spread = array("f", [0.0]) * n
        self.count = array("H", [0]) * n  # samples seen (saturates at 65535)
        self.flagged = array("H", [0]) * n  # 1 + period number of the slot's last flag
        self.lo = math.inf  # extremes of the residuals seen against seen slots
        self.hi = -math.inf
        self.residuals = 0

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for k, v in zip(self.__slots__, state, strict=True):
            setattr(self, k, v)


def _buckets(duration_ms: int, bucket_ms: int) -> int:
    return max(1, round(duration_ms / bucket_ms))


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
        self.fine_margin = fine_margin
        self.quiet_ms = quiet_ms
        self.quiet_below = quiet_below
        self._rel_noise = 0.0
        self._fine_pending = 0.0  # the fine excess of the sample being scored
        self._fine_last = 0.0  # and of the one before
        self.noise_margin = noise_margin
        self.noise_ms = noise_ms
        self._noise = 0.0
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
        # Moving averages over m buckets: the last m - 1 full buckets and the one filling.
        lengths = (*self.scales_ms, seasonal_smoothing_ms)
        self._ms = sorted({_buckets(d, bucket_ms) for d in lengths})
        self._scale_at = [self._ms.index(_buckets(d, bucket_ms)) for d in self.scales_ms]
        self._smooth_at = self._ms.index(_buckets(seasonal_smoothing_ms, bucket_ms))
        self._rest = _buckets(rest_ms, bucket_ms) if rest_ms > 0 else 0
        self._depth = max(*self._ms, self._rest, 1)
        self._sums = array("d", [0.0]) * self._depth  # full buckets, newest at _pos
        self._counts = array("H", [0]) * self._depth
        self._peaks = array("f", [0.0]) * self._depth  # highest raw evidence of each
        self._tails = array("d", [0.0]) * len(self._ms)  # sums of the last m - 1 buckets
        self._tail_n = array("l", [0]) * len(self._ms)
        self._pos = -1
        self._filled = 0  # full buckets in the ring (a prior or a warm start has none)
        self._bucket_sum = 0.0  # the bucket being filled
        self._bucket_n = 0
        self._bucket_peak = 0.0
        self._n = 0  # values learned
        self._lo = math.inf  # the metric's own extremes: the unit of every excess
        self._hi = -math.inf
        self._scale_lo = array("d", [math.inf]) * len(self.scales_ms)
        self._scale_hi = array("d", [-math.inf]) * len(self.scales_ms)
        self._seasons = [_Season(p, s) for p, s in self.seasons]
        self._by_period = sorted(self._seasons, key=lambda s: -s.period_ms)  # for bands
        self._first_ts_ms: int | None = None  # of the history learned
        self._last_ts_ms: int | None = None
        self._last_raw = 0.0
        self._dt_ms = 0.0  # typical sampling interval
        self._k = 1  # samples per bucket at that interval
        self._mean = math.nan  # recent level and spread, the band's fallback
        self._spread = 0.0

    # -- the River contract -------------------------------------------------------------

    def learn_one(self, x: Features) -> None:
        """Learn one point (a counter reset is skipped)."""
        self.score_learn(x, learn_below=math.inf)

    def score_one(self, x: Features) -> float:
        """Anomaly score of one point: 0 for what was seen, ~1 for a range-sized jump."""
        if x.get("counter_reset") or self._n < max(self.warmup, 1):
            return 0.0
        value, ts_ms = float(x["value"]), int(x["ts_ms"])
        raw = self._raw(value, ts_ms, self._averages(value))
        return self._suppressed(raw) if self.counts(raw, ts_ms) else 0.0

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
        averages = self._averages(value)
        raw = self._raw(value, ts_ms, averages) if self._n else 0.0
        warm = self._n >= max(self.warmup, 1)
        score = self._suppressed(raw) if warm and self.counts(raw, ts_ms) else 0.0
        self._last_raw = raw if warm else 0.0
        # Flagged means the evidence itself, not the de-duplicated score: a burst's later
        # samples are not learned either.
        if self._last_raw < learn_below or self._recurring_flag(ts_ms):
            self._learn(value, ts_ms, averages)
        self._push(value, ts_ms, raw)
        return score

    # -- scoring ------------------------------------------------------------------------

    def _averages(self, value: float) -> list[float | None]:
        """Moving average over m buckets with ``value`` added, for every m in use (None
        where fewer than m - 1 full buckets were seen yet)."""
        filled, s, n = self._filled, self._bucket_sum + value, self._bucket_n + 1
        tails, tail_n = self._tails, self._tail_n
        return [
            (tails[j] + s) / (tail_n[j] + n) if filled >= m - 1 else None
            for j, m in enumerate(self._ms)
        ]

    def _raw(self, value: float, ts_ms: int, averages: list[float | None]) -> float:
        lo, hi = self._lo, self._hi
        span = hi - lo
        if not span > 0:
            return 0.0 if value == hi or self._n == 0 else 1.0
        # A single sample finer than a bucket carries noise the bucket's mean does not:
        # it must pass the record by that noise, noise_margin times over.
        margin = self.noise_margin * self._noise if self._k > 1 else 0.0
        raw = (
            (value - hi - margin) / span if value > hi + margin
            else (lo - margin - value) / span if value < lo - margin
            else 0.0
        )  # fmt: skip
        lows, highs = self._scale_lo, self._scale_hi
        for i, j in enumerate(self._scale_at):
            v = averages[j]
            if v is None or highs[i] < lows[i]:  # no average of this length learned yet
                continue
            if v > highs[i]:
                raw = max(raw, (v - highs[i]) / span)
            elif v < lows[i]:
                raw = max(raw, (lows[i] - v) / span)
        if self._seasons:
            slots = self._slots_on(ts_ms)
            seasonal = self._seasonal_excess(averages[self._smooth_at], slots, span)
            if seasonal is not None:
                raw = max(raw, self.seasonal_weight * seasonal)
            if self._k > 1:
                # Two samples in a row (a single fast sample is too noisy to tell).
                fine = self._fine_excess(value, slots, span)
                self._fine_pending = fine
                raw = max(raw, self.seasonal_weight * min(fine, self._fine_last))
        return min(raw, 1e3)

    def _slots_on(self, ts_ms: int) -> list[tuple[_Season, int, float]]:
        """The slot of ``ts_ms`` in every season that scores and has a level there."""
        out = []
        for s in self._seasons:
            i = slot_of(ts_ms, s.period_ms, s.slot_ms)
            level = s.mean[i]
            if not math.isnan(level) and self._season_on(s, ts_ms):
                out.append((s, i, level))
        return out

    def _fine_excess(self, v: float, slots: list[tuple[_Season, int, float]], span: float) -> float:
        """A fast sample against its slot's level: unusual when further from it than
        ``fine_margin`` times the sample noise at that level plus three times the slot's
        spread. It scores when two samples in a row are (a burst of a few seconds at a
        quiet hour, which no average shows)."""
        noise = self.fine_margin * self._rel_noise
        return min(
            (max(0.0, abs(v - level) - noise * abs(level) - 3.0 * s.spread[i]) / span
             for s, i, level in slots),
            default=0.0,
        )  # fmt: skip

    def _season_on(self, s: _Season, ts_ms: int) -> bool:
        """Whether ``s`` has seen enough residuals and history to score."""
        if s.residuals < self.seasonal_warmup or self._first_ts_ms is None:
            return False
        needed = s.period_ms if s.period_ms <= DAY_MS else 2 * s.period_ms
        return ts_ms - self._first_ts_ms >= needed

    @staticmethod
    def _seasonal_excess(
        v: float | None, slots: list[tuple[_Season, int, float]], span: float
    ) -> float | None:
        if v is None or not slots:
            return None
        return min(
            (v - level - s.hi) / span if v - level > s.hi
            else (s.lo - v + level) / span if v - level < s.lo
            else 0.0
            for s, _, level in slots
        )  # fmt: skip

    def _suppressed(self, raw: float) -> float:
        if raw <= 0.0:
            return 0.0
        if self._rest > 0:
            filled = min(self._filled, self._rest)
            recent = max(self._peaks[(self._pos - i) % self._depth] for i in range(filled)) \
                if filled else 0.0  # fmt: skip
            if self.refire_ratio * max(recent, self._bucket_peak) >= raw:
                return 0.0
        return raw

    def _recurring_flag(self, ts_ms: int) -> bool:
        """Whether a point flagged now was flagged at this time of a previous period too
        (this slot or a neighbour): a recurring event (a nightly job) is learned, not
        protected against. Marks the slot either way."""
        if not self.learn_recurring or self._n < RECURRING_AFTER:
            return False  # what is flagged while the range is still being learned is no event
        shifted = ts_ms + MONDAY_OFFSET_MS
        seen = False
        for s in self._seasons:
            n = len(s.flagged)
            i = (shifted % s.period_ms) // s.slot_ms
            mark = min(shifted // s.period_ms, 0xFFFE) + 1
            if n > 2 and any(0 < s.flagged[j % n] < mark for j in (i - 1, i, i + 1)):
                seen = True
            s.flagged[i] = mark
        return seen

    # -- learning -----------------------------------------------------------------------

    def _learn(self, value: float, ts_ms: int, averages: list[float | None]) -> None:
        lows, highs = self._scale_lo, self._scale_hi
        for i, j in enumerate(self._scale_at):
            v = averages[j]
            if v is not None:
                if v < lows[i]:
                    lows[i] = v
                if v > highs[i]:
                    highs[i] = v
        if value < self._lo:
            self._lo = value
        if value > self._hi:
            self._hi = value
        if self._first_ts_ms is None:
            self._first_ts_ms = ts_ms
        smooth = averages[self._smooth_at]
        # Until the smoothing length is filled, the recent level is the mean of all so far.
        level = smooth if smooth is not None else self._history_mean(value)
        # Recent level, spread and noise: plain means until noise_ms of samples, then
        # exponential over noise_ms.
        a = min(1.0, max((self._dt_ms or self.bucket_ms) / self.noise_ms, 1 / (self._n + 1)))
        self._noise += a * (abs(value - level) - self._noise)
        if level != 0.0:
            self._rel_noise += a * (abs(value - level) / abs(level) - self._rel_noise)
        self._learn_recent(level, a)
        if smooth is not None:
            self._learn_seasons(smooth, ts_ms)
        self._n += 1

    def _history_mean(self, value: float) -> float:
        depth, filled = self._depth, self._filled
        total = self._bucket_sum + value + sum(self._sums[(self._pos - i) % depth]
                                               for i in range(filled))  # fmt: skip
        n = self._bucket_n + 1 + sum(self._counts[(self._pos - i) % depth] for i in range(filled))
        return total / n

    def _learn_recent(self, v: float, a: float) -> None:
        if math.isnan(self._mean):
            self._mean = v
        else:
            self._spread += a * (abs(v - self._mean) - self._spread)
            self._mean += a * (v - self._mean)

    def _push(self, value: float, ts_ms: int, raw: float) -> None:
        """The input window moves on whether or not the point was learned."""
        if self._last_ts_ms is not None and ts_ms > self._last_ts_ms:
            dt = float(ts_ms - self._last_ts_ms)
            if self._dt_ms == 0:
                self._dt_ms = dt
            elif dt < 4 * self._dt_ms:  # a gap (nettel or the container was down) is no rate
                self._dt_ms += 0.05 * (dt - self._dt_ms)
            self._k = max(1, round(self.bucket_ms / self._dt_ms))
        self._last_ts_ms = ts_ms
        self._fine_last, self._fine_pending = self._fine_pending, 0.0
        self._bucket_sum += value
        self._bucket_n += 1
        if raw > self._bucket_peak:
            self._bucket_peak = min(raw, 1e30)
        if self._bucket_n >= self._k:
            self._close_bucket()

    def _close_bucket(self) -> None:
        depth, sums, counts = self._depth, self._sums, self._counts
        s, n = self._bucket_sum, min(self._bucket_n, 0xFFFF)
        for j, m in enumerate(self._ms):
            if m > 1:
                tail, tail_n = self._tails[j] + s, self._tail_n[j] + n
                if self._filled >= m - 1:
                    leaving = (self._pos - (m - 2)) % depth
                    tail -= sums[leaving]
                    tail_n -= counts[leaving]
                self._tails[j], self._tail_n[j] = tail, tail_n
        self._pos = (self._pos + 1) % depth
        sums[self._pos], counts[self._pos] = s, n
        self._peaks[self._pos] = self._bucket_peak
        self._filled = min(self._filled + 1, depth)
        self._bucket_sum, self._bucket_n, self._bucket_peak = 0.0, 0, 0.0
        if self._pos == 0:  # once per turn of the ring, sum afresh (no drift)
            self._resum()

    def _resum(self) -> None:
        for j, m in enumerate(self._ms):
            k = min(self._filled, m - 1)
            at = [(self._pos - i) % self._depth for i in range(k)]
            self._tails[j] = sum(self._sums[i] for i in at)
            self._tail_n[j] = sum(self._counts[i] for i in at)

    def _learn_seasons(self, v: float, ts_ms: int) -> None:
        dt = self._dt_ms or float(self.seasons[0][1] if self.seasons else MINUTE_MS)
        shifted = ts_ms + MONDAY_OFFSET_MS
        for s in self._seasons:
            i = (shifted % s.period_ms) // s.slot_ms
            level = s.mean[i]
            count = s.count[i]
            if count < 0xFFFF:
                count += 1
                s.count[i] = count
            if level != level:  # NaN: the slot's first sample
                s.mean[i] = v
                continue
            d = v - level
            s.residuals += 1
            if d < s.lo:
                s.lo = d
            if d > s.hi:
                s.hi = d
            # One visit of the slot (slot_ms of samples) moves the level by seasonal_rate.
            # Until then (a slot's first visit), its level is the plain mean of its samples.
            r = self.seasonal_rate * min(dt, s.slot_ms) / s.slot_ms
            if r < 1.0 / count:
                r = 1.0 / count
            if r > 1.0:
                r = 1.0
            s.mean[i] = level + r * d
            s.spread[i] += r * ((d if d >= 0 else -d) - s.spread[i])

    # -- what it knows ------------------------------------------------------------------

    @property
    def last_raw(self) -> float:
        """The evidence of the last :meth:`score_learn` before de-duplication: it stays high
        for as long as an anomaly lasts, where the score fires once."""
        return self._last_raw

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
        if evidence >= self.quiet_below:
            return True
        return self._first_ts_ms is not None and ts_ms - self._first_ts_ms >= self.quiet_ms

    @property
    def highest(self) -> float:
        """The highest value learned (-inf before any)."""
        return self._hi

    @property
    def n_learned(self) -> int:
        """Points learned so far."""
        return self._n

    @property
    def sample_interval_ms(self) -> float:
        """The sampling interval learned from the timestamps (0 before two samples)."""
        return self._dt_ms

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
        shifted = ts_ms + MONDAY_OFFSET_MS
        for s in self._by_period:
            i = (shifted % s.period_ms) // s.slot_ms
            level = float(s.mean[i])
            if not math.isnan(level):
                spread = max(float(s.spread[i]), self._spread * 0.25)
                basis = (
                    "week" if s.period_ms == WEEK_MS else "day" if s.period_ms == DAY_MS else "slot"
                )
                return Band(max(0.0, level - width * spread), level, level + width * spread,
                            basis)  # fmt: skip
        if math.isnan(self._mean):
            return Band(0.0, 0.0, 0.0, "")
        return Band(max(0.0, self._mean - width * self._spread), self._mean,
                    self._mean + width * self._spread, "recent")  # fmt: skip

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
        for start_ms, mean, low, high in rows:
            self._lo = min(self._lo, low)
            self._hi = max(self._hi, high)
            for i in range(len(self.scales_ms)):
                self._scale_lo[i] = min(self._scale_lo[i], low)
                self._scale_hi[i] = max(self._scale_hi[i], high)
            if self._first_ts_ms is None:
                self._first_ts_ms = start_ms
            saved = self._dt_ms
            for s in self._seasons:
                if s.residuals < self.seasonal_warmup:
                    s.residuals = self.seasonal_warmup
            self._dt_ms = float(min(s.slot_ms for s in self._seasons) if self._seasons else HOUR_MS)
            self._learn_recent(mean, min(1.0, self._dt_ms / self.noise_ms))
            self._learn_seasons(mean, start_ms)
            for s in self._seasons:
                s.lo = min(s.lo, low - mean)
                s.hi = max(s.hi, high - mean)
            self._dt_ms = saved
            self._n = max(self._n, self.warmup)

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
        for i in range(len(self.scales_ms)):
            self._scale_lo[i] = min(self._scale_lo[i], value)
            self._scale_hi[i] = max(self._scale_hi[i], value)
        self._lo, self._hi = min(self._lo, value), max(self._hi, value)
        shifted = ts_ms + MONDAY_OFFSET_MS
        for s in self._seasons:
            i = (shifted % s.period_ms) // s.slot_ms
            level = float(s.mean[i])
            if level != level:
                s.mean[i] = level = value
            d = value - level
            s.lo, s.hi = min(s.lo, d), max(s.hi, d)
            s.spread[i] = max(float(s.spread[i]), 1.01 * abs(d) / 3.0)  # float32: a margin

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
        twin = copy.deepcopy(self)
        twin._peaks = array("f", [0.0]) * self._depth
        twin._last_ts_ms = None
        twin._filled = 0
        twin._pos = -1
        twin._tails = array("d", [0.0]) * len(twin._ms)
        twin._tail_n = array("l", [0]) * len(twin._ms)
        twin._bucket_sum, twin._bucket_n, twin._bucket_peak = 0.0, 0, 0.0
        twin._fine_pending = twin._fine_last = 0.0
        return twin


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
