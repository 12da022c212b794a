"""Every numeric setting refuses, at start, a value outside what it admits."""

from __future__ import annotations

import dataclasses

import pytest

from nettel.config import Settings
from nettel.errors import ConfigError

# one value each setting must refuse (below its range, or at an open lower bound)
OUT_OF_RANGE = {
    "NETTEL_SAMPLE_INTERVAL_S": "0",
    "NETTEL_INVENTORY_INTERVAL_S": "0",
    "NETTEL_BUFFER_MAX_EVENTS": "0",
    "NETTEL_PARTITIONS": "1001",
    "NETTEL_BROKER_PORT": "70000",
    "NETTEL_BROKER_MAX_RSS_MB": "16",
    "NETTEL_WINDOW_GRACE_S": "-1",
    "NETTEL_FLUSH_INTERVAL_S": "0",
    "NETTEL_ROLLUP_INTERVAL_S": "-5",
    "NETTEL_RETENTION_MINUTE_DAYS": "-1",
    "NETTEL_RETENTION_HOUR_DAYS": "-1",
    "NETTEL_RETENTION_DAY_DAYS": "-1",
    "NETTEL_RETENTION_SAMPLES_DAYS": "-1",
    "NETTEL_RETENTION_ALERTS_DAYS": "-1",
    "NETTEL_RETENTION_REPORTS_DAYS": "-1",
    "NETTEL_RETENTION_HEALTH_DAYS": "-1",
    "NETTEL_HEALTH_INTERVAL_S": "0",
    "NETTEL_MAINTENANCE_INTERVAL_S": "0",
    "NETTEL_MCP_PORT": "0",
    "NETTEL_MCP_RATE_PER_MINUTE": "0",
    "NETTEL_DETECT_CHECKPOINT_S": "0",
    "NETTEL_PRICE_EGRESS_PER_GB": "-0.01",
    "NETTEL_PRICE_INGRESS_PER_GB": "-1",
    "NETTEL_TRAFFIC_BUDGET_GB_PER_DAY": "-1",
}


def test_every_numeric_setting_has_a_case_here() -> None:
    numeric = {
        f.metadata["setting"].env
        for f in dataclasses.fields(Settings)
        if f.type in ("int", "float")
    }
    assert numeric == set(OUT_OF_RANGE)


@pytest.mark.parametrize(("env", "value"), sorted(OUT_OF_RANGE.items()))
def test_an_out_of_range_value_fails_naming_the_setting(env: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{env}=.* is not valid: expected "):
        Settings.from_env({env: value})


@pytest.mark.parametrize("env", sorted(OUT_OF_RANGE))
def test_a_non_number_fails_naming_the_setting(env: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{env}='many' is not valid"):
        Settings.from_env({env: "many"})
