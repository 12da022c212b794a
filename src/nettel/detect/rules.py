"""Custom alert rules from a TOML file: static thresholds and relative changes.

A file holds ``[[rule]]`` tables::

    [[rule]]
    name = "big sender"          # unique; alerts carry it
    metric = "tx_bytes"          # one of nettel.detect.container.METRICS
    window = "5m"                # optional: s, m, h; counters are summed over it
    above = 500_000_000          # fires while the value is above this ...

    [[rule]]
    name = "api syn flood"
    service = "api"              # scope: container = "<identity>", service = "<compose
    metric = "syn_recv"          # service>" or "<project>/<service>", or neither (all)
    above = 200

    [[rule]]
    name = "traffic tripled"
    metric = "rx_bytes"
    window = "10m"
    change = 3.0                 # ... or while the window's value is >= 3x the previous
                                 # window's (a factor below 1 fires on a fall)

What a rule measures: for a counter (bytes, packets, errors, drops) the per-second rate
of the latest sample, or with ``window`` the total over the last ``window``; for a gauge
(connections and TCP states) the latest value, or with ``window`` the largest in it.
``cooldown`` (a duration) keeps a rule quiet for a container after it resolved.
A rule alert opens on the first sample where the condition holds and resolves on the
first where it does not.

:func:`load_rules` validates everything at once and raises :class:`RulesError` naming
the line, the rule and the reason.

The same file's ``[[restart]]`` tables are restart triggers
(:mod:`nettel.detect.restarts`), read by :func:`~nettel.detect.restarts.parse_restarts`.

Examples
--------
>>> rules = parse_rules('''
... [[rule]]
... name = "api syn flood"
... service = "api"
... metric = "syn_recv"
... above = 200
... ''')
>>> rules[0].name, rules[0].metric, rules[0].service, rules[0].above
('api syn flood', 'syn_recv', 'api', 200.0)
>>> parse_rules('[[rule]]\\nname = "x"\\nmetric = "tx_byte"\\nabove = 1\\n')  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
nettel.detect.rules.RulesError: <rules> line 3 (rule "x"): unknown metric 'tx_byte'; valid: ...
"""

from __future__ import annotations

import re
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from nettel.detect.container import METRICS, RATE_METRICS
from nettel.errors import NettelError
from nettel.models import StatEvent

_KEYS: Final = {"name", "metric", "container", "service", "window", "above", "below", "change",
                "cooldown"}  # fmt: skip
_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_UNIT_MS: Final = {"s": 1000, "m": 60_000, "h": 3_600_000}


class RulesError(NettelError, ValueError):
    """A rules file nettel cannot use: the message names the line, the rule and why."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule; see the module docstring for the meaning of each field."""

    name: str
    metric: str
    container: str = ""
    service: str = ""
    window_ms: int = 0
    above: float | None = None
    below: float | None = None
    change: float | None = None
    cooldown_ms: int = 0
    line: int = 0

    def applies_to(self, ev: StatEvent) -> bool:
        """Whether ``ev``'s container is in this rule's scope."""
        if self.container:
            return ev.identity == self.container or ev.name == self.container
        if self.service:
            if "/" in self.service:
                return f"{ev.compose_project}/{ev.compose_service}" == self.service
            return ev.compose_service == self.service
        return True

    def describe_limit(self) -> str:
        """The condition as text, e.g. ``> 200`` or ``>= 3x the previous 10m``."""
        parts = []
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        if self.change is not None:
            op = ">=" if self.change >= 1 else "<="
            parts.append(f"{op} {self.change:g}x the previous {_duration_text(self.window_ms)}")
        span = f" over {_duration_text(self.window_ms)}" if self.window_ms else ""
        return " and ".join(parts) + (span if self.change is None else "")


