"""What ingest watches: a unit is one network namespace with a stable identity.

For the engine source a unit is a container; for the procfs source it is a
network namespace of the host (the host's own included).

Examples
--------
>>> stable_identity("web-1", {"com.docker.compose.project": "shop",
...                           "com.docker.compose.service": "api"})
'shop/api'
>>> stable_identity("web-1", {"com.docker.compose.project": "shop",
...                           "com.docker.compose.service": "api",
...                           "com.docker.compose.container-number": "2"})
'shop/api/2'
>>> stable_identity("/web-1", {})
'web-1'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_NUMBER = "com.docker.compose.container-number"


def stable_identity(name: str, labels: Mapping[str, str]) -> str:
    """Identity that survives restarts and re-creation: compose project/service[/n], else name."""
    project, service = labels.get(COMPOSE_PROJECT, ""), labels.get(COMPOSE_SERVICE, "")
    if project and service:
        number = labels.get(COMPOSE_NUMBER, "1") or "1"
        return f"{project}/{service}" + ("" if number == "1" else f"/{number}")
    return name.lstrip("/")


@dataclass(frozen=True, slots=True)
class Unit:
    """One thing to sample. ``pid`` is a process inside its network namespace.

    ``started_ms`` is set when the unit started after ingest began watching, so its
    first sample counts its traffic from zero instead of being only a baseline.
    """

    identity: str
    container_id: str
    name: str
    pid: int | None
    image: str = ""
    compose_project: str = ""
    compose_service: str = ""
    started_ms: int | None = None
    exclude_interfaces: frozenset[str] = field(default_factory=frozenset)
