"""Synthetic container traffic with known ground truth, for load tests and benchmarks.

Each simulated container has its own base rate (log-uniform, 2 KB/s to 5 MB/s), a daily
cycle peaking at its own hour, quieter weekends, multiplicative noise, short bursts,
occasional restarts (``counter_reset``), and — the ground truth — injected spikes: a
metric multiplied by a large factor for a few minutes, listed by :func:`simulate`'s
caller through ``spikes``. Everything is a pure function of the seed.

Examples
--------
>>> sim = TrafficSimulator(containers=3, seed=7)
>>> events = list(sim.events(start_ms=1_795_651_200_000, duration_ms=60_000))
>>> len(events), events[0].identity, events[0].interval_ms
(36, 'sim/svc-0', 5000)
>>> events == list(TrafficSimulator(containers=3, seed=7).events(1_795_651_200_000, 60_000))
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from nettel.models import StatEvent, TcpStates

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True, slots=True)
class Spike:
    """An injected anomaly: ``metric`` of ``identity`` times ``factor`` in [start, end)."""

    identity: str
    metric: str
    start_ms: int
    end_ms: int
    factor: float

    def to_json(self) -> dict[str, object]:
        """The spike as a JSON-ready dict (one line of the ground-truth file)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Profile:
    identity: str
    base_rx: float
    tx_ratio: float
    peak_hour: float
    weekend: float
    connections: int


class TrafficSimulator:
    """``containers`` containers sampled every ``interval_ms``; see the module docstring."""

    def __init__(self, containers: int, *, seed: int = 1, interval_ms: int = 5000,
                 noise: float = 0.15, burst_probability: float = 0.002,
                 restart_probability: float = 0.0002, host: str = "sim") -> None:  # fmt: skip
        self.containers = containers
        self.seed = seed
        self.interval_ms = interval_ms
        self.noise = noise
        self.burst_probability = burst_probability
        self.restart_probability = restart_probability
        self.host = host
        rng = random.Random(seed)
        self._profiles = [
            _Profile(
                identity=f"sim/svc-{i}",
                base_rx=math.exp(rng.uniform(math.log(2e3), math.log(5e6))),
                tx_ratio=rng.uniform(0.1, 3.0),
                peak_hour=rng.uniform(0, 24),
                weekend=rng.uniform(0.4, 1.0),
                connections=rng.randint(1, 60),
            )
            for i in range(containers)
        ]

    def identities(self) -> list[str]:
        """The simulated containers' identities."""
        return [p.identity for p in self._profiles]

    def expected_rx_rate(self, identity: str, ts_ms: int) -> float:
        """The noise-free rx bytes/s of ``identity`` at ``ts_ms`` (daily and weekly cycle)."""
        p = next(p for p in self._profiles if p.identity == identity)
        return self._shape(p, ts_ms)

    @staticmethod
    def _shape(p: _Profile, ts_ms: int) -> float:
        hour = (ts_ms % DAY_MS) / HOUR_MS
        daily = 1.0 + 0.8 * math.cos(2 * math.pi * (hour - p.peak_hour) / 24)
        weekday = (ts_ms // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday: 0 = Monday
        return p.base_rx * daily * (p.weekend if weekday >= 5 else 1.0)

    def spikes(self, count: int, start_ms: int, duration_ms: int, *, seed: int = 99,
               factor: float = 20.0) -> list[Spike]:  # fmt: skip
        """``count`` spikes at random containers and times within the span."""
        rng = random.Random(seed)
        out = []
        for _ in range(count):
            p = rng.choice(self._profiles)
            at = start_ms + rng.randrange(0, max(duration_ms - 10 * 60_000, 1))
            at -= at % self.interval_ms
            length = rng.randint(1, 5) * 60_000
            metric = rng.choice(["rx_bytes", "tx_bytes"])
            out.append(Spike(p.identity, metric, at, at + length, factor))
        return sorted(out, key=lambda s: s.start_ms)

    def events(self, start_ms: int, duration_ms: int,
               spikes: list[Spike] | None = None) -> Iterator[StatEvent]:  # fmt: skip
        """Every sample of every container in [start, start + duration), in time order."""
        rng = random.Random(self.seed * 7919)
        spikes = spikes or []
        start_ms -= start_ms % self.interval_ms
        seconds = self.interval_ms / 1000
        for ts in range(start_ms, start_ms + duration_ms, self.interval_ms):
            for p in self._profiles:
                rate = self._shape(p, ts) * rng.lognormvariate(0, self.noise)
                if rng.random() < self.burst_probability:
                    rate *= rng.uniform(2, 4)
                rx = rate * seconds
                tx = rx * p.tx_ratio * rng.lognormvariate(0, self.noise / 2)
                for s in spikes:
                    if s.identity == p.identity and s.start_ms <= ts < s.end_ms:
                        if s.metric == "rx_bytes":
                            rx *= s.factor
                        else:
                            tx *= s.factor
                conns = max(0, round(p.connections * (rate / p.base_rx)))
                yield StatEvent(
                    ts_ms=ts, host=self.host, container_id=f"simid{p.identity[8:]}",
                    identity=p.identity, name=p.identity.replace("/", "-"), image="sim:1",
                    compose_project="sim", compose_service=p.identity[4:],
                    interval_ms=self.interval_ms, rx_bytes=int(rx), tx_bytes=int(tx),
                    rx_packets=int(rx / 900) + 1, tx_packets=int(tx / 1200) + 1,
                    rx_errors=int(rng.random() < 0.001), rx_drops=int(rng.random() < 0.002),
                    connections=conns,
                    tcp=TcpStates(established=conns, time_wait=rng.randint(0, 3), listen=1),
                    counter_reset=rng.random() < self.restart_probability, source="simulate",
                )  # fmt: skip
