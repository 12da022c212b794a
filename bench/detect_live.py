"""Live detection quality: anomalies with ground truth through the whole pipeline.

    python -m bench.detect_live [--containers 24] [--days 10] [--warmup-days 7]
                                [--interval-s 60] [--seed 1]

What runs is what `nettel up` runs, built by the same functions with the same defaults
(only the data dir, the broker port and the sample interval are set): the embedded
Tansu broker (``EmbeddedBroker``, topics from ``topic_partitions``), the stream worker
(``make_stream``: samples, minute, hour, day tables) and the detector
(``make_detect``: models, alert lifecycle, ``nettel.alerts`` and the ``alerts``
table). The traffic is published by ``NETTEL_SAMPLE_INTERVAL_S=60 nettel simulate
--scenario mixed --truth FILE``, run as its own process as a user would run it: a mix
of spikes (3x-30x for 1-10 samples), level shifts, slow ramps of tx over hours, outages
(no traffic at all), SYN_RECV surges and error bursts, among events that must stay
quiet: restarts, deploys that change the level for good, daily cycles, quieter
weekends and weekly jobs. Simulated time is compressed: days of events, timestamps
spread over the days before now, are published as fast as the broker takes them.

The first ``--warmup-days`` carry no injected event (a week, so that the weekly jobs
in the scored days are their second occurrence); only the days after are scored.
Ground truth per injected anomaly: its kind, container, metric and span (the command's
truth file) and the true extreme of its metric over the span (from the same events,
generated again here: the simulator is a pure function of its seed). Scoring reads
every version of every alert back from the ``alerts`` table; only the model's
incidents count (no rules are configured):

- an incident **detects** an anomaly of its container when it opens from the
  anomaly's first sample to 3 samples after its last, and its first anomalous sample
  lies before the anomaly's end (one that starts after it is about something else);
  the first such incident gives
  the **delay** (samples from the anomaly's first sample to the one that opened it);
  more incidents on one anomaly are counted as ``split``;
- **recall** per kind, over the anomalies the detector can see: those whose values
  reach the detector's minimum volume for their metric (below it nothing alerts, by
  design: ``DEFAULT_MIN_VOLUME``); the others are counted apart (``below_min_volume``);
- **peak within 10 %**: the first incident's own entry for the anomaly's metric (its
  ``metrics`` list) has a peak within 10 % of the anomaly's true extreme (for an
  outage, whose true extreme is 0: a peak under 10 % of the level before); and
  ``..._of_own_span``: of the true extreme over the part of the anomaly the incident
  lasted for (what the alert layer can know: an incident the detector resolved in the
  middle of a level shift cannot quote what came after);
- **false alerts** per container-day: incidents opened in the scored days that detect
  no anomaly, with the normal event they followed (a restart, a deploy, a weekly job
  within the 6 hours before) or none.

Writes bench/results/detect_live.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from bench.common import write_result

from nettel.broker import EmbeddedBroker, free_loopback_port
from nettel.cli import (
    configure_logging,
    make_detect,
    make_stream,
    table_uri,
    topic_partitions,
)
from nettel.config import Settings
from nettel.detect.container import DEFAULT_MIN_VOLUME
from nettel.ingest.simulate import ANOMALY_KINDS, Anomaly, simulation
from nettel.models import StatEvent

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
#: An incident opened up to this many samples after an anomaly's last sample detects it.
LATE_SAMPLES = 3
#: A false alert within this long after a normal event is put down to that event.
AFTER_NORMAL_MS = 6 * HOUR_MS
#: Both consumers idle this long (and past the events published): everything is in.
SETTLE_S = 15.0


def metric_value(ev: StatEvent, metric: str) -> float:
    """The detector's view of ``metric`` in ``ev``: a rate per second or a gauge."""
    seconds = ev.interval_ms / 1000
    if metric == "syn_recv":
        return float(ev.tcp.syn_recv) if ev.tcp is not None else 0.0
    if metric == "errors":
        return (ev.rx_errors + ev.tx_errors) / seconds
    return float(getattr(ev, metric)) / seconds


@dataclass
class Truth:
    """An injected anomaly with what really happened: the extreme of its metric over
    its span and the metric's value in the sample before it."""

    anomaly: Anomaly
    extreme: float = math.nan
    before: float = math.nan
    values: list[tuple[int, float]] = field(default_factory=list)
    detected_by: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dip(self) -> bool:
        return self.anomaly.kind == "outage"

    @property
    def visible(self) -> bool:
        """Whether its values reach the detector's minimum volume for the metric."""
        floor = DEFAULT_MIN_VOLUME.get(self.anomaly.metric, 0.0)
        return (self.before if self.dip else self.extreme) >= floor


