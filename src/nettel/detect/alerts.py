"""Alerts: the record, its lifecycle, and the sentence that explains it.

An :class:`AlertTracker` follows **incidents**: one per ``(container, rule)``. An incident
opens when one of the container's metrics is **confirmed**: ``confirm_samples`` anomalous
samples in a row, or one sample at ``confirm_at`` or above (a single unusual sample is
most often noise; a very strong one is not). Anomalous in a row: a sample at ``open_at``
or above, and next to it (before or after) another at ``open_at`` or clearly beyond its
band (:data:`BEYOND`): a model may need two samples to be sure of a burst, so the
sample before the first flagged one counts when it was already clearly out of its band
(:attr:`Signal.previous`). Every other metric that reaches ``open_at`` while the
incident lasts joins it (the metrics of one container that break their bands together
are one event, so a consumer is paged once). It is published again when it grows (a
metric joins, the severity rises, the evidence doubles) and resolves once, after
``resolve_after`` calm samples in a row (hysteresis: ``close_at`` < ``open_at``); then
the container is not raised again for ``cooldown_ms``.

A sample is **calm** when none of the incident's metrics is at ``close_at`` or above
and, within ``hold_ms`` of the last sample where one was, none still goes on: clearly
beyond its band, or beyond the band of its episode's first sample and at least
:data:`HOLD_SHARE` of the way to its peak. A model adapts to a lasting new level (a
level shift, a ramp) within tens of samples and stops flagging it; the episode lasts
as long as the traffic stays out, so it stays one incident. ``resolved_ms`` is the
first calm sample of the run that resolved it (the episode's span is ``[started_ms,
resolved_ms)``), published once that run is ``resolve_after`` samples long. The
model's metrics share one incident per container; each custom rule has its own
tracker (no confirmation, no hold), so rules keep their own alerts.

What each costs: confirmation delays an incident by one sample unless its first sample
reaches ``confirm_at`` or the sample before it was already out of its band (it never
moves ``started_ms``); a lone anomalous sample under ``confirm_at`` raises nothing.
The hold delays the *resolved* version (never its ``resolved_ms``) by as long as the
traffic stays out, at most ``hold_ms`` after the model's last flag.

Each metric of an incident keeps what is true of its whole episode:

- its **direction** (``spike`` or ``dip``), fixed by the sample that made it anomalous;
- ``started_ms``: its first anomalous sample, the first of the uninterrupted run of
  samples at ``close_at`` or above (or clearly out of its band just before a break)
  that led to it breaking ``open_at``;
- its **peak**: its most extreme value in its direction over the episode (the highest
  of a spike, the lowest of a dip; never replaced by a later, less extreme one), with
  the band it broke (the band at that sample).

The first metric to break names the incident (in the scorer's metric order when
several break in the same sample): ``metric``, ``peak`` and the band fields are its;
``metrics`` lists every metric of the incident, the first one included, with its own
direction, start, peak and band. The explanation always quotes the peak and the band
it broke. The id hashes container, first metric, rule and start, so a replay of the
same events gives the same ids and a consumer can de-duplicate.

Examples
--------
>>> t = AlertTracker(open_at=1.0, close_at=0.5, resolve_after=2, cooldown_ms=60_000)
>>> band = Band(100.0, 200.0, 300.0, "day")
>>> def step(ts, evidence, value=5000.0):
...     a = t.observe(Signal("web", "rx_bytes", ts, evidence, value, band))
...     return a and (a.status, a.started_ms, a.resolved_ms, a.peak)
>>> [step(0, 0.1, 150.0), step(5000, 3.0), step(10_000, 2.0, 9000.0), step(15_000, 0.2, 150.0),
...  step(20_000, 0.2, 150.0), step(30_000, 3.0)]
[None, None, ('open', 5000, None, 9000.0), None, ('resolved', 5000, 15000, 9000.0), None]
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from nettel.detect.baseline import Band
from nettel.detect.container import UNITS

#: 2: one alert per incident (``direction`` and ``metrics`` added; version 1 alerts still decode).
ALERT_SCHEMA_VERSION: Final = 2

#: A sample is clearly beyond its band (it confirms a break next to it) when it passes
#: the band's edge by this share of the edge: above 1.5 times the top, below two thirds
#: of the bottom.
BEYOND: Final = 0.5
#: An open incident's metric holds it open (while the model no longer flags it) when its
#: value is at least this share of the way from its normal level to the episode's peak.
HOLD_SHARE: Final = 0.5

Status = Literal["open", "update", "resolved"]
Severity = Literal["info", "warning", "critical"]
Direction = Literal["spike", "dip"]


class MetricEvidence(msgspec.Struct, frozen=True, kw_only=True):
    """One metric of an incident: its direction, first anomalous sample, peak (the value
    most extreme value in its direction, at ``peak_ms``), the band that peak broke,
    its latest value and its highest evidence."""

    metric: str
    direction: Direction
    started_ms: int
    peak_ms: int
    peak: float
    expected: float
    band_low: float
    band_high: float
    band_basis: str = ""
    observed: float
    score: float


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert (an incident) as published on ``nettel.alerts`` (key: the container).

    ``metric``, ``direction``, ``peak`` and the band fields (``expected``, ``band_low``,
    ``band_high``, ``band_basis``: the band the peak broke) are those of the metric that
    named the incident; ``metrics`` lists every metric of the incident, that one first,
    each with its own peak and band (empty in alerts written before incidents existed).
    ``resolved_ms`` (resolved versions): the episode's end, its first calm sample.
    ``rule`` is the custom rule's name, empty for the model's alerts. ``related`` maps
    other metrics of the container that moved at the same time (without breaking their
    bands) to their value as a multiple of what was expected; ``restarts`` counts the
    container's restarts in the hour before the alert opened. ``time_to_limit_s``
    (resource alerts of a memory leak, :mod:`nettel.detect.resources`): when memory
    reaches its limit at the pace it rises; None for every other alert.
    """

    id: str
    status: Status
    identity: str
    metric: str
    rule: str = ""
    host: str = ""
    container_id: str = ""
    started_ms: int
    updated_ms: int
    resolved_ms: int | None = None
    observed: float
    peak: float
    expected: float
    band_low: float
    band_high: float
    band_basis: str = ""
    score: float
    severity: Severity
    related: dict[str, float] = {}
    restarts: int = 0
    explanation: str
    direction: Direction = "spike"
    metrics: list[MetricEvidence] = []
    time_to_limit_s: float | None = None
    schema_version: int = ALERT_SCHEMA_VERSION


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Alert)


