"""Every metric of one container, scored and learned from each of its events.

:func:`event_features` turns a :class:`~nettel.models.StatEvent` into the metrics the
detector watches (per-second rates of the counters, the gauges as they are);
:class:`ContainerDetector` keeps one :class:`~nettel.detect.baseline.TrafficBaseline`
per metric, protected from learning what it flags, with a minimum-volume guard, and
says what each metric usually does at any hour of the week.

Examples
--------
>>> from nettel.models import StatEvent, TcpStates
>>> ev = StatEvent(ts_ms=10_000, host="h", container_id="c", identity="web", name="web",
...                interval_ms=5000, rx_bytes=5000, tx_bytes=10_000, rx_errors=1,
...                connections=3, tcp=TcpStates(established=2, time_wait=1))
>>> f = event_features(ev)
>>> f["rx_bytes"], f["tx_bytes"], f["errors"], f["established"], f["ts_ms"]
(1000.0, 2000.0, 0.2, 2.0, 10000)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Final

from river.base import AnomalyDetector

from nettel.detect.baseline import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    Band,
    Features,
    TrafficBaseline,
)
from nettel.models import StatEvent

#: Rates per second derived from the event's counters.
RATE_METRICS: Final = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "errors", "drops")
#: Gauges: sockets at sample time.
GAUGE_METRICS: Final = ("connections", "syn_recv", "time_wait", "close_wait", "established")
METRICS: Final = RATE_METRICS + GAUGE_METRICS

#: How each metric is written in explanations.
UNITS: Final = {m: f"{m}/s" for m in RATE_METRICS} | {m: m for m in GAUGE_METRICS}

#: Below these values (and expected below them too) nothing is an anomaly.
DEFAULT_MIN_VOLUME: Final = {
    "rx_bytes": 10_240.0, "tx_bytes": 10_240.0, "rx_packets": 20.0, "tx_packets": 20.0,
    "errors": 1.0, "drops": 5.0, "connections": 10.0, "syn_recv": 10.0,
    "time_wait": 20.0, "close_wait": 10.0, "established": 10.0,
}  # fmt: skip


def event_features(ev: StatEvent) -> Features:
    """The watched metrics of one event, with ``ts_ms`` and ``counter_reset``."""
    seconds = ev.interval_ms / 1000 if ev.interval_ms > 0 else 1.0
    x: Features = {
        "ts_ms": ev.ts_ms,
        "counter_reset": ev.counter_reset,
        "catch_up": ev.catch_up,
        "rx_bytes": ev.rx_bytes / seconds,
        "tx_bytes": ev.tx_bytes / seconds,
        "rx_packets": ev.rx_packets / seconds,
        "tx_packets": ev.tx_packets / seconds,
        "errors": (ev.rx_errors + ev.tx_errors) / seconds,
        "drops": (ev.rx_drops + ev.tx_drops) / seconds,
    }
    if ev.connections is not None:
        x["connections"] = float(ev.connections)
    if ev.tcp is not None:
        x["syn_recv"] = float(ev.tcp.syn_recv)
        x["time_wait"] = float(ev.tcp.time_wait)
        x["close_wait"] = float(ev.tcp.close_wait)
        x["established"] = float(ev.tcp.established)
    return x


class MetricScore:
    """One metric of one event: its value, anomaly score, lasting evidence and band (the
    band is computed when first asked for: most points never need it)."""

    __slots__ = ("_band", "_model", "_ts_ms", "evidence", "metric", "score", "value")

    def __init__(self, metric: str, value: float, score: float, evidence: float,
                 band: Band | None = None, model: TrafficBaseline | None = None,
                 ts_ms: int = 0) -> None:  # fmt: skip
        self.metric = metric
        self.value = value
        self.score = score
        self.evidence = evidence
        self._band = band
        self._model = model
        self._ts_ms = ts_ms

    @property
    def band(self) -> Band:
        """What the metric usually does at this hour."""
        if self._band is None:
            model = self._model
            self._band = model.band(self._ts_ms) if model else Band(0.0, 0.0, 0.0, "")
        return self._band

    def __repr__(self) -> str:
        return (f"MetricScore({self.metric!r}, value={self.value}, score={self.score}, "
                f"evidence={self.evidence})")  # fmt: skip


#: The evidence (a value's excess as a fraction of the metric's range) at which the service
#: alerts. Every score and evidence :class:`ContainerDetector` gives is divided by it, so
#: 1.0 is an alert (:class:`~nettel.detect.alerts.AlertTracker`'s ``open_at``). Chosen on
#: the NAB dev corpus (``python -m bench.nab``: NAB's standard-profile optimum, rounded).
SHIPPED_THRESHOLD: Final = 0.015
#: Evidence (same unit as above, before the division) from which a point is not learned.
GUARD_THRESHOLD: Final = 1.0


def make_detector(*, sensitivity: float = 1.0, warmup: int | None = None) -> ContainerDetector:
    """The detector of one container, as ``nettel up``, ``nettel detect`` and the NAB bench
    build it: one :class:`~nettel.detect.baseline.TrafficBaseline` per metric with its
    defaults (lengths are durations, the sampling interval is learned from the data),
    alerting at :data:`SHIPPED_THRESHOLD`.

    ``sensitivity`` scales what alerts (2.0: evidence half the shipped threshold already
    alerts); ``warmup`` is the samples learned before any score (tests with few samples).

    Examples
    --------
    >>> make_detector()._get_params() == make_detector()._get_params()
    True
    >>> make_detector(sensitivity=2.0).alert_threshold == SHIPPED_THRESHOLD / 2
    True
    """
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity}")
    # No template by default: each metric's model is a TrafficBaseline() with its defaults
    # (a template object would be held, unused, by every container).
    baseline = None if warmup is None else TrafficBaseline(warmup=warmup)
    return ContainerDetector(baseline=baseline, alert_threshold=SHIPPED_THRESHOLD / sensitivity)


class ContainerDetector(AnomalyDetector):
    """Scores every metric of a container's events against its own baselines.

    Parameters
    ----------
    baseline
        The model cloned for each metric (``TrafficBaseline()`` by default).
    alert_threshold
        Evidence that means "alert": scores and evidence are given in multiples of it.
    guard_threshold
        Evidence (before the division) from which a metric's point is flagged and not
        learned.
    protected_ms, protected_samples
        How long a metric keeps not learning flagged points in a row (both this time and
        this many samples); after that it learns its new level anyway.
    min_volume
        Per metric: when neither the value nor its expected value reach it, the score
        is 0 (low-traffic noise is not an anomaly). Metrics not named have none.

    ``score_one`` is the largest metric score; :meth:`update` scores and learns in one
    pass and gives every metric's :class:`MetricScore`; :meth:`update_metric` does it for
    one metric of any name (the NAB bench feeds its series that way).

    Examples
    --------
    >>> det = ContainerDetector(baseline=TrafficBaseline(warmup=5))
    >>> for i in range(100):
    ...     det.learn_one({"ts_ms": i * 5000, "rx_bytes": 50_000.0 + i % 9 * 1000})
    >>> det.score_one({"ts_ms": 500_000, "rx_bytes": 55_000.0})
    0.0
    >>> det.score_one({"ts_ms": 500_000, "rx_bytes": 1_000_000.0}) > 10
    True
    >>> det.score_one({"ts_ms": 500_000, "rx_bytes": 55_000.0, "counter_reset": True})
    0.0
    >>> det.score_one({"ts_ms": 500_000, "rx_bytes": 1_000_000.0, "catch_up": True})
    0.0
    >>> det.update({"ts_ms": 500_000, "rx_bytes": 1_000_000.0, "catch_up": True})
    {}
    """

    def __init__(
        self,
        baseline: TrafficBaseline | None = None,
        alert_threshold: float = SHIPPED_THRESHOLD,
        guard_threshold: float = GUARD_THRESHOLD,
        protected_ms: int = 15 * MINUTE_MS,
        protected_samples: int = 3,
        min_volume: Mapping[str, float] | None = None,
    ) -> None:
        self.baseline = baseline
        self.alert_threshold = alert_threshold
        self.guard_threshold = guard_threshold
        self.protected_ms = protected_ms
        self.protected_samples = protected_samples
        self.min_volume = dict(DEFAULT_MIN_VOLUME if min_volume is None else min_volume)
        self._models: dict[str, TrafficBaseline] = {}
        # Per metric: when its run of flagged points began (-1: none) and how long it is.
        self._flagged_since: dict[str, int] = {}
        self._flagged_run: dict[str, int] = {}

    def _model(self, metric: str) -> TrafficBaseline:
        m = self._models.get(metric)
        if m is None:
            template = self.baseline if self.baseline is not None else TrafficBaseline()
            m = self._models[metric] = template.clone()
            self._flagged_since[metric] = -1
            self._flagged_run[metric] = 0
        return m

    def learn_one(self, x: Features) -> None:
        """Learn every metric of ``x`` (unless flagged; a counter reset is skipped)."""
        self.update(x)

    def score_one(self, x: Features) -> float:
        """The largest metric score of ``x``."""
        return max((s.score for s in self.score_metrics(x).values()), default=0.0)

    def score_metrics(self, x: Features) -> dict[str, MetricScore]:
        """Every metric's score of ``x``, learning nothing."""
        out: dict[str, MetricScore] = {}
        if x.get("counter_reset") or x.get("catch_up"):
            return out
        ts_ms = int(x["ts_ms"])
        unit = self.alert_threshold
        for metric in METRICS:
            if metric in x and metric in self._models:
                model = self._models[metric]
                value = float(x[metric])
                score = model.score_one({"value": value, "ts_ms": ts_ms}) / unit
                out[metric] = self._guarded(metric, value, score, score, model.band(ts_ms))
        return out

    def update(self, x: Features) -> dict[str, MetricScore]:
        """Score every metric of ``x``, then learn those not flagged; one pass.

        A counter reset (restart) is neither scored nor learned: it is never a spike; nor
        is a catch-up (a gap after nettel's restart, counted over its real interval).
        """
        out: dict[str, MetricScore] = {}
        if x.get("counter_reset") or x.get("catch_up"):
            return out
        ts_ms = int(x["ts_ms"])
        for metric in METRICS:
            if metric in x:
                out[metric] = self.update_metric(metric, float(x[metric]), ts_ms)
        return out

    def update_metric(self, metric: str, value: float, ts_ms: int) -> MetricScore:
        """Score one metric's value, then learn it unless flagged; one pass.

        Examples
        --------
        >>> det = make_detector(warmup=3)
        >>> [round(det.update_metric("cpu", v, i * 300_000).score, 1)
        ...  for i, v in enumerate([10, 20, 10, 20, 90])]
        [0.0, 0.0, 0.0, 0.0, 466.7]
        """
        model = self._model(metric)
        since, run = self._flagged_since[metric], self._flagged_run[metric]
        protect = since < 0 or run < self.protected_samples or ts_ms - since < self.protected_ms
        limit = self.guard_threshold if protect else math.inf
        floor = self.min_volume.get(metric, 0.0)
        # Below the floor, and never above it (no band needed) or not expected above it.
        quiet = (
            floor > 0
            and value < floor
            and (model.highest < floor or model.band(ts_ms).expected < floor)
        )
        unit = self.alert_threshold
        score = model.score_learn_value(value, ts_ms, learn_below=limit) / unit
        raw = model.last_raw
        if raw < self.guard_threshold:
            self._flagged_since[metric], self._flagged_run[metric] = -1, 0
        else:
            self._flagged_since[metric] = ts_ms if since < 0 else since
            self._flagged_run[metric] = run + 1
        if quiet or not model.counts(raw, ts_ms):
            return MetricScore(metric, value, 0.0, 0.0, None, model, ts_ms)
        return MetricScore(metric, value, score, raw / unit, None, model, ts_ms)

    def _guarded(
        self, metric: str, value: float, score: float, evidence: float, band: Band
    ) -> MetricScore:
        floor = self.min_volume.get(metric, 0.0)
        if value < floor and band.expected < floor:
            score = evidence = 0.0
        return MetricScore(metric, value, score, evidence, band)

    def band(self, metric: str, ts_ms: int) -> Band:
        """What ``metric`` usually does at ``ts_ms``'s hour of the week."""
        model = self._models.get(metric)
        return model.band(ts_ms) if model is not None else Band(0.0, 0.0, 0.0, "")

    def weekly_bands(self, metric: str, week_start_ms: int = 4 * DAY_MS) -> list[Band]:
        """The expected band of ``metric`` for each of the 168 hours of a week, from
        Monday 00:00 UTC (``week_start_ms`` is any Monday 00:00 UTC).

        Examples
        --------
        >>> len(ContainerDetector().weekly_bands("rx_bytes"))
        168
        """
        return [self.band(metric, week_start_ms + h * HOUR_MS + HOUR_MS // 2) for h in range(168)]

    @property
    def n_learned(self) -> int:
        """Metric points learned so far, over all metrics."""
        return sum(m.n_learned for m in self._models.values())

    @property
    def metrics(self) -> list[str]:
        """The metrics seen so far."""
        return list(self._models)

    def warm_start(self, metric: str, rows: Iterable[tuple[int, float, float, float]]) -> None:
        """Seed ``metric`` from stored hourly rollups ``(hour_start_ms, mean, low, high)``."""
        self._model(metric).warm_start(rows)

    def false_positive(self, metric: str, ts_ms: int, value: float) -> None:
        """Feedback on an alert: ``value`` of ``metric`` at ``ts_ms`` was normal; the band
        of that metric at that hour widens to hold it."""
        self._model(metric).accept(value, ts_ms)

    def prior(self) -> ContainerDetector:
        """What this container learned, to start a new container of the same image or
        compose service warm.

        Examples
        --------
        >>> a = ContainerDetector(baseline=TrafficBaseline(warmup=5))
        >>> for i in range(50):
        ...     a.learn_one({"ts_ms": i * 5000, "tx_bytes": 40_000.0 + i % 4 * 100})
        >>> b = a.prior()
        >>> b.score_one({"ts_ms": 0, "tx_bytes": 40_100.0}), b.metrics
        (0.0, ['tx_bytes'])
        """
        twin = copy.copy(self)
        twin._models = {k: m.prior() for k, m in self._models.items()}
        twin._flagged_since = dict.fromkeys(self._models, -1)
        twin._flagged_run = dict.fromkeys(self._models, 0)
        return twin
