"""One validated settings object, read from the environment and CLI flags.

Every setting has an env var (``NETTEL_*``, plus ``KAFKA_BOOTSTRAP_SERVERS`` and
``DOCKER_HOST``); CLI flags override them. A bad value fails at start with a
:class:`~nettel.errors.ConfigError` naming the setting and what is allowed.

Examples
--------
>>> s = Settings.from_env({"NETTEL_SAMPLE_INTERVAL_S": "2.5", "NETTEL_PARTITIONS": "4"})
>>> s.sample_interval_s, s.partitions, s.kafka_bootstrap_servers is None
(2.5, 4, True)
>>> try:
...     Settings.from_env({"NETTEL_SOURCE": "cgroups"})
... except ConfigError as e:
...     print(e)
NETTEL_SOURCE='cgroups' is not valid: expected one of auto, engine, procfs
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from nettel.errors import ConfigError
from nettel.models import WireFormat

Source = Literal["auto", "engine", "procfs"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, kw_only=True)
class Setting:
    """How one field is read: its env var, parser and a description for docs and errors."""

    env: str
    help: str


def _field(default: Any, env: str, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"setting": Setting(env=env, help=help)})


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything nettel can be told. Build with :meth:`from_env`; fields are validated."""

    kafka_bootstrap_servers: str | None = _field(
        None,
        "KAFKA_BOOTSTRAP_SERVERS",
        "host:port[,host:port] of an external broker; unset: start the embedded Tansu broker",
    )
    docker_host: str | None = _field(
        None,
        "DOCKER_HOST",
        "engine API socket (unix:///run/podman/podman.sock, ...); "
        "unset: try Docker's then Podman's",
    )
    source: Source = _field(
        "auto",
        "NETTEL_SOURCE",
        "auto: engine if its socket answers, else procfs; engine; procfs (every netns on the host)",
    )
    proc_root: str = _field("/proc", "NETTEL_PROC_ROOT", "where the host's /proc is mounted")
    host: str = _field("", "NETTEL_HOST", "host name put on every event; unset: this host's name")
    sample_interval_s: float = _field(5.0, "NETTEL_SAMPLE_INTERVAL_S", "seconds between samples")
    inventory_interval_s: float = _field(
        30.0, "NETTEL_INVENTORY_INTERVAL_S", "seconds between full re-lists of containers"
    )
    buffer_max_events: int = _field(
        100_000,
        "NETTEL_BUFFER_MAX_EVENTS",
        "events held while the broker is down; past it the oldest are dropped and counted",
    )
    partitions: int = _field(12, "NETTEL_PARTITIONS", "partitions of topics nettel creates")
    topic_stats: str = _field("nettel.stats", "NETTEL_TOPIC_STATS", "topic of sample events")
    topic_alerts: str = _field("nettel.alerts", "NETTEL_TOPIC_ALERTS", "topic of alerts")
    topic_dlq: str = _field("nettel.stats.dlq", "NETTEL_TOPIC_DLQ", "dead-letter topic")
    topic_resources: str = _field(
        "nettel.resources", "NETTEL_TOPIC_RESOURCES",
        "topic of resource events (CPU, memory, block I/O, pids per container)",
    )  # fmt: skip
    topic_health: str = _field(
        "nettel.health", "NETTEL_TOPIC_HEALTH",
        "topic of health events (start, die, oom, healthcheck status) and dependency edges",
    )  # fmt: skip
    health_interval_s: float = _field(
        15.0, "NETTEL_HEALTH_INTERVAL_S",
        "seconds between polls of engine events and samples of the dependency map",
    )  # fmt: skip
    broker_port: int = _field(9092, "NETTEL_BROKER_PORT", "loopback port of the embedded broker")
    broker_max_rss_mb: int = _field(
        512,
        "NETTEL_BROKER_MAX_RSS_MB",
        "embedded broker memory (MiB) past which it is rotated to a fresh one",
    )
    data_dir: str = _field(
        "", "NETTEL_DATA_DIR",
        "data dir (path or s3:// URI); unset: $XDG_DATA_HOME/nettel (~/.local/share/nettel), "
        "/var/lib/nettel for root",
    )  # fmt: skip
    local_dir: str = _field(
        "", "NETTEL_LOCAL_DIR",
        "where files that stay on this host go (the embedded broker's log, epoch and pid); "
        "unset: the data dir, or the default local data dir when the data dir is s3://",
    )  # fmt: skip
    window_grace_s: float = _field(
        30.0, "NETTEL_WINDOW_GRACE_S", "seconds a minute window waits for late samples"
    )
    wire_format: WireFormat = _field(
        "msgpack", "NETTEL_WIRE_FORMAT",
        "how events travel on the stats topic: msgpack (compact) or json (readable with "
        "kcat); consumers read both",
    )  # fmt: skip
    flush_interval_s: float = _field(
        30.0, "NETTEL_FLUSH_INTERVAL_S", "seconds between the stream worker's table commits"
    )
    retention_samples_days: int = _field(
        2, "NETTEL_RETENTION_SAMPLES_DAYS", "days the samples table (raw events) keeps (0: forever)"
    )
    retention_minute_days: int = _field(
        14, "NETTEL_RETENTION_MINUTE_DAYS", "days the minute table keeps (0: forever)"
    )
    retention_hour_days: int = _field(
        400, "NETTEL_RETENTION_HOUR_DAYS", "days the hour table keeps (0: forever)"
    )
    retention_day_days: int = _field(
        0, "NETTEL_RETENTION_DAY_DAYS", "days the day table keeps (0: forever)"
    )
    retention_alerts_days: int = _field(
        90, "NETTEL_RETENTION_ALERTS_DAYS",
        "days the alerts and alert_feedback tables keep (0: forever)",
    )  # fmt: skip
    retention_health_days: int = _field(
        30, "NETTEL_RETENTION_HEALTH_DAYS",
        "days the health table (health events, dependency edges) keeps (0: forever)",
    )  # fmt: skip
    retention_reports_days: int = _field(
        400, "NETTEL_RETENTION_REPORTS_DAYS", "days of stored daily reports kept (0: forever)"
    )
    rollup_interval_s: float = _field(
        300.0, "NETTEL_ROLLUP_INTERVAL_S", "seconds between rolls of minute rows into hour and day"
    )
    maintenance_interval_s: float = _field(
        3600.0,
        "NETTEL_MAINTENANCE_INTERVAL_S",
        "seconds between `nettel up`'s store maintenance passes (retention, compaction, vacuum)",
    )
    mcp_host: str = _field(
        "127.0.0.1", "NETTEL_MCP_HOST",
        "address of the MCP HTTP endpoint (`nettel mcp --http`, `nettel up`); "
        "beyond loopback it needs NETTEL_MCP_TOKEN",
    )  # fmt: skip
    mcp_port: int = _field(8765, "NETTEL_MCP_PORT", "port of the MCP streamable HTTP endpoint /mcp")
    mcp_token: str | None = _field(
        None, "NETTEL_MCP_TOKEN", "bearer token MCP HTTP clients must send (needed beyond loopback)"
    )
    mcp_rate_per_minute: int = _field(
        600, "NETTEL_MCP_RATE_PER_MINUTE", "MCP HTTP requests per minute per client address"
    )
    mcp_allowed_hosts: str = _field(
        "", "NETTEL_MCP_ALLOWED_HOSTS",
        "Host headers the MCP HTTP endpoint accepts besides loopback (comma-separated; "
        "`name` for any port or `name:port`)",
    )  # fmt: skip
    mcp_allowed_origins: str = _field(
        "", "NETTEL_MCP_ALLOWED_ORIGINS",
        "browser Origins the MCP HTTP endpoint accepts besides loopback (comma-separated, "
        "e.g. https://console.example.com)",
    )  # fmt: skip
    actions_containers: str = _field(
        "", "NETTEL_ACTIONS_CONTAINERS",
        "containers (exact names, comma-separated) the MCP tool restart_container may restart "
        "through the engine API; empty: the tool is not offered (see SECURITY.md)",
    )  # fmt: skip
    rules_file: str | None = _field(
        None, "NETTEL_RULES_FILE", "TOML file of custom alert rules (checked at start)"
    )
    detect_checkpoint_s: float = _field(
        30.0, "NETTEL_DETECT_CHECKPOINT_S", "seconds between the detector's checkpoints"
    )
    report_tz: str = _field("UTC", "NETTEL_REPORT_TZ", "time zone of the daily report's day")
    price_egress_per_gb: float = _field(
        0.09, "NETTEL_PRICE_EGRESS_PER_GB", "data-transfer price per GB sent (report cost)"
    )
    price_ingress_per_gb: float = _field(
        0.0, "NETTEL_PRICE_INGRESS_PER_GB", "data-transfer price per GB received (report cost)"
    )
    traffic_budget_gb_per_day: float = _field(
        0.0, "NETTEL_TRAFFIC_BUDGET_GB_PER_DAY",
        "daily traffic per container past which the forecast flags it (0: no check)",
    )  # fmt: skip
    log_level: LogLevel = _field("info", "NETTEL_LOG_LEVEL", "debug, info, warning or error")
    log_format: LogFormat = _field(
        "auto", "NETTEL_LOG_FORMAT", "auto (console on a terminal, else JSON), json or console"
    )

    def __post_init__(self) -> None:
        if not self.data_dir:
            object.__setattr__(self, "data_dir", default_data_dir(os.environ))
        _check_data_dir(self.data_dir)
        if not self.local_dir:
            local = default_data_dir(os.environ) if is_remote(self.data_dir) else self.data_dir
            object.__setattr__(self, "local_dir", local)
        _check("://" not in self.local_dir, "local_dir", self.local_dir, "a local path")
        for name, number in _NUMBERS.items():
            value = getattr(self, name)
            _check(number.admits(value), name, value, number.allowed)
        for name in ("topic_stats", "topic_alerts", "topic_dlq", "topic_resources", "topic_health"):
            value = getattr(self, name)
            _check(
                bool(value) and all(c.isalnum() or c in "._-" for c in value),
                name,
                value,
                "a Kafka topic name (letters, digits, '.', '_', '-')",
            )
        if self.kafka_bootstrap_servers is not None:
            for hp in self.kafka_bootstrap_servers.split(","):
                host, sep, port = hp.strip().rpartition(":")
                _check(
                    bool(sep and host and port.isdigit()),
                    "kafka_bootstrap_servers",
                    self.kafka_bootstrap_servers,
                    "host:port[,host:port...]",
                )
        for name in ("source", "log_format", "log_level", "wire_format"):
            allowed = get_args(_LITERALS[name])
            _check(
                getattr(self, name) in allowed,
                name,
                getattr(self, name),
                "one of " + ", ".join(allowed),
            )

    @property
    def host_name(self) -> str:
        """The host name put on events."""
        return self.host or socket.gethostname()

    @property
    def sample_interval_ms(self) -> int:
        """The sample interval in whole milliseconds."""
        return round(self.sample_interval_s * 1000)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``env`` (default ``os.environ``); ``overrides`` (CLI flags) win.

        Empty env values count as unset. ``None`` overrides are ignored.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            setting: Setting = f.metadata["setting"]
            raw = env.get(setting.env, "")
            if raw != "":
                values[f.name] = _parse(f.name, setting.env, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("data_dir", default_data_dir(env))
        if is_remote(values["data_dir"]):
            values.setdefault("local_dir", default_data_dir(env))
            check_object_store_env(env)
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(env var, default, help) of every setting, for docs and ``--help``.

        Examples
        --------
        >>> row = ("NETTEL_PARTITIONS", "12", "partitions of topics nettel creates")
        >>> row in Settings.describe()
        True
        """
        rows = []
        for f in dataclasses.fields(cls):
            setting: Setting = f.metadata["setting"]
            rows.append((setting.env, "" if f.default is None else str(f.default), setting.help))
        return rows


def default_data_dir(env: Mapping[str, str], uid: int | None = None) -> str:
    """Where nettel keeps its data when ``NETTEL_DATA_DIR`` is unset: an absolute path, so
    every command finds the same data from any working directory.

    Examples
    --------
    >>> default_data_dir({"XDG_DATA_HOME": "/x/share"}, uid=1000)
    '/x/share/nettel'
    >>> default_data_dir({"HOME": "/home/ann"}, uid=1000)
    '/home/ann/.local/share/nettel'
    >>> default_data_dir({"XDG_DATA_HOME": "/x/share"}, uid=0)
    '/var/lib/nettel'
    """
    if (os.getuid() if uid is None else uid) == 0:
        return "/var/lib/nettel"
    xdg = env.get("XDG_DATA_HOME", "")
    if os.path.isabs(xdg):  # the spec: a relative value is ignored
        return os.path.join(xdg, "nettel")
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "share", "nettel")


#: URI schemes a data dir may have besides a plain path (``s3a`` is read as ``s3``).
DATA_DIR_SCHEMES = ("s3", "s3a", "file")


def is_remote(data_dir: str) -> bool:
    """Whether ``data_dir`` is an object-store URI rather than a local path.

    Examples
    --------
    >>> is_remote("s3://bucket/nettel"), is_remote("/var/lib/nettel"), is_remote("file:///d")
    (True, False, False)
    """
    return "://" in data_dir and not data_dir.startswith("file://")


def _check_data_dir(data_dir: str) -> None:
    """A path, or a URI of a supported scheme with a bucket."""
    if "://" not in data_dir:
        return
    scheme, _, rest = data_dir.partition("://")
    allowed = "a local path or s3://BUCKET[/PREFIX] (storage options: the AWS_* env vars)"
    _check(scheme in DATA_DIR_SCHEMES, "data_dir", data_dir, allowed)
    _check(scheme == "file" or bool(rest.split("/", 1)[0]), "data_dir", data_dir, allowed)


def check_object_store_env(env: Mapping[str, str]) -> None:
    """The AWS_* storage options an ``s3://`` data dir is reached with, where a wrong
    combination would only fail later, deep in a write.

    Examples
    --------
    >>> check_object_store_env({"AWS_ENDPOINT_URL": "https://s3.example.com"})
    >>> try:
    ...     check_object_store_env({"AWS_ENDPOINT_URL": "http://127.0.0.1:8333"})
    ... except ConfigError as e:
    ...     print(e)
    AWS_ALLOW_HTTP=None is not valid: expected true when AWS_ENDPOINT_URL is http://
    """
    endpoint = env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT") or ""
    if endpoint.startswith("http://") and env.get("AWS_ALLOW_HTTP", "").lower() != "true":
        raise ConfigError("AWS_ALLOW_HTTP", env.get("AWS_ALLOW_HTTP"),
                          "true when AWS_ENDPOINT_URL is http://")  # fmt: skip
    if env.get("AWS_CONDITIONAL_PUT", "").lower() == "disabled":
        raise ConfigError("AWS_CONDITIONAL_PUT", "disabled",
                          "etag or unset: Delta commits need conditional PUT")  # fmt: skip


_LITERALS: dict[str, Any] = {"source": Source, "log_format": LogFormat, "log_level": LogLevel,
                             "wire_format": WireFormat}  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Number:
    """How a numeric setting is parsed and which values it admits (one place for both)."""

    parse: Callable[[str], Any]
    low: float
    high: float
    allowed: str
    low_open: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and value <= self.high


_SECONDS_1H = "a number of seconds in (0, 3600]"
_DAYS = "a whole number of days >= 0 (0: forever)"
_NUMBERS: dict[str, _Number] = {
    "sample_interval_s": _Number(float, 0, 3600, _SECONDS_1H, low_open=True),
    "inventory_interval_s": _Number(float, 0, math.inf, "a number of seconds > 0", low_open=True),
    "buffer_max_events": _Number(int, 1, 10_000_000, "a whole number from 1 to 10000000"),
    "partitions": _Number(int, 1, 1000, "a whole number from 1 to 1000"),
    "broker_port": _Number(int, 1, 65535, "a TCP port from 1 to 65535"),
    "broker_max_rss_mb": _Number(int, 32, math.inf, "a whole number of MiB >= 32"),
    "window_grace_s": _Number(float, 0, 3600, "a number of seconds in [0, 3600]"),
    "flush_interval_s": _Number(float, 0, 3600, _SECONDS_1H, low_open=True),
    "rollup_interval_s": _Number(float, 0, 86400, "a number of seconds in [0, 86400]"),
    "retention_samples_days": _Number(int, 0, math.inf, _DAYS),
    "retention_minute_days": _Number(int, 0, math.inf, _DAYS),
    "retention_hour_days": _Number(int, 0, math.inf, _DAYS),
    "retention_day_days": _Number(int, 0, math.inf, _DAYS),
    "retention_alerts_days": _Number(int, 0, math.inf, _DAYS),
    "retention_reports_days": _Number(int, 0, math.inf, _DAYS),
    "retention_health_days": _Number(int, 0, math.inf, _DAYS),
    "health_interval_s": _Number(float, 0, 3600, _SECONDS_1H, low_open=True),
    "mcp_port": _Number(int, 1, 65535, "a TCP port from 1 to 65535"),
    "detect_checkpoint_s": _Number(float, 0, 3600, _SECONDS_1H, low_open=True),
    "price_egress_per_gb": _Number(float, 0, 1e6, "a price per GB >= 0"),
    "price_ingress_per_gb": _Number(float, 0, 1e6, "a price per GB >= 0"),
    "traffic_budget_gb_per_day": _Number(float, 0, math.inf, "a number of GB >= 0 (0: none)"),
    "mcp_rate_per_minute": _Number(int, 1, 1_000_000, "a whole number from 1 to 1000000"),
    "maintenance_interval_s": _Number(
        float, 0, 7 * 86400, "a number of seconds in (0, 604800]", low_open=True
    ),
}


def _env_name(field_name: str) -> str:
    for f in dataclasses.fields(Settings):
        if f.name == field_name:
            setting: Setting = f.metadata["setting"]
            return setting.env
    return field_name


def _parse(name: str, env: str, raw: str) -> Any:
    number = _NUMBERS.get(name)
    if number is None:
        return raw.strip()
    try:
        return number.parse(raw.strip())
    except ValueError:
        raise ConfigError(env, raw, number.allowed) from None


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(_env_name(name), value, allowed)
