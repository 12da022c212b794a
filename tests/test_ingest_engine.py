"""Ingest against a real Podman engine with real containers and traffic, and a real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from conftest import (
    Engine,
    consume_events,
    kernel_counters,
    ss_tcp_states,
    start_ingest,
    wait_for,
)
from nettel.broker import EmbeddedBroker
from nettel.errors import SampleError
from nettel.ingest import procfs
from nettel.ingest.sampler import Sampler
from nettel.ingest.sources import EngineSource
from nettel.ingest.units import Unit
from nettel.models import StatEvent

pytestmark = [pytest.mark.engine, pytest.mark.broker]

INTERVAL_S = 1.0
FILE_BYTES = 200_000
FETCHES = 5
COUNTERS = (
    "rx_bytes",
    "tx_bytes",
    "rx_packets",
    "tx_packets",
    "rx_errors",
    "tx_errors",
    "rx_drops",
    "tx_drops",
)


def logs_of(container: Any) -> str:
    out: bytes = container.logs()
    return out.decode()


def totals(events: list[StatEvent], identity: str) -> dict[str, int]:
    mine = [e for e in events if e.identity == identity]
    return {k: sum(getattr(e, k) for e in mine) for k in COUNTERS}


class KernelPoller:
    """Reads each container's kernel counters (every 20 ms) and ss states (every 250 ms)
    in a thread, independently of nettel, so every sample can be bracketed by readings."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.counters: dict[str, list[tuple[int, dict[str, int]]]] = {k: [] for k in pids}
        self.states: dict[str, list[tuple[int, int, dict[str, int]]]] = {k: [] for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last_ss = 0.0
        while not self._stop.is_set():
            for key, pid in self.pids.items():
                self.counters[key].append((now_ms(), kernel_counters(pid)))
            if time.monotonic() - last_ss > 0.25:
                last_ss = time.monotonic()
                for key, pid in self.pids.items():
                    t_start = now_ms()
                    states = ss_tcp_states(pid)
                    self.states[key].append((t_start, now_ms(), states))
            time.sleep(0.02)

    def __enter__(self) -> KernelPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def counters_around(self, key: str, ts_ms: int) -> tuple[dict[str, int], dict[str, int]] | None:
        """The last reading at least 100 ms before ``ts_ms`` and the first after it."""
        readings = self.counters[key]
        before = [c for t, c in readings if t < ts_ms - 100]
        after = [c for t, c in readings if t > ts_ms]
        return (before[-1], after[0]) if before and after else None

    def states_around(self, key: str, ts_ms: int) -> tuple[dict[str, int], dict[str, int]] | None:
        """ss states from the last reading finished before ``ts_ms - 100`` and the next one."""
        readings = self.states[key]
        before = [s for _, end, s in readings if end < ts_ms - 100]
        after = [s for start, _, s in readings if start > ts_ms]
        return (before[-1], after[0]) if before and after else None


def now_ms() -> int:
    return time.time_ns() // 10**6


async def test_published_bytes_and_packets_equal_the_kernels_counters(
    engine: Engine, broker: EmbeddedBroker
) -> None:
    """Over the run, the deltas nettel publishes add up exactly to the kernel's counters.

    Containers start after ingest, so their first sample counts from zero. At every
    sample where the kernel's counters did not move between a reading just before and
    one just after it, the published running total must equal that reading exactly; the
    same for TCP states against ss.
    """
    source = EngineSource(engine.url, inventory_interval_s=2.0)
    ingest = await start_ingest(source, broker.bootstrap_servers, INTERVAL_S)
    try:
        server = engine.run(
            f"mkdir -p /www && dd if=/dev/zero of=/www/f bs=1000 "
            f"count={FILE_BYTES // 1000} 2>/dev/null && httpd -f -p 8080 -h /www"
        )
        listener = engine.run("sleep 3600 | nc -l -p 9000")
        await asyncio.sleep(0.5)
        client = engine.run(
            f"sleep 2; for i in $(seq {FETCHES}); do "
            f"wget -q -O /dev/null http://{engine.ip(server)}:8080/f; sleep 0.5; done; "
            "echo fetched; sleep 3600"
        )
        holder = engine.run(f"sleep 3600 | nc {engine.ip(listener)} 9000")
        containers = {"server": server, "client": client, "listener": listener, "holder": holder}
        pids = {k: engine.pid(c) for k, c in containers.items()}
        with KernelPoller(pids) as poller:
            await wait_for(lambda: "fetched" in logs_of(client), 60, "the client's fetches")
            await asyncio.sleep(4 * INTERVAL_S)
    finally:
        await ingest.finish()
    events = sorted(await consume_events(broker.bootstrap_servers), key=lambda e: e.ts_ms)
    final = {k: poller.counters[k][-1][1] for k in pids}
    assert final["server"]["tx_bytes"] > FETCHES * FILE_BYTES
    assert final["client"]["rx_bytes"] > FETCHES * FILE_BYTES
    for key, container in containers.items():
        # delivery is at least once: de-duplicate on the sample's time, as consumers do
        mine = sorted({e.ts_ms: e for e in events if e.identity == container.name}.values(),
                      key=lambda e: e.ts_ms)  # fmt: skip
        assert len(mine) >= 5, f"{key}: only {len(mine)} samples"
        running = dict.fromkeys(COUNTERS, 0)
        exact = 0
        for e in mine:
            for k in COUNTERS:
                running[k] += getattr(e, k)
            around = poller.counters_around(key, e.ts_ms)
            if around is not None and around[0] == around[1]:
                assert running == around[0], f"{key} at {e.ts_ms}: {running} != {around[0]}"
                exact += 1
        assert exact >= 3, f"{key}: only {exact} samples with still counters around them"
        # The whole run: the last sample's total matches the kernel's (nothing moved after).
        if poller.counters_around(key, mine[-1].ts_ms) is not None:
            assert running["rx_bytes"] <= final[key]["rx_bytes"]
        checked = 0
        for e in mine:
            around_ss = poller.states_around(key, e.ts_ms)
            if around_ss is None or around_ss[0] != around_ss[1]:
                continue
            assert e.tcp is not None
            got = {k: v for k, v in msgspec.structs.asdict(e.tcp).items() if v}
            assert got == around_ss[0], f"{key} at {e.ts_ms}: sampled {got} != ss {around_ss[0]}"
            assert e.connections == sum(v for k, v in got.items() if k not in {"listen", "close"})
            checked += 1
        assert checked >= 2, f"{key}: only {checked} samples with still TCP states around them"
    last_holder = [e for e in events if e.identity == holder.name][-1]
    assert last_holder.tcp is not None
    assert last_holder.tcp.established == 1


async def test_a_restarted_container_is_flagged_once_and_keeps_its_identity(
    engine: Engine, broker: EmbeddedBroker
) -> None:
    source = EngineSource(engine.url, inventory_interval_s=2.0)
    ingest = await start_ingest(source, broker.bootstrap_servers, INTERVAL_S)
    try:
        server = engine.run(
            "mkdir -p /www && echo hello > /www/i && httpd -f -p 8080 -h /www",
            labels={"com.docker.compose.project": "shop", "com.docker.compose.service": "web"},
        )
        await asyncio.sleep(0.5)
        client = engine.run(
            f"while true; do wget -q -O /dev/null http://{engine.ip(server)}:8080/i; "
            "sleep 0.1; done"
        )
        await asyncio.sleep(4 * INTERVAL_S)
        pid_before = engine.pid(client)
        restart_ms = time.time_ns() // 10**6
        subprocess.run(
            ["podman", "restart", "-t", "0", client.id], check=True, capture_output=True, timeout=60
        )
        await asyncio.sleep(5 * INTERVAL_S)
        assert engine.pid(client) != pid_before
        server.restart(timeout=0)
        await asyncio.sleep(4 * INTERVAL_S)
        final = kernel_counters(engine.pid(client))
    finally:
        await ingest.finish()
    events = await consume_events(broker.bootstrap_servers)
    # delivery is at least once: de-duplicate on the sample's time, as consumers do
    mine = sorted({e.ts_ms: e for e in events if e.container_id == client.id}.values(),
                  key=lambda e: e.ts_ms)  # fmt: skip
    assert {e.identity for e in mine} == {client.name}
    for e in mine:
        assert all(getattr(e, k) >= 0 for k in COUNTERS), e
    resets = [e for e in mine if e.counter_reset]
    assert len(resets) == 1, [(e.ts_ms, e.counter_reset) for e in mine]
    first_after = next(
        e
        for e in mine
        if e.ts_ms > restart_ms + 100
        and e.interval_ms > 0
        and e is not mine[0]
        and e.ts_ms >= resets[0].ts_ms
    )
    assert first_after is resets[0]
    assert resets[0].rx_bytes <= final["rx_bytes"], "a reset must not emit a giant delta"
    assert all(not e.counter_reset for e in mine if e.ts_ms < restart_ms)
    srv = sorted({e.ts_ms: e for e in events if e.container_id == server.id}.values(),
                 key=lambda e: e.ts_ms)  # fmt: skip
    assert {e.identity for e in srv} == {"shop/web"}
    assert sum(e.counter_reset for e in srv) == 1, [
        (e.ts_ms, e.counter_reset, e.rx_bytes, e.rx_packets, e.tcp) for e in srv if e.counter_reset
    ]


class StaleUnitsSource(EngineSource):
    """The real engine source, plus units the test keeps listing after they are gone."""

    extra: list[Unit]

    def units(self) -> list[Unit]:
        return super().units() + self.extra


async def test_vanished_process_and_engine_error_are_logged_and_skipped(
    engine: Engine, broker: EmbeddedBroker
) -> None:
    steady = engine.run("sleep 3600")
    doomed = engine.run("sleep 3600")
    source = StaleUnitsSource(engine.url)
    source.extra = []
    source.refresh()
    doomed_unit = next(u for u in source.units() if u.container_id == doomed.id)
    ghost = Unit(identity="ghost", container_id="f" * 64, name="ghost", pid=None)
    source.extra = [ghost]
    events: list[StatEvent] = []
    sampler = Sampler(source, events.append, host="h", interval_s=INTERVAL_S)
    # Kill `doomed` in the middle of its sample: after net/dev was read, before net/tcp.
    real_read = procfs._read
    pid = doomed_unit.pid

    def read_and_kill(path: str) -> str:
        if path == f"/proc/{pid}/net/tcp":
            subprocess.run(
                ["podman", "kill", doomed.id], check=True, capture_output=True, timeout=60
            )
            for _ in range(100):
                try:
                    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                        f.read()
                except OSError:
                    break
                time.sleep(0.05)
        return real_read(path)

    try:
        procfs._read = read_and_kill
        with capture_logs() as logs:
            for _ in range(3):
                await sampler.tick()
                await asyncio.sleep(INTERVAL_S)
    finally:
        procfs._read = real_read
        sampler.close()
        source.close()
    skipped = [entry for entry in logs if entry["event"] == "sample_skipped"]
    assert any(
        entry["container"] == "ghost" and "engine stats failed" in entry["reason"]
        for entry in skipped
    ), skipped
    assert any(entry["container"] == doomed_unit.identity for entry in skipped), skipped
    assert len([e for e in events if e.container_id == steady.id]) >= 2
    assert not [e for e in events if e.identity in {"ghost", doomed_unit.identity}]


def test_a_container_read_through_procfs_is_never_read_through_stats_while_restarting(
    engine: Engine,
) -> None:
    """The engine's stats call keys an incarnation by PID, procfs by namespace inode: a
    container switching between them mid-restart would be flagged reset twice."""
    box = engine.run("sleep 3600")
    source = EngineSource(engine.url, inventory_interval_s=60)
    stats_calls: list[str] = []
    real_stats = source._stats

    def counting_stats(unit: Unit) -> dict[str, object]:
        stats_calls.append(unit.identity)
        return real_stats(unit)

    source._stats = counting_stats  # type: ignore[method-assign]
    try:
        source.refresh()
        unit = next(u for u in source.units() if u.container_id == box.id)
        assert source.read(unit).source == "engine+procfs"
        subprocess.run(["podman", "kill", box.id], check=True, capture_output=True, timeout=60)
        for _ in range(100):
            if not os.path.exists(f"/proc/{unit.pid}"):
                break
            time.sleep(0.05)
        with pytest.raises(SampleError, match="gone"):
            source.read(unit)
    finally:
        source.close()
    assert stats_calls == []
