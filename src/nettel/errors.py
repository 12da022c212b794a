"""The one root error of nettel, and the decision attribute callers read.

Callers decide whether to retry by reading ``retriable``, never by listing types.

Examples
--------
>>> err = BrokerUnavailableError("broker at 127.0.0.1:9092 did not answer")
>>> isinstance(err, NettelError), err.retriable
(True, True)
>>> ConfigError("NETTEL_SAMPLE_INTERVAL_S", "abc", "a number of seconds > 0").retriable
False
"""

from __future__ import annotations


class NettelError(Exception):
    """Root of every error nettel raises on purpose."""

    retriable: bool = False


class ConfigError(NettelError, ValueError):
    """A setting has a value nettel cannot use; the message names it and what is allowed.

    Examples
    --------
    >>> str(ConfigError("NETTEL_PARTITIONS", "0", "a whole number from 1 to 1000"))
    "NETTEL_PARTITIONS='0' is not valid: expected a whole number from 1 to 1000"
    """

    def __init__(self, setting: str, value: object, allowed: str) -> None:
        self.setting = setting
        self.value = value
        self.allowed = allowed
        super().__init__(f"{setting}={value!r} is not valid: expected {allowed}")


class BrokerUnavailableError(NettelError):
    """The Kafka-protocol broker could not be reached or did not start."""

    retriable = True


class EngineUnavailableError(NettelError):
    """The container engine's API socket could not be reached."""

    retriable = True


class SampleError(NettelError):
    """One unit could not be sampled this tick (its process vanished, the engine erred)."""

    retriable = True


class QueryError(NettelError, ValueError):
    """A query asked for something the store cannot answer; the message names what can.

    Examples
    --------
    >>> str(QueryError("metric", "bytez", ["bytes", "packets"]))
    "unknown metric 'bytez': expected one of bytes, packets"
    """

    def __init__(self, what: str, value: object, choices: list[str] | tuple[str, ...]) -> None:
        self.what = what
        self.value = value
        self.choices = list(choices)
        super().__init__(f"unknown {what} {value!r}: expected one of {', '.join(self.choices)}")
