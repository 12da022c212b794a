"""All containers' detectors, rules and alert lifecycles: events in, alerts out.

:class:`FleetDetector` is what a worker drives (it does no I/O):
:meth:`~FleetDetector.process_batch` takes a partition's batch of
:class:`~nettel.models.StatEvent` and returns the alerts to publish (:meth:`~FleetDetector.
process`: one event). Every model of every container lives in one
:class:`~nettel.detect.store.BaselineStore`, and a batch is scored in rounds: one event per
container per round, every metric of the round at once with numpy; Python work per event
is left for the alert lifecycle of the few whose evidence is not calm. The result is that
of scoring the events one by one in order (each container's events keep their order;
containers share nothing but the store; a new container, whose prior is another's state,
and the hourly sweep start a new series of rounds).
A container seen for the first time starts from a prior: the learned state of another
container of the same compose service, else of the same image. A container unseen for
``forget_after_ms`` of event time (7 days by default) is forgotten (checked once an
hour, never while it has an open alert), so a fleet whose containers come and go keeps
a bounded state. Before the alert lifecycle, two checks of the alert layer adjust the
model's evidence (:func:`_alert_evidence`): traffic fallen to about nothing where its
band expects plenty is an outage, and a fall of errors, drops or half-open sockets is
no incident; each signal carries its metric's value in the container's previous
sample, so a burst the model confirms only at its second sample starts at its first.
The whole object is plain data (:mod:`nettel.detect.checkpoint`), so a worker
checkpoints it with the offsets it has consumed.

Examples
--------
>>> from nettel.models import StatEvent
>>> fleet = FleetDetector()
>>> def ev(ts, rx, reset=False):
...     return StatEvent(ts_ms=ts, host="h", container_id="c1", identity="shop/web",
...                      name="web", image="nginx", interval_ms=5000, rx_bytes=rx,
...                      counter_reset=reset)
>>> alerts = []
>>> for i in range(400):
...     alerts += fleet.process(ev(i * 5000, 500_000 + (i % 7) * 10_000))
>>> alerts += fleet.process(ev(400 * 5000, 50_000_000, reset=True))  # a restart: no spike
>>> alerts
[]
>>> burst = [a for i in range(401, 405) for a in fleet.process(ev(i * 5000, 20_000_000))]
>>> [(a.status, a.metric, a.severity) for a in burst][:1]
[('open', 'rx_bytes', 'critical')]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Final

import numpy as np

from nettel.detect.alerts import Alert, AlertTracker, Direction, Signal, related_moves
from nettel.detect.baseline import DAY_MS, HOUR_MS, Band, bands_of
from nettel.detect.container import (
    GAUGE_METRICS,
    METRICS,
    RATE_METRICS,
    ContainerDetector,
    MetricScore,
    make_detector,
)
from nettel.detect.rules import Rule, RuleSet
from nettel.models import StatEvent

RESTART_MEMORY_MS: Final = HOUR_MS
#: The metrics of an event, by how many it has: the rates, plus the connection count,
#: plus the TCP states (an event may lack either).
METRIC_SETS: Final = {
    6: RATE_METRICS,
    7: (*RATE_METRICS, "connections"),
    10: (*RATE_METRICS, *GAUGE_METRICS[1:]),
    11: METRICS,
}
#: Traffic metrics checked for an outage (a fall to about nothing).
OUTAGE_METRICS: Final = frozenset({"rx_bytes", "tx_bytes", "rx_packets", "tx_packets"})
#: An outage: the value below this share of its band's low.
OUTAGE_FRACTION: Final = 0.1
#: Metrics whose fall is good news (fewer errors, drops, half-open or closing sockets).
GOOD_WHEN_LOW: Final = frozenset({"errors", "drops", "syn_recv", "close_wait"})
#: Event time after which a container that sent nothing is forgotten.
FORGET_AFTER_MS: Final = 7 * DAY_MS


class FleetDetector:
    """Per-container detectors, custom rules and the alert lifecycle over them.

    Parameters
    ----------
    template
        The container detector cloned for each new container without a prior
        (:func:`~nettel.detect.container.make_detector` by default).
    tracker
        The lifecycle of model alerts.
    rules
        Custom rules; their alerts open when the condition holds and resolve when it
        stops (each rule's ``cooldown`` applies after that).
    forget_after_ms
        Event time after which a container that sent nothing is forgotten (its models,
        restarts and alert bookkeeping), unless one of its alerts is still open.

    Examples
    --------
    >>> fleet = FleetDetector(forget_after_ms=HOUR_MS)
    >>> def ev(identity, ts):
    ...     return StatEvent(ts_ms=ts, host="h", container_id=identity, identity=identity,
    ...                      name=identity, interval_ms=5000, rx_bytes=1000)
    >>> _ = fleet.process(ev("old", 0)) + fleet.process(ev("new", 0))
    >>> _ = fleet.process(ev("new", 3 * HOUR_MS))  # "old" sent nothing for 3 hours
    >>> fleet.identities
    ['new']
    """

    def __init__(
        self,
        template: ContainerDetector | None = None,
        tracker: AlertTracker | None = None,
        rules: Sequence[Rule] = (),
        forget_after_ms: int = FORGET_AFTER_MS,
    ) -> None:
        self.template = template or make_detector()
        self.forget_after_ms = forget_after_ms
        self.tracker = tracker or AlertTracker()
        self.rules = RuleSet(rules)
        self._rule_trackers = {
            r.name: AlertTracker(
                open_at=1.0,
                close_at=1.0,
                resolve_after=1,
                cooldown_ms=r.cooldown_ms,
                confirm_samples=1,
                hold_ms=0,
            )
            for r in rules
        }
        self._store = self.template.new_store()
        floor = self.template.min_volume
        self._floors = {k: [floor.get(m, 0.0) for m in ms] for k, ms in METRIC_SETS.items()}
        self._outage_mask = {k: [m in OUTAGE_METRICS for m in ms] for k, ms in METRIC_SETS.items()}
        self._containers: dict[str, ContainerDetector] = {}
        self._groups: dict[str, str] = {}  # "service:<p>/<s>" or "image:<i>" -> identity
        self._restarts: dict[str, deque[int]] = {}
        self._last_seen: dict[str, int] = {}
        #: each container's last scored event (ts_ms, metric names, values): the alert
        #: layer looks one sample back
        self._previous: dict[str, tuple[int, tuple[str, ...], list[float]]] = {}
        self._next_sweep_ms = 0

    def detector(self, identity: str) -> ContainerDetector | None:
        """The container's detector, if it was seen."""
        return self._containers.get(identity)

    def last_seen(self, identity: str) -> int | None:
        """The time of the container's newest scored event (None: not seen, or forgotten).

        Examples
        --------
        >>> fleet = FleetDetector()
        >>> _ = fleet.process(StatEvent(ts_ms=5000, host="h", container_id="c", identity="c",
        ...                             name="c", interval_ms=5000, rx_bytes=1))
        >>> fleet.last_seen("c"), fleet.last_seen("other")
        (5000, None)
        """
        return self._last_seen.get(identity)

    @property
    def open_alerts(self) -> int:
        """Alerts open now (the model's and the rules')."""
        trackers = [self.tracker, *self._rule_trackers.values()]
        return sum(t.open_count for t in trackers)

    @property
    def identities(self) -> list[str]:
        """Containers seen so far."""
        return list(self._containers)

    def _detector_for(self, ev: StatEvent) -> ContainerDetector:
        det = self._containers.get(ev.identity)
        if det is not None:
            return det
        keys = []
        if ev.compose_service:
            keys.append(f"service:{ev.compose_project}/{ev.compose_service}")
        if ev.image:
            keys.append(f"image:{ev.image}")
        prior = next((self._containers[self._groups[k]] for k in keys if k in self._groups), None)
        if prior is not None:
            det = prior.prior()
        else:
            det = self.template.clone()
            det.attach(self._store)
        self._containers[ev.identity] = det
        for k in keys:
            self._groups.setdefault(k, ev.identity)
        return det

    def _sweep(self, now_ms: int) -> None:
        """Forget the containers unseen since ``now_ms - forget_after_ms`` (none with an
        open alert), and the group priors that named them."""
        cutoff = now_ms - self.forget_after_ms
        trackers = [self.tracker, *self._rule_trackers.values()]
        for identity in [i for i, ts in self._last_seen.items() if ts < cutoff]:
            if any(t.is_open_for(identity) for t in trackers):
                continue
            for t in trackers:
                t.forget(identity)
            det = self._containers.pop(identity, None)
            if det is not None:
                det.release()
            for state in (self._restarts, self._last_seen, self._previous):
                state.pop(identity, None)
            for k in [k for k, i in self._groups.items() if i == identity]:
                del self._groups[k]

    def process(self, ev: StatEvent) -> list[Alert]:
        """Score and learn one event; the alerts it opens, grows or resolves."""
        return self.process_batch([ev])

    def process_batch(self, events: Sequence[StatEvent]) -> list[Alert]:
        """Score and learn ``events`` (in order); the alerts they open, grow or resolve, in
        the order of the events that raised them.

        Examples
        --------
        >>> fleet = FleetDetector()
        >>> def ev(name, i, rx):
        ...     return StatEvent(ts_ms=i * 5000, host="h", container_id=name, identity=name,
        ...                      name=name, interval_ms=5000, rx_bytes=rx)
        >>> batch = [ev(n, i, 500_000 + i % 7 * 9000) for i in range(400) for n in "ab"]
        >>> fleet.process_batch(batch)
        []
        >>> [a.identity for a in fleet.process_batch([ev("b", 400, 9e7), ev("a", 400, 530_000)])]
        ['b']
        """
        return [a for _, a in self.process_indexed(events)]

    def process_indexed(self, events: Sequence[StatEvent]) -> list[tuple[int, Alert]]:
        """:meth:`process_batch`, each alert with the index of the event that raised it."""
        out: list[tuple[int, Alert]] = []
        segment: list[int] = []
        for i, ev in enumerate(events):
            sweep = ev.ts_ms >= self._next_sweep_ms
            if sweep or ev.identity not in self._containers:
                self._score_rounds(events, segment, out)
                segment = []
                if sweep:
                    self._last_seen[ev.identity] = ev.ts_ms
                    self._sweep(ev.ts_ms)
                    self._next_sweep_ms = ev.ts_ms + HOUR_MS
                self._detector_for(ev)
            segment.append(i)
        self._score_rounds(events, segment, out)
        out.sort(key=lambda pair: pair[0])
        return out

    def _score_rounds(
        self, events: Sequence[StatEvent], segment: list[int], out: list[tuple[int, Alert]]
    ) -> None:
        """Score ``segment`` (indices of ``events`` whose containers are known) in rounds."""
        rounds: list[list[int]] = []
        depth: dict[str, int] = {}
        for i in segment:
            identity = events[i].identity
            r = depth.get(identity, 0)
            depth[identity] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(i)
        for indices in rounds:
            self._score_round(events, indices, out)

    def _score_round(
        self, events: Sequence[StatEvent], indices: list[int], out: list[tuple[int, Alert]]
    ) -> None:
        """Score one event of each of several containers, every metric at once."""
        rows: list[int] = []
        values: list[float] = []
        floors: list[float] = []
        outage: list[bool] = []  # rows of metrics checked for an outage (OUTAGE_METRICS)
        sets: list[int] = []  # each event's metric set (METRIC_SETS), 0 for none
        containers = self._containers
        for i in indices:
            ev = events[i]
            if ev.counter_reset or ev.catch_up:
                sets.append(0)
                continue
            seconds = ev.interval_ms / 1000 if ev.interval_ms > 0 else 1.0
            values += (ev.rx_bytes / seconds, ev.tx_bytes / seconds, ev.rx_packets / seconds,
                       ev.tx_packets / seconds, (ev.rx_errors + ev.tx_errors) / seconds,
                       (ev.rx_drops + ev.tx_drops) / seconds)  # fmt: skip
            key = 6
            if ev.connections is not None:
                values.append(float(ev.connections))
                key = 7
            if ev.tcp is not None:
                t = ev.tcp
                values += (float(t.syn_recv), float(t.time_wait), float(t.close_wait),
                           float(t.established))  # fmt: skip
                key += 4
            sets.append(key)
            rows += containers[ev.identity].rows_for(METRIC_SETS[key])
            floors += self._floors[key]
            outage += self._outage_mask[key]
        score = evidence = np.zeros(0)
        hot_events: list[bool] = [False] * len(indices)
        if rows:
            ts = np.repeat(np.array([events[i].ts_ms for i in indices], dtype=np.int64), sets)
            at = np.array(rows, dtype=np.int64)
            if bool((np.diff(at) > 0).all()):
                score, evidence = self.template.score_rows(
                    at, np.array(values), ts, np.array(floors), self._store)  # fmt: skip
            else:  # in row order: consecutive rows are read and written as slices
                order = np.argsort(at)
                score, evidence = np.empty(len(at)), np.empty(len(at))
                score[order], evidence[order] = self.template.score_rows(
                    at[order], np.array(values)[order], ts[order], np.array(floors)[order],
                    self._store)  # fmt: skip
            # hot: evidence to act on, or an outage (_alert_evidence's test, at once)
            hot_rows = evidence >= self.tracker.close_at
            value_of, floor_of = np.array(values), np.array(floors)
            low = np.flatnonzero(
                np.array(outage, dtype=bool) & (value_of < floor_of)
                & (evidence < self.tracker.open_at)
            )  # fmt: skip
            if len(low):
                band_low, expected = bands_of(self._store, at[low], ts[low])
                hot_rows[low[(expected >= floor_of[low])
                             & (value_of[low] <= OUTAGE_FRACTION * band_low)]] = True  # fmt: skip
            hot = np.flatnonzero(hot_rows)
            if len(hot):
                owner = np.repeat(np.arange(len(indices)), sets)
                for k in set(owner[hot].tolist()):
                    hot_events[k] = True
        tracker = self.tracker
        store = self._store
        start = 0
        for k, i in enumerate(indices):
            ev = events[i]
            end = start + sets[k]
            self._last_seen[ev.identity] = ev.ts_ms
            # restarts within RESTART_MEMORY_MS, kept only for containers that had some
            restarts = self._restarts.get(ev.identity)
            if ev.counter_reset:
                if restarts is None:
                    restarts = self._restarts[ev.identity] = deque()
                restarts.append(ev.ts_ms)
            recent = 0
            if restarts is not None:
                while restarts and restarts[0] < ev.ts_ms - RESTART_MEMORY_MS:
                    restarts.popleft()
                recent = len(restarts)
                if not recent:
                    del self._restarts[ev.identity]
            previous = self._previous.pop(ev.identity, None)
            if end > start:
                names = METRIC_SETS[sets[k]]
                if hot_events[k] or tracker.tracked(ev.identity):
                    scores = {
                        m: MetricScore(m, values[r], float(score[r]), float(evidence[r]),
                                       ts_ms=ev.ts_ms, store=store, row=rows[r])
                        for m, r in zip(names, range(start, end), strict=True)
                    }  # fmt: skip
                    alert = self._observe(ev, scores, recent, previous)
                    if alert is not None:
                        out.append((i, alert))
                self._previous[ev.identity] = (ev.ts_ms, names, values[start:end])
            if self.rules.rules:
                for alert in self._apply_rules(ev, recent):
                    out.append((i, alert))
            start = end

    def _observe(
        self,
        ev: StatEvent,
        scores: dict[str, MetricScore],
        restarts: int,
        previous: tuple[int, tuple[str, ...], list[float]] | None,
    ) -> Alert | None:
        """The model alert lifecycle for one event's metric scores (``previous``: the
        container's last scored event, see ``_previous``)."""
        tracker = self.tracker
        floor = self.template.min_volume
        # Most samples of most metrics are unremarkable and followed by no incident: skip.
        tracked = tracker.tracked(ev.identity)
        evidence = {
            m: _alert_evidence(s, floor.get(m, 0.0), tracker.open_at)
            for m, s in scores.items()
            if s.evidence >= tracker.close_at or m in tracked or m in OUTAGE_METRICS
        }
        live = [scores[m] for m, e in evidence.items() if e >= tracker.close_at or m in tracked]
        if not live:
            return None
        moves = [
            (m, s.value, s.band.expected)
            for m, s in scores.items()
            if max(s.value, s.band.expected) >= floor.get(m, 0.0)
        ]
        before: dict[str, float] = {}
        if previous is not None:
            before = dict(zip(previous[1], previous[2], strict=True))
        signals = [
            Signal(ev.identity, s.metric, ev.ts_ms, evidence[s.metric], s.value, s.band,
                   host=ev.host, container_id=ev.container_id, restarts=restarts,
                   related=related_moves(moves, s.metric)
                   if evidence[s.metric] >= tracker.close_at else {},
                   previous=(previous[0], before[s.metric])
                   if previous is not None and s.metric in before else None)
            for s in live
        ]  # fmt: skip
        return tracker.observe_sample(signals)

    def _apply_rules(self, ev: StatEvent, restarts: int) -> list[Alert]:
        out = []
        for hit in self.rules.evaluate(ev):
            tracker = self._rule_trackers[hit.rule.name]
            alert = tracker.observe(
                Signal(ev.identity, hit.rule.metric, ev.ts_ms, 1.0 if hit.holds else 0.0,
                       hit.value, Band(0.0, 0.0, 0.0, ""), rule=hit.rule.name,
                       limit=hit.rule.describe_limit(), host=ev.host,
                       container_id=ev.container_id, restarts=restarts,
                       direction=_rule_direction(hit.rule))
            )  # fmt: skip
            if alert is not None:
                out.append(alert)
        return out


def _alert_evidence(s: MetricScore, floor: float, outage: float) -> float:
    """The evidence the alert layer goes by for one metric's sample: the model's, except
    that a fall of a metric whose fall is good news (:data:`GOOD_WHEN_LOW`) is no
    incident, and that a traffic metric (:data:`OUTAGE_METRICS`) fallen below
    :data:`OUTAGE_FRACTION` of its band's low, where it is expected at or above its
    minimum volume, is an outage (evidence ``outage``, the tracker's ``open_at``: it opens
    when confirmed, like any other). The model looks for what traffic never did; a
    container that stops talking did nothing new, so the alert layer checks it. The band
    (computed on demand) is asked for only below the minimum volume or for such a fall.

    Examples
    --------
    >>> def score(metric, value, evidence, band):
    ...     return MetricScore(metric, value, evidence, evidence, band)
    >>> busy = Band(40_000.0, 60_000.0, 80_000.0, "week")
    >>> _alert_evidence(score("rx_bytes", 120.0, 0.0, busy), 10_240.0, 1.0)  # ~0: 40-80 KB/s
    1.0
    >>> _alert_evidence(score("rx_bytes", 120.0, 0.0, Band(0.0, 5e3, 9e3, "week")), 10_240.0, 1.0)
    0.0
    >>> _alert_evidence(score("errors", 0.0, 4.0, Band(2.0, 5.0, 8.0, "day")), 1.0, 1.0)  # fewer
    0.0
    """
    metric, evidence, value = s.metric, s.evidence, s.value
    if metric in OUTAGE_METRICS:
        if evidence < outage and value < floor:
            band = s.band
            if band.expected >= floor and value <= OUTAGE_FRACTION * band.low:
                return outage
        return evidence
    if metric in GOOD_WHEN_LOW and evidence > 0 and value < s.band.expected:
        return 0.0
    return evidence


def _rule_direction(rule: Rule) -> Direction:
    """A rule that fires on a fall (``below``, a change factor under 1) tracks dips.

    Examples
    --------
    >>> _rule_direction(Rule("r", "tx_bytes", below=5.0)), _rule_direction(Rule("r", "x", above=1))
    ('dip', 'spike')
    """
    falls = rule.below is not None or (rule.change is not None and rule.change < 1)
    return "dip" if rule.above is None and falls else "spike"
