"""The partition store: a batch scored in rounds ends where each series scored alone ends.

``FleetDetector.process_batch`` scores one event per container per round, every metric of
the round at once; ``ContainerDetector.update_metric`` (the NAB path) scores one value of
one series. Same inputs must give the same models (every number of every row: the
evidence each point had is in them, through what was learned and the detection memory)
and the same alerts as feeding the fleet one event at a time.
"""

from __future__ import annotations

import random

import numpy as np

from nettel.detect.container import make_detector
from nettel.detect.fleet import FleetDetector
from nettel.models import StatEvent, TcpStates

START_MS = 1_795_392_000_000  # a Monday 00:00 UTC


def interleaved_events() -> list[StatEvent]:
    """Three containers at different sampling intervals (5 min, 1 min, 20 s), in time
    order, with bursts, a counter reset, metrics that stay 0 and a missing TCP view."""
    rng = random.Random(7)
    events = []
    for name, step_ms, n in (("slow", 300_000, 300), ("mid", 60_000, 400), ("fast", 20_000, 400)):
        for i in range(n):
            rate = 200_000 * rng.lognormvariate(0, 0.2) * (1 + 0.5 * (i % 288 > 144))
            if rng.random() < 0.01:
                rate *= rng.uniform(5, 30)
            tcp = None if name == "slow" else TcpStates(established=rng.randint(3, 9))
            events.append(StatEvent(
                ts_ms=START_MS + i * step_ms, host="h", container_id=name, identity=name,
                name=name, interval_ms=step_ms, rx_bytes=int(rate * step_ms / 1000),
                tx_bytes=int(rate * step_ms / 3000), rx_packets=int(rate * step_ms / 1e6),
                connections=None if name == "slow" else rng.randint(3, 9), tcp=tcp,
                counter_reset=i == 200,
            ))  # fmt: skip
    return sorted(events, key=lambda e: e.ts_ms)


def test_rounds_of_a_batch_equal_each_series_alone_and_one_event_at_a_time() -> None:
    events = interleaved_events()
    batched = FleetDetector(template=make_detector(warmup=20))
    alerts_batched = []
    for i in range(0, len(events), 97):
        alerts_batched += batched.process_batch(events[i : i + 97])
    one_by_one = FleetDetector(template=make_detector(warmup=20))
    alerts_one_by_one = [a for ev in events for a in one_by_one.process(ev)]
    assert alerts_batched == alerts_one_by_one
    assert len(alerts_batched) >= 2  # the bursts were seen

    alone = {name: make_detector(warmup=20) for name in ("slow", "mid", "fast")}
    for ev in events:
        if ev.counter_reset:
            continue
        det = alone[ev.identity]
        seconds = ev.interval_ms / 1000
        values = {"rx_bytes": ev.rx_bytes / seconds, "tx_bytes": ev.tx_bytes / seconds,
                  "rx_packets": ev.rx_packets / seconds, "tx_packets": 0.0, "errors": 0.0,
                  "drops": 0.0}  # fmt: skip
        if ev.connections is not None and ev.tcp is not None:
            values |= {"connections": float(ev.connections), "syn_recv": 0.0,
                       "time_wait": 0.0, "close_wait": 0.0,
                       "established": float(ev.tcp.established)}  # fmt: skip
        for metric, value in values.items():
            det.update_metric(metric, value, ev.ts_ms)
    store = batched._store
    for name, single in alone.items():
        fleet_det = batched.detector(name)
        assert fleet_det is not None
        assert fleet_det.metrics == single.metrics
        for metric in single.metrics:
            mine, theirs = fleet_det.row(metric), single.row(metric)
            for column, arr in store.cols.items():
                if column not in ("level_row", "flag_row"):  # places in pools
                    ours, ref = arr[mine], single.store.cols[column][theirs]
                    assert np.array_equal(ours, ref, equal_nan=True), (name, metric, column)
            assert fleet_det.weekly_bands(metric) == single.weekly_bands(metric)
    # Metrics that never left 0 keep no slot levels (only their visit counts).
    level_rows = store.cols["level_row"]
    mid = batched.detector("mid")
    assert mid is not None
    assert level_rows[mid.row("errors")] == -1
    assert level_rows[mid.row("rx_bytes")] >= 0
    # The alert layer's outage check reads the bands of a round's rows at once: the same
    # (expected, spread) as one row at a time, for rows with and without slot levels and
    # one that never learned, at every hour of a week.
    fresh = store.add_row()
    hours = np.arange(168, dtype=np.int64) * 3_600_000 + START_MS + 1_800_000
    rows = np.repeat(np.arange(fresh + 1, dtype=np.int64), len(hours))
    ts = np.tile(hours, fresh + 1)
    expected, spread = store.bands(rows, ts)
    by_row = [store.band(r, t)[:2] for r, t in zip(rows.tolist(), ts.tolist(), strict=True)]
    assert list(zip(expected.tolist(), spread.tolist(), strict=True)) == by_row
