"""Traffic forecasts: River's Holt-Winters on an hourly series, with a calibrated interval.

The model is :class:`river.time_series.HoltWinters`, multiplicative, with a weekly season
(168 hours, which holds the daily cycle too) once the history spans three weeks, and a
daily season (24 hours) from three days on; shorter histories get no forecast. Values
are shifted by one byte so an idle hour never divides by zero.

A value more than :data:`OUTLIER_FACTOR` times above (or below) the model's one-step
forecast is learned as that forecast unless it lasts :data:`OUTLIER_HOURS` hours, so a
one-off spike does not recur in every forecast season while a lasting change is
learned; the interval still counts every value.

The interval comes from the model's own errors: while it learns the history, it
forecasts up to a week ahead from an origin every 6 hours, and the quantiles of
``log((actual + 1) / (forecast + 1))`` over those forecasts give the multiplicative
bounds of a ``level`` interval. A day's bounds scale its forecast by the same factors
(hour errors within a day are correlated, so this errs on the wide side).

Examples
--------
>>> import math
>>> hours = [1000 * (2 + math.sin(2 * math.pi * h / 24)) for h in range(24 * 10)]
>>> f = forecast_hourly(hours, start_ms=0, horizon_hours=48)
>>> f.model, len(f.values), f.start_ms == 240 * 3_600_000
('HoltWinters(seasonality=24)', 48, True)
>>> all(lo <= v <= hi for lo, v, hi in zip(f.low, f.values, f.high))
True
>>> abs(f.values[6] - 3000) < 150  # hour 6 of a day: the sine's top
True
>>> forecast_hourly(hours[:48], start_ms=0) is None  # under three days: no forecast
True
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import polars as pl
from river import time_series

from nettel.errors import QueryError
from nettel.models import RATE_METRICS
from nettel.store.query import TrafficQuery, check_choice

HOUR_MS: Final = 3_600_000
WEEK_HOURS: Final = 168
DAY_HOURS: Final = 24
#: Hours of history needed for the weekly model, and for the daily one.
WEEKLY_MIN_HOURS: Final = 21 * DAY_HOURS
DAILY_MIN_HOURS: Final = 3 * DAY_HOURS
#: Hours between the origins the interval is calibrated from.
CALIBRATION_STEP_HOURS: Final = 6
#: A value this many times above or below the one-step forecast is an outlier; one that
#: lasts this many hours in a row is a change the model learns (module docstring).
OUTLIER_FACTOR: Final = 2.0
OUTLIER_HOURS: Final = 3


@dataclass(frozen=True, slots=True)
class HourlyForecast:
    """Expected value per hour from ``start_ms`` on, with a ``level`` interval.

    ``calibration_points``: how many (forecast, actual) pairs the interval came from
    (0: none yet; the interval is then the point forecast widened by ±50%).
    """

    model: str
    start_ms: int
    values: list[float]
    low: list[float]
    high: list[float]
    level: float
    history_hours: int
    calibration_points: int


#: River's class, untyped: held as Any so strict mypy accepts the calls
_HoltWinters: Any = time_series.HoltWinters


def _model(seasonality: int) -> Any:
    # beta small but set: River's seasonal update reads the trend component
    return _HoltWinters(
        alpha=0.05, beta=0.001, gamma=0.2, seasonality=seasonality, multiplicative=True
    )


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values.

    Examples
    --------
    >>> _quantile([1.0, 2.0, 3.0, 4.0], 0.5), _quantile([1.0, 2.0, 3.0, 4.0], 0.95)
    (2.0, 4.0)
    """
    rank = min(len(sorted_xs), max(1, math.ceil(q * len(sorted_xs))))
    return sorted_xs[rank - 1]


def forecast_hourly(
    values: Sequence[float], start_ms: int, *, horizon_hours: int = 168, level: float = 0.95
) -> HourlyForecast | None:
    """Forecast the ``horizon_hours`` after an hourly series (oldest first, no gaps).

    ``start_ms`` is the first value's hour. Returns ``None`` when the history is under
    three days. See the module docstring for the model and the interval.
    """
    if not 1 <= horizon_hours <= 4 * WEEK_HOURS:
        raise QueryError("horizon_hours", horizon_hours, ["1..672"])
    if not 0 < level < 1:
        raise QueryError("level", level, ["a fraction between 0 and 1"])
    n = len(values)
    if n < DAILY_MIN_HOURS:
        return None
    season = WEEK_HOURS if n >= WEEKLY_MIN_HOURS else DAY_HOURS
    model = _model(season)
    errors: list[float] = []
    initialized = False
    run = 0  # outlying values in a row
    for t, v in enumerate(values):
        if t >= 2 * season and t % CALIBRATION_STEP_HOURS == 0 and t < n - 1:
            ahead = min(horizon_hours, n - t)
            for h, f in enumerate(model.forecast(ahead)):
                errors.append(math.log((values[t + h] + 1) / (max(f, 1.0))))
        y = float(v) + 1
        if initialized:
            # a one-off spike would otherwise become part of the season and recur in every
            # forecast: a value OUTLIER_FACTOR away from the model's expectation is learned
            # as that expectation, unless it lasts OUTLIER_HOURS (then it is a change)
            expected = max(model.forecast(1)[0], 1.0)
            outlying = not expected / OUTLIER_FACTOR <= y <= expected * OUTLIER_FACTOR
            run = run + 1 if outlying else 0
            if outlying and run < OUTLIER_HOURS:
                y = expected
        model.learn_one(y)
        if model._initialized and not initialized:
            # River starts the trend at the mean step over the first season: a season that
            # starts low and ends high would read as growth for weeks. Start it flat.
            model.trend[-1] = 0.0
            initialized = True
    point = [max(f - 1, 0.0) for f in model.forecast(horizon_hours)]
    if errors:
        errors.sort()
        lo = math.exp(_quantile(errors, (1 - level) / 2))
        hi = math.exp(_quantile(errors, 1 - (1 - level) / 2))
    else:
        lo, hi = 0.5, 1.5
    lo, hi = min(lo, 1.0), max(hi, 1.0)
    return HourlyForecast(
        model=f"HoltWinters(seasonality={season})",
        start_ms=start_ms + n * HOUR_MS,
        values=point,
        low=[v * lo for v in point],
        high=[v * hi for v in point],
        level=level,
        history_hours=n,
        calibration_points=len(errors),
    )


