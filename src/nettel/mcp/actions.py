"""Tools that act on containers (``restart_container``, ``stop_container``), for any
nettel MCP server.

Off by default: a server gets them only when the ``NETTEL_ACTIONS_CONTAINERS`` setting
names the containers they may touch (:func:`register_actions`); without it they are not
listed at all. Every call is checked before anything happens:

- the container must be named in the allowlist exactly (no fuzzy match, no ids);
- ``confirm`` must be true (an agent says it means it);
- rate limits, per action: a container is restarted (or stopped) at most once per
  ``cooldown_s`` and all of them together at most ``max_per_hour`` times an hour
  (restart loops are what go wrong with auto-healers; these caps bound the damage a
  confused agent can do). The first call reads the last hour's actions from the audit
  rows, so the limits hold across server processes and restarts.

A permitted call restarts the container through the engine API (the ``restart``
callable the composition root gives: the engine's ``POST /containers/{name}/restart``),
then leaves an audit row in the ``alerts`` table (an alert version with ``rule``
``restart_container``, status ``resolved``: an action done) and publishes the same
record on the alerts topic when a broker is configured. A restart the engine refuses
is audited too, then reported as the tool's error. ``stop_container`` is the same
with the engine's ``POST /containers/{name}/stop`` (the ``stop`` callable) and audit
rows of ``rule`` ``stop_container``. The mcp layer imports neither the
engine SDK nor Kafka: both come in as callables.

The restart rules of the rules file (:mod:`nettel.detect.restarts`, run by the health
writer) act through the same class with their own allowlist, passing each rule's
``limits`` (cooldown and hourly cap of that container), ``by`` (what asked) and
``dry_run``: a dry run goes through the same checks and leaves the same audit row and
event with ``rule`` ``restart_container_dry_run`` and ``done`` false, and restarts
nothing (its rows are not restarts: they never count against a real one's limits).

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
#: The ``rule`` of an audit row of a restart a dry-run rule would have done.
DRY_RUN_RULE = "restart_container_dry_run"
#: The ``rule`` of an audit row of a stop.
STOP_RULE = "stop_container"
#: Each action's audit rule, past participle and gerund (for answers and refusals).
ACTIONS: dict[str, tuple[str, str, str]] = {
    "restart": (RESTART_RULE, "restarted", "restarting"),
    "stop": (STOP_RULE, "stopped", "stopping"),
}
#: Who asked, in the audit row of an MCP call.
MCP_CALL = "MCP, confirmed, allowed by NETTEL_ACTIONS_CONTAINERS"


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
    its id, ``stop(name, timeout_s)`` (if given: else no stops) stops one;
    ``publish(key, value)``, if given, puts a record on the alerts topic.
    """

    def __init__(self, policy: ActionPolicy, *, restart: Callable[[str, int], str],
                 audit: AlertTable, stop: Callable[[str, int], str] | None = None,
                 publish: Callable[[bytes, bytes], None] | None = None,
                 clock: Callable[[], float] = time.time, host: str = "") -> None:  # fmt: skip
        self.policy = policy
        self.engine = {"restart": restart} | ({"stop": stop} if stop is not None else {})
        self.audit = audit
        self.publish = publish
        self.clock = clock
        self.host = host
        self._last: dict[tuple[str, str], float] = {}  # (container, rule) -> last
        self._recent: deque[tuple[float, str, str]] = deque()  # the last hour's
        self._lock = threading.Lock()  # calls run in threads: check and reserve at once
        self._loaded = False

    def check(self, container: str, confirm: bool, *, limits: tuple[float, int] | None = None,
              dry_run: bool = False, action: str = "restart") -> None:  # fmt: skip
        """Raise (with what would be accepted) unless ``action`` may be done to
        ``container`` now.

        ``limits``: (cooldown s, most an hour) of this container alone, instead of the
        policy's (whose hourly cap counts every container's actions of this kind)."""
        rule, done, doing = ACTIONS[action]
        rule = DRY_RUN_RULE if dry_run else rule
        allowed = ", ".join(sorted(self.policy.allowed))
        if container not in self.policy.allowed:
            raise ToolInputError(f"container {container!r} is not in NETTEL_ACTIONS_CONTAINERS;"
                                 f" allowed: {allowed}")  # fmt: skip
        if confirm is not True:
            raise ToolInputError(f"{doing} {container!r} needs confirm=true; nothing done")
        now = self.clock()
        if not self._loaded:
            self._load_history(now)
        while self._recent and self._recent[0][0] <= now - 3600:
            self._recent.popleft()
        cooldown_s, cap = limits or (self.policy.cooldown_s, self.policy.max_per_hour)
        last = self._last.get((container, rule))
        if last is not None and now - last < cooldown_s:
            wait = cooldown_s - (now - last)
            raise ToolInputError(f"{container!r} was {done} {now - last:.0f} s ago; "
                                 f"try again in {wait:.0f} s (one {action} per "
                                 f"{cooldown_s:.0f} s)")  # fmt: skip
        counted = sum(r == rule and (limits is None or c == container)
                      for _, c, r in self._recent)  # fmt: skip
        if counted >= cap:
            raise ToolInputError(f"{cap} {action}s in the last hour: the "
                                 "cap is reached; try again later")  # fmt: skip

    def _load_history(self, now: float) -> None:
        """The last hour's actions from the audit rows, so the limits hold across
        processes (each stdio client starts its own server) and restarts of nettel."""
        rows = self.audit.latest(since_ms=int((now - 3600) * 1000))
        rules = [DRY_RUN_RULE, *(rule for rule, _, _ in ACTIONS.values())]
        done = rows.filter(pl.col("rule").is_in(rules))
        for r in done.sort("started").iter_rows(named=True):
            at, key = r["started"].timestamp(), (r["container"], r["rule"])
            self._recent.append((at, *key))
            self._last[key] = max(at, self._last.get(key, at))
        self._loaded = True

    def restart(self, container: str, confirm: bool, timeout_s: int = 10, *,
                limits: tuple[float, int] | None = None, dry_run: bool = False,
                by: str = MCP_CALL) -> ActionDone:  # fmt: skip
        """``restart_container``: checked, done through the engine, audited, published
        (a dry run: checked, audited and published as what would be done)."""
        return self.act("restart", container, confirm, timeout_s, limits=limits,
                        dry_run=dry_run, by=by)  # fmt: skip

    def stop(self, container: str, confirm: bool, timeout_s: int = 10) -> ActionDone:
        """``stop_container``: checked, done through the engine, audited, published."""
        return self.act("stop", container, confirm, timeout_s)

    def act(self, action: str, container: str, confirm: bool, timeout_s: int = 10, *,
            limits: tuple[float, int] | None = None, dry_run: bool = False,
            by: str = MCP_CALL) -> ActionDone:  # fmt: skip
        """``action`` (a key of :data:`ACTIONS` this instance has an engine call for) on
        ``container``: checked, done, audited, published."""
        engine_call = self.engine[action]
        with self._lock:
            self.check(container, confirm, limits=limits, dry_run=dry_run, action=action)
            started = self.clock()
            rule, done, _ = ACTIONS[action]
            rule = DRY_RUN_RULE if dry_run else rule
            self._last[(container, rule)] = started
            self._recent.append((started, container, rule))
        if dry_run:
            audit_id, published = self._record(container, "", started,
                                               f"would be {done} (dry run: nothing done)",
                                               by, rule, action)  # fmt: skip
            return ActionDone(container=container, action=action, done=False,
                              container_id="", seconds=0.0, audit_id=audit_id,
                              published=published, at=iso(int(started * 1000)))  # fmt: skip
        try:
            cid = engine_call(container, timeout_s)
        except Exception as e:
            self._record(container, "", started, f"failed: {str(e)[:200]}", by, rule, action)
            raise ToolInputError(f"the engine did not {action} {container!r}: "
                                 f"{str(e)[:200]}") from e  # fmt: skip
        seconds = round(self.clock() - started, 2)
        what = f"{done} through the engine API in {seconds} s"
        audit_id, published = self._record(container, cid, started, what, by, rule, action)
        return ActionDone(container=container, action=action, done=True, container_id=cid,
                          seconds=seconds, audit_id=audit_id, published=published,
                          at=iso(int(started * 1000)))  # fmt: skip

    def _record(self, container: str, cid: str, started: float, what: str, by: str,
                rule: str, action: str) -> tuple[str, bool]:  # fmt: skip
        """The audit row (and the event): an alert version of rule ``rule``."""
        ms = int(started * 1000)
        done = self.clock()
        a = Alert(
            id=alert_id(container, action, rule, ms), status="resolved",
            identity=container, metric=action, rule=rule, host=self.host,
            container_id=cid, started_ms=ms, updated_ms=int(done * 1000),
            resolved_ms=int(done * 1000), observed=float(rule != DRY_RUN_RULE),
            peak=float(rule != DRY_RUN_RULE), expected=0.0,
            band_low=0.0, band_high=0.0, score=0.0, severity="warning",
            explanation=f"{ACTIONS[action][0]} ({by}): {container} {what}",
        )  # fmt: skip
        row: dict[str, Any] = msgspec.to_builtins(a) | {"partition": -1, "offset": -1}
        self.audit.append([row], {}, writer="nettel-mcp", topic="actions", epoch=0)
        published = False
        if self.publish is not None:
            self.publish(container.encode(), encode_alert(a))
            published = True
        return a.id, published


AllowedName = Annotated[str, Field(description="exact name from NETTEL_ACTIONS_CONTAINERS")]


def register_actions(server: TelemetryServer, actions: ContainerActions | None) -> None:
    """Add the acting tools to ``server`` when ``actions`` is enabled (else none)."""
    if actions is None or not actions.policy.enabled:
        return

    @server.tool()
    async def restart_container(
        container: AllowedName,
        confirm: Annotated[bool, Field(description="must be true: the container restarts")] = False,
    ) -> ActionDone:
        """Restart one allowed container through the engine (needs confirm=true; at most
        once per 5 min per container, 6 an hour in all); audited in the alerts table."""
        return await _answer(lambda: actions.restart(container, confirm))

    if "stop" in actions.engine:

        @server.tool()
        async def stop_container(
            container: AllowedName,
            confirm: Annotated[
                bool, Field(description="must be true: the container stops")
            ] = False,
        ) -> ActionDone:
            """Stop one allowed container through the engine (needs confirm=true; same
            limits as restart_container); audited in the alerts table."""
            return await _answer(lambda: actions.stop(container, confirm))
