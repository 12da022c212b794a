"""Custom rules: they fire exactly when their condition holds; a bad file is refused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nettel.detect.fleet import FleetDetector
from nettel.detect.restarts import RestartTriggers, parse_restarts
from nettel.detect.rules import RulesError, load_rules, parse_rules
from nettel.models import HealthKind, HealthRecord, StatEvent, TcpStates

RULES = """
# Users' own alerts.
[[rule]]
name = "big sender"
metric = "tx_bytes"
window = "5m"
above = 380_000_000

[[rule]]
name = "api syn flood"
service = "api"
metric = "syn_recv"
above = 200

[[rule]]
name = "rx tripled"
container = "shop/db"
metric = "rx_bytes"
window = "1m"
change = 3.0
"""

T0 = 1_795_392_000_000


def events(seed: int = 4) -> list[StatEvent]:
    """Three containers, 5-second samples, with random bursts of every kind."""
    rng = random.Random(seed)
    out = []
    for i in range(720):
        for identity, service in (("shop/api", "api"), ("shop/db", "db"), ("shop/web", "web")):
            tx = rng.choice([1_000_000, 5_000_000, 30_000_000]) if rng.random() < 0.3 else 2_000_000
            rx = 1_000_000 * (rng.choice([1, 1, 1, 4, 8]) if i % 40 < 12 else 1)
            syn = rng.choice([0, 5, 150, 250, 400]) if rng.random() < 0.2 else 3
            out.append(StatEvent(
                ts_ms=T0 + i * 5000, host="h", container_id=identity, identity=identity,
                name=identity, compose_project="shop", compose_service=service,
                interval_ms=5000, rx_bytes=rx, tx_bytes=tx, connections=10,
                tcp=TcpStates(established=10, syn_recv=syn),
            ))  # fmt: skip
    return out


def expected_holds(evs: list[StatEvent]) -> dict[tuple[str, str], list[bool]]:
    """The conditions computed directly from their definition, sample by sample."""
    out: dict[tuple[str, str], list[bool]] = {}
    by_container: dict[str, list[StatEvent]] = {}
    for ev in evs:
        by_container.setdefault(ev.identity, []).append(ev)
    for identity, series in by_container.items():
        big = [sum(e.tx_bytes for e in series[max(0, i - 59) : i + 1]) > 380_000_000
               for i in range(len(series))]  # fmt: skip
        out[("big sender", identity)] = big
        if identity == "shop/api":
            out[("api syn flood", identity)] = [
                e.tcp is not None and e.tcp.syn_recv > 200 for e in series
            ]
        if identity == "shop/db":
            now = [
                sum(e.rx_bytes for e in series[max(0, i - 11) : i + 1]) for i in range(len(series))
            ]
            out[("rx tripled", identity)] = [
                i >= 23 and now[i] >= 3 * now[i - 12] for i in range(len(series))
            ]
    return out


def test_rules_fire_exactly_when_the_condition_holds() -> None:
    rules = parse_rules(RULES)
    fleet = FleetDetector(rules=rules)
    evs = events()
    alerts = [a for ev in evs for a in fleet.process(ev) if a.rule]
    for (rule, identity), holds in expected_holds(evs).items():
        ts = [T0 + i * 5000 for i in range(len(holds))]
        starts = [t for i, t in enumerate(ts) if holds[i] and (i == 0 or not holds[i - 1])]
        ends = [t for i, t in enumerate(ts) if i and not holds[i] and holds[i - 1]]
        mine = [a for a in alerts if a.rule == rule and a.identity == identity]
        assert starts, f"{rule} never holds for {identity}: the test data must exercise it"
        assert [a.started_ms for a in mine if a.status == "open"] == starts, (rule, identity)
        assert [a.resolved_ms for a in mine if a.status == "resolved"] == ends, (rule, identity)
    # Scope: the syn flood rule is for the api service only, the change rule for shop/db.
    assert {a.identity for a in alerts if a.rule == "api syn flood"} == {"shop/api"}
    assert {a.identity for a in alerts if a.rule == "rx tripled"} == {"shop/db"}
    first = next(a for a in alerts if a.rule == "api syn flood")
    assert first.explanation.startswith("rule api syn flood: syn_recv ")
    assert "> 200" in first.explanation


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('[[rule]]\nname = "a"\nmetric = "tx_byte"\nabove = 1\n', 3, "unknown metric 'tx_byte'"),
        ('[[rule]]\nname = "a"\nmetric = "tx_bytes"\n', 1, "needs a condition"),
        (
            '[[rule]]\nname = "a"\nmetric = "tx_bytes"\nabove = "lots"\n',
            4,
            "above must be a number",
        ),
        (
            '[[rule]]\nname = "a"\nmetric = "tx_bytes"\nwindow = "5 weeks"\nabove = 1\n',
            4,
            "not a duration",
        ),
        ('[[rule]]\nname = "a"\nmetric = "rx_bytes"\nchange = 3\n', 4, "give a window too"),
        (
            '[[rule]]\nname = "a"\nmetric = "rx_bytes"\nabove = 1\n\n[[rule]]\nname = "a"\n'
            'metric = "rx_bytes"\nabove = 2\n',
            7,
            "used twice",
        ),
        (
            '[[rule]]\nname = "a"\nmetric = "rx_bytes"\nabove = 1\nservise = "api"\n',
            5,
            "unknown key 'servise'",
        ),
        (
            '[[rule]]\nname = "a"\nmetric = "rx_bytes"\nabove = 1\n'
            'container = "x"\nservice = "y"\n',
            6,
            "not both",
        ),
        ('[[rule]]\nname = "a"\nmetric = "rx_bytes"\nabove = \n', 4, "not valid TOML"),
    ],
)
def test_invalid_rules_are_refused_with_line_and_reason(
    tmp_path: Path, text: str, line: int, reason: str
) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(RulesError) as e:
        load_rules(path)
    message = str(e.value)
    assert message.startswith(str(path)), message
    assert f"line {line}" in message, message
    assert reason in message, message


def test_a_valid_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULES)
    rules = load_rules(path)
    assert [r.name for r in rules] == ["big sender", "api syn flood", "rx tripled"]
    assert [r.line for r in rules] == [3, 9, 15]
    assert rules[0].window_ms == 300_000
    assert rules[0].describe_limit() == "> 3.8e+08 over 5m"


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read the rules file"):
        load_rules(tmp_path / "nope.toml")


def test_restart_triggers_are_checked_with_the_rules_and_count_failures_in_a_row() -> None:
    """Unit (pure logic): ``[[restart]]`` tables sit beside ``[[rule]]`` ones; each bad
    key is named with its line; failures count in a row (a healthy check, a start or a
    firing starts again), for the named container only."""
    text = RULES + '\n[[restart]]\nname = "heal db"\ncontainer = "shop/db"\nafter_failures = 2\n'
    assert len(parse_rules(text)) == len(parse_rules(RULES))
    (rule,) = parse_restarts(text)
    assert (rule.container, rule.after_failures, rule.dry_run) == ("shop/db", 2, True)
    bad = '[[restart]]\nname = "x"\ncontainer = "db"\nafter_failures = 0\ndry_run = "no"\n'
    with pytest.raises(RulesError) as e:
        parse_restarts(bad + 'on_rule = "big sendr"\n')
    assert str(e.value).splitlines() == [
        "<rules> line 6 (restart \"x\"): no [[rule]] is named 'big sendr'; rules: none",
        '<rules> line 4 (restart "x"): after_failures must be a whole number >= 1, not 0',
        "<rules> line 5 (restart \"x\"): dry_run must be true or false, not 'no'",
    ]
    (on_alert,) = parse_restarts(
        RULES + '[[restart]]\nname = "y"\ncontainer = "web"\non_rule = "big sender"\n'
    )
    assert RestartTriggers([on_alert]).on_alert("big sender", "web") == [on_alert]
    triggers = RestartTriggers([rule])

    def rec(kind: HealthKind, health: str = "", container: str = "shop/db") -> HealthRecord:
        return HealthRecord(ts_ms=1, host="h", kind=kind, container=container, health=health)

    seq = [rec("health", "unhealthy"), rec("start"), rec("health", "unhealthy"),
           rec("health", "unhealthy", "other"), rec("health", "unhealthy"),
           rec("health", "unhealthy"), rec("health", "unhealthy")]  # fmt: skip
    assert [len(triggers.observe(r)) for r in seq] == [0, 0, 0, 0, 1, 0, 1]
