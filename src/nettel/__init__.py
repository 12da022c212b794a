"""nettel: container network telemetry, streaming anomaly detection, MCP tools."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    """nettel's installed version (``0+unknown`` when it runs from a bare source tree).

    Examples
    --------
    >>> version().count(".") >= 1
    True
    """
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("nettel")
    except PackageNotFoundError:
        return "0+unknown"
