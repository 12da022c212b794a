"""Restart triggers: ``[[restart]]`` tables of the rules file, and when they fire.

A trigger names one container (its identity, exactly) and restarts it after its
healthcheck failed ``after_failures`` times in a row, or when the alert rule
``on_rule`` (a ``[[rule]]`` name) opens an alert for it (either, or both)::

    [[restart]]
    name = "heal web"
    container = "web"
    after_failures = 3       # unhealthy health records in a row (1 or more)
    on_rule = "web stuck"    # and/or: when this rule fires for web
    cooldown = "5m"          # optional (default 5m): at most one restart per cooldown
    max_per_hour = 6         # optional (default 6): at most this many an hour
    dry_run = false          # optional (default true: say what it would do, do nothing)

Nothing restarts unless a table names the container, and a new table is a dry run
until it says ``dry_run = false``. Failures are counted from the health records
(:class:`~nettel.models.HealthRecord`): each ``health`` record whose ``health`` is
``unhealthy`` is one failed check; a ``healthy`` one, or a ``start`` or ``restart`` of
the container, starts the count again, and so does the trigger firing. This module
only decides; the health writer acts (through the same checks, audit rows and events
as the ``restart_container`` tool), and its cooldown and hourly cap hold there.

Examples
--------
>>> rules = parse_restarts('''
... [[restart]]
... name = "heal web"
... container = "web"
... after_failures = 2
... ''')
>>> rules[0].dry_run, rules[0].cooldown_ms, rules[0].max_per_hour
(True, 300000, 6)
>>> t = RestartTriggers(rules)
>>> def check(health):
...     return HealthRecord(ts_ms=1, host="h", kind="health", container="web", health=health)
>>> [[r.name for r in t.observe(check(h))] for h in ("unhealthy", "healthy", "unhealthy",
...                                                  "unhealthy", "unhealthy")]
[[], [], [], ['heal web'], []]
>>> parse_restarts('[[restart]]\\nname = "x"\\ncontainer = "web"\\n')  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
nettel.detect.rules.RulesError: <rules> line 1 (restart "x"): needs after_failures...
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from nettel.detect.rules import (
    RulesError,
    load_toml,
    read_rules_file,
    read_tables,
    table_cooldown_ms,
)
from nettel.models import HealthRecord

_KEYS: Final = {"name", "container", "after_failures", "on_rule", "cooldown", "max_per_hour",
                "dry_run"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class RestartRule:
    """One validated ``[[restart]]`` table; see the module docstring for each field."""

    name: str
    container: str
    after_failures: int = 0  # 0: not on failures
    on_rule: str = ""  # "": not on an alert rule
    cooldown_ms: int = 300_000
    max_per_hour: int = 6
    dry_run: bool = True
    line: int = 0


def parse_restarts(text: str, source: str = "<rules>") -> list[RestartRule]:
    """The ``[[restart]]`` tables of a rules file's text, validated (every problem is
    reported, first line first); ``[[rule]]`` tables are left to
    :func:`~nettel.detect.rules.parse_rules`."""
    doc = load_toml(text, source)
    problems: list[str] = []
    out: list[RestartRule] = []
    raw_rules = doc.get("rule", [])
    known = sorted({str(t.get("name")) for t in raw_rules if isinstance(t, dict)}
                   if isinstance(raw_rules, list) else [])  # fmt: skip
    for table, name, line, bad in read_tables(doc, text, source, "restart", _KEYS, problems):
        container = table.get("container")
        if not isinstance(container, str) or not container.strip():
            bad("container", "needs the container (its identity, exactly) it may restart")
        failures, on_rule = table.get("after_failures"), table.get("on_rule", "")
        if not isinstance(on_rule, str):
            bad("on_rule", f"on_rule must be the name of a [[rule]], not {on_rule!r}")
        elif on_rule and on_rule not in known:
            bad("on_rule", f"no [[rule]] is named {on_rule!r}; rules: "
                           f"{', '.join(known) or 'none'}")  # fmt: skip
        if failures is None and not on_rule:
            bad("", "needs after_failures (how many failed health checks in a row restart "
                    "it) or on_rule (the [[rule]] whose alert restarts it)")  # fmt: skip
        elif failures is None:
            pass
        elif isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            bad("after_failures", f"after_failures must be a whole number >= 1, not {failures!r}")
        cooldown_ms = table_cooldown_ms(table, bad, 300_000)
        cap = table.get("max_per_hour", 6)
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            bad("max_per_hour", f"max_per_hour must be a whole number >= 1, not {cap!r}")
        dry_run = table.get("dry_run", True)
        if not isinstance(dry_run, bool):
            bad("dry_run", f"dry_run must be true or false, not {dry_run!r}")
        if not problems:
            out.append(RestartRule(name=str(name), container=str(container),
                                   after_failures=int(failures or 0), on_rule=str(on_rule),
                                   cooldown_ms=cooldown_ms,
                                   max_per_hour=int(cap), dry_run=bool(dry_run),
                                   line=line))  # fmt: skip
    if problems:
        raise RulesError("\n".join(problems))
    return out


def load_restarts(path: str | Path) -> list[RestartRule]:
    """Read a rules file and validate its ``[[restart]]`` tables (:func:`parse_restarts`)."""
    return parse_restarts(read_rules_file(path), str(path))


class RestartTriggers:
    """Counts each container's failed checks in a row from its health records and says
    which restart rules fire (the count starts again when one does)."""

    def __init__(self, rules: Sequence[RestartRule]) -> None:
        self.rules = list(rules)
        self._by_container: dict[str, list[RestartRule]] = {}
        for r in self.rules:
            self._by_container.setdefault(r.container, []).append(r)
        self._failures: dict[str, int] = {}

    @property
    def alert_rules(self) -> frozenset[str]:
        """The alert rules any trigger waits for."""
        return frozenset(r.on_rule for r in self.rules if r.on_rule)

    def on_alert(self, rule: str, container: str) -> list[RestartRule]:
        """The triggers that fire when alert rule ``rule`` opens for ``container``."""
        return [r for r in self._by_container.get(container, []) if r.on_rule == rule]

    @property
    def containers(self) -> frozenset[str]:
        """Every container a rule may restart."""
        return frozenset(self._by_container)

    def observe(self, record: HealthRecord) -> list[RestartRule]:
        """The rules that fire on ``record`` (usually none)."""
        rules = self._by_container.get(record.container)
        if not rules:
            return []
        if record.kind in ("start", "restart") or (
            record.kind == "health" and record.health == "healthy"
        ):
            self._failures.pop(record.container, None)
            return []
        if record.kind != "health" or record.health != "unhealthy":
            return []
        n = self._failures.get(record.container, 0) + 1
        fired = [r for r in rules if r.after_failures and n >= r.after_failures]
        self._failures[record.container] = 0 if fired else n
        return fired
