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
    WEEK_MS,
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


def service_baseline() -> TrafficBaseline:
    """The per-metric baseline the service uses for 5-second samples: hour of day and
    hour of week, a slot's usual spread as its band, one minute of smoothing, and the
    seasonal evidence in multiples of what the hour usually does.

    Examples
    --------
    >>> service_baseline().seasons == ((DAY_MS, HOUR_MS), (WEEK_MS, HOUR_MS))
    True
    """
    return TrafficBaseline(
        seasons=((DAY_MS, HOUR_MS), (WEEK_MS, HOUR_MS)),
        seasonal_width=4.0,
        seasonal_relative=True,
        seasonal_weight=1.0,
        warmup=60,
    )


class ContainerDetector(AnomalyDetector):
    """Scores every metric of a container's events against its own baselines.

    Parameters
    ----------
    baseline
        The model cloned for each metric (:func:`service_baseline` by default).
    threshold
        Evidence from which a metric's point is flagged and not learned.
    max_protected_run
        Flagged points in a row after which a metric learns its new level anyway.
    min_volume
        Per metric: when neither the value nor its expected value reach it, the score
        is 0 (low-traffic noise is not an anomaly).

    ``score_one`` is the largest metric score; :meth:`update` scores and learns in one
    pass and gives every metric's :class:`MetricScore`.

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
        threshold: float = 1.0,
        max_protected_run: int = 60,
        min_volume: Mapping[str, float] | None = None,
    ) -> None:
        self.baseline = baseline
        self.threshold = threshold
        self.max_protected_run = max_protected_run
        self.min_volume = dict(DEFAULT_MIN_VOLUME if min_volume is None else min_volume)
        self._models: dict[str, TrafficBaseline] = {}
        self._runs: dict[str, int] = {}

    def _model(self, metric: str) -> TrafficBaseline:
        m = self._models.get(metric)
        if m is None:
            template = self.baseline if self.baseline is not None else service_baseline()
            m = self._models[metric] = template.clone()
            self._runs[metric] = 0
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
        for metric in METRICS:
            if metric in x and metric in self._models:
                model = self._models[metric]
                value = float(x[metric])
                score = model.score_one({"value": value, "ts_ms": ts_ms})
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
            if metric not in x:
                continue
            value = float(x[metric])
            model = self._model(metric)
            protect = self._runs[metric] < self.max_protected_run
            limit = self.threshold if protect else math.inf
            # The band the value is judged against, before it is learned (when needed).
            floor = self.min_volume.get(metric, 0.0)
            # Below the floor, and never above it (no band needed) or not expected above it.
            quiet = value < floor and (model.highest < floor or model.band(ts_ms).expected < floor)
            score = model.score_learn_value(value, ts_ms, learn_below=limit)
            evidence = model.last_raw
            self._runs[metric] = self._runs[metric] + 1 if evidence >= self.threshold else 0
            if quiet:
                score = evidence = 0.0
            out[metric] = MetricScore(metric, value, score, evidence, None, model, ts_ms)
        return out

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
        twin._runs = dict.fromkeys(self._models, 0)
        return twin
