"""Tools that act on containers (``restart_container``), for any nettel MCP server.

Off by default: a server gets them only when the ``NETTEL_ACTIONS_CONTAINERS`` setting
names the containers they may touch (:func:`register_actions`); without it they are not
listed at all. Every call is checked before anything happens:

- the container must be named in the allowlist exactly (no fuzzy match, no ids);
- ``confirm`` must be true (an agent says it means it);
- rate limits: a container is restarted at most once per ``cooldown_s`` and all of them
  together at most ``max_per_hour`` times an hour (restart loops are what go wrong with
  auto-healers; these caps bound the damage a confused agent can do). The first call
  reads the last hour's restarts from the audit rows, so the limits hold across server
  processes and restarts.

A permitted call restarts the container through the engine API (the ``restart``
callable the composition root gives: the engine's ``POST /containers/{name}/restart``),
then leaves an audit row in the ``alerts`` table (an alert version with ``rule``
``restart_container``, status ``resolved``: an action done) and publishes the same
record on the alerts topic when a broker is configured. A restart the engine refuses
is audited too, then reported as the tool's error. The mcp layer imports neither the
engine SDK nor Kafka: both come in as callables.

Examples
--------
>>> p = ActionPolicy.parse(" web, shop-db ,")
>>> sorted(p.allowed), p.cooldown_s, p.max_per_hour
(['shop-db', 'web'], 300.0, 6)
>>> ActionPolicy.parse("").enabled
False
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import polars as pl
from pydantic import BaseModel, Field

from nettel.detect.alerts import Alert, alert_id, encode_alert
from nettel.mcp.answers import ToolInputError
from nettel.mcp.server import TelemetryServer, _answer
from nettel.mcp.tools import iso
from nettel.store.alerts import AlertTable

#: The ``rule`` of an audit row of a restart.
RESTART_RULE = "restart_container"


@dataclass(frozen=True, slots=True)
class ActionPolicy:
    """Which containers the acting tools may touch, and how often."""

    allowed: frozenset[str]
    cooldown_s: float = 300.0
    max_per_hour: int = 6

    @classmethod
    def parse(cls, names: str) -> ActionPolicy:
        """The policy of a comma-separated list of container names."""
        return cls(frozenset(n.strip() for n in names.split(",") if n.strip()))

    @property
    def enabled(self) -> bool:
        """Whether any container may be touched (else the tools are not listed)."""
        return bool(self.allowed)


class ActionDone(BaseModel):
    """What a permitted action did."""

    container: str
    action: str
    done: bool
    container_id: str
    seconds: float = Field(description="how long the engine took")
    audit_id: str = Field(description="id of the audit row in the alerts table")
    published: bool = Field(description="whether the event is on the alerts topic")
    at: str


class ContainerActions:
    """The checks, the engine call, the audit row and the event of every action.

    ``restart(name, timeout_s)`` restarts a container through the engine and returns
    its id; ``publish(key, value)``, if given, puts a record on the alerts topic.
    """

    def __init__(self, policy: ActionPolicy, *, restart: Callable[[str, int], str],
                 audit: AlertTable, publish: Callable[[bytes, bytes], None] | None = None,
                 clock: Callable[[], float] = time.time, host: str = "") -> None:  # fmt: skip
        self.policy = policy
        self.restart_fn = restart
        self.audit = audit
        self.publish = publish
        self.clock = clock
        self.host = host
        self._last: dict[str, float] = {}
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()  # calls run in threads: check and reserve at once
        self._loaded = False

    def check(self, container: str, confirm: bool) -> None:
        """Raise (with what would be accepted) unless ``container`` may be acted on now."""
        allowed = ", ".join(sorted(self.policy.allowed))
        if container not in self.policy.allowed:
            raise ToolInputError(f"container {container!r} is not in NETTEL_ACTIONS_CONTAINERS;"
                                 f" allowed: {allowed}")  # fmt: skip
        if confirm is not True:
            raise ToolInputError(f"restarting {container!r} needs confirm=true; nothing done")
        now = self.clock()
        if not self._loaded:
            self._load_history(now)
        while self._recent and self._recent[0] <= now - 3600:
            self._recent.popleft()
        last = self._last.get(container)
        if last is not None and now - last < self.policy.cooldown_s:
            wait = self.policy.cooldown_s - (now - last)
            raise ToolInputError(f"{container!r} was restarted {now - last:.0f} s ago; "
                                 f"try again in {wait:.0f} s (one restart per "
                                 f"{self.policy.cooldown_s:.0f} s)")  # fmt: skip
        if len(self._recent) >= self.policy.max_per_hour:
            raise ToolInputError(f"{self.policy.max_per_hour} restarts in the last hour: the "
                                 "cap is reached; try again later")  # fmt: skip

    def _load_history(self, now: float) -> None:
        """The last hour's restarts from the audit rows, so the limits hold across
        processes (each stdio client starts its own server) and restarts of nettel."""
        rows = self.audit.latest(since_ms=int((now - 3600) * 1000))
        for r in rows.filter(pl.col("rule") == RESTART_RULE).sort("started").iter_rows(named=True):
            at = r["started"].timestamp()
            self._recent.append(at)
            self._last[r["container"]] = max(at, self._last.get(r["container"], at))
        self._loaded = True

    def restart(self, container: str, confirm: bool, timeout_s: int = 10) -> ActionDone:
        """``restart_container``: checked, done through the engine, audited, published."""
        with self._lock:
            self.check(container, confirm)
            started = self.clock()
            self._last[container] = started
            self._recent.append(started)
        try:
            cid = self.restart_fn(container, timeout_s)
        except Exception as e:
            self._record(container, "", started, f"failed: {str(e)[:200]}")
            raise ToolInputError(f"the engine did not restart {container!r}: "
                                 f"{str(e)[:200]}") from e  # fmt: skip
        seconds = round(self.clock() - started, 2)
        what = f"restarted through the engine API in {seconds} s"
        audit_id, published = self._record(container, cid, started, what)
        return ActionDone(container=container, action="restart", done=True, container_id=cid,
                          seconds=seconds, audit_id=audit_id, published=published,
                          at=iso(int(started * 1000)))  # fmt: skip

    def _record(self, container: str, cid: str, started: float, what: str) -> tuple[str, bool]:
        """The audit row (and the event): an alert version of rule ``restart_container``."""
        ms = int(started * 1000)
        done = self.clock()
        a = Alert(
            id=alert_id(container, "restart", RESTART_RULE, ms), status="resolved",
            identity=container, metric="restart", rule=RESTART_RULE, host=self.host,
            container_id=cid, started_ms=ms, updated_ms=int(done * 1000),
            resolved_ms=int(done * 1000), observed=1.0, peak=1.0, expected=0.0,
            band_low=0.0, band_high=0.0, score=0.0, severity="warning",
            explanation=f"restart_container (MCP, confirmed, allowed by "
                        f"NETTEL_ACTIONS_CONTAINERS): {container} {what}",
        )  # fmt: skip
        row: dict[str, Any] = msgspec.to_builtins(a) | {"partition": -1, "offset": -1}
        self.audit.append([row], {}, writer="nettel-mcp", topic="actions", epoch=0)
        published = False
        if self.publish is not None:
            self.publish(container.encode(), encode_alert(a))
            published = True
        return a.id, published


def register_actions(server: TelemetryServer, actions: ContainerActions | None) -> None:
    """Add the acting tools to ``server`` when ``actions`` is enabled (else none)."""
    if actions is None or not actions.policy.enabled:
        return

    @server.tool()
    async def restart_container(
        container: Annotated[str, Field(description="exact name from NETTEL_ACTIONS_CONTAINERS")],
        confirm: Annotated[bool, Field(description="must be true: the container restarts")] = False,
    ) -> ActionDone:
        """Restart one allowed container through the engine (needs confirm=true; at most
        once per 5 min per container, 6 an hour in all); audited in the alerts table."""
        return await _answer(lambda: actions.restart(container, confirm))
