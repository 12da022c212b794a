"""Synthetic container traffic with known ground truth, for load tests and benchmarks.

Each simulated container has its own base rate (log-uniform, 2 KB/s to 5 MB/s), a daily
cycle peaking at its own hour, quieter weekends, multiplicative noise, short bursts,
occasional restarts (``counter_reset``), now and then a half-open connection
(SYN_RECV), optionally a weekly job (``weekly_peaks``: a share of containers send
several times their usual traffic for an hour at the same time every week), and — the
ground truth — what is injected through ``events(..., spikes)``, each an
:class:`Anomaly` of a kind:

- anomalies: ``spike`` (a metric times ``factor`` for a few samples), ``level_shift``
  (the same for hours), ``ramp`` (tx rising steadily to ``factor`` times over hours:
  exfiltration-like), ``outage`` (no traffic at all), ``syn_flood`` (``factor``
  half-open connections, SYN_RECV, and as many packets received), ``error_burst``
  (``factor`` errors per second);
- normal events, which a detector should stay quiet about: ``restart`` (a counter
  reset), ``deploy`` (a restart, a new container id, and the level times ``factor``
  from then on, for good) and ``weekly_peak`` (the weekly job, listed for the record).

:meth:`TrafficSimulator.spikes` gives spikes only (``nettel simulate``'s default);
:meth:`TrafficSimulator.mixed` a mix of every kind (``nettel simulate --scenario
mixed``). Everything is a pure function of the seed.

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
from typing import Final

from nettel.models import StatEvent, TcpStates

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


WEEK_MS = 7 * DAY_MS

#: What a detector should find (the ground truth's positives).
ANOMALY_KINDS: Final = ("spike", "level_shift", "ramp", "outage", "syn_flood", "error_burst")
#: What a detector should stay quiet about.
NORMAL_KINDS: Final = ("restart", "deploy", "weekly_peak")


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something injected in [start, end): by default a spike (``metric`` of ``identity``
    times ``factor``); ``kind`` says what else (see the module docstring).

    Examples
    --------
    >>> Anomaly("sim/svc-0", "rx_bytes", 0, 60_000, 20.0).to_json()["kind"]
    'spike'
    >>> Anomaly("sim/svc-0", "rx_bytes", 0, 60_000, 1.5, "deploy").is_anomaly
    False
    """

    identity: str
    metric: str
    start_ms: int
    end_ms: int
    factor: float
    kind: str = "spike"

    @property
    def is_anomaly(self) -> bool:
        """Whether a detector should raise it (else it is a normal event)."""
        return self.kind in ANOMALY_KINDS

    def to_json(self) -> dict[str, object]:
        """As a JSON-ready dict (one line of the ground-truth file)."""
        return asdict(self)


#: The name of :class:`Anomaly` when it only held spikes.
Spike = Anomaly

#: Share of a mixed scenario's slots given to each kind (the rest stay empty).
MIX: Final = (("spike", 0.30), ("level_shift", 0.07), ("ramp", 0.04), ("outage", 0.05),
              ("syn_flood", 0.05), ("error_burst", 0.05), ("deploy", 0.05),
              ("restart", 0.06))  # fmt: skip
SLOT_MS: Final = 6 * HOUR_MS


@dataclass(frozen=True, slots=True)
class _Profile:
    identity: str
    base_rx: float
    tx_ratio: float
    peak_hour: float
    weekend: float
    connections: int
    #: (hour of the week it starts, factor) of a weekly job, if it has one
    weekly: tuple[int, float] | None = None


