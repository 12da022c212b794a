"""Resource signals per container: a memory leak heading for its limit, CPU throttling,
OOM kills. Pure: resource events in, findings out (no Kafka, no files).

A **memory leak** is memory that keeps rising towards ``memory.max``: over the last
``window_s`` of samples (at least ``min_samples``), a least-squares line through memory
over time has a positive slope that explains most of the variation (R² of at least
``min_r2``) and, carried on, reaches the limit within ``horizon_s``; the finding carries
that projected time to the limit. A container without a limit has nothing to run into.
**Throttling** is a share of CFS periods throttled of at least ``throttled_share`` over
the window. An **OOM kill** is reported as soon as a sample counts one.

:class:`ResourceAlerts` turns the findings into alerts with the network alerts'
lifecycle (:class:`~nettel.detect.alerts.AlertTracker`: open, update, resolved; one
incident per container and signal) and a one-sentence explanation each; the resource
stream worker (:mod:`nettel.stream.resources`) runs it on every resource event.

Examples
--------
>>> from nettel.models import ResourceEvent
>>> sig = ResourceSignals(min_samples=4, horizon_s=600)
>>> ev = lambda t, mem: ResourceEvent(ts_ms=t * 1000, host="h", container_id="c",
...     identity="web", name="web", interval_ms=5000, memory_bytes=mem,
...     memory_limit_bytes=100 << 20)
>>> found = [f for t in range(0, 40, 5) for f in sig.update(ev(t, (20 << 20) + t * (1 << 20)))]
>>> f = found[-1]
>>> f.kind, round(f.time_to_limit_s), round(f.slope_bytes_per_s / (1 << 20), 2)
('memory_leak', 45, 1.0)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgspec

from nettel.detect.alerts import Alert, AlertTracker, Severity, Signal
from nettel.detect.baseline import Band
from nettel.models import ResourceEvent

#: The metric each kind of finding is alerted on (an alert's ``metric``; its ``rule``
#: is the kind).
KIND_METRICS: Final = {"memory_leak": "memory_bytes", "oom_kill": "oom_kills",
                       "cpu_throttling": "cpu_throttled_share"}  # fmt: skip
_NO_BAND: Final = Band(0.0, 0.0, 0.0, "")


@dataclass(frozen=True, slots=True)
class ResourceFinding:
    """What a signal found about one container at ``ts_ms``, with why."""

    kind: str  # memory_leak, cpu_throttling, oom_kill
    identity: str
    ts_ms: int
    observed: float
    explanation: str
    time_to_limit_s: float | None = None
    slope_bytes_per_s: float | None = None


@dataclass(slots=True)
class _Adopted:
    """An incident a previous run left open, and the samples of its container since."""

    alert: Alert
    samples: int = 0


@dataclass(slots=True)
class _History:
    points: deque[tuple[float, float]] = field(default_factory=deque)  # (seconds, bytes)
    periods: deque[tuple[float, int, int]] = field(default_factory=deque)  # (s, all, throttled)


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(slope, R²) of the least-squares line through ``points`` (R² 0 for a flat set).

    Examples
    --------
    >>> fit_line([(0, 1), (1, 3), (2, 5)])
    (2.0, 1.0)
    >>> fit_line([(0, 4), (1, 4)])
    (0.0, 0.0)
    """
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    syy = sum((y - my) ** 2 for _, y in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    if sxx == 0 or syy == 0:
        return 0.0, 0.0
    return sxy / sxx, sxy * sxy / (sxx * syy)


class ResourceSignals:
    """The resource signals of every container seen, over a sliding window each."""

    def __init__(self, *, window_s: float = 600.0, min_samples: int = 6,
                 min_r2: float = 0.8, horizon_s: float = 3600.0,
                 throttled_share: float = 0.25) -> None:  # fmt: skip
        self.window_s = window_s
        self.min_samples = min_samples
        self.min_r2 = min_r2
        self.horizon_s = horizon_s
        self.throttled_share = throttled_share
        self._history: dict[str, _History] = {}

    def update(self, ev: ResourceEvent) -> list[ResourceFinding]:
        """Fold in one sample; what it shows now (a leak, throttling, an OOM kill)."""
        h = self._history.setdefault(ev.identity, _History())
        if ev.counter_reset:  # a new process: its memory history starts again
            h.points.clear()
            h.periods.clear()
        now_s = ev.ts_ms / 1000
        h.points.append((now_s, float(ev.memory_bytes)))
        h.periods.append((now_s, ev.cpu_periods, ev.cpu_throttled_periods))
        while h.points and h.points[0][0] < now_s - self.window_s:
            h.points.popleft()
        while h.periods and h.periods[0][0] < now_s - self.window_s:
            h.periods.popleft()
        out = []
        if ev.oom_kills:
            out.append(ResourceFinding("oom_kill", ev.identity, ev.ts_ms, ev.oom_kills,
                                       f"{ev.oom_kills} process(es) killed for memory at "
                                       f"limit {ev.memory_limit_bytes} bytes"))  # fmt: skip
        leak = self._leak(ev, h)
        if leak is not None:
            out.append(leak)
        periods = sum(p for _, p, _ in h.periods)
        throttled = sum(t for _, _, t in h.periods)
        if (
            len(h.periods) >= self.min_samples
            and periods
            and (throttled / periods >= self.throttled_share)
        ):
            share = throttled / periods
            out.append(ResourceFinding(
                "cpu_throttling", ev.identity, ev.ts_ms, share,
                f"{100 * share:.0f}% of CPU periods throttled over the last "
                f"{len(h.periods)} samples: the CPU limit holds it back"))  # fmt: skip
        return out

    def _leak(self, ev: ResourceEvent, h: _History) -> ResourceFinding | None:
        limit = ev.memory_limit_bytes
        if not limit or len(h.points) < self.min_samples:
            return None
        slope, r2 = fit_line(list(h.points))
        if slope <= 0 or r2 < self.min_r2:
            return None
        eta = max(0.0, (limit - ev.memory_bytes) / slope)
        if eta > self.horizon_s:
            return None
        return ResourceFinding(
            "memory_leak", ev.identity, ev.ts_ms, float(ev.memory_bytes),
            f"memory rose {slope / (1 << 20):.3g} MiB/s over {len(h.points)} samples "
            f"(R² {r2:.2f}); at this pace it reaches its limit of {limit} bytes in "
            f"{eta:.0f} s", time_to_limit_s=eta, slope_bytes_per_s=slope)  # fmt: skip

    def forget(self, identity: str) -> None:
        """Drop a container that is gone."""
        self._history.pop(identity, None)


def _clock(ts_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts_ms / 1000))