def record_truth(events: Iterator[StatEvent], truths: Sequence[Truth],
                 interval_ms: int) -> Iterator[StatEvent]:  # fmt: skip
    """Pass ``events`` through, noting each anomaly's extreme and level before."""
    by_identity: dict[str, list[Truth]] = defaultdict(list)
    for t in truths:
        by_identity[t.anomaly.identity].append(t)
    for ev in events:
        for t in by_identity.get(ev.identity, ()):
            a = t.anomaly
            if ev.ts_ms == a.start_ms - interval_ms:
                t.before = metric_value(ev, a.metric)
            elif a.start_ms <= ev.ts_ms < a.end_ms:
                v = metric_value(ev, a.metric)
                t.values.append((ev.ts_ms, v))
                if math.isnan(t.extreme) or (v < t.extreme if t.dip else v > t.extreme):
                    t.extreme = v
        yield ev


def incidents(alerts_uri: str) -> list[dict[str, Any]]:
    """Every model incident: when it opened, its start and its latest version."""
    rows = pl.read_delta(alerts_uri).filter(pl.col("rule").fill_null("") == "")
    out = []
    for _, group in rows.sort("updated").group_by("id", maintain_order=True):
        versions = group.to_dicts()
        opened = next((v for v in versions if v["status"] == "open"), versions[0])
        last = versions[-1]
        out.append({
            "id": last["id"], "container": last["container"],
            "opened_ms": int(opened["updated"].timestamp() * 1000),
            "started_ms": int(last["started"].timestamp() * 1000),
            "metric": last["metric"], "peak": last["peak"], "versions": len(versions),
            "last_ms": int(last["updated"].timestamp() * 1000),
            "resolved": last["status"] == "resolved",
            "metrics": {m["metric"]: m for m in last["metrics"] or ()}
            or {last["metric"]: {"metric": last["metric"], "peak": last["peak"]}},
        })  # fmt: skip
    return out


def peak_ok(t: Truth, incident: dict[str, Any], own_span: bool = False) -> bool | None:
    """Whether the incident's peak of the anomaly's metric is within 10 % of the truth:
    the anomaly's extreme, or (``own_span``) the extreme of the part of the anomaly the
    incident lasted for. None: the incident does not list that metric."""
    m = incident["metrics"].get(t.anomaly.metric)
    if m is None:
        return None
    truth = t.extreme
    if own_span:
        mine = [v for ts, v in t.values if incident["started_ms"] <= ts <= incident["last_ms"]]
        truth = (min(mine) if t.dip else max(mine)) if mine else truth
    if t.dip and truth == 0:
        return bool(m["peak"] <= 0.1 * max(t.before, 1e-9))
    return bool(abs(m["peak"] - truth) <= 0.1 * abs(truth))


