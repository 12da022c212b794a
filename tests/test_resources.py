"""Resources end to end: cgroup files -> ingest -> nettel.resources -> resource tables.

Real Podman containers burning CPU (under a --cpus limit), holding memory and writing to
disk; a real broker; the resource stream writing real Delta tables. What the tables hold
is compared with the cgroup files' own counters, read here independently of nettel.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from conftest import IMAGE, Engine, consume_all, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.detect.alerts import Alert, decode_alert
from nettel.ingest.cgroups import CgroupReader, ResourceTracker
from nettel.ingest.publisher import EventPublisher
from nettel.ingest.service import IngestService
from nettel.ingest.sources import EngineSource
from nettel.models import (
    RESOURCE_COUNTERS,
    ResourceEvent,
    decode_resource_event,
    encode_resource_event,
)
from nettel.store.alerts import AlertTable
from nettel.store.resources import RESOURCE_ROLLUP, ResourceMinuteTable
from nettel.store.rollup import HOUR_MS, RollupTable
from nettel.stream.resources import ResourceStreamWorker

NETTEL = str(Path(sys.executable).with_name("nettel"))
TOPICS = {"nettel.stats": 2, "nettel.resources": 2, "nettel.stats.dlq": 1, "nettel.alerts": 2}
MiB = 1 << 20


# -- cgroup v2 parsing, on files laid out as on a v2 host ------------------------------

V2_FILES = {
    "cpu.stat": "usage_usec 5000123\nuser_usec 4000000\nsystem_usec 1000123\n"
    "core_sched.force_idle_usec 0\nnr_periods 120\nnr_throttled 37\n"
    "throttled_usec 2500000\nnr_bursts 0\nburst_usec 0\n",
    "memory.current": "52428800\n",
    "memory.max": "67108864\n",
    "memory.stat": "anon 41943040\nfile 8388608\nkernel 2097152\nkernel_stack 65536\n"
    "pagetables 131072\nsock 0\nshmem 0\nfile_mapped 0\n",
    "memory.events": "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n",
    "io.stat": "254:0 rbytes=1048576 wbytes=4194304 rios=16 wios=64 dbytes=0 dios=0\n"
    "7:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
    "pids.current": "3\n",
    "pids.max": "max\n",
}


def test_cgroup_v2_files_are_read_once_each_into_counters_and_gauges(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text("0::/machine.slice/libpod-abc.scope/container\n")
    (root / "cgroup.controllers").parent.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    d = root / "machine.slice" / "libpod-abc.scope" / "container"
    d.mkdir(parents=True)
    for name, text in V2_FILES.items():
        (d / name).write_text(text)
    reader = CgroupReader(proc_root=str(proc), cgroup_root=str(root))
    r = reader.read("abc", 4242)
    c, g = r.counters, r.gauges
    assert r.source == "cgroup-v2"
    assert (c.cpu_usage_us, c.cpu_user_us, c.cpu_system_us) == (5000123, 4000000, 1000123)
    assert (c.cpu_periods, c.cpu_throttled_periods, c.cpu_throttled_us) == (120, 37, 2500000)
    assert (c.io_read_bytes, c.io_write_bytes, c.io_reads, c.io_writes) == (
        1052672,
        4194304,
        17,
        64,
    )
    assert (c.oom_events, c.oom_kills) == (2, 1)
    assert (g.memory_bytes, g.memory_limit_bytes) == (52428800, 67108864)
    assert (g.memory_anon_bytes, g.memory_file_bytes, g.memory_kernel_bytes) == (
        41943040, 8388608, 2097152)  # fmt: skip
    assert (g.pids, g.pids_limit) == (3, 0)
    # counters become deltas; a counter going down is a reset, never a negative
    t = ResourceTracker()
    assert t.update("abc", r, ts_ms=0) is None
    (d / "cpu.stat").write_text(V2_FILES["cpu.stat"].replace("5000123", "5500123"))
    delta = t.update("abc", reader.read("abc", 4242), ts_ms=1000)
    assert delta is not None
    assert (delta.counters.cpu_usage_us, delta.reset) == (500000, False)
    (d / "cpu.stat").write_text(V2_FILES["cpu.stat"].replace("5000123", "10"))
    delta = t.update("abc", reader.read("abc", 4242), ts_ms=2000)
    assert delta is not None
    assert (delta.counters.cpu_usage_us, delta.reset) == (10, True)
    # files that cannot be read are an error the source falls back from, not a crash
    (d / "io.stat").unlink()
    with pytest.raises(OSError, match=r"io\.stat"):
        CgroupReader(proc_root=str(proc), cgroup_root=str(root)).read("abc", 4242)
    reader.close()


# -- real containers -> ingest -> broker -> resource tables ----------------------------


def _cgroup_dir(pid: int, controller: str) -> str:
    """The container's directory of ``controller`` (parsed here, not by nettel)."""
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "/sys/fs/cgroup" + next(p for h, c, p in lines if h == "0")
    return next(f"/sys/fs/cgroup/{c}{p}" for _, c, p in lines if controller in c.split(","))