class ResourceAlerts:
    """Alerts from :class:`ResourceSignals`, with the lifecycle of network alerts.

    Each kind of finding (:data:`KIND_METRICS`) has its own
    :class:`~nettel.detect.alerts.AlertTracker` (the way custom rules do: no
    confirmation, no hold): an incident per container opens with the first finding,
    is published again when its evidence doubles (a leak: its time to the limit halved),
    and resolves after ``resolve_after`` samples without one; then that container and
    kind stay quiet for ``cooldown_ms``. The evidence: a leak's ``horizon_s`` over its
    time to the limit, a throttled share over ``throttled_share``, the OOM kills
    counted. Severity: an OOM kill, and a leak with less than ``critical_within_s``
    left, are critical; the rest warnings. The explanation is the finding's sentence
    with the incident's start (and, resolved, its end); a leak's alert carries
    ``time_to_limit_s``. Containers not seen for ``forget_after_ms`` are forgotten
    (unless an incident of theirs is open), so the state stays bounded.

    Examples
    --------
    >>> alerts = ResourceAlerts(ResourceSignals(min_samples=4, horizon_s=600))
    >>> ev = lambda t, mem: ResourceEvent(ts_ms=t * 1000, host="h", container_id="c",
    ...     identity="web", name="web", interval_ms=5000, memory_bytes=mem,
    ...     memory_limit_bytes=100 << 20)
    >>> leak = lambda t: ev(t, (20 << 20) + t * (1 << 20))
    >>> out = [a for t in range(0, 55, 5) for a in alerts.update(leak(t))]
    >>> [(a.status, a.rule, round(a.time_to_limit_s), a.severity) for a in out]
    [('open', 'memory_leak', 65, 'critical'), ('update', 'memory_leak', 30, 'critical')]
    >>> flat = [a for t in range(55, 200, 5) for a in alerts.update(ev(t, 70 << 20))]
    >>> [a.status for a in flat], flat[0].explanation.startswith("memory rose")
    (['resolved'], True)
    """

    def __init__(self, signals: ResourceSignals | None = None, *, resolve_after: int = 3,
                 cooldown_ms: int = 60_000, critical_within_s: float = 300.0,
                 forget_after_ms: int = 3_600_000) -> None:  # fmt: skip
        self.signals = signals or ResourceSignals()
        self.resolve_after = resolve_after
        self.cooldown_ms = cooldown_ms
        self.critical_within_s = critical_within_s
        self.forget_after_ms = forget_after_ms
        self._trackers = {
            kind: AlertTracker(open_at=1.0, close_at=1.0, resolve_after=resolve_after,
                               cooldown_ms=cooldown_ms, confirm_samples=1, hold_ms=0)
            for kind in KIND_METRICS
        }  # fmt: skip
        self._last: dict[tuple[str, str], ResourceFinding] = {}
        self._seen: dict[str, int] = {}
        self._next_sweep_ms = 0
        #: incidents a previous run left open, not yet seen again
        self._adopted: dict[tuple[str, str], _Adopted] = {}
        #: (id, started_ms) an adopted incident's versions carry on with
        self._carry: dict[tuple[str, str], tuple[str, int]] = {}

    def adopt(self, open_alerts: Iterable[Alert]) -> None:
        """Carry on the incidents a previous run left open (its alerts whose latest
        version is not resolved, read back after a restart): the signals' history is not
        kept, so the same leak, throttling or OOM kill is found again after a few
        samples; its versions then keep the old ``id`` and ``started_ms`` (an update,
        not a new incident). One not found again within ``min_samples`` +
        ``resolve_after`` samples of its container, or whose container is not seen for
        ``forget_after_ms``, is resolved.

        Examples
        --------
        >>> a = ResourceAlerts(ResourceSignals(min_samples=2))
        >>> old = Alert(id="old", status="open", identity="web", metric="oom_kills",
        ...     rule="oom_kill", started_ms=0, updated_ms=0, observed=1.0, peak=1.0,
        ...     expected=0.0, band_low=0.0, band_high=0.0, score=1.0, severity="critical",
        ...     explanation="1 process(es) killed")
        >>> a.adopt([old])
        >>> ev = lambda t, kills: ResourceEvent(ts_ms=t * 1000, host="h", container_id="c",
        ...     identity="web", name="web", interval_ms=1000, oom_kills=kills)
        >>> [(x.id, x.status) for x in a.update(ev(1, 1))]
        [('old', 'update')]
        >>> [(x.id, x.status) for t in range(2, 9) for x in a.update(ev(t, 0))]
        [('old', 'resolved')]
        >>> a.adopt([old])  # not found again: resolved after 2 + 3 calm samples
        >>> [(x.id, x.status, x.resolved_ms) for t in range(9, 20) for x in a.update(ev(t, 0))]
        [('old', 'resolved', 13000)]
        """
        for a in open_alerts:
            if a.rule in KIND_METRICS and a.status != "resolved":
                self._adopted[(a.identity, a.rule)] = _Adopted(a)

    def update(self, ev: ResourceEvent) -> list[Alert]:
        """Fold in one sample; the alert versions to publish (opened, grown, resolved)."""
        found = {f.kind: f for f in self.signals.update(ev)}
        self._seen[ev.identity] = ev.ts_ms
        out = []
        for kind, tracker in self._trackers.items():
            f = found.get(kind)
            key = (ev.identity, kind)
            adopted = self._adopted.get(key)
            if adopted is not None and f is None and not tracker.is_open(ev.identity, kind):
                adopted.samples += 1
                if adopted.samples >= self.signals.min_samples + self.resolve_after:
                    out.append(self._resolve_adopted(key, ev.ts_ms, "not found again"))
                continue
            if f is None and not tracker.is_open(ev.identity, kind):
                continue  # nothing found, nothing open: nothing to follow
            if f is not None:
                self._last[key] = f
            evidence = 0.0 if f is None else self._evidence(f)
            alert = tracker.observe(Signal(
                ev.identity, KIND_METRICS[kind], ev.ts_ms, evidence, self._last[key].observed,
                _NO_BAND, rule=kind, host=ev.host, container_id=ev.container_id,
                direction="spike"))  # fmt: skip
            if alert is not None:
                out.append(self._explained(self._carried(key, alert), self._last[key]))
                if alert.status == "resolved":
                    del self._last[key]
        if ev.ts_ms >= self._next_sweep_ms:
            out += self._sweep(ev.ts_ms)
        return out

    def _carried(self, key: tuple[str, str], alert: Alert) -> Alert:
        """``alert`` as a version of the adopted incident it continues, if any."""
        adopted = self._adopted.pop(key, None)
        if adopted is not None and alert.status == "open":
            self._carry[key] = (adopted.alert.id, adopted.alert.started_ms)
            alert = msgspec.structs.replace(alert, status="update")
        carry = self._carry.get(key)
        if carry is None:
            return alert
        if alert.status == "resolved":
            del self._carry[key]
        return msgspec.structs.replace(alert, id=carry[0], started_ms=carry[1])

    def _resolve_adopted(self, key: tuple[str, str], ts_ms: int, why: str) -> Alert:
        old = self._adopted.pop(key).alert
        return msgspec.structs.replace(
            old, status="resolved", updated_ms=ts_ms, resolved_ms=ts_ms,
            explanation=f"{old.explanation}; {why} after a restart of nettel's "
                        f"detection, calm since {_clock(ts_ms)}",
        )  # fmt: skip

    def _evidence(self, f: ResourceFinding) -> float:
        if f.kind == "memory_leak":
            return self.signals.horizon_s / max(f.time_to_limit_s or 0.0, 1.0)
        if f.kind == "cpu_throttling":
            return f.observed / self.signals.throttled_share
        return f.observed

    def _explained(self, alert: Alert, f: ResourceFinding) -> Alert:
        text = f"{f.explanation}; started {_clock(alert.started_ms)}"
        if alert.resolved_ms is not None:
            text += f"; calm since {_clock(alert.resolved_ms)}"
        severity: Severity = "warning"
        if f.kind == "oom_kill" or (
            f.time_to_limit_s is not None and f.time_to_limit_s < self.critical_within_s
        ):
            severity = "critical"
        return msgspec.structs.replace(alert, explanation=text, time_to_limit_s=f.time_to_limit_s,
                                       severity=severity)  # fmt: skip

    def _sweep(self, now_ms: int) -> list[Alert]:
        """Forget containers not seen for ``forget_after_ms``; the adopted incidents of
        containers not seen since, resolved."""
        self._next_sweep_ms = now_ms + self.forget_after_ms // 4
        gone = [
            key for key, a in self._adopted.items()
            if key[0] not in self._seen and a.alert.updated_ms < now_ms - self.forget_after_ms
        ]  # fmt: skip
        resolved = [self._resolve_adopted(key, now_ms, "its container not seen") for key in gone]
        for identity, seen_ms in list(self._seen.items()):
            if seen_ms >= now_ms - self.forget_after_ms:
                continue
            if any(t.is_open_for(identity) for t in self._trackers.values()):
                continue
            for t in self._trackers.values():
                t.forget(identity)
            self.signals.forget(identity)
            del self._seen[identity]
        return resolved
