"""Health events and the dependency map from real Podman containers, through a real
broker into the real ``health`` Delta table, built as ``nettel up`` builds them
(:func:`~nettel.cli.make_health_watcher`, :func:`~nettel.cli.make_health_stream`).

A container in a restart loop (the engine's on-failure policy, twice) and three more:
``db`` (httpd on 5432), ``web`` (httpd on 8080, holding one
connection to db, with a healthcheck that connects to db), ``client`` (holding two
connections to web). The map must show client -> web:8080 (2) and web -> db:5432 (1);
stopping db gives a ``die`` event with its exit code, and the healthcheck run by hand
(Podman here runs none by itself: no systemd timers) turns web unhealthy; the loop
shows three exits with their code and a restart count of 2.

The rules file's restart triggers run in the same health writer: a dry-run rule on web
leaves its audit row and event and restarts nothing; an enabled rule on ``sick`` (a
healthcheck that always fails) restarts it once through the engine, and its next
failure, inside the cooldown, restarts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from mcp import Client

from conftest import Engine, consume_all, wait_for
from nettel.broker import EmbeddedBroker, ensure_topics
from nettel.cli import make_health_stream, make_health_watcher, topic_partitions
from nettel.config import Settings
from nettel.detect.alerts import Alert, decode_alert
from nettel.ingest.health import EdgeCounter, HealthWatcher
from nettel.mcp.actions import DRY_RUN_RULE, RESTART_RULE
from nettel.mcp.health import HealthTools, build_health_server
from nettel.models import HealthRecord, encode_health_record
from nettel.store.alerts import AlertTable
from nettel.store.health import HealthTable

IMAGE = "localhost/nettel-test:latest"


def run(engine: Engine, name: str, command: str, **kw: Any) -> Any:
    c = engine.client.containers.run(IMAGE, ["sh", "-c", command], name=name, detach=True, **kw)
    assert c.id is not None
    engine.created.append(c.id)
    return c


@pytest.mark.engine
@pytest.mark.broker
async def test_health_events_and_dependency_map_from_real_containers(
    engine: Engine, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    db = run(engine, f"hc-db-{tag}", "exec httpd -f -p 5432")
    db_ip = engine.ip(db)
    check = {"test": ["CMD-SHELL", f"echo | nc -w 1 {db_ip} 5432"], "retries": 1,
             "interval": 3_600_000_000_000}  # fmt: skip
    hold_db = f"(sleep 600 | nc {db_ip} 5432 &)"
    web = run(engine, f"hc-web-{tag}", f"{hold_db}; exec httpd -f -p 8080", healthcheck=check)
    web_ip = engine.ip(web)
    hold_web = f"(sleep 600 | nc {web_ip} 8080 &)"
    client = run(engine, f"hc-client-{tag}", f"{hold_web}; {hold_web}; exec sleep 600")
    failing = {"test": ["CMD-SHELL", "exit 1"], "retries": 1, "interval": 3_600_000_000_000}
    sick = run(engine, f"hc-sick-{tag}", "trap 'exit 0' TERM; while :; do sleep 0.2; done",
               healthcheck=failing)  # fmt: skip
    rules = tmp_path / "rules.toml"
    rules.write_text(f"""
[[rule]]
name = "client flood"
container = "hc-client-{tag}"
metric = "syn_recv"
above = 200

[[restart]]
name = "heal web"
container = "hc-web-{tag}"
after_failures = 1

[[restart]]
name = "reset client"
container = "hc-client-{tag}"
on_rule = "client flood"