def score(truths: Sequence[Truth], normal: Sequence[Anomaly], found: Sequence[dict[str, Any]],
          *, interval_ms: int, scored_from_ms: int, containers: int,
          scored_days: float) -> dict[str, Any]:  # fmt: skip
    """Recall, delay, peak accuracy per kind and false alerts (see the module docstring)."""
    by_identity: dict[str, list[Truth]] = defaultdict(list)
    for t in truths:
        by_identity[t.anomaly.identity].append(t)
    false: list[dict[str, Any]] = []
    for inc in found:
        if inc["opened_ms"] < scored_from_ms:
            continue
        hits = [t for t in by_identity.get(inc["container"], ())
                if t.anomaly.start_ms <= inc["opened_ms"]
                <= t.anomaly.end_ms + LATE_SAMPLES * interval_ms
                and inc["started_ms"] < t.anomaly.end_ms]  # fmt: skip
        if hits:
            min(hits, key=lambda t: inc["opened_ms"] - t.anomaly.start_ms).detected_by.append(inc)
        else:
            false.append(inc)
    kinds: dict[str, Any] = {}
    groups: dict[str, list[Truth]] = defaultdict(list)
    for t in truths:
        groups[t.anomaly.kind].append(t)
        if t.anomaly.kind == "spike":
            strong = (
                t.anomaly.factor >= 5 and t.anomaly.end_ms - t.anomaly.start_ms >= 2 * interval_ms
            )
            groups["spike >=5x >=2 samples" if strong else "spike other"].append(t)
    for kind, group in sorted(groups.items()):
        visible = [t for t in group if t.visible]
        detected = [t for t in visible if t.detected_by]
        delays = [(t.detected_by[0]["opened_ms"] - t.anomaly.start_ms) / interval_ms
                  for t in detected]  # fmt: skip
        peaks = [peak_ok(t, t.detected_by[0]) for t in detected]
        own = [peak_ok(t, t.detected_by[0], own_span=True) for t in detected]
        kinds[kind] = {
            "injected": len(group),
            "below_min_volume": len(group) - len(visible),
            "detected": len(detected),
            "recall": round(len(detected) / len(visible), 3) if visible else None,
            "median_delay_samples": statistics.median(delays) if delays else None,
            "max_delay_samples": max(delays) if delays else None,
            "split": sum(len(t.detected_by) - 1 for t in detected),
            "peak_within_10pct": round(sum(p is True for p in peaks) / len(peaks), 3)
            if peaks else None,
            "peak_within_10pct_of_own_span": round(sum(p is True for p in own) / len(own), 3)
            if own else None,
            "metric_not_in_incident": sum(p is None for p in peaks),
            "missed": [
                {"container": t.anomaly.identity, "metric": t.anomaly.metric,
                 "factor": round(t.anomaly.factor, 2),
                 "samples": (t.anomaly.end_ms - t.anomaly.start_ms) // interval_ms}
                for t in visible if not t.detected_by
            ][:10],
        }  # fmt: skip
    causes: dict[str, int] = defaultdict(int)
    for inc in false:
        before = [n for n in normal if n.identity == inc["container"]
                  and n.start_ms - interval_ms <= inc["opened_ms"]
                  <= n.end_ms + AFTER_NORMAL_MS]  # fmt: skip
        causes[before[-1].kind if before else "none"] += 1
    all_detected = [t for t in truths if t.visible and t.detected_by]
    all_delays = [(t.detected_by[0]["opened_ms"] - t.anomaly.start_ms) / interval_ms
                  for t in all_detected]  # fmt: skip
    all_peaks = [peak_ok(t, t.detected_by[0]) for t in all_detected]
    all_own = [peak_ok(t, t.detected_by[0], own_span=True) for t in all_detected]
    return {
        "per_kind": kinds,
        "recall_all_kinds": round(len(all_detected) / max(sum(t.visible for t in truths), 1), 3),
        "median_delay_samples": statistics.median(all_delays) if all_delays else None,
        "peak_within_10pct": round(sum(p is True for p in all_peaks) / max(len(all_peaks), 1), 3),
        "peak_within_10pct_of_own_span": round(
            sum(p is True for p in all_own) / max(len(all_own), 1), 3),
        "false_alerts": len(false),
        "false_alerts_per_container_day": round(len(false) / (containers * scored_days), 3),
        "false_alerts_after": dict(causes),
        "incidents_scored": sum(1 for i in found if i["opened_ms"] >= scored_from_ms),
        "incidents_warmup": sum(1 for i in found if i["opened_ms"] < scored_from_ms),
        "versions_per_incident": round(
            statistics.mean(i["versions"] for i in found), 2) if found else None,
    }  # fmt: skip


async def simulate(settings: Settings, bootstrap: str, args: Sequence[str],
                   truth_path: str) -> list[Anomaly]:  # fmt: skip
    """Run ``nettel simulate ARGS --truth truth_path`` against ``bootstrap``; its truth."""
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap, NETTEL_LOG_LEVEL="warning",
               NETTEL_SAMPLE_INTERVAL_S=str(settings.sample_interval_s),
               NETTEL_PARTITIONS=str(settings.partitions))  # fmt: skip
    nettel = str(Path(sys.executable).with_name("nettel"))
    proc = await asyncio.create_subprocess_exec(nettel, "simulate", *args, "--truth", truth_path,
                                                env=env)  # fmt: skip
    if await proc.wait() != 0:
        raise RuntimeError(f"nettel simulate failed ({proc.returncode})")
    text = await asyncio.to_thread(Path(truth_path).read_text, encoding="utf-8")
    lines = text.splitlines()
    return [Anomaly(**json.loads(line)) for line in lines]