def encode_alert(alert: Alert) -> bytes:
    """JSON bytes of ``alert``, as written on the alerts topic."""
    return _encoder.encode(alert)


def decode_alert(data: bytes) -> Alert:
    """Parse one alert (raises ``msgspec.ValidationError`` or ``DecodeError``).

    Examples
    --------
    >>> a = Alert(id="x", status="open", identity="web", metric="rx_bytes", started_ms=1,
    ...           updated_ms=1, observed=2.0, peak=2.0, expected=1.0, band_low=0.5,
    ...           band_high=1.5, score=3.0, severity="info", explanation="...")
    >>> decode_alert(encode_alert(a)) == a
    True
    """
    return _decoder.decode(data)


def alert_id(identity: str, metric: str, rule: str, started_ms: int) -> str:
    """Stable id of an alert: the same signal starting at the same time, the same id.

    Examples
    --------
    >>> alert_id("shop/web", "rx_bytes", "", 1) == alert_id("shop/web", "rx_bytes", "", 1)
    True
    >>> len(alert_id("shop/web", "rx_bytes", "", 1))
    20
    """
    key = f"{identity}\x1f{metric}\x1f{rule}\x1f{started_ms}".encode()
    return hashlib.blake2b(key, digest_size=10).hexdigest()


def human(value: float, unit: str = "") -> str:
    """A value the way a person reads it: ``48 MB/s``, ``1.9 KB/s``, ``12``.

    Examples
    --------
    >>> human(48_213_000, "B/s"), human(1_900, "B/s"), human(12.0), human(0.25, "/s")
    ('48 MB/s', '1.9 KB/s', '12', '0.25/s')
    """
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor and unit.startswith("B"):
            return f"{_digits(value / factor)} {prefix}{unit}"
    if unit.startswith("B"):
        return f"{_digits(value)} {unit}"
    return f"{_digits(value)}{unit}"


def _digits(v: float) -> str:
    if abs(v) >= 10 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.2g}" if abs(v) < 1 else f"{v:.1f}"