def _text(path: str) -> str:
    return Path(path).read_text(encoding="ascii")


def kernel_resources(pid: int) -> dict[str, int]:
    """CPU time (us), bytes written, throttled periods and memory from the cgroup files."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        d = _cgroup_dir(pid, "")
        cpu = dict(line.split() for line in _text(f"{d}/cpu.stat").splitlines())
        written = sum(int(kv.split("=")[1]) for line in _text(f"{d}/io.stat").splitlines()
                      for kv in line.split()[1:] if kv.startswith("wbytes="))  # fmt: skip
        return {"cpu_usage_us": int(cpu["usage_usec"]), "io_write_bytes": written,
                "cpu_throttled_periods": int(cpu["nr_throttled"]),
                "memory_bytes": int(_text(f"{d}/memory.current"))}  # fmt: skip
    usage_ns = int(_text(f"{_cgroup_dir(pid, 'cpuacct')}/cpuacct.usage"))
    cpu = dict(line.split() for line in _text(f"{_cgroup_dir(pid, 'cpu')}/cpu.stat").splitlines())
    blkio = _text(f"{_cgroup_dir(pid, 'blkio')}/blkio.throttle.io_service_bytes")
    written = sum(int(p[2]) for p in (line.split() for line in blkio.splitlines())
                  if len(p) == 3 and p[1] == "Write")  # fmt: skip
    memory = int(_text(f"{_cgroup_dir(pid, 'memory')}/memory.usage_in_bytes"))
    return {"cpu_usage_us": usage_ns // 1000, "io_write_bytes": written,
            "cpu_throttled_periods": int(cpu["nr_throttled"]), "memory_bytes": memory}  # fmt: skip


class CgroupPoller:
    """Reads the containers' cgroup files every 20 ms in a thread, independently of
    nettel, so each of nettel's readings can be bracketed by two of these."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.readings: dict[str, list[tuple[int, dict[str, int]]]] = {k: [] for k in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, pid in self.pids.items():
                self.readings[key].append((time.time_ns() // 1_000_000, kernel_resources(pid)))
            time.sleep(0.02)

    def __enter__(self) -> CgroupPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def bracket(self, key: str, counter: str, start_ms: int, end_ms: int) -> tuple[int, int]:
        """(least, most) the counter can have grown from ``start_ms`` to ``end_ms``."""
        at = self.readings[key]
        margin = 25  # nettel stamps a reading just before it reads the cgroup files
        before_start = max(v[counter] for t, v in at if t <= start_ms - margin)
        after_start = min(v[counter] for t, v in at if t >= start_ms + margin)
        before_end = max(v[counter] for t, v in at if t <= end_ms - margin)
        after_end = min(v[counter] for t, v in at if t >= end_ms + margin)
        return before_end - after_start, after_end - before_start


def oom_kills(pid: int) -> int:
    """OOM kills in the container's memory cgroup, from its own file."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        text = _text(f"{_cgroup_dir(pid, '')}/memory.events")
    else:
        text = _text(f"{_cgroup_dir(pid, 'memory')}/memory.oom_control")
    return int(dict(line.split() for line in text.splitlines()).get("oom_kill", 0))


def root_block_device() -> str:
    """The block device the engine's storage lives on (for a write-bps rule)."""
    dev = os.stat("/var/lib/containers" if os.path.exists("/var/lib/containers") else "/").st_dev
    name = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    return f"/dev/{name}"


def run(engine: Engine, command: str, **kw: Any) -> Any:
    c = engine.client.containers.run(IMAGE, ["sh", "-c", command], detach=True, **kw)
    assert c.id is not None
    engine.created.append(c.id)
    c.reload()
    return c


@pytest.mark.engine
@pytest.mark.broker
async def test_burner_holder_writer_stats_equal_their_cgroup_counters(
    engine: Engine, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    tag = os.urandom(3).hex()
    # on a cgroup v1 host the kernel counts a cgroup's block I/O only under a throttle
    # rule: a generous one makes it count (v2's io.stat always does)
    rule = [{"Path": root_block_device(), "Rate": 1 << 30}]
    containers = {
        # four burners under a tenth of a core: throttled even on a busy machine
        "cpu": run(engine, "for i in 1 2 3; do dd if=/dev/zero of=/dev/null & done; "
                   "dd if=/dev/zero of=/dev/null", name=f"nt-res-cpu-{tag}",
                   nano_cpus=100_000_000),
        "mem": run(engine, "dd if=/dev/zero of=/dev/shm/f bs=1M count=24; sleep 600",
                   name=f"nt-res-mem-{tag}", mem_limit="64m"),
        "disk": run(engine, "while true; do dd if=/dev/zero of=/tmp/x bs=1M count=4 "
                    "conv=fsync 2>/dev/null; sleep 0.2; done", name=f"nt-res-disk-{tag}",
                    device_write_bps=rule),
        # a leak: 3 MiB more tmpfs a step until the 40 MiB limit, then each new dd is
        # OOM-killed (the largest process; the container itself runs on)
        "leak": run(engine, "(sleep 1; i=0; while true; do dd if=/dev/zero of=/dev/shm/f$i "
                    "bs=1M count=3 2>/dev/null; i=$((i+1)); sleep 0.5; done) & sleep 600",
                    name=f"nt-res-leak-{tag}", mem_limit="40m"),
    }  # fmt: skip
    pids = {k: engine.pid(c) for k, c in containers.items()}
    names = {k: c.name for k, c in containers.items()}
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, TOPICS)
    source = EngineSource(engine.url, inventory_interval_s=60, resources=True)
    service = IngestService(
        source, EventPublisher(bootstrap, "nettel.stats"), host="test-host", interval_s=0.5,
        resource_publisher=EventPublisher(bootstrap, "nettel.resources"),
    )  # fmt: skip
    with CgroupPoller(pids) as poller:
        await asyncio.sleep(0.1)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.sleep(4)
        await wait_for(lambda: oom_kills(pids["leak"]) > 0, 40, "the leaking container's OOM kill")
        await asyncio.sleep(1.5)  # a sample or two after it
        stop.set()
        await asyncio.wait_for(task, 20)
        await asyncio.sleep(0.1)
    after = {k: kernel_resources(pid) for k, pid in pids.items()}
    sent = service.resource_publisher.sent if service.resource_publisher else 0
    assert sent >= 4 * 5
    events = [decode_resource_event(m.value) for m in await consume_all(
        bootstrap, "nettel.resources")]  # fmt: skip

    table = ResourceMinuteTable(str(tmp_path / "resource_minute"))
    hour = RollupTable(str(tmp_path / "resource_hour"), table, HOUR_MS, spec=RESOURCE_ROLLUP)
    alerts = AlertTable(str(tmp_path / "alerts"))
    worker = ResourceStreamWorker(bootstrap, table, flush_interval_s=0.5, rollups=[hour],
                                  seal_on_stop=True, grace_ms=1000, alerts=alerts)  # fmt: skip
    wstop = asyncio.Event()
    wtask = asyncio.create_task(worker.run(wstop))
    await wait_for(lambda: worker.consumed >= sent, 60, "every resource event consumed")
    wstop.set()
    await asyncio.wait_for(wtask, 30)
    assert worker.dead_lettered == 0

    rows = table.scan().collect()
    hours = hour.scan().collect()
    for key, name in names.items():
        mine = rows.filter(pl.col("name") == name)
        assert mine.height >= 1, key
        assert set(mine["source"].to_list()) <= {"cgroup-v1", "cgroup-v2"}
        evs = sorted((e for e in events if e.name == name), key=lambda e: e.ts_ms)
        start_ms, end_ms = evs[0].ts_ms - evs[0].interval_ms, evs[-1].ts_ms
        assert not any(e.counter_reset for e in evs)
        for counter in ("cpu_usage_us", "io_write_bytes", "cpu_throttled_periods"):
            stored = int(mine[counter].sum())
            assert hours.filter(pl.col("name") == name)[counter].sum() == stored  # rolled
            # nettel's first reading is a baseline and its last ends the last delta: what
            # the files counted between the two, bracketed by the poller's readings
            least, most = poller.bracket(key, counter, start_ms, end_ms)
            assert least <= stored <= most, (key, counter, least, stored, most)
    cpu = rows.filter(pl.col("name") == names["cpu"])
    peak = int(cpu["cpu_peak_millicores"].max())  # type: ignore[arg-type]
    assert 0 < peak < 250  # about a tenth of a core at most, sample by sample
    assert cpu["cpu_throttled_periods"].sum() > 0
    assert rows.filter(pl.col("name") == names["disk"])["io_write_bytes"].sum() >= 4 * MiB
    # the resource alerts the worker published: the leak is seen, with the time it has
    # left, before the OOM kill, which is reported too; the capped burner is throttled
    published = [decode_alert(m.value) for m in await consume_all(bootstrap, "nettel.alerts")]
    assert len(published) == worker.alerts_published
    firsts: dict[tuple[str, str], Alert] = {}
    for a in published:
        firsts.setdefault((a.identity, a.rule), a)
    leak = firsts.get((names["leak"], "memory_leak"))
    kill = firsts.get((names["leak"], "oom_kill"))
    throttled = firsts.get((names["cpu"], "cpu_throttling"))
    assert leak is not None, list(firsts)
    assert kill is not None, list(firsts)
    assert throttled is not None, list(firsts)
    assert (leak.status, kill.status, throttled.status) == ("open", "open", "open")
    assert leak.updated_ms < kill.started_ms  # raised before the kill
    assert leak.time_to_limit_s is not None
    assert 0 < leak.time_to_limit_s < 60
    assert f"{leak.time_to_limit_s:.0f} s" in leak.explanation
    assert "killed for memory" in kill.explanation
    assert kill.severity == "critical"
    assert "throttled" in throttled.explanation
    assert not any(a.identity == names["mem"] for a in published)  # steady memory: quiet
    kept = alerts.latest()  # every published version is in the table, once
    assert sorted(kept["id"].to_list()) == sorted({a.id for a in published})
    assert pl.scan_delta(alerts.uri).select(pl.len()).collect().item() == len(published)
    assert kept.filter(pl.col("rule") == "memory_leak")["time_to_limit_s"].min() > 0  # type: ignore[operator]
    mem = rows.filter(pl.col("name") == names["mem"]).sort("ts").row(-1, named=True)
    assert mem["memory_limit_bytes_last"] == 64 * MiB
    assert abs(mem["memory_bytes_last"] - after["mem"]["memory_bytes"]) < 2 * MiB
    assert mem["memory_bytes_max"] >= 24 * MiB
    assert mem["pids_last"] >= 1


# -- exactly once across a restart of the resource stream ------------------------------


def synthetic(containers: int, minutes: int, start_ms: int) -> list[ResourceEvent]:
    out = []
    for i in range(minutes * 12):
        for c in range(containers):
            out.append(ResourceEvent(
                ts_ms=start_ms + i * 5000, host="h", container_id=f"c{c}", identity=f"svc-{c}",
                name=f"svc-{c}", interval_ms=5000, cpu_usage_us=1000 * (i % 7 + c),
                io_write_bytes=4096 * (i % 3), memory_bytes=MiB * (10 + i % 5),
                memory_limit_bytes=64 * MiB, pids=1 + c, source="cgroup-v2"))  # fmt: skip
    return out


def leaking(start_ms: int, samples: int) -> list[ResourceEvent]:
    """A container whose memory rises 256 KiB a sample for 40 samples, then falls back."""
    return [ResourceEvent(
        ts_ms=start_ms + i * 5000, host="h", container_id="cl", identity="leaky", name="leaky",
        interval_ms=5000, memory_bytes=MiB * 10 + (i * MiB // 4 if i < 40 else 0),
        memory_limit_bytes=64 * MiB, source="cgroup-v2") for i in range(samples)]  # fmt: skip


@pytest.mark.broker
async def test_resource_stream_restarted_midway_counts_every_event_once(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, TOPICS)
    start_ms = 1_800_000_000_000
    events = sorted(synthetic(3, 6, start_ms) + leaking(start_ms, 72), key=lambda e: e.ts_ms)
    # the first run stops two minutes in: while the leak (from sample 5 to 40) is open
    halves = ([e for e in events if e.ts_ms < start_ms + 120_000],
              [e for e in events if e.ts_ms >= start_ms + 120_000])  # fmt: skip
    table = ResourceMinuteTable(str(tmp_path / "resource_minute"))
    alerts = AlertTable(str(tmp_path / "alerts"))

    async def publish(part: list[ResourceEvent], bad: bool) -> None:
        publisher = EventPublisher(bootstrap, "nettel.resources")
        async with publisher:
            for ev in part:
                publisher.publish(ev.identity.encode(), encode_resource_event(ev))
            if bad:
                publisher.publish(b"bad", b'{"ts_ms": -1}')  # refused: dead-lettered, not lost
            await wait_for(lambda: publisher.sent == len(part) + bad, 60, "all sent")

    async def consume(until: int, seal: bool) -> ResourceStreamWorker:
        worker = ResourceStreamWorker(bootstrap, table, flush_interval_s=0.3, grace_ms=5000,
                                      seal_on_stop=seal, alerts=alerts)  # fmt: skip
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        await wait_for(lambda: worker.consumed >= until, 60, f"{until} consumed")
        await asyncio.sleep(0.5)  # a flush or two
        stop.set()
        await asyncio.wait_for(task, 30)
        return worker

    await publish(halves[0], bad=True)
    first = await consume(len(halves[0]) + 1, seal=False)  # stops with windows open
    resend = halves[0][:30]  # copies of folded events (a publisher's resend): dropped
    await publish(halves[1] + resend, bad=False)
    points = table.replay_points("nettel-resources", "nettel.resources", [0, 1], epoch=0)
    replay = sum(p.resume_offset for p in points.values())
    # resumes from the stored points (reading again from each one's resume offset)
    second = await consume(len(events) + 1 + len(resend) - replay, seal=True)
    assert first.dead_lettered + second.dead_lettered >= 1
    assert second.duplicates >= len(resend)
    assert first.duplicates + second.duplicates >= 30  # a copy read again is dropped again
    rows = table.scan().collect()
    for c in RESOURCE_COUNTERS:
        assert rows[c].sum() == sum(getattr(e, c) for e in events), c
    assert rows["samples"].sum() == len(events)
    assert rows["memory_bytes_sum"].sum() == sum(e.memory_bytes for e in events)
    # the leak open at the restart is one incident: the second run found it again and
    # carried on its id, and resolved it; each version is written and published once
    assert first.alerts_published >= 1
    versions = pl.scan_delta(alerts.uri).collect().sort("updated")
    assert versions["container"].unique().to_list() == ["leaky"]
    assert versions["id"].n_unique() == 1
    assert versions["status"][0] == "open"
    assert versions["status"][-1] == "resolved"
    assert versions.select("id", "status", "updated").is_unique().all()
    published = [decode_alert(m.value) for m in await consume_all(bootstrap, "nettel.alerts")]
    assert sorted((a.id, a.status, a.updated_ms) for a in published) == sorted(
        (r["id"], r["status"], int(r["updated"].timestamp() * 1000))
        for r in versions.iter_rows(named=True))  # fmt: skip


# -- restart_container, stop_container: allowed, confirmed, rate-limited, audited -------


def answer_text(result: Any) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.engine
@pytest.mark.broker
async def test_restart_and_stop_container_over_stdio_act_only_on_what_is_allowed_and_audit(
    engine: Engine, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    tag = os.urandom(3).hex()
    # PID 1 of a container ignores SIGTERM unless it traps it: stop at once when asked
    loop = "trap 'exit 0' TERM; while true; do sleep 0.2; done"
    allowed = run(engine, loop, name=f"nt-act-ok-{tag}")
    other = run(engine, loop, name=f"nt-act-no-{tag}")
    before = {c.name: (engine.pid(c), c.attrs["State"]["StartedAt"]) for c in (allowed, other)}
    await ensure_topics(broker.bootstrap_servers, TOPICS)
    env = {**os.environ, "NETTEL_DATA_DIR": str(tmp_path), "NETTEL_LOG_FORMAT": "json",
           "NETTEL_ACTIONS_CONTAINERS": f"{allowed.name},nt-act-absent-{tag}",
           "DOCKER_HOST": engine.url,
           "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}  # fmt: skip
    params = StdioServerParameters(command=NETTEL, args=["mcp", "--server", "resource-monitor"],
                                   env=env)  # fmt: skip
    async with Client(params, read_timeout_seconds=60) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert {"restart_container", "stop_container"} <= names
        refused = [
            await client.call_tool("restart_container", {"container": other.name, "confirm": True}),
            await client.call_tool("restart_container", {"container": allowed.name}),
            await client.call_tool("restart_container",
                                   {"container": allowed.name, "confirm": False}),
        ]  # fmt: skip
        assert [r.is_error for r in refused] == [True, True, True]
        # list_processes: the container's processes from its cgroup and /proc, no exec
        listed = await client.call_tool("list_processes",
                                        {"container": other.name, "sort_by": "rss"})  # fmt: skip
        wrong = [await client.call_tool("list_processes", {"container": f"nt-act-gone-{tag}"}),
                 await client.call_tool("list_processes",
                                        {"container": other.name, "sort_by": "gpu"})]  # fmt: skip
        assert "not in NETTEL_ACTIONS_CONTAINERS" in answer_text(refused[0])
        assert "confirm=true" in answer_text(refused[1])
        done = await client.call_tool("restart_container",
                                      {"container": allowed.name, "confirm": True})  # fmt: skip
        assert not done.is_error, answer_text(done)
        allowed.reload()
        assert allowed.status == "running"
        assert (engine.pid(allowed), allowed.attrs["State"]["StartedAt"]) != before[allowed.name]
    # another client (its own server process): the cooldown holds, read from the audit row;
    # a stop has its own cooldown, refused as a restart is, then done
    async with Client(params, read_timeout_seconds=60) as client:
        again = await client.call_tool("restart_container",
                                       {"container": allowed.name, "confirm": True})  # fmt: skip
        no_stop = [
            await client.call_tool("stop_container", {"container": other.name, "confirm": True}),
            await client.call_tool("stop_container", {"container": allowed.name}),
        ]  # fmt: skip
        stopped = await client.call_tool("stop_container",
                                         {"container": allowed.name, "confirm": True})  # fmt: skip
    assert again.is_error
    assert "try again in" in answer_text(again)
    assert [r.is_error for r in no_stop] == [True, True]
    assert "not in NETTEL_ACTIONS_CONTAINERS" in answer_text(no_stop[0])
    assert "stopping" in answer_text(no_stop[1])
    assert "confirm=true" in answer_text(no_stop[1])
    assert not stopped.is_error, answer_text(stopped)
    for r in (*refused, done, again, listed, *wrong, *no_stop, stopped):
        assert len(answer_text(r)) <= 8_000
    processes = listed.structured_content
    assert processes is not None, answer_text(listed)
    assert (processes["container"], processes["sort_by"]) == (other.name, "rss")
    main_pid = before[other.name][0]
    main = next(p for p in processes["processes"] if p["pid"] == main_pid)
    assert main["command"] == f"sh -c {loop}"
    assert main["state"] in "RSD"
    status = _text(f"/proc/{main_pid}/status")
    assert main["rss_bytes"] == 1024 * int(status.split("VmRSS:")[1].split()[0])
    rss = [p["rss_bytes"] for p in processes["processes"]]
    assert rss == sorted(rss, reverse=True)
    assert processes["total"] >= len(rss) >= 1
    assert all(w.is_error for w in wrong)
    assert "running:" in answer_text(wrong[0])
    assert allowed.name in answer_text(wrong[0]) or "in all" in answer_text(wrong[0])
    assert "'cpu'" in answer_text(wrong[1])
    assert "'rss'" in answer_text(wrong[1])
    doc = done.structured_content
    assert doc is not None
    assert (doc["container"], doc["done"], doc["published"]) == (allowed.name, True, True)
    for c in (allowed, other):
        c.reload()
    assert allowed.status == "exited"
    assert (engine.pid(other), other.attrs["State"]["StartedAt"]) == before[other.name]
    assert other.status == "running"
    assert doc["container_id"] == allowed.id
    stop = stopped.structured_content
    assert stop is not None
    assert (stop["container"], stop["action"], stop["done"], stop["container_id"]) == (
        allowed.name, "stop", True, allowed.id)  # fmt: skip
    # one audit row per action done (the refused calls change nothing), the same on the topic
    rows = pl.scan_delta(str(tmp_path / "alerts")).collect().sort("started")
    assert rows["rule"].to_list() == ["restart_container", "stop_container"]
    assert rows["id"].to_list() == [doc["audit_id"], stop["audit_id"]]
    assert rows["container"].to_list() == [allowed.name] * 2
    events = [decode_alert(m.value) for m in await consume_all(broker.bootstrap_servers,
                                                               "nettel.alerts")]  # fmt: skip
    assert sorted((a.id, a.rule, a.identity) for a in events) == sorted([
        (doc["audit_id"], "restart_container", allowed.name),
        (stop["audit_id"], "stop_container", allowed.name)])  # fmt: skip