def hourly_values(frame: pl.DataFrame, column: str, end_ms: int) -> tuple[int, list[float]]:
    """One container's hourly rows (``ts_ms``, ``column``) as a gapless series up to
    ``end_ms``: (first hour, values), hours without rows as 0.

    Examples
    --------
    >>> f = pl.DataFrame({"ts_ms": [0, 2 * HOUR_MS], "bytes": [5, 7]})
    >>> hourly_values(f, "bytes", 4 * HOUR_MS)
    (0, [5.0, 0.0, 7.0, 0.0])
    """
    if not frame.height:
        return end_ms, []
    first = int(frame["ts_ms"].min())  # type: ignore[arg-type]
    first -= first % HOUR_MS
    hours = {int(t): float(v or 0) for t, v in zip(frame["ts_ms"], frame[column], strict=True)}
    return first, [hours.get(t, 0.0) for t in range(first, end_ms, HOUR_MS)]


def _history(query: TrafficQuery, container: str, metric: str, history_days: int,
             now_ms: int | None) -> tuple[int, list[float]]:  # fmt: skip
    """``container``'s hourly ``metric`` over up to ``history_days`` before the last whole
    hour before ``now_ms``: (first hour, values)."""
    check_choice("metric", metric, RATE_METRICS)
    if not 1 <= history_days <= 400:
        raise QueryError("history_days", history_days, ["1..400"])
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    end = now_ms - now_ms % HOUR_MS
    frame = query.series(end - history_days * 24 * HOUR_MS, end, resolution="hour",
                         metrics=(metric,), containers=[container])  # fmt: skip
    return hourly_values(frame, metric, end)


def forecast_container(query: TrafficQuery, container: str, *, metric: str = "bytes",
                       horizon_hours: int = 168, history_days: int = 28,
                       now_ms: int | None = None,
                       level: float = 0.95) -> HourlyForecast | None:  # fmt: skip
    """``container``'s ``metric`` (a counter or total: bytes, rx_bytes, packets, errors, ...)
    per hour for the ``horizon_hours`` after the last whole hour before ``now_ms``, from up
    to ``history_days`` of its hourly history (what the MCP tool ``forecast_traffic``
    answers). ``None``: under three days of history.
    """
    first, values = _history(query, container, metric, history_days, now_ms)
    return forecast_hourly(values, first, horizon_hours=horizon_hours, level=level)


class ForecastCache:
    """:func:`forecast_container` with the fits kept: the ``size`` most recently used.

    A fit is keyed by its inputs: the container, metric, horizon and level, and the
    hourly history itself (its first hour and values), which is the data's version: the
    same history gives the same forecast, and a new hour or late data makes a new key.

    Examples
    --------
    >>> cache = ForecastCache(size=2)
    >>> hours = [1000.0 + h % 24 for h in range(24 * 4)]
    >>> a = cache.fit("web", "bytes", hours, 0, horizon_hours=24)
    >>> cache.fit("web", "bytes", hours, 0, horizon_hours=24) is a, cache.fits
    (True, 1)
    >>> cache.fit("web", "bytes", hours + [5.0], 0, horizon_hours=24) is a, cache.fits
    (False, 2)
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.fits = 0
        self._kept: OrderedDict[tuple[Any, ...], HourlyForecast | None] = OrderedDict()
        self._lock = threading.Lock()

    def fit(self, container: str, metric: str, values: Sequence[float], first_ms: int, *,
            horizon_hours: int, level: float = 0.95) -> HourlyForecast | None:  # fmt: skip
        """The forecast of an hourly history (fitted only if not kept)."""
        key = (container, metric, horizon_hours, level, first_ms, tuple(values))
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        fitted = forecast_hourly(values, first_ms, horizon_hours=horizon_hours, level=level)
        with self._lock:
            self.fits += 1
            self._kept[key] = fitted
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return fitted

    def forecast(self, query: TrafficQuery, container: str, *, metric: str = "bytes",
                 horizon_hours: int = 168, history_days: int = 28, now_ms: int | None = None,
                 level: float = 0.95) -> HourlyForecast | None:  # fmt: skip
        """As :func:`forecast_container`, from the kept fit when the history is the same."""
        first, values = _history(query, container, metric, history_days, now_ms)
        return self.fit(container, metric, values, first, horizon_hours=horizon_hours,
                        level=level)  # fmt: skip
