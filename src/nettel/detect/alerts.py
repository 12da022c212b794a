"""Alerts: the record, its lifecycle, and the sentence that explains it.

An :class:`AlertTracker` follows one signal per ``(container, metric, rule)``: an alert
opens when the evidence reaches ``open_at``, is updated while it lasts (at most when it
grows), resolves after ``resolve_after`` samples in a row below ``close_at`` (hysteresis:
``close_at`` < ``open_at``), and is not raised again for that signal within
``cooldown_ms``. Its id hashes container, metric, rule and start time, so a replay of
the same events gives the same ids and a consumer can de-duplicate.

Examples
--------
>>> t = AlertTracker(open_at=1.0, close_at=0.5, resolve_after=2, cooldown_ms=60_000)
>>> band = Band(100.0, 200.0, 300.0, "day")
>>> def step(ts, evidence, value=5000.0):
...     a = t.observe(Signal("web", "rx_bytes", ts, evidence, value, band))
...     return a and (a.status, a.started_ms, a.resolved_ms)
>>> [step(0, 0.1, 150.0), step(5000, 3.0), step(10_000, 2.0), step(15_000, 0.2, 150.0),
...  step(20_000, 0.2, 150.0), step(30_000, 3.0)]
[None, ('open', 5000, None), None, None, ('resolved', 5000, 20000), None]
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from nettel.detect.baseline import Band
from nettel.detect.container import UNITS

ALERT_SCHEMA_VERSION: Final = 1

Status = Literal["open", "update", "resolved"]
Severity = Literal["info", "warning", "critical"]


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert as published on ``nettel.alerts`` (key: the container's identity).

    ``rule`` is the custom rule's name, empty for the model's alerts. ``related`` maps
    other metrics of the container that moved at the same time to their value as a
    multiple of what was expected; ``restarts`` counts the container's restarts in the
    hour before the alert opened.
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
    metric: str, observed: float, band: Band, started_ms: int,
    related: Mapping[str, float], restarts: int, rule: str = "", limit: str = "",
) -> str:  # fmt: skip
    """One plain sentence saying what happened.

    Examples
    --------
    >>> print(explain("tx_bytes", 48e6, Band(0.6e6, 1.2e6, 1.9e6, "week"), 1795528920000,
    ...               {"connections": 12.0}, 0))  # doctest: +NORMALIZE_WHITESPACE
    tx_bytes/s 48 MB/s vs expected 0.6-1.9 MB/s at this hour on Tuesdays;
    connections x12; started 14:02
    >>> explain("syn_recv", 250, Band(0, 0, 0, ""), 0, {}, 2, rule="api syn flood",
    ...         limit="> 200")
    'rule api syn flood: syn_recv 250 > 200; 2 restarts in the hour before; started 00:00'
    """
    head = _metric_text(metric, observed)
    if rule:
        parts = [f"rule {rule}: {head} {limit}".rstrip()]
    else:
        lo, hi = _band_text(band.low, band.high, _value_unit(metric))
        when = {
            "week": f" at this hour on {_WEEKDAYS[_weekday(started_ms)]}",
            "day": " at this hour",
            "recent": " lately",
        }.get(band.basis, "")
        parts = [f"{head} vs expected {lo}-{hi}{when}"]
    for other, ratio in sorted(related.items(), key=lambda kv: -abs(kv[1]))[:3]:
        parts.append(f"{other} x{_digits(ratio)}")
    if restarts:
        parts.append(f"{restarts} restart{'s' if restarts > 1 else ''} in the hour before")
    parts.append(f"started {_clock(started_ms)}")
    return "; ".join(parts)


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
    """One sample of one watched signal: the evidence and what explains it."""

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


@dataclass
class _Open:
    alert: Alert
    calm: int = 0
    last_emitted_score: float = 0.0


class AlertTracker:
    """The lifecycle of alerts over signals; see the module docstring.

    ``severity`` comes from the evidence and from how far the value is from its band:
    critical from ``critical_ratio`` times the band's top (or evidence 10), warning from
    ``warning_ratio`` (or evidence 3), info below.
    """

    def __init__(
        self,
        open_at: float = 1.0,
        close_at: float = 0.3,
        resolve_after: int = 3,
        cooldown_ms: int = 15 * 60_000,
        warning_ratio: float = 3.0,
        critical_ratio: float = 10.0,
    ) -> None:
        if not close_at <= open_at:
            raise ValueError(f"close_at ({close_at}) must be <= open_at ({open_at})")
        self.open_at = open_at
        self.close_at = close_at
        self.resolve_after = resolve_after
        self.cooldown_ms = cooldown_ms
        self.warning_ratio = warning_ratio
        self.critical_ratio = critical_ratio
        self._open: dict[tuple[str, str, str], _Open] = {}
        self._quiet_until: dict[tuple[str, str, str], int] = {}

    @property
    def open_count(self) -> int:
        """Alerts open now."""
        return len(self._open)

    def severity(self, evidence: float, observed: float, band: Band) -> Severity:
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
        ratio = (
            observed / top if observed >= band.expected else (band.low or top) / max(observed, 1e-9)
        )
        if ratio >= self.critical_ratio or evidence >= 10:
            return "critical"
        if ratio >= self.warning_ratio or evidence >= 3:
            return "warning"
        return "info"

    def observe(self, s: Signal) -> Alert | None:
        """Feed one sample; returns the alert to publish (opened, grown, resolved) if any."""
        key = (s.identity, s.metric, s.rule)
        current = self._open.get(key)
        if current is None:
            if s.evidence < self.open_at or s.ts_ms < self._quiet_until.get(key, -1):
                return None
            alert = Alert(
                id=alert_id(s.identity, s.metric, s.rule, s.ts_ms), status="open",
                identity=s.identity, metric=s.metric, rule=s.rule, host=s.host,
                container_id=s.container_id, started_ms=s.ts_ms, updated_ms=s.ts_ms,
                observed=s.observed, peak=s.observed, expected=s.band.expected,
                band_low=s.band.low, band_high=s.band.high, band_basis=s.band.basis,
                score=s.evidence, severity=self.severity(s.evidence, s.observed, s.band),
                related=dict(s.related), restarts=s.restarts,
                explanation=explain(s.metric, s.observed, s.band, s.ts_ms, s.related,
                                    s.restarts, s.rule, s.limit),
            )  # fmt: skip
            self._open[key] = _Open(alert, 0, s.evidence)
            return alert
        a = current.alert
        if s.evidence >= self.close_at:
            current.calm = 0
            severity = self.severity(s.evidence, s.observed, s.band)
            grown = (
                _rank(severity) > _rank(a.severity) or s.evidence >= 2 * current.last_emitted_score
            )
            peak = max(a.peak, s.observed) if s.observed >= a.expected else min(a.peak, s.observed)
            related = {**a.related, **s.related}
            a = msgspec.structs.replace(
                a, status="update", updated_ms=s.ts_ms, observed=s.observed, peak=peak,
                score=max(a.score, s.evidence), related=related,
                severity=severity if _rank(severity) > _rank(a.severity) else a.severity,
                explanation=explain(a.metric, peak, _band_of(a), a.started_ms, related,
                                    a.restarts, a.rule, s.limit),
            )  # fmt: skip
            current.alert = a
            if grown:
                current.last_emitted_score = s.evidence
                return a
            return None
        current.calm += 1
        if current.calm < self.resolve_after:
            return None
        del self._open[key]
        self._quiet_until[key] = s.ts_ms + self.cooldown_ms
        return msgspec.structs.replace(
            a, status="resolved", updated_ms=s.ts_ms, resolved_ms=s.ts_ms, observed=s.observed
        )

    def is_open(self, identity: str, metric: str, rule: str = "") -> bool:
        """Whether an alert is open for that signal."""
        return (identity, metric, rule) in self._open

    def open_alerts(self) -> list[Alert]:
        """The alerts open now."""
        return [o.alert for o in self._open.values()]


def _rank(severity: Severity) -> int:
    return {"info": 0, "warning": 1, "critical": 2}[severity]


def _band_of(a: Alert) -> Band:
    return Band(a.band_low, a.expected, a.band_high, a.band_basis)


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