def _duration_text(ms: int) -> str:
    for unit in ("h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms / 1000:g}s"


def _rule_lines(text: str, table: str = "rule") -> list[int]:
    """The line (1-based) of each ``[[table]]`` header."""
    header = re.compile(rf"^\s*\[\[\s*{table}\s*\]\]")
    return [i + 1 for i, ln in enumerate(text.splitlines()) if header.match(ln)]


def _key_line(text: str, start: int, key: str) -> int:
    """Line of ``key`` in the table whose header is on line ``start`` (1-based)."""
    lines = text.splitlines()
    for i in range(start, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start


def _duration(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and value > 0:
        return int(value * 1000)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNIT_MS[m.group(2)])
    return None


#: ``bad(key, reason)``: note a problem of a table (at ``key``'s line; "": the table's).
Bad = Callable[[str, str], None]


def load_toml(text: str, source: str) -> dict[str, Any]:
    """The document of a rules file's text (or :class:`RulesError` saying why not)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: not valid TOML: {e}") from None


def read_tables(doc: dict[str, Any], text: str, source: str, kind: str, keys: set[str],
                problems: list[str]) -> Iterator[tuple[dict[str, Any], Any, int, Bad]]:  # fmt: skip
    """Each ``[[kind]]`` table of a rules file, with its name, its line and a ``bad``
    that adds a problem naming the line, the table and the reason to ``problems``
    (unknown keys and missing or repeated names are added already)."""
    raw = doc.get(kind, [])
    if not isinstance(raw, list):
        raise RulesError(f"{source}: '{kind}' must be [[{kind}]] tables")
    starts = _rule_lines(text, kind)
    names: set[str] = set()
    for n, table in enumerate(raw):
        line = starts[n] if n < len(starts) else 0
        name = table.get("name")
        label = f'{kind} "{name}"' if isinstance(name, str) and name else f"{kind} #{n + 1}"

        def bad(key: str, reason: str, *, _line: int = line, _label: str = label) -> None:
            at = _key_line(text, _line, key) if key else _line
            problems.append(f"{source} line {at} ({_label}): {reason}")

        for key in sorted(set(table) - keys):
            bad(key, f"unknown key {key!r}; valid: {', '.join(sorted(keys))}")
        if not isinstance(name, str) or not name.strip():
            bad("name", "needs a name (a non-empty string)")
        elif name in names:
            bad("name", f"the name {name!r} is used twice")
        else:
            names.add(name)
        yield table, name, line, bad


def table_cooldown_ms(table: dict[str, Any], bad: Bad, default_ms: int) -> int:
    """The table's ``cooldown`` in ms (``default_ms`` without one; a bad one is noted)."""
    if "cooldown" not in table:
        return default_ms
    c = _duration(table["cooldown"])
    if c is None:
        bad("cooldown", f'cooldown {table["cooldown"]!r} is not a duration like "10m"')
    return default_ms if c is None else c


def parse_rules(text: str, source: str = "<rules>") -> list[Rule]:
    """Validate the text of a rules file; every problem is reported, first line first."""
    doc = load_toml(text, source)
    problems: list[str] = []
    extra = sorted(set(doc) - {"rule", "restart"})
    if extra:
        problems.append(f"{source}: unknown top-level key(s) {extra}; a file holds [[rule]] "
                        "and [[restart]] tables")  # fmt: skip
    rules: list[Rule] = []
    for table, name, line, bad in read_tables(doc, text, source, "rule", _KEYS, problems):
        metric = table.get("metric")
        if metric not in METRICS:
            bad("metric", f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
        container, service = table.get("container", ""), table.get("service", "")
        for key, value in (("container", container), ("service", service)):
            if not isinstance(value, str):
                bad(key, f"{key} must be a string")
        if container and service:
            bad("service", "give container or service, not both (neither: all containers)")
        window_ms = 0
        if "window" in table:
            w = _duration(table["window"])
            if w is None:
                bad(
                    "window", f'window {table["window"]!r} is not a duration like "30s", "5m", "1h"'
                )
            else:
                window_ms = w
        cooldown_ms = table_cooldown_ms(table, bad, 0)
        limits: dict[str, float | None] = {}
        for key in ("above", "below", "change"):
            value = table.get(key)
            if value is None:
                limits[key] = None
            elif isinstance(value, bool) or not isinstance(value, int | float):
                bad(key, f"{key} must be a number, not {value!r}")
                limits[key] = None
            else:
                limits[key] = float(value)
        if all(table.get(k) is None for k in ("above", "below", "change")):
            bad("", "needs a condition: above, below (a threshold) or change (a factor)")
        change = limits["change"]
        if change is not None:
            if change <= 0 or change == 1:
                bad(
                    "change",
                    f"change must be a factor > 0, not 1 (3: tripled, 0.5: halved), not {change:g}",
                )
            if not window_ms:
                bad("change", "change compares two windows: give a window too")
        if not problems:
            rules.append(
                Rule(name=str(name), metric=str(metric), container=container,
                     service=service, window_ms=window_ms, above=limits["above"],
                     below=limits["below"], change=change, cooldown_ms=cooldown_ms,
                     line=line)
            )  # fmt: skip
    if problems:
        raise RulesError("\n".join(problems))
    return rules


def read_rules_file(path: str | Path) -> str:
    """The text of a rules file (or :class:`RulesError` saying why it cannot be read)."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise RulesError(f"{p}: cannot read the rules file: {e.strerror}") from None


def load_rules(path: str | Path) -> list[Rule]:
    """Read and validate a rules file (see :func:`parse_rules`)."""
    return parse_rules(read_rules_file(path), str(path))


def _sample_value(rule: Rule, ev: StatEvent) -> float | None:
    m = rule.metric
    if m in RATE_METRICS:
        if m == "errors":
            return float(ev.rx_errors + ev.tx_errors)
        if m == "drops":
            return float(ev.rx_drops + ev.tx_drops)
        return float(getattr(ev, m))
    if m == "connections":
        return None if ev.connections is None else float(ev.connections)
    return None if ev.tcp is None else float(getattr(ev.tcp, m))


@dataclass(frozen=True, slots=True)
class RuleHit:
    """A rule's verdict on one event of one container."""

    rule: Rule
    identity: str
    ts_ms: int
    value: float
    holds: bool


@dataclass
class _Series:
    points: deque[tuple[int, float, int]] = field(default_factory=deque)  # ts, value, interval


class RuleSet:
    """Evaluates rules on events, keeping each container's recent samples per rule.

    Examples
    --------
    >>> rs = RuleSet(parse_rules('[[rule]]\\nname = "big"\\nmetric = "tx_bytes"\\n'
    ...                          'window = "10s"\\nabove = 1000\\n'))
    >>> def ev(ts, tx):
    ...     return StatEvent(ts_ms=ts, host="h", container_id="c", identity="web",
    ...                      name="web", interval_ms=5000, tx_bytes=tx)
    >>> samples = [(5000, 400), (10000, 500), (15000, 600)]
    >>> [h.holds for t, tx in samples for h in rs.evaluate(ev(t, tx))]
    [False, False, True]
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self._series: dict[tuple[str, str], _Series] = {}

    def evaluate(self, ev: StatEvent) -> list[RuleHit]:
        """Every applicable rule's verdict on ``ev``."""
        hits: list[RuleHit] = []
        for rule in self.rules:
            if not rule.applies_to(ev):
                continue
            sample = _sample_value(rule, ev)
            if sample is None:
                continue
            value, previous = self._measure(rule, ev, sample)
            holds = True
            if rule.above is not None:
                holds = holds and value > rule.above
            if rule.below is not None:
                holds = holds and value < rule.below
            if rule.change is not None:
                if previous is None or previous <= 0:
                    holds = False
                elif rule.change >= 1:
                    holds = holds and value >= rule.change * previous
                else:
                    holds = holds and value <= rule.change * previous
            hits.append(RuleHit(rule, ev.identity, ev.ts_ms, value, holds))
        return hits

    def _measure(self, rule: Rule, ev: StatEvent, sample: float) -> tuple[float, float | None]:
        counter = rule.metric in RATE_METRICS
        if not rule.window_ms:
            if counter:
                return sample / (ev.interval_ms / 1000 if ev.interval_ms > 0 else 1.0), None
            return sample, None
        series = self._series.setdefault((rule.name, ev.identity), _Series())
        pts = series.points
        pts.append((ev.ts_ms, sample, ev.interval_ms))
        keep = 2 * rule.window_ms if rule.change is not None else rule.window_ms
        while pts and pts[0][0] <= ev.ts_ms - keep:
            pts.popleft()
        cut = ev.ts_ms - rule.window_ms
        now = [v for t, v, _ in pts if t > cut]
        before = [v for t, v, _ in pts if t <= cut]
        if counter:
            value = sum(now)
            prev = sum(before) if before and pts[0][0] - pts[0][2] <= ev.ts_ms - keep + 1 else None
        else:
            value = max(now)
            prev = max(before) if before else None
        return value, prev if rule.change is not None else None