_WEEKDAYS: Final = ("Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays",
                    "Saturdays", "Sundays")  # fmt: skip


def _clock(ts_ms: int) -> str:
    return time.strftime("%H:%M", time.gmtime(ts_ms / 1000))


def _value_unit(metric: str) -> str:
    name = UNITS.get(metric, metric)
    return "B/s" if name.endswith("bytes/s") else "/s" if name.endswith("/s") else ""


def _metric_text(metric: str, value: float) -> str:
    return f"{UNITS.get(metric, metric)} {human(value, _value_unit(metric))}"


def explain(
    metric: str, peak: float, band: Band, started_ms: int,
    related: Mapping[str, float], restarts: int, rule: str = "", limit: str = "",
    direction: Direction = "spike", peak_ms: int | None = None,
    others: Sequence[MetricEvidence] = (),
) -> str:  # fmt: skip
    """One plain sentence saying what happened: the peak and the band it broke, the
    incident's other metrics (their peaks and bands), what else moved, restarts, start.

    Examples
    --------
    >>> print(explain("tx_bytes", 48e6, Band(0.6e6, 1.2e6, 1.9e6, "week"), 1795528920000,
    ...               {"connections": 12.0}, 0))  # doctest: +NORMALIZE_WHITESPACE
    tx_bytes/s up to 48 MB/s vs expected 0.6-1.9 MB/s at this hour on Tuesdays;
    connections x12; started 14:02
    >>> other = MetricEvidence(metric="tx_packets", direction="spike", started_ms=0,
    ...     peak_ms=0, peak=40_000.0, expected=1500.0, band_low=1000.0, band_high=2000.0,
    ...     band_basis="day", observed=900.0, score=4.0)
    >>> print(explain("rx_bytes", 0.0, Band(1e6, 2e6, 3e6, "day"), 0, {}, 0, direction="dip",
    ...               others=[other]))  # doctest: +NORMALIZE_WHITESPACE
    rx_bytes/s down to 0 B/s vs expected 1-3 MB/s at this hour;
    also tx_packets/s up to 40000/s vs 1000-2000/s; started 00:00
    >>> explain("syn_recv", 250, Band(0, 0, 0, ""), 0, {}, 2, rule="api syn flood",
    ...         limit="> 200")
    'rule api syn flood: syn_recv 250 > 200; 2 restarts in the hour before; started 00:00'
    """
    if rule:
        parts = [f"rule {rule}: {_metric_text(metric, peak)} {limit}".rstrip()]
    else:
        at_ms = started_ms if peak_ms is None else peak_ms
        when = {
            "week": f" at this hour on {_WEEKDAYS[_weekday(at_ms)]}",
            "day": " at this hour",
            "recent": " lately",
        }.get(band.basis, "")
        parts = [f"{_excess_text(metric, peak, band, direction)}{when}"]
    for m in others[:3]:
        band_of_m = Band(m.band_low, m.expected, m.band_high, m.band_basis)
        parts.append("also " + _excess_text(m.metric, m.peak, band_of_m, m.direction, "vs"))
    if len(others) > 3:
        parts.append(f"{len(others) - 3} more metrics")
    for other, ratio in sorted(related.items(), key=lambda kv: -abs(kv[1]))[:3]:
        parts.append(f"{other} x{_digits(ratio)}")
    if restarts:
        parts.append(f"{restarts} restart{'s' if restarts > 1 else ''} in the hour before")
    parts.append(f"started {_clock(started_ms)}")
    return "; ".join(parts)


def _excess_text(
    metric: str, peak: float, band: Band, direction: Direction, against: str = "vs expected"
) -> str:
    unit = _value_unit(metric)
    lo, hi = _band_text(band.low, band.high, unit)
    way = "up to" if direction == "spike" else "down to"
    return f"{UNITS.get(metric, metric)} {way} {human(peak, unit)} {against} {lo}-{hi}"


def _band_text(low: float, high: float, unit: str) -> tuple[str, str]:
    if unit == "B/s":
        for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if high >= factor:
                return _digits(low / factor), f"{_digits(high / factor)} {prefix}B/s"
        return _digits(low), f"{_digits(high)} B/s"
    return _digits(low), f"{_digits(high)}{unit}"


