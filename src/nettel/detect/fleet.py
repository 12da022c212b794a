"""All containers' detectors, rules and alert lifecycles: events in, alerts out.

:class:`FleetDetector` is what a worker drives (it does no I/O): :meth:`~FleetDetector.
process` takes one :class:`~nettel.models.StatEvent` and returns the alerts to publish.
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

from nettel.detect.alerts import Alert, AlertTracker, Direction, Signal, related_moves
from nettel.detect.baseline import DAY_MS, HOUR_MS, Band, Features
from nettel.detect.container import (
    ContainerDetector,
    MetricScore,
    event_features,
    make_detector,
)
from nettel.detect.rules import Rule, RuleSet
from nettel.models import StatEvent

RESTART_MEMORY_MS: Final = HOUR_MS
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
        self._containers: dict[str, ContainerDetector] = {}
        self._groups: dict[str, str] = {}  # "service:<p>/<s>" or "image:<i>" -> identity
        self._restarts: dict[str, deque[int]] = {}
        self._last_seen: dict[str, int] = {}
        #: each container's last event's features (the alert layer looks one sample back)
        self._previous: dict[str, Features] = {}
        self._next_sweep_ms = 0

    def detector(self, identity: str) -> ContainerDetector | None:
        """The container's detector, if it was seen."""
        return self._containers.get(identity)

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
        det = prior.prior() if prior is not None else self.template.clone()
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
            for state in (self._containers, self._restarts, self._last_seen, self._previous):
                state.pop(identity, None)
            for k in [k for k, i in self._groups.items() if i == identity]:
                del self._groups[k]

    def process(self, ev: StatEvent) -> list[Alert]:
        """Score and learn one event; the alerts it opens, grows or resolves."""
        last: dict[str, Features] = self.__dict__.setdefault("_previous", {})  # older checkpoints
        self._last_seen[ev.identity] = ev.ts_ms
        if ev.ts_ms >= self._next_sweep_ms:
            self._sweep(ev.ts_ms)
            self._next_sweep_ms = ev.ts_ms + HOUR_MS
        det = self._detector_for(ev)
        restarts = self._restarts.setdefault(ev.identity, deque())
        if ev.counter_reset:
            restarts.append(ev.ts_ms)
        while restarts and restarts[0] < ev.ts_ms - RESTART_MEMORY_MS:
            restarts.popleft()
        out: list[Alert] = []
        x = event_features(ev)
        previous = last.get(ev.identity)
        last[ev.identity] = x
        if x["counter_reset"] or x["catch_up"]:
            del last[ev.identity]  # no rate to compare with
        scores = det.update(x)
        tracker = self.tracker
        floor = det.min_volume
        # Most samples of most metrics are unremarkable and followed by no incident: skip.
        tracked = tracker.tracked(ev.identity)
        evidence = {
            m: _alert_evidence(s, floor.get(m, 0.0), tracker.open_at)
            for m, s in scores.items()
            if s.evidence >= tracker.close_at or m in tracked or m in OUTAGE_METRICS
        }
        live = [scores[m] for m, e in evidence.items() if e >= tracker.close_at or m in tracked]
        if live:
            moves = [
                (m, s.value, s.band.expected)
                for m, s in scores.items()
                if max(s.value, s.band.expected) >= floor.get(m, 0.0)
            ]
            signals = [
                Signal(ev.identity, s.metric, ev.ts_ms, evidence[s.metric], s.value, s.band,
                       host=ev.host, container_id=ev.container_id, restarts=len(restarts),
                       related=related_moves(moves, s.metric)
                       if evidence[s.metric] >= tracker.close_at else {},
                       previous=(previous["ts_ms"], previous[s.metric])
                       if previous is not None and s.metric in previous else None)
                for s in live
            ]  # fmt: skip
            alert = tracker.observe_sample(signals)
            if alert is not None:
                out.append(alert)
        for hit in self.rules.evaluate(ev):
            tracker = self._rule_trackers[hit.rule.name]
            alert = tracker.observe(
                Signal(ev.identity, hit.rule.metric, ev.ts_ms, 1.0 if hit.holds else 0.0,
                       hit.value, Band(0.0, 0.0, 0.0, ""), rule=hit.rule.name,
                       limit=hit.rule.describe_limit(), host=ev.host,
                       container_id=ev.container_id, restarts=len(restarts),
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