async def run(containers: int, days: float, warmup_days: float, interval_s: float,
              seed: int) -> dict[str, Any]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nettel-bench-live-") as data:
        settings = Settings.from_env({}, data_dir=data, broker_port=free_loopback_port(),
                                     sample_interval_s=interval_s)  # fmt: skip
        interval_ms = settings.sample_interval_ms
        duration_ms = round(days * DAY_MS)
        # whole days before now: every timestamp is in the past, days end at midnight UTC
        start_ms = (time.time_ns() // 1_000_000 // DAY_MS) * DAY_MS - duration_ms
        warmup_ms = round(warmup_days * DAY_MS)
        total = containers * (duration_ms // interval_ms)
        broker = EmbeddedBroker(settings.broker_port)
        await broker.start(topics=topic_partitions(settings))
        bootstrap = broker.bootstrap_servers
        stream = make_stream(settings, bootstrap, epoch=broker.epoch, embedded=True)
        detect = make_detect(settings, bootstrap, epoch=broker.epoch)
        stops = asyncio.Event(), asyncio.Event()
        t0 = time.monotonic()
        c0 = time.process_time()
        tasks = [asyncio.create_task(stream.run(stops[0])),
                 asyncio.create_task(detect.run(stops[1]))]  # fmt: skip
        try:
            injected = await simulate(settings, bootstrap, [
                "--scenario", "mixed", "--containers", str(containers),
                "--hours", str(days * 24), "--warmup-hours", str(warmup_days * 24),
                "--start-ms", str(start_ms), "--seed", str(seed),
            ], f"{data}/truth.jsonl")  # fmt: skip
            published_s = time.monotonic() - t0
            # Every event is on the broker now. A publisher that retried a timed-out send
            # may have written some twice, so "consumed >= total" can come early: wait
            # until both consumers have stopped advancing too.
            seen, still_since = (-1, -1), time.monotonic()
            while not any(t.done() for t in tasks):
                now = (detect.stats.consumed, stream.stats.consumed)
                if now != seen:
                    seen, still_since = now, time.monotonic()
                elif min(now) >= total and time.monotonic() - still_since >= SETTLE_S:
                    break
                await asyncio.sleep(0.5)
            for stop in stops:
                stop.set()
            await asyncio.gather(*tasks)
            wall_s = time.monotonic() - t0
            cpu_s = time.process_time() - c0
            broker_rss = broker.rss_bytes()
        finally:
            for stop in stops:
                stop.set()
            await broker.stop()
        sim, again = simulation("mixed", containers, seed=seed, interval_ms=interval_ms,
                                start_ms=start_ms, duration_ms=duration_ms,
                                warmup_ms=warmup_ms)  # fmt: skip
        if again != injected:
            raise RuntimeError("the truth file differs from the simulator's scenario")
        truths = [Truth(a) for a in injected if a.is_anomaly]
        normal = [a for a in injected if not a.is_anomaly]
        for _ in record_truth(sim.events(start_ms, duration_ms, injected), truths, interval_ms):
            pass
        found = incidents(table_uri(settings, "alerts"))
        figures = score(truths, normal, found, interval_ms=interval_ms,
                        scored_from_ms=start_ms + warmup_ms, containers=containers,
                        scored_days=days - warmup_days)  # fmt: skip
        return {
            "containers": containers,
            "simulated_days": days,
            "warmup_days": warmup_days,
            "sample_interval_s": interval_s,
            "events": total,
            "anomalies_injected": len(truths),
            "normal_events_injected": {
                k: sum(a.kind == k for a in normal) for k in sorted({a.kind for a in normal})
            },
            **figures,
            "targets": {
                "recall_spikes_5x_2_samples_and_level_shifts": 0.95,
                "median_delay_samples": 2,
                "false_alerts_per_container_day": 0.1,
                "peak_within_10pct": 0.99,
            },
            "wall_s": round(wall_s, 1),
            "publish_s": round(published_s, 1),
            "cpu_s_stream_and_detect": round(cpu_s, 1),
            "detector_consumed": detect.stats.consumed,
            "stream_consumed": stream.stats.consumed,
            "broker_rss_mib_at_end": round(broker_rss / 2**20),
            "kinds": list(ANOMALY_KINDS),
            "load_average_at_end": os.getloadavg(),
        }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.detect_live", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--containers", type=int, default=24)
    parser.add_argument("--days", type=float, default=10.0, help="simulated days in all")
    parser.add_argument("--warmup-days", type=float, default=7.0, help="days before scoring")
    parser.add_argument("--interval-s", type=float, default=60.0, help="sample interval")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    configure_logging("warning", "console")
    figures = asyncio.run(run(args.containers, args.days, args.warmup_days, args.interval_s,
                              args.seed))  # fmt: skip
    write_result("detect_live", figures,
                 "python -m bench.detect_live " + " ".join(argv or sys.argv[1:]))  # fmt: skip


if __name__ == "__main__":
    main()