[[restart]]
name = "heal sick"
container = "hc-sick-{tag}"
after_failures = 1
cooldown = "10m"
max_per_hour = 2
dry_run = false
""")
    settings = Settings.from_env({
        "NETTEL_DATA_DIR": str(tmp_path), "NETTEL_PARTITIONS": "3", "DOCKER_HOST": engine.url,
        "NETTEL_HEALTH_INTERVAL_S": "0.3", "NETTEL_FLUSH_INTERVAL_S": "0.5",
        "NETTEL_RULES_FILE": str(rules)})  # fmt: skip
    watcher = make_health_watcher(settings, broker.bootstrap_servers)
    assert watcher is not None
    stream = make_health_stream(settings, broker.bootstrap_servers)
    triggered = stream.on_written  # the shipped triggers, counted
    fails: list[HealthRecord] = []
    assert triggered is not None

    async def counted(records: list[HealthRecord]) -> None:
        await triggered(records)
        fails.extend(r for r in records if r.container == sick.name and r.health == "unhealthy")

    stream.on_written = counted
    stop_watch, stop_stream = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(watcher.run(stop_watch)),
             asyncio.create_task(stream.runtime.run(stop_stream))]  # fmt: skip
    edges = watcher.edges.edges
    loop = run(engine, f"hc-loop-{tag}", "sleep 0.3; exit 3",
               restart_policy={"Name": "on-failure", "MaximumRetryCount": 2})  # fmt: skip

    def seen(client: str, server: str, n: int) -> bool:
        return any(k[1:3] == (client, server) and e.connections == n for k, e in edges.items())

    both = lambda: (seen(f"hc-client-{tag}", f"hc-web-{tag}", 2)  # noqa: E731
                    and seen(f"hc-web-{tag}", f"hc-db-{tag}", 1))  # fmt: skip
    await wait_for(both, 20, "both edges sampled")
    loop.reload()
    await wait_for(lambda: loop.reload() or (loop.attrs["State"]["Status"], loop.attrs[
        "RestartCount"]) == ("exited", 2), 20, "the restart loop's end")  # fmt: skip
    published = watcher.published
    db.stop(timeout=0)
    assert check_health(web) == "unhealthy"
    web_started, sick_started = started_at(web), started_at(sick)
    assert check_health(sick) == "unhealthy"
    audit = AlertTable(f"{tmp_path}/alerts")
    now_ms = time.time_ns() // 1_000_000
    flood = Alert(
        id="flood-1",
        status="open",
        identity=client.name,
        metric="syn_recv",
        rule="client flood",
        host="h",
        container_id="",
        started_ms=now_ms,
        updated_ms=now_ms,
        observed=500.0,
        peak=500.0,
        expected=0.0,
        band_low=0.0,
        band_high=200.0,
        score=0.0,
        severity="warning",
        explanation="> 200",
    )
    audit.append(
        [msgspec.to_builtins(flood) | {"partition": 0, "offset": 0}],
        {},
        writer="nettel-detect",
        topic="nettel.stats",
        epoch=0,
    )  # as detect does

    def audited(rule: str) -> list[str]:
        return audit.latest().filter(rule=rule)["container"].to_list()

    await wait_for(lambda: audited(RESTART_RULE) == [sick.name]
                   and sorted(audited(DRY_RUN_RULE)) == sorted([web.name, client.name]),
                   30, "every trigger acted")  # fmt: skip
    restarted = started_at(sick)
    assert restarted != sick_started  # the enabled rule restarted it
    assert started_at(web) == web_started  # the dry run restarted nothing
    assert check_health(sick) == "unhealthy"  # failed again, inside the cooldown
    await wait_for(lambda: len(fails) >= 2, 30, "the second failure seen by the triggers")
    assert audited(RESTART_RULE) == [sick.name]
    assert started_at(sick) == restarted
    acts = {decode_alert(m.value).identity: decode_alert(m.value)
            for m in await consume_all(broker.bootstrap_servers, "nettel.alerts")
            if tag in m.key.decode()}  # fmt: skip
    assert {k: a.rule for k, a in acts.items()} == {
        web.name: DRY_RUN_RULE,
        client.name: DRY_RUN_RULE,
        sick.name: RESTART_RULE,
    }
    assert "restart rule 'heal web'" in acts[web.name].explanation
    assert "would be restarted (dry run: nothing done)" in acts[web.name].explanation
    assert "alert flood-1 of rule 'client flood'" in acts[client.name].explanation
    assert "restarted through the engine API" in acts[sick.name].explanation
    await wait_for(lambda: watcher.published > published + 1, 20, "die and health published")
    stop_watch.set()
    await tasks[0]
    table = HealthTable(f"{tmp_path}/health")
    await wait_for(lambda: stream.written == watcher.published, 30, "every record written")
    stop_stream.set()
    await tasks[1]

    events = table.events(0)
    assert events.height + table._scan(0, None, edges=True).height == watcher.published
    assert events.select("partition", "offset").is_duplicated().sum() == 0
    died = events.filter(kind="die", container=f"hc-db-{tag}").row(0, named=True)
    assert died["exit_code"] in (137, 143), died
    assert died["status"] == "exited"
    sick = events.filter(kind="health", container=f"hc-web-{tag}").row(-1, named=True)
    assert (sick["status"], sick["health"], sick["restarts"]) == ("running", "unhealthy", 0)
    looped = events.filter(container=f"hc-loop-{tag}")
    assert looped.filter(kind="die")["exit_code"].to_list() == [3, 3, 3]
    assert looped.filter(kind="restart").height == 2
    assert looped["restarts"][-1] == 2
    mine = table.edges(0).filter(pl_in_tag(tag))
    got = {(r["client"], r["server"], r["port"]): r["connections"]
           for r in mine.iter_rows(named=True)}  # fmt: skip
    assert got == {(f"hc-client-{tag}", f"hc-web-{tag}", 8080): 2,
                   (f"hc-web-{tag}", f"hc-db-{tag}", 5432): 1}  # fmt: skip

    # the health-check tools over these tables (the SDK's client, in process)
    async with Client(build_health_server(HealthTools.for_data_dir(str(tmp_path)))) as client:
        doc = await call(client, "get_health", {"container": f"hc-web-{tag}"})
        (web_health,) = doc["containers"]
        assert (web_health["status"], web_health["restarts"]) == ("unhealthy", 0)
        doc = await call(client, "get_health", {"container": f"hc-db-{tag}"})
        assert doc["containers"][0]["last_exit"]["code"] == died["exit_code"]
        doc = await call(client, "get_health", {"container": f"hc-loop-{tag}"})
        (looping,) = doc["containers"]
        assert (looping["status"], looping["restarts"], looping["last_exit"]["code"]) == (
            "exited", 2, 3)  # fmt: skip
        doc = await call(client, "get_dependencies", {"container": f"hc-web-{tag}", "depth": 2})
        assert [(e["server"], e["port"], e["connections"]) for e in doc["upstream"]] == [
            (f"hc-db-{tag}", 5432, 1)]  # fmt: skip
        assert [(e["client"], e["connections"]) for e in doc["downstream"]] == [
            (f"hc-client-{tag}", 2)]  # fmt: skip
        doc = await call(client, "get_incidents", {"since": "hour", "limit": 50})
        (incident,) = [i for i in doc["incidents"] if i["root"] == f"hc-db-{tag}"]
        assert incident["containers"] == [f"hc-db-{tag}", f"hc-web-{tag}"]
        assert f"depends on hc-db-{tag}:5432, which died (exit" in incident["explanation"]


def check_health(container: Any) -> str:
    """Run the container's healthcheck as the engine's timer would (none runs here)."""
    done = subprocess.run(["podman", "healthcheck", "run", container.id], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    return done.stdout.strip()


def started_at(container: Any) -> str:
    container.reload()
    return str(container.attrs["State"]["StartedAt"])


async def call(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    doc: dict[str, Any] | None = result.structured_content
    assert doc is not None
    return doc


def pl_in_tag(tag: str) -> Any:
    import polars as pl

    return pl.col("client").str.contains(tag) | pl.col("server").str.contains(tag)


@pytest.mark.broker
async def test_health_stream_writes_each_record_once_across_restarts_and_dead_letters_garbage(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """Records published around a cancelled worker (its buffer lost, not written) and a
    clean restart land once each; a record that is not one goes to the dead-letter topic."""
    settings = Settings.from_env({"NETTEL_DATA_DIR": str(tmp_path), "NETTEL_PARTITIONS": "3",
                                  "NETTEL_FLUSH_INTERVAL_S": "0.3"})  # fmt: skip
    bootstrap = broker.bootstrap_servers
    await ensure_topics(bootstrap, topic_partitions(settings))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    sent = 0

    async def publish(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            r = HealthRecord(ts_ms=1_700_000_000_000 + sent, host="h", kind="start",
                             container=f"c{sent % 7}", status="running")  # fmt: skip
            await producer.send_and_wait("nettel.health", encode_health_record(r),
                                         key=r.container.encode())  # fmt: skip
            sent += 1

    table = HealthTable(f"{tmp_path}/health")
    try:
        await publish(30)
        await producer.send_and_wait("nettel.health", b"not json", key=b"c0")
        first = make_health_stream(settings, bootstrap)
        stop = asyncio.Event()
        task = asyncio.create_task(first.runtime.run(stop))
        await wait_for(lambda: first.written == 30, 30, "the first 30 written")
        await publish(20)
        await wait_for(lambda: first.consumed >= 51, 30, "the next 20 read")
        task.cancel()  # a crash: whatever it buffered is not written
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await publish(10)
        second = make_health_stream(settings, bootstrap)
        stop = asyncio.Event()
        task = asyncio.create_task(second.runtime.run(stop))
        await wait_for(lambda: table.events(0).height == sent, 30, "every record written")
        stop.set()
        await task
    finally:
        await producer.stop()
    rows = table.events(0)
    assert rows.height == sent == 60
    assert rows.select("partition", "offset").is_duplicated().sum() == 0
    dead = await consume_all(bootstrap, "nettel.stats.dlq")
    assert [m.value for m in dead] == [b"not json"]
    assert dict(dead[0].headers)["nettel-error"].startswith(b"not a health record")


class _Api:
    """The engine calls the watcher makes, answering for one running container."""

    def __init__(self) -> None:
        self.inspected = 0
        self.events_due: list[dict[str, Any]] = []
        self.health = ""

    def events(self, **kw: Any) -> list[dict[str, Any]]:
        due, self.events_due = self.events_due, []
        return due

    def containers(self) -> list[dict[str, Any]]:
        return [{"Id": "c1"}]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        self.inspected += 1
        state = {"Status": "running", "Running": True, "Health": {"Status": self.health}}
        return {"Id": cid, "Name": "/quiet", "State": state}


def test_a_health_event_seen_before_its_check_ends_is_looked_at_again() -> None:
    """Unit (a stand-in engine): Podman announces a check as it starts, so the status the
    event's inspect saw may be the old one; the next poll records the new one. Docker's
    action form (``health_status: unhealthy``) is understood too."""
    api = _Api()
    client = type("Client", (), {"api": api})()
    watcher = HealthWatcher(client, None, host="h", proc_root="/nonexistent")
    watcher.poll()
    api.health = "starting"
    api.events_due = [{"Action": "health_status: unhealthy", "id": "c1", "timeNano": 10**18,
                       "Actor": {"Attributes": {"name": "quiet"}}}]  # fmt: skip
    first = watcher.poll()
    api.health = "unhealthy"
    second, third = watcher.poll(), watcher.poll()
    assert [(r.kind, r.health) for r in first] == [("health", "starting")]
    assert [(r.kind, r.health) for r in second] == [("health", "unhealthy")]
    assert third == []


def test_a_quiet_container_state_is_recorded_again_each_day() -> None:
    """Unit (pure logic, a stand-in engine): the table keeps every running container's
    state within its retention however long ago its last event was, at one inspect and
    one record per container per day."""
    now = [1_800_000_000.0]
    api = _Api()
    client = type("Client", (), {"api": api})()
    watcher = HealthWatcher(client, None, host="h", proc_root="/nonexistent",
                            clock=lambda: now[0])  # fmt: skip
    kinds = []
    for step_s in (0, 3600, 20 * 3600, 3 * 3600, 3600):
        now[0] += step_s
        kinds.append([r.kind for r in watcher.poll()])
    assert kinds == [["state"], [], [], ["state"], []]
    assert api.inspected == 2


def test_edges_that_appear_or_vanish_are_events_kept_apart_from_health(tmp_path: Path) -> None:
    """Unit (pure counting, a real Delta table): after the watcher's first ``vanish_ms``,
    an edge seen for the first time is an ``edge_new`` record and one unseen for
    ``vanish_ms`` an ``edge_gone``; in the table they are dependency changes, never a
    container's health (its summary stays that of its events)."""
    counter = EdgeCounter(vanish_ms=120_000)
    records = [HealthRecord(ts_ms=0, host="h", kind="start", container="web", status="running")]
    for minute in range(12):  # web -> db throughout; worker -> db minutes 4-5, again at 9
        counts = {("web", "db", 5432): 1}
        if minute in (4, 5, 9):
            counts[("worker", "db", 5432)] = 2
        counter.add(minute * 60_000 + 5_000, counts)
        records += counter.closed(minute * 60_000 + 5_000, "h")
    assert len(counter._seen) == 2  # what it remembers is bounded by vanish_ms
    table = HealthTable(f"{tmp_path}/health")
    table.append([(r, 0, i) for i, r in enumerate(records)], {0: len(records)}, writer="t",
                 topic="nettel.health", epoch=0)  # fmt: skip
    changes = table.dependency_changes(0)
    assert [(r["kind"], r["container"], r["server"], r["port"], r["ts"].minute)
            for r in changes.iter_rows(named=True)] == [
        ("edge_new", "worker", "db", 5432, 4), ("edge_gone", "worker", "db", 5432, 6),
        ("edge_new", "worker", "db", 5432, 9)]  # fmt: skip
    assert table.events(0)["kind"].to_list() == ["start"]
    assert table.summary(0)["state"].to_list() == ["running"]
    assert table.edges(0).height == 2
