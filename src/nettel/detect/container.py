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
from collections.abc import Iterable, Mapping
from typing import Final

import numpy as np
import numpy.typing as npt
from river.base import AnomalyDetector

from nettel.detect.baseline import (
    DAY_MS,
    HOUR_MS,
    MINUTE_MS,
    Band,
    Features,
    TrafficBaseline,
    band_of,
)
from nettel.detect.store import BaselineStore, row_index
from nettel.models import StatEvent

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

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

    __slots__ = ("_band", "_model", "_row", "_store", "_ts_ms", "evidence", "metric", "score",
                 "value")  # fmt: skip

    def __init__(self, metric: str, value: float, score: float, evidence: float,
                 band: Band | None = None, model: TrafficBaseline | None = None,
                 ts_ms: int = 0, store: BaselineStore | None = None,
                 row: int = -1) -> None:  # fmt: skip
        self.metric = metric
        self.value = value
        self.score = score
        self.evidence = evidence
        self._band = band
        self._model = model
        self._ts_ms = ts_ms
        self._store = store
        self._row = row

    @property
    def band(self) -> Band:
        """What the metric usually does at this hour."""
        if self._band is None:
            if self._store is not None:
                self._band = band_of(self._store, self._row, self._ts_ms)
            elif self._model is not None:
                self._band = self._model.band(self._ts_ms)
            else:
                self._band = Band(0.0, 0.0, 0.0, "")
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
        # Each metric's model is a row of a store: the detector's own (made when first
        # needed) or its partition's (FleetDetector.attach).
        self._store: BaselineStore | None = None
        self._rows: dict[str, int] = {}
        self._row_sets: dict[int, list[int]] = {}  # rows_for's, by the set's length

    def new_store(self) -> BaselineStore:
        """An empty store for models of this detector's baseline parameters."""
        template = self.baseline if self.baseline is not None else TrafficBaseline()
        return template.new_store()

    @property
    def store(self) -> BaselineStore:
        """The store holding this detector's models."""
        if self._store is None:
            self._store = self.new_store()
        return self._store

    def attach(self, store: BaselineStore) -> None:
        """Keep this detector's models in ``store`` (a partition's), before it has any."""
        if self._rows:
            raise ValueError("attach a detector to a store before it learns anything")
        self._store = store

    def row(self, metric: str) -> int:
        """The store row of ``metric``'s model (made when first needed)."""
        row = self._rows.get(metric)
        if row is None:
            row = self._rows[metric] = self.store.add_row()
        return row

    def rows_for(self, metrics: tuple[str, ...]) -> list[int]:
        """The rows of ``metrics`` (one of a few fixed sets, told apart by length)."""
        rows = self._row_sets.get(len(metrics))
        if rows is None:
            rows = self._row_sets[len(metrics)] = [self.row(m) for m in metrics]
        return rows

    def release(self) -> None:
        """Give this detector's rows back to its store (it is forgotten)."""
        if self._store is not None:
            for row in self._rows.values():
                self._store.release(row)
        self._rows = {}
        self._row_sets = {}

    @property
    def _models(self) -> dict[str, TrafficBaseline]:
        """Each metric's model (views on the store's rows)."""
        return {m: TrafficBaseline.on_row(self.store, r) for m, r in self._rows.items()}

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
        store = self.store
        for metric in METRICS:
            if metric in x and metric in self._rows:
                row = self._rows[metric]
                value = float(x[metric])
                score = store.score_only(np.array([row]), np.array([value]),
                                         np.array([ts_ms]))[0] / self.alert_threshold  # fmt: skip
                band = band_of(store, row, ts_ms)
                floor = self.min_volume.get(metric, 0.0)
                if value < floor and band.expected < floor:
                    score = 0.0
                out[metric] = MetricScore(metric, value, float(score), float(score), band)
        return out

    def update(self, x: Features) -> dict[str, MetricScore]:
        """Score every metric of ``x``, then learn those not flagged; one pass.

        A counter reset (restart) is neither scored nor learned: it is never a spike; nor
        is a catch-up (a gap after nettel's restart, counted over its real interval).
        """
        if x.get("counter_reset") or x.get("catch_up"):
            return {}
        ts_ms = int(x["ts_ms"])
        metrics = [m for m in METRICS if m in x]
        values = np.array([float(x[m]) for m in metrics])
        rows = np.array([self.row(m) for m in metrics], dtype=np.int64)
        floors = np.array([self.min_volume.get(m, 0.0) for m in metrics])
        score, evidence = self.score_rows(rows, values, np.full(len(rows), ts_ms), floors)
        store = self.store
        return {
            m: MetricScore(m, float(values[i]), float(score[i]), float(evidence[i]),
                           ts_ms=ts_ms, store=store, row=int(rows[i]))
            for i, m in enumerate(metrics)
        }  # fmt: skip

    def update_metric(self, metric: str, value: float, ts_ms: int) -> MetricScore:
        """Score one metric's value, then learn it unless flagged; one pass.

        Examples
        --------
        >>> det = make_detector(warmup=3)
        >>> [round(det.update_metric("cpu", v, i * 300_000).score, 1)
        ...  for i, v in enumerate([10, 20, 10, 20, 90])]
        [0.0, 0.0, 0.0, 0.0, 466.7]
        """
        row = self.row(metric)
        score, evidence = self.score_rows(
            np.array([row]), np.array([value], dtype=np.float64),
            np.array([ts_ms], dtype=np.int64), np.array([self.min_volume.get(metric, 0.0)]),
        )  # fmt: skip
        return MetricScore(metric, value, float(score[0]), float(evidence[0]), ts_ms=ts_ms,
                           store=self.store, row=row)  # fmt: skip

    def score_rows(
        self,
        rows: Ints,
        values: Floats,
        ts_ms: Ints,
        floors: Floats,
        store: BaselineStore | None = None,
    ) -> tuple[Floats, Floats]:
        """Score and learn distinct ``rows`` of this detector's store at once, with this
        detector's guard, floors (``min_volume`` of each row's metric) and alert unit:
        (scores, evidence), both in multiples of ``alert_threshold``. A fleet scores every
        container's rows of a round through its template's, on its own ``store``."""
        store = self.store if store is None else store
        c = store.cols
        at = row_index(rows)
        since, run = c["flagged_since"][at], c["flagged_run"][at]
        protect = (since < 0) | (run < self.protected_samples) | (ts_ms - since < self.protected_ms)
        limit = np.where(protect, self.guard_threshold, np.inf)
        # Below the floor, and never above it or not expected above it: quiet.
        quiet = (floors > 0) & (values < floors)
        if quiet.any():
            ask = quiet & (c["hi"][at] >= floors)
            if ask.any():
                quiet[ask] = store.expected(rows[ask], ts_ms[ask]) < floors[ask]
        score, raw = store.score_learn(rows, values, ts_ms, limit)
        calm = raw < self.guard_threshold
        c["flagged_since"][at] = np.where(calm, -1, np.where(since < 0, ts_ms, since))
        c["flagged_run"][at] = np.where(calm, 0, run + 1)
        shown = ~quiet & store.scores_at(rows, raw, ts_ms)
        unit = self.alert_threshold
        return np.where(shown, score / unit, 0.0), np.where(shown, raw / unit, 0.0)

    def band(self, metric: str, ts_ms: int) -> Band:
        """What ``metric`` usually does at ``ts_ms``'s hour of the week."""
        row = self._rows.get(metric)
        return band_of(self.store, row, ts_ms) if row is not None else Band(0.0, 0.0, 0.0, "")

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
        if not self._rows:
            return 0
        return int(self.store.cols["n"][list(self._rows.values())].sum())

    @property
    def metrics(self) -> list[str]:
        """The metrics seen so far."""
        return list(self._rows)

    def warm_start(self, metric: str, rows: Iterable[tuple[int, float, float, float]]) -> None:
        """Seed ``metric`` from stored hourly rollups ``(hour_start_ms, mean, low, high)``."""
        self.store.warm_start(self.row(metric), list(rows))

    def false_positive(self, metric: str, ts_ms: int, value: float) -> None:
        """Feedback on an alert: ``value`` of ``metric`` at ``ts_ms`` was normal; the band
        of that metric at that hour widens to hold it."""
        self.store.accept(self.row(metric), value, ts_ms)

    def prior(self) -> ContainerDetector:
        """What this container learned, to start a new container of the same image or
        compose service warm (in the same store).

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
        store = self.store
        twin._rows = {}
        twin._row_sets = {}
        for metric, row in self._rows.items():
            new = twin._rows[metric] = store.add_row()
            store.copy_row(row, new)
            store.forget_recent(new)
        return twin