def _weekday(ts_ms: int) -> int:
    return (ts_ms // 86_400_000 + 3) % 7


@dataclass(frozen=True, slots=True)
class Signal:
    """One sample of one watched signal: the evidence and what explains it.

    ``direction``: which way the value is anomalous; ``None`` (the model's signals):
    a spike when the value is at or above the band's expected value, else a dip.
    ``previous``: the metric's ``(ts_ms, value)`` in the container's sample before, if
    known; a run that breaks starts there when that value was already beyond the band
    (a model may need two samples to be sure; the episode began with the first).
    """

    identity: str
    metric: str
    ts_ms: int
    evidence: float
    observed: float
    band: Band
    rule: str = ""
    limit: str = ""
    host: str = ""
    container_id: str = ""
    related: Mapping[str, float] = field(default_factory=dict)
    restarts: int = 0
    direction: Direction | None = None
    previous: tuple[int, float] | None = None


#: No band (a rule's signal), also the default of an episode restored from an older checkpoint.
_NO_BAND: Final = Band(0.0, 0.0, 0.0, "")


def direction_of(s: Signal) -> Direction:
    """The way ``s`` is anomalous: its own, else a spike at or above the band's expected
    value and a dip below it."""
    return s.direction or ("spike" if s.observed >= s.band.expected else "dip")


@dataclass
class _Episode:
    """One metric's anomalous run: from its first anomalous sample on. (No ``slots``:
    a field added later has a class default, so an older checkpoint still reads.)"""

    metric: str
    direction: Direction
    started_ms: int
    peak_ms: int
    peak: float
    peak_band: Band
    observed: float
    score: float
    #: samples in a row at ``open_at`` or above, up to the latest
    breaking: int = 0
    #: the band at the first sample
    start_band: Band = _NO_BAND

    @classmethod
    def first(cls, s: Signal, open_at: float = math.inf) -> _Episode:
        """The run that ``s`` begins; when ``s`` breaks ``open_at`` and its metric's
        previous sample was beyond the band already, the run begins there."""
        run = cls(s.metric, direction_of(s), s.ts_ms, s.ts_ms, s.observed, s.band,
                  s.observed, s.evidence, start_band=s.band)  # fmt: skip
        if s.previous is not None and s.evidence >= open_at:
            ts_ms, value = s.previous
            before = Signal(s.identity, s.metric, ts_ms, 0.0, value, s.band)
            if ts_ms < s.ts_ms and run.beyond_band(before):
                run.started_ms, run.breaking = ts_ms, 1
                if value > s.observed if run.direction == "spike" else value < s.observed:
                    run.peak, run.peak_ms = value, ts_ms
        return run

    def see(self, s: Signal) -> None:
        """One more sample of the run: the peak moves only to a more extreme value."""
        self.observed = s.observed
        self.score = max(self.score, s.evidence)
        v = s.observed
        if v > self.peak if self.direction == "spike" else v < self.peak:
            self.peak, self.peak_ms, self.peak_band = v, s.ts_ms, s.band

    def goes_on(self, s: Signal) -> bool:
        """Whether ``s`` is still part of the episode though the model no longer flags it:
        outside the band of the episode's first sample and at least :data:`HOLD_SHARE`
        of the way from that band's expected value to the episode's peak (a model learns
        a lasting level, a level shift or a ramp, into its band within tens of samples;
        the band before the episode does not move). A rule's signal has no band: never."""
        b = self.start_band
        if not b.basis:
            return False
        v, e = s.observed, b.expected
        if self.direction == "spike":
            return v > b.high and v - e >= HOLD_SHARE * (self.peak - e)
        return v < b.low and e - v >= HOLD_SHARE * (e - self.peak)

    def beyond_band(self, s: Signal) -> bool:
        """Whether ``s`` lies clearly outside its band in the episode's direction, or
        outside the band of the episode's first sample (a model learns a lasting level
        into its band within tens of samples; the band before the episode does not move).
        Clearly: :data:`BEYOND` beyond the band's edge, relative to it (a band describes
        a smoothed level, and single samples stray outside it). A rule's signal has no
        band: never."""
        v, far = s.observed, 1.0 + BEYOND
        if self.direction == "spike":
            return any(b.basis and v > b.high * far for b in (s.band, self.start_band))
        return any(b.basis and v * far < b.low for b in (s.band, self.start_band))

    def evidence(self) -> MetricEvidence:
        b = self.peak_band
        return MetricEvidence(
            metric=self.metric, direction=self.direction, started_ms=self.started_ms,
            peak_ms=self.peak_ms, peak=self.peak, expected=b.expected, band_low=b.low,
            band_high=b.high, band_basis=b.basis, observed=self.observed, score=self.score,
        )  # fmt: skip


@dataclass
class _Incident:
    """An open incident: its metrics (the first names it) and its last published state."""

    id: str
    started_ms: int
    members: dict[str, _Episode]
    host: str
    container_id: str
    restarts: int
    limit: str
    severity: Severity
    related: dict[str, float] = field(default_factory=dict)
    calm: int = 0
    last_emitted_score: float = 0.0
    #: the last sample with a metric at close_at or above
    last_active_ms: int = 0
    #: the first calm sample of the current calm run
    calm_since_ms: int = 0


#: (container, rule) of an incident; a metric's pending run adds the metric.
_Key = tuple[str, str]


class AlertTracker:
    """The lifecycle of incidents over signals; see the module docstring.

    ``severity`` comes from the evidence and from how far the value is from its band:
    critical from ``critical_ratio`` times the band's top (or evidence 33), warning from
    ``warning_ratio`` (or evidence 7), info below. An incident's severity is the highest
    any of its metrics reached.
    """

    # Defaults of attributes added after checkpoints existed (a restored tracker has
    # only the attributes it was written with).
    confirm_samples: int = 1
    confirm_at: float = 1.0
    hold_ms: int = 0

    def __init__(
        self,
        open_at: float = 1.0,
        close_at: float = 0.3,
        resolve_after: int = 3,
        cooldown_ms: int = 5 * 60_000,
        warning_ratio: float = 3.0,
        critical_ratio: float = 10.0,
        confirm_samples: int = 2,
        confirm_at: float = 40.0,
        hold_ms: int = 30 * 60_000,
    ) -> None:
        if not close_at <= open_at:
            raise ValueError(f"close_at ({close_at}) must be <= open_at ({open_at})")
        if confirm_samples < 1 or resolve_after < 1:
            raise ValueError("confirm_samples and resolve_after must be >= 1")
        self.open_at = open_at
        self.close_at = close_at
        self.resolve_after = resolve_after
        self.cooldown_ms = cooldown_ms
        self.confirm_samples = confirm_samples
        self.confirm_at = max(confirm_at, open_at)
        self.hold_ms = hold_ms
        self.warning_ratio = warning_ratio
        self.critical_ratio = critical_ratio
        self._open: dict[_Key, _Incident] = {}
        #: runs of samples at close_at or above that have not broken open_at (yet)
        self._pending: dict[_Key, dict[str, _Episode]] = {}
        self._quiet_until: dict[_Key, int] = {}

    @property
    def open_count(self) -> int:
        """Alerts open now."""
        return len(self._open)

    def is_open_for(self, identity: str) -> bool:
        """Whether ``identity`` has an open alert (under any rule)."""
        return any(k[0] == identity for k in self._open)

    def forget(self, identity: str) -> bool:
        """Drop what the tracker keeps of ``identity`` (pending runs, cooldowns), unless
        it has an open alert; whether it was dropped.

        Examples
        --------
        >>> t = AlertTracker()
        >>> t.forget("gone")
        True
        """
        if self.is_open_for(identity):
            return False
        for state in (self._pending, self._quiet_until):
            for k in [k for k in state if k[0] == identity]:
                del state[k]
        return True

    def severity(
        self, evidence: float, observed: float, band: Band, direction: Direction | None = None
    ) -> Severity:
        """Severity from the evidence and the size of the deviation.

        Examples
        --------
        >>> t = AlertTracker()
        >>> b = Band(0, 100, 200, "day")
        >>> t.severity(1.2, 300, b), t.severity(1.2, 900, b), t.severity(1.2, 5000, b)
        ('info', 'warning', 'critical')
        """
        if not band.basis:
            return "warning"  # a rule's alert: no band to measure it against
        top = max(band.high, 1e-9)
        if direction is None:
            direction = "spike" if observed >= band.expected else "dip"
        ratio = observed / top if direction == "spike" else (band.low or top) / max(observed, 1e-9)
        # evidence is in units of the detector's shipped threshold (1.0: 1.5 % of the
        # metric's range beyond its band): 33 is half the range beyond, 7 a tenth
        if ratio >= self.critical_ratio or evidence >= 33:
            return "critical"
        if ratio >= self.warning_ratio or evidence >= 7:
            return "warning"
        return "info"

    def tracked(self, identity: str, rule: str = "") -> Collection[str]:
        """Metrics of ``identity`` whose next samples the tracker needs even when calm:
        those of its open incident and of runs that may open one."""
        key = (identity, rule)
        incident = self._open.get(key)
        pending = self._pending.get(key)
        if incident is None:
            return pending.keys() if pending else ()
        return incident.members.keys() | pending.keys() if pending else incident.members.keys()

    def observe(self, s: Signal) -> Alert | None:
        """Feed one sample of one signal; the alert to publish (opened, grown, resolved)."""
        return self.observe_sample([s])

    def observe_sample(self, signals: Sequence[Signal]) -> Alert | None:
        """Feed one sample of one container (and rule): its signals at one time, in the
        scorer's metric order. Signals below ``close_at`` may be left out unless their
        metric is :meth:`tracked`. Returns the incident's version to publish, if any."""
        if not signals:
            return None
        first = signals[0]
        key = (first.identity, first.rule)
        pending = self._pending.get(key)
        incident = self._open.get(key)
        if incident is None:
            if first.ts_ms < self._quiet_until.get(key, -1):
                return None
            return self._maybe_open(key, signals, pending)
        return self._follow(key, incident, signals, pending)

    def _runs(self, key: _Key, signals: Sequence[Signal],
              pending: dict[str, _Episode] | None) -> dict[str, _Episode]:  # fmt: skip
        """Extend or end each signal's pending run; the runs that are live now."""
        runs = pending if pending is not None else {}
        for s in signals:
            run = runs.get(s.metric)
            if s.evidence < self.close_at:
                if run is not None and run.breaking and run.beyond_band(s):
                    run.see(s)  # a sample after a break, still out of its band
                    run.breaking += 1
                elif run is not None:
                    del runs[s.metric]
                continue
            if run is None or run.direction != direction_of(s):
                run = runs[s.metric] = _Episode.first(s, self.open_at)
            else:
                run.see(s)
            breaks = s.evidence >= self.open_at or (run.breaking > 0 and run.beyond_band(s))
            run.breaking = run.breaking + 1 if breaks else 0
        if runs:
            self._pending[key] = runs
        else:
            self._pending.pop(key, None)
        return runs

    def _maybe_open(self, key: _Key, signals: Sequence[Signal],
                    pending: dict[str, _Episode] | None) -> Alert | None:  # fmt: skip
        runs = self._runs(key, signals, pending)
        confirmed = {
            s.metric
            for s in signals
            if s.metric in runs
            and (s.evidence >= self.confirm_at or runs[s.metric].breaking >= self.confirm_samples)
        }
        if not confirmed:
            return None
        breaking = [s for s in signals if s.evidence >= self.open_at or s.metric in confirmed]
        members = {s.metric: runs.pop(s.metric) for s in breaking}
        if not runs:
            self._pending.pop(key, None)
        lead = breaking[0]
        started_ms = min(m.started_ms for m in members.values())
        incident = _Incident(
            id=alert_id(lead.identity, lead.metric, lead.rule, started_ms),
            started_ms=started_ms, members=members, host=lead.host,
            container_id=lead.container_id, restarts=lead.restarts, limit=lead.limit,
            severity=max((self._severity_of(m) for m in members.values()), key=_rank),
        )  # fmt: skip
        self._relate(incident, signals)
        self._open[key] = incident
        incident.last_active_ms = lead.ts_ms
        incident.last_emitted_score = max(m.score for m in members.values())
        return self._version(key, incident, "open", lead.ts_ms)

    def _follow(self, key: _Key, incident: _Incident, signals: Sequence[Signal],
                pending: dict[str, _Episode] | None) -> Alert | None:  # fmt: skip
        members = incident.members
        others = [s for s in signals if s.metric not in members]
        runs = self._runs(key, others, pending)
        grown = False
        active = held = False
        ts_ms = signals[0].ts_ms
        holding = ts_ms - incident.last_active_ms < self.hold_ms
        for s in signals:
            member = members.get(s.metric)
            if member is not None:
                member.see(s)
                active = active or s.evidence >= self.close_at
                held = held or (holding and (member.goes_on(s) or member.beyond_band(s)))
            elif s.evidence >= self.open_at:  # another metric breaks: it joins
                members[s.metric] = runs.pop(s.metric)
                grown = active = True
        if not runs:
            self._pending.pop(key, None)
        if not active:
            if held:  # still out of its band: the episode goes on
                incident.calm = 0
                return None
            incident.calm += 1
            if incident.calm == 1:
                incident.calm_since_ms = ts_ms
            if incident.calm < self.resolve_after:
                return None
            del self._open[key]
            self._pending.pop(key, None)
            self._quiet_until[key] = ts_ms + self.cooldown_ms
            return self._version(key, incident, "resolved", ts_ms)
        incident.calm = 0
        incident.last_active_ms = ts_ms
        self._relate(incident, signals)
        severity = max((self._severity_of(m) for m in members.values()), key=_rank)
        score = max(m.score for m in members.values())
        if _rank(severity) > _rank(incident.severity):
            incident.severity = severity
            grown = True
        if score >= 2 * incident.last_emitted_score:
            grown = True
        if not grown:
            return None
        incident.last_emitted_score = score
        return self._version(key, incident, "update", ts_ms)

    def _severity_of(self, m: _Episode) -> Severity:
        return self.severity(m.score, m.peak, m.peak_band, m.direction)

    @staticmethod
    def _relate(incident: _Incident, signals: Sequence[Signal]) -> None:
        for s in signals:
            incident.related.update(s.related)
        for metric in incident.members:
            incident.related.pop(metric, None)

    def _version(self, key: _Key, incident: _Incident, status: Status, ts_ms: int) -> Alert:
        identity, rule = key
        episodes = list(incident.members.values())
        lead = episodes[0]
        band = lead.peak_band
        others = [m.evidence() for m in episodes[1:]]
        return Alert(
            id=incident.id, status=status, identity=identity, metric=lead.metric, rule=rule,
            host=incident.host, container_id=incident.container_id,
            started_ms=incident.started_ms, updated_ms=ts_ms,
            resolved_ms=incident.calm_since_ms if status == "resolved" else None,
            observed=lead.observed,
            peak=lead.peak, expected=band.expected, band_low=band.low, band_high=band.high,
            band_basis=band.basis, score=max(m.score for m in episodes),
            severity=incident.severity, related=dict(incident.related),
            restarts=incident.restarts, direction=lead.direction,
            metrics=[lead.evidence(), *others],
            explanation=explain(lead.metric, lead.peak, band, incident.started_ms,
                                incident.related, incident.restarts, rule, incident.limit,
                                lead.direction, lead.peak_ms, others),
        )  # fmt: skip

    def is_open(self, identity: str, rule: str = "") -> bool:
        """Whether an incident is open for that container (and rule)."""
        return (identity, rule) in self._open

    def open_alerts(self) -> list[Alert]:
        """The incidents open now, as their latest version."""
        return [self._version(k, i, "update", max(m.peak_ms for m in i.members.values()))
                for k, i in self._open.items()]  # fmt: skip


def _rank(severity: Severity) -> int:
    return {"info": 0, "warning": 1, "critical": 2}[severity]


def related_moves(
    scores: Sequence[tuple[str, float, float]], metric: str, at_least: float = 2.0
) -> dict[str, float]:
    """Other metrics that moved: ``(metric, value, expected)`` triples whose value is at
    least ``at_least`` times (or at most 1 / ``at_least`` of) what was expected.

    Examples
    --------
    >>> related_moves([("rx_bytes", 9e6, 1e6), ("connections", 120, 10),
    ...                ("errors", 0.0, 0.0), ("tx_bytes", 1.1e6, 1e6)], "rx_bytes")
    {'connections': 12.0}
    """
    out: dict[str, float] = {}
    for name, value, expected in scores:
        if name == metric or expected <= 0:
            continue
        ratio = value / expected
        if ratio >= at_least or ratio <= 1 / at_least:
            out[name] = round(ratio, 2)
    return out