class TrafficSimulator:
    """``containers`` containers sampled every ``interval_ms``; see the module docstring."""

    def __init__(self, containers: int, *, seed: int = 1, interval_ms: int = 5000,
                 noise: float = 0.15, burst_probability: float = 0.002,
                 restart_probability: float = 0.0002, host: str = "sim",
                 weekly_peaks: float = 0.0) -> None:  # fmt: skip
        self.containers = containers
        self.seed = seed
        self.interval_ms = interval_ms
        self.noise = noise
        self.burst_probability = burst_probability
        self.restart_probability = restart_probability
        self.host = host
        self.weekly_peaks = weekly_peaks
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
        weekly_rng = random.Random(seed * 31 + 7)  # its own draws: the rest is unchanged
        self._profiles = [
            _Profile(p.identity, p.base_rx, p.tx_ratio, p.peak_hour, p.weekend, p.connections,
                     (weekly_rng.randrange(0, 168), weekly_rng.uniform(4.0, 8.0)))
            if weekly_rng.random() < weekly_peaks else p
            for p in self._profiles
        ]  # fmt: skip

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
               factor: float = 20.0) -> list[Anomaly]:  # fmt: skip
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

    def weekly_peaks_in(self, start_ms: int, duration_ms: int) -> list[Anomaly]:
        """Every occurrence of the containers' weekly jobs in the span (normal events)."""
        out = []
        for p in self._profiles:
            if p.weekly is None:
                continue
            hour, factor = p.weekly
            # week slot 0 is Monday 00:00 UTC; 1970-01-01 was a Thursday
            at = start_ms - (start_ms + 3 * DAY_MS) % WEEK_MS + hour * HOUR_MS
            while at < start_ms + duration_ms:
                if at + HOUR_MS > start_ms:
                    out.append(Anomaly(p.identity, "tx_bytes", at, at + HOUR_MS, factor,
                                       "weekly_peak"))  # fmt: skip
                at += WEEK_MS
        return sorted(out, key=lambda a: a.start_ms)

    def mixed(self, start_ms: int, duration_ms: int, *, warmup_ms: int = DAY_MS,
              seed: int = 99) -> list[Anomaly]:  # fmt: skip
        """Anomalies of every kind and normal events (restarts, deploys; the weekly jobs'
        occurrences are listed too), after ``warmup_ms`` of plain traffic.

        Each container's time after the warm-up is cut into 6-hour slots; a share of
        them (:data:`MIX`) gets one event, starting in the slot's first hour, so events
        never overlap each other or a weekly job. Spikes are 3x-30x (log-uniform) for
        1-10 samples; level shifts 3x-6x for 1-3 hours; ramps of tx reach 8x-20x over
        3-5 hours; outages last 5-30 minutes; SYN floods hold 100-1000 half-open
        connections and error bursts 20-200 errors/s, for 2-10 samples each; a deploy
        changes the level to 0.5x-0.8x or 1.3x-2x for good.

        Examples
        --------
        >>> sim = TrafficSimulator(20, seed=3, interval_ms=60_000, weekly_peaks=0.3)
        >>> kinds = {a.kind for a in sim.mixed(1_795_392_000_000, 10 * DAY_MS)}
        >>> sorted(kinds) == sorted(ANOMALY_KINDS + NORMAL_KINDS)
        True
        """
        rng = random.Random(seed)
        step = self.interval_ms
        weekly = self.weekly_peaks_in(start_ms, duration_ms)
        busy: dict[str, list[Anomaly]] = {}
        for w in weekly:
            busy.setdefault(w.identity, []).append(w)
        slots = [
            (p.identity, at)
            for p in self._profiles
            for at in range(start_ms + warmup_ms, start_ms + duration_ms - SLOT_MS + 1, SLOT_MS)
            if not any(w.start_ms < at + SLOT_MS + HOUR_MS and at - HOUR_MS < w.end_ms
                       for w in busy.get(p.identity, ()))
        ]  # fmt: skip
        rng.shuffle(slots)
        plan = [kind for kind, share in MIX for _ in range(round(share * len(slots)))]
        out = list(weekly)
        for kind, (identity, slot) in zip(plan, slots, strict=False):
            at = slot + rng.randrange(0, HOUR_MS // step) * step
            samples = rng.randint(1, 10)
            metric = rng.choice(("rx_bytes", "tx_bytes"))
            if kind == "spike":
                factor, end = math.exp(rng.uniform(math.log(3), math.log(30))), at + samples * step
            elif kind == "level_shift":
                factor, end = rng.uniform(3, 6), at + rng.randint(60, 180) * 60_000
            elif kind == "ramp":
                metric, factor = "tx_bytes", rng.uniform(8, 20)
                end = at + rng.randint(180, 300) * 60_000
            elif kind == "outage":
                metric, factor, end = "rx_bytes", 0.0, at + rng.randint(5, 30) * 60_000
            elif kind == "syn_flood":
                metric, factor = "syn_recv", float(rng.randint(100, 1000))
                end = at + rng.randint(2, 10) * step
            elif kind == "error_burst":
                metric, factor = "errors", rng.uniform(20, 200)
                end = at + rng.randint(2, 10) * step
            elif kind == "deploy":
                factor = rng.uniform(0.5, 0.8) if rng.random() < 0.5 else rng.uniform(1.3, 2.0)
                end = at + step
            else:  # restart
                factor, end = 1.0, at + step
            out.append(Anomaly(identity, metric, at, max(end, at + step), factor, kind))
        return sorted(out, key=lambda a: (a.start_ms, a.identity))

    def events(self, start_ms: int, duration_ms: int,
               spikes: list[Anomaly] | None = None) -> Iterator[StatEvent]:  # fmt: skip
        """Every sample of every container in [start, start + duration), in time order,
        with ``spikes`` (any :class:`Anomaly` kinds) injected."""
        rng = random.Random(self.seed * 7919)
        extra = random.Random(self.seed * 104_729)  # draws added later: the rest unchanged
        injected: dict[str, list[Anomaly]] = {}
        for a in spikes or []:
            if a.kind != "weekly_peak":  # the profile's own weekly job
                injected.setdefault(a.identity, []).append(a)
        start_ms -= start_ms % self.interval_ms
        seconds = self.interval_ms / 1000
        for ts in range(start_ms, start_ms + duration_ms, self.interval_ms):
            for p in self._profiles:
                rate = self._shape(p, ts) * rng.lognormvariate(0, self.noise)
                if rng.random() < self.burst_probability:
                    rate *= rng.uniform(2, 4)
                mine = injected.get(p.identity, ())
                deploys = 0
                for a in mine:
                    if a.kind == "deploy" and a.start_ms <= ts:
                        rate *= a.factor
                        deploys += 1
                rx = rate * seconds
                tx = rx * p.tx_ratio * rng.lognormvariate(0, self.noise / 2)
                if p.weekly is not None:
                    hour, weekly_factor = p.weekly
                    if ((ts + 3 * DAY_MS) % WEEK_MS) // HOUR_MS == hour:
                        tx *= weekly_factor
                conns = max(0, round(p.connections * (rate / p.base_rx)))
                rx_errors = int(rng.random() < 0.001)
                rx_drops = int(rng.random() < 0.002)
                time_wait = rng.randint(0, 3)
                reset = rng.random() < self.restart_probability
                syn_recv = int(extra.random() < 0.05)
                rx_packets, tx_packets = int(rx / 900) + 1, int(tx / 1200) + 1
                for a in mine:
                    if not a.start_ms <= ts < a.end_ms:
                        continue
                    kind = a.kind
                    if kind in ("spike", "level_shift"):
                        if a.metric == "rx_bytes":
                            rx *= a.factor
                        else:
                            tx *= a.factor
                        rx_packets, tx_packets = int(rx / 900) + 1, int(tx / 1200) + 1
                    elif kind == "ramp":
                        tx *= 1 + (a.factor - 1) * (ts - a.start_ms + self.interval_ms) / (
                            a.end_ms - a.start_ms)  # fmt: skip
                        tx_packets = int(tx / 1200) + 1
                    elif kind == "outage":
                        rx = tx = 0.0
                        rx_packets = tx_packets = conns = syn_recv = 0
                    elif kind == "syn_flood":
                        syn_recv += int(a.factor)
                        rx_packets += int(a.factor)
                    elif kind == "error_burst":
                        rx_errors += round(a.factor * seconds)
                    elif kind in ("restart", "deploy"):
                        reset = True
                yield StatEvent(
                    ts_ms=ts, host=self.host,
                    container_id=f"simid{p.identity[8:]}" + (f"-{deploys}" if deploys else ""),
                    identity=p.identity, name=p.identity.replace("/", "-"), image="sim:1",
                    compose_project="sim", compose_service=p.identity[4:],
                    interval_ms=self.interval_ms, rx_bytes=int(rx), tx_bytes=int(tx),
                    rx_packets=rx_packets, tx_packets=tx_packets, rx_errors=rx_errors,
                    rx_drops=rx_drops, connections=conns + syn_recv,
                    tcp=TcpStates(established=conns, time_wait=time_wait, listen=1,
                                  syn_recv=syn_recv),
                    counter_reset=reset, source="simulate",
                )  # fmt: skip


SCENARIOS: Final = ("spikes", "mixed")


def simulation(
    scenario: str, containers: int, *, seed: int, interval_ms: int, start_ms: int,
    duration_ms: int, spikes: int = 5, warmup_ms: int = DAY_MS,
) -> tuple[TrafficSimulator, list[Anomaly]]:  # fmt: skip
    """The simulator and ground truth ``nettel simulate`` publishes: ``spikes`` (that many
    20x spikes) or ``mixed`` (:meth:`TrafficSimulator.mixed`, with weekly jobs on 30 %
    of the containers, every kind after ``warmup_ms``).

    Examples
    --------
    >>> sim, truth = simulation("spikes", 3, seed=1, interval_ms=5000, start_ms=0,
    ...                         duration_ms=HOUR_MS, spikes=2)
    >>> len(truth), {a.kind for a in truth}
    (2, {'spike'})
    """
    if scenario == "spikes":
        sim = TrafficSimulator(containers, seed=seed, interval_ms=interval_ms)
        return sim, sim.spikes(spikes, start_ms, duration_ms, seed=seed + 1)
    if scenario == "mixed":
        sim = TrafficSimulator(containers, seed=seed, interval_ms=interval_ms, weekly_peaks=0.3)
        return sim, sim.mixed(start_ms, duration_ms, warmup_ms=warmup_ms, seed=seed + 1)
    raise ValueError(f"unknown scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
