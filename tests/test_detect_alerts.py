"""Alert lifecycle: open, update, hysteresis, cooldown, stable ids, severity, JSON."""

from __future__ import annotations

from nettel.detect.alerts import Alert, AlertTracker, Signal, decode_alert, encode_alert
from nettel.detect.baseline import Band
from nettel.detect.fleet import FleetDetector
from nettel.models import StatEvent

BAND = Band(100.0, 200.0, 300.0, "week")


def run(tracker: AlertTracker, evidence: list[float], step_ms: int = 5000) -> list[Alert]:
    out = []
    for i, e in enumerate(evidence):
        a = tracker.observe(Signal("shop/web", "rx_bytes", i * step_ms, e, 250.0 + 1000 * e, BAND))
        if a is not None:
            out.append(a)
    return out


def test_opens_updates_and_resolves_with_hysteresis() -> None:
    t = AlertTracker(open_at=1.0, close_at=0.4, resolve_after=3, cooldown_ms=0)
    # Dips between close_at and open_at do not resolve it; three calm samples in a row do.
    alerts = run(t, [0.2, 1.5, 0.5, 0.6, 3.5, 0.3, 0.9, 0.3, 0.3, 0.3, 0.2])
    assert [a.status for a in alerts] == ["open", "update", "resolved"]
    opened, grown, resolved = alerts
    assert opened.id == grown.id == resolved.id
    assert (opened.started_ms, resolved.resolved_ms) == (5000, 45_000)
    assert grown.score == 3.5
    assert grown.severity == "critical"
    assert resolved.peak == 250.0 + 3500


def test_evidence_between_the_thresholds_never_opens() -> None:
    t = AlertTracker(open_at=1.0, close_at=0.4)
    assert run(t, [0.9, 0.5, 0.99, 0.45] * 10) == []


def test_cooldown_before_raising_again() -> None:
    t = AlertTracker(open_at=1.0, close_at=0.4, resolve_after=1, cooldown_ms=60_000)
    # open at 5 s, resolved at 10 s; quiet until 70 s; the 40 s spike is not raised.
    evidence = [0.0] * 20
    evidence[1] = evidence[8] = evidence[15] = 2.0
    alerts = run(t, evidence)
    assert [(a.status, a.updated_ms) for a in alerts] == [
        ("open", 5000), ("resolved", 10_000), ("open", 75_000), ("resolved", 80_000),
    ]  # fmt: skip


def test_replay_gives_the_same_ids() -> None:
    first = run(AlertTracker(), [0, 2, 2, 0, 0, 0, 0, 5, 0, 0, 0])
    again = run(AlertTracker(), [0, 2, 2, 0, 0, 0, 0, 5, 0, 0, 0])
    assert [a.id for a in first] == [a.id for a in again]
    other = [a.id for a in run(AlertTracker(), [0, 0, 2, 0, 0, 0])]
    assert other[0] != first[0].id  # another start time, another alert


def test_severity_from_score_and_deviation() -> None:
    t = AlertTracker()
    assert t.severity(1.1, 350.0, BAND) == "info"
    assert t.severity(1.1, 1000.0, BAND) == "warning"
    assert t.severity(4.0, 350.0, BAND) == "warning"
    assert t.severity(1.1, 3000.0, BAND) == "critical"
    assert t.severity(1.1, 10.0, BAND) == "critical"  # a fall to a tenth of the band


def test_alert_json_round_trip_and_explanation() -> None:
    fleet = FleetDetector()

    def ev(i: int, rx: int, conns: int) -> StatEvent:
        return StatEvent(ts_ms=1_795_392_000_000 + i * 5000, host="h", container_id="c",
                         identity="shop/api", name="api", interval_ms=5000, rx_bytes=rx,
                         tx_bytes=rx, connections=conns)  # fmt: skip

    for i in range(700):
        fleet.process(ev(i, 300_000 + (i % 5) * 20_000, 20 + i % 3))
    alerts = [a for i in range(700, 703) for a in fleet.process(ev(i, 60_000_000, 300))]
    opened = [a for a in alerts if a.status == "open"]
    assert {a.metric for a in opened} >= {"rx_bytes", "tx_bytes"}
    rx = next(a for a in opened if a.metric == "rx_bytes")
    assert rx.explanation.startswith("rx_bytes/s 12 MB/s vs expected")
    assert "connections x" in rx.explanation
    assert "started 00:58" in rx.explanation
    assert rx.related["connections"] > 10
    assert decode_alert(encode_alert(rx)) == rx


def test_a_checkpointed_fleet_resumes_exactly() -> None:
    """Checkpoint mid-run (the typed format a worker stores with its offsets), resume:
    same alerts."""
    from nettel.detect.checkpoint import decode_checkpoint, encode_checkpoint
    from nettel.ingest.simulate import TrafficSimulator

    sim = TrafficSimulator(4, seed=8, restart_probability=0.002)
    start = 1_795_392_000_000
    spikes = sim.spikes(3, start + 3_600_000, 3_600_000, factor=30.0)
    events = list(sim.events(start, 2 * 3_600_000, spikes))
    half = len(events) // 2
    fleet = FleetDetector()
    for ev in events[:half]:
        fleet.process(ev)
    resumed = decode_checkpoint(encode_checkpoint(fleet), FleetDetector)
    straight = [a for ev in events[half:] for a in fleet.process(ev)]
    again = [a for ev in events[half:] for a in resumed.process(ev)]
    assert straight == again
    assert {a.identity for a in straight if a.status == "open"} >= {s.identity for s in spikes}
