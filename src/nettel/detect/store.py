"""Every metric baseline of a partition in one set of numpy arrays, scored a batch at a time.

A :class:`BaselineStore` holds one row per (container, metric): the novelty-of-extremes
baseline that :class:`~nettel.detect.baseline.TrafficBaseline` describes, as columns
(``[rows]`` arrays of the running numbers, ``[rows, depth]`` rings of 5-minute buckets)
and seasonal slots (15-minute slots of the day and hours of the week side by side,
``[rows, 264]``). :meth:`BaselineStore.score_learn` scores and learns any set of distinct
rows at once, every step a numpy operation over those rows, so a partition's events are
scored in rounds (one event per container per round) at a cost per round, not per metric.

What a row costs: the slots' visit counts (uint16) always; their levels and spreads
(float32) and last-flag marks (uint16) only once the row learned a level other than 0
(most containers never have errors, drops, SYN_RECV or CLOSE_WAIT: a slot of such a row
is 0 once visited, and nothing else). Rows of forgotten containers are reused.

Examples
--------
>>> import numpy as np
>>> from nettel.detect.baseline import TrafficBaseline
>>> store = TrafficBaseline(warmup=10).new_store()
>>> rows = np.array([store.add_row(), store.add_row()])
>>> for i in range(200):
...     _ = store.score_learn(rows, np.array([100.0 + i % 7, 5.0 + i % 3]),
...                           np.full(2, i * 60_000, dtype=np.int64))
>>> score, raw = store.score_learn(rows, np.array([104.0, 500.0]),
...                                np.full(2, 200 * 60_000, dtype=np.int64))
>>> float(score[0]), bool(score[1] > 1)
(0.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

#: A few milliseconds' worth of names shared with :mod:`nettel.detect.baseline`.
MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
DAY_MS: Final = 24 * HOUR_MS
WEEK_MS: Final = 7 * DAY_MS
#: 1970-01-01 was a Thursday: shifting by 3 days puts slot 0 of a week on Monday 00:00 UTC.
MONDAY_OFFSET_MS: Final = 3 * DAY_MS
#: Points learned before flags count as events that can recur.
RECURRING_AFTER: Final = 100
#: 15-minute slots of the day, hours of the week.
DEFAULT_SEASONS: Final = ((DAY_MS, 15 * MINUTE_MS), (WEEK_MS, HOUR_MS))
#: Samples are gathered into buckets of this length for the moving averages.
BUCKET_MS: Final = 5 * MINUTE_MS
#: A seasonal excess is measured in this many spans of the row's slot levels (when that is
#: less than the row's whole range; see ``BaselineStore._seasonal``).
CYCLE_UNITS: Final = 2.5
#: "No timestamp yet" in the int64 time columns.
NO_TS: Final = np.iinfo(np.int64).min

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
#: Rows to work on: an array of distinct rows, or a slice when they are consecutive (the
#: usual case: a container's rows are made together, and a round has every container),
#: where reading a column is a view and writing it costs no gather.
Index = slice | Ints
#: Each row's slot columns and, before this point learns, their (level, spread):
#: ``[rows, seasons]`` arrays read once per batch by scoring and learning alike.
Slots = tuple[Ints, Floats, Floats]


def row_index(rows: Ints) -> Index:
    """``rows`` as a slice when they are consecutive and increasing, else as they are.

    Examples
    --------
    >>> row_index(np.array([3, 4, 5])), row_index(np.array([3, 5])).tolist()
    (slice(3, 6, None), [3, 5])
    """
    n = len(rows)
    if n > 1 and rows[-1] - rows[0] == n - 1 and bool((np.diff(rows) > 0).all()):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _array(rows: Index) -> Ints:
    if isinstance(rows, slice):
        return np.arange(rows.start, rows.stop, dtype=np.int64)
    return rows


def _subset(slots: Slots | None, keep: npt.NDArray[np.bool_]) -> Slots | None:
    return None if slots is None else (slots[0][keep], slots[1][keep], slots[2][keep])


def _buckets(duration_ms: int, bucket_ms: int) -> int:
    return max(1, round(duration_ms / bucket_ms))


#: Per-row columns: name -> (dtype, initial value, width: 0 for [rows], else a key).
_SCALARS: Final = {
    "n": (np.int64, 0), "lo": (np.float64, math.inf), "hi": (np.float64, -math.inf),
    "first_ts": (np.int64, NO_TS), "last_ts": (np.int64, NO_TS),
    "last_raw": (np.float64, 0.0), "dt": (np.float64, 0.0), "k": (np.int64, 1),
    "mean": (np.float64, math.nan), "spread": (np.float64, 0.0),
    "noise": (np.float64, 0.0), "rel_noise": (np.float64, 0.0),
    "fine_last": (np.float64, 0.0), "pos": (np.int64, -1), "filled": (np.int64, 0),
    "bucket_sum": (np.float64, 0.0), "bucket_n": (np.int64, 0),
    "bucket_peak": (np.float64, 0.0), "level_row": (np.int32, -1), "flag_row": (np.int32, -1),
    "flagged_since": (np.int64, -1), "flagged_run": (np.int64, 0), "cycle": (np.float64, 0.0),
}  # fmt: skip


#: The parameters a store needs: :class:`~nettel.detect.baseline.TrafficBaseline`'s.
PARAMETERS: Final = (
    "scales_ms", "bucket_ms", "seasons", "seasonal_smoothing_ms", "seasonal_rate",
    "seasonal_weight", "seasonal_warmup", "rest_ms", "refire_ratio", "warmup",
    "learn_recurring", "noise_margin", "noise_ms", "fine_margin", "quiet_ms", "quiet_below",
)  # fmt: skip


class BaselineStore:
    """Rows of metric baselines (see the module docstring); ``params`` are the parameters
    of :class:`~nettel.detect.baseline.TrafficBaseline`, which documents them
    (``TrafficBaseline(...).new_store()`` makes a store of its parameters).

    Rows are added with :meth:`add_row`, given back with :meth:`release` (and reused),
    scored and learned with :meth:`score_learn`, queried with :meth:`band`.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        missing = [k for k in PARAMETERS if k not in params]
        if missing:
            raise ValueError(f"a store needs every baseline parameter; missing: {missing}")
        self.params = {k: params[k] for k in PARAMETERS}
        self.scales_ms: tuple[int, ...] = tuple(params["scales_ms"])
        self.bucket_ms: int = params["bucket_ms"]
        self.seasons = tuple((int(p), int(s)) for p, s in params["seasons"])
        seasonal_smoothing_ms: int = params["seasonal_smoothing_ms"]
        self.seasonal_rate: float = params["seasonal_rate"]
        self.seasonal_weight: float = params["seasonal_weight"]
        self.seasonal_warmup: int = params["seasonal_warmup"]
        rest_ms: int = params["rest_ms"]
        self.refire_ratio: float = params["refire_ratio"]
        self.warmup: int = params["warmup"]
        self.learn_recurring: bool = params["learn_recurring"]
        self.noise_margin: float = params["noise_margin"]
        self.noise_ms: int = params["noise_ms"]
        self.fine_margin: float = params["fine_margin"]
        self.quiet_ms: int = params["quiet_ms"]
        self.quiet_below: float = params["quiet_below"]
        bucket_ms = self.bucket_ms
        # Moving averages over m buckets: the last m - 1 full buckets and the one filling.
        lengths = (*self.scales_ms, seasonal_smoothing_ms)
        self._ms = sorted({_buckets(d, bucket_ms) for d in lengths})
        self._scale_at = [self._ms.index(_buckets(d, bucket_ms)) for d in self.scales_ms]
        self._smooth_at = self._ms.index(_buckets(seasonal_smoothing_ms, bucket_ms))
        self._rest = _buckets(rest_ms, bucket_ms) if rest_ms > 0 else 0
        self._depth = max(*self._ms, self._rest, 1)
        # Seasons side by side on one slot axis: season j's slots start at _offsets[j].
        self._widths = [max(1, p // s) for p, s in self.seasons]
        self._offsets = [sum(self._widths[:j]) for j in range(len(self.seasons))]
        self._slots = sum(self._widths)
        self._offset_arr = np.array(self._offsets, dtype=np.int64)
        self._period_arr = np.array([p for p, _ in self.seasons], dtype=np.int64)
        self._slot_arr = np.array([s for _, s in self.seasons], dtype=np.int64)
        #: History a season needs before it scores: its period (two when over a day).
        self._needed_arr = np.array([p if p <= DAY_MS else 2 * p for p, _ in self.seasons],
                                    dtype=np.int64)  # fmt: skip
        # Longest period first, for bands.
        self._by_period = sorted(range(len(self.seasons)), key=lambda j: -self.seasons[j][0])
        self._capacity = 0
        self._free: list[int] = []
        self._size = 0  # rows ever handed out (free ones included)
        # Pools of rows made only when a row needs them: its pointer column -> the arrays.
        self._pools = {"level_row": ("levels", "spreads"), "flag_row": ("flags",)}
        self._pool_capacity = dict.fromkeys(self._pools, 0)
        self._pool_size = dict.fromkeys(self._pools, 0)
        self._pool_free: dict[str, list[int]] = {k: [] for k in self._pools}
        self.cols: dict[str, np.ndarray[Any, Any]] = {}
        for name, (dtype, _) in _SCALARS.items():
            self.cols[name] = np.empty(0, dtype=dtype)
        ns, nm, ne = len(self.scales_ms), len(self._ms), len(self.seasons)
        self.cols["scale_lo"] = np.empty((0, ns))
        self.cols["scale_hi"] = np.empty((0, ns))
        self.cols["tails"] = np.empty((0, nm))
        self.cols["tail_n"] = np.empty((0, nm), dtype=np.int64)
        self.cols["sums"] = np.empty((0, self._depth))
        self.cols["counts"] = np.empty((0, self._depth), dtype=np.uint16)
        self.cols["peaks"] = np.empty((0, self._depth), dtype=np.float32)
        self.cols["residuals"] = np.empty((0, ne), dtype=np.int64)
        self.cols["res_lo"] = np.empty((0, ne))
        self.cols["res_hi"] = np.empty((0, ne))
        self.cols["visits"] = np.empty((0, self._slots), dtype=np.uint16)
        # Only rows that learned a level other than 0 (see level_row):
        self.levels = np.empty((0, self._slots), dtype=np.float32)
        self.spreads = np.empty((0, self._slots), dtype=np.float32)
        # Only rows that had a point flagged once they knew their range (flag_row): 1 + the
        # period number of each slot's last flag.
        self.flags = np.empty((0, self._slots), dtype=np.uint16)

    # -- rows ---------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows in use."""
        return self._size - len(self._free)

    def add_row(self) -> int:
        """A fresh row (a reused one when a row was released)."""
        if self._free:
            row = self._free.pop()
        else:
            if self._size == self._capacity:
                self._grow(max(16, self._capacity // 8))
            row = self._size
            self._size += 1
        self._reset(row)
        return row

    def release(self, row: int) -> None:
        """Give ``row`` back (its container was forgotten)."""
        for pointer in self._pools:
            self._release_pooled(row, pointer)
        self._free.append(row)

    def _grow(self, extra: int) -> None:
        self._capacity += extra
        for name, arr in self.cols.items():
            bigger = np.zeros((self._capacity, *arr.shape[1:]), dtype=arr.dtype)
            bigger[: len(arr)] = arr
            self.cols[name] = bigger

    def _reset(self, row: int) -> None:
        c = self.cols
        for name, (_, initial) in _SCALARS.items():
            c[name][row] = initial
        c["scale_lo"][row] = math.inf
        c["scale_hi"][row] = -math.inf
        for name in ("tails", "tail_n", "sums", "counts", "peaks", "residuals", "visits"):
            c[name][row] = 0
        c["res_lo"][row] = math.inf
        c["res_hi"][row] = -math.inf

    def _pooled(self, row: int, pointer: str) -> int:
        """``row``'s place in the pool of ``pointer`` (``level_row``, ``flag_row``), made
        when first needed."""
        at = int(self.cols[pointer][row])
        if at >= 0:
            return at
        free = self._pool_free[pointer]
        if free:
            at = free.pop()
        else:
            if self._pool_size[pointer] == self._pool_capacity[pointer]:
                capacity = self._pool_capacity[pointer]
                capacity = self._pool_capacity[pointer] = capacity + max(16, capacity // 8)
                for name in self._pools[pointer]:
                    arr = getattr(self, name)
                    bigger = np.zeros((capacity, self._slots), dtype=arr.dtype)
                    bigger[: len(arr)] = arr
                    setattr(self, name, bigger)
            at = self._pool_size[pointer]
            self._pool_size[pointer] += 1
        if pointer == "level_row":
            # Until now every visited slot's level was 0 with no spread.
            visited = self.cols["visits"][row] > 0
            self.levels[at] = np.where(visited, np.float32(0.0), np.float32(np.nan))
            self.spreads[at] = 0.0
        else:
            self.flags[at] = 0
        self.cols[pointer][row] = at
        return at

    def _release_pooled(self, row: int, pointer: str) -> None:
        at = int(self.cols[pointer][row])
        if at >= 0:
            self._pool_free[pointer].append(at)
            self.cols[pointer][row] = -1

    def _level_row(self, row: int) -> int:
        """The row's slot levels, made when first needed: until then every visited slot's
        level is 0 with no spread (all the row ever learned was 0)."""
        return self._pooled(row, "level_row")

    def pooled_rows(self, pointer: str) -> int:
        """Rows holding a place in the pool of ``pointer`` (``level_row``, ``flag_row``)."""
        return self._pool_size[pointer] - len(self._pool_free[pointer])

    def copy_row(self, src: int, dst: int, source: BaselineStore | None = None) -> None:
        """Make ``dst`` hold what ``src`` (of ``source``, this store by default) holds."""
        origin = self if source is None else source
        for name, arr in self.cols.items():
            if name not in self._pools:
                arr[dst] = origin.cols[name][src]
        for pointer, names in self._pools.items():
            at = int(origin.cols[pointer][src])
            if at >= 0:
                mine = self._pooled(dst, pointer)
                for name in names:
                    getattr(self, name)[mine] = getattr(origin, name)[at]
            else:
                self._release_pooled(dst, pointer)

    def forget_recent(self, row: int) -> None:
        """Drop what ``row`` saw recently (its buckets, detections, last time), keeping what
        it learned: a prior for a new container."""
        c = self.cols
        for name in ("peaks", "tails", "tail_n"):
            c[name][row] = 0
        c["last_ts"][row] = NO_TS
        c["filled"][row] = 0
        c["pos"][row] = -1
        c["bucket_sum"][row] = c["bucket_peak"][row] = c["fine_last"][row] = 0.0
        c["bucket_n"][row] = 0
        c["flagged_since"][row] = -1
        c["flagged_run"][row] = 0

    # -- slots --------------------------------------------------------------------------

    def _slot_columns(self, ts_ms: Ints) -> Ints:
        """``[rows, seasons]``: the slot column of each ts_ms in every season."""
        shifted = (ts_ms + MONDAY_OFFSET_MS)[:, None]
        return self._offset_arr + (shifted % self._period_arr) // self._slot_arr

    def _slot_values(self, rows: Index, cols: Ints) -> tuple[Floats, Floats]:
        """(level, spread) of each row's slots ``cols`` (``[rows, seasons]``; a NaN level:
        never visited)."""
        level_rows = self.cols["level_row"][rows]
        made = level_rows >= 0
        if made.all():
            at = level_rows[:, None]
            return (self.levels[at, cols].astype(np.float64),
                    self.spreads[at, cols].astype(np.float64))  # fmt: skip
        visited = self.cols["visits"][_array(rows)[:, None], cols] > 0
        level = np.where(visited, 0.0, np.nan)
        spread = np.zeros(level.shape)
        if made.any():
            at, c = level_rows[made][:, None], cols[made]
            level[made] = self.levels[at, c]
            spread[made] = self.spreads[at, c]
        return level, spread

    # -- scoring ------------------------------------------------------------------------

    def score_learn(
        self, rows: Ints, values: Floats, ts_ms: Ints, learn_below: Floats | float = math.inf
    ) -> tuple[Floats, Floats]:
        """Score each row's value, then learn it where its evidence is below
        ``learn_below``; one pass. ``rows`` must be distinct. Returns (score, evidence):
        the evidence (``last_raw``) stays high for as long as an anomaly lasts, where the
        score fires once (see :class:`~nettel.detect.baseline.TrafficBaseline`)."""
        with np.errstate(divide="ignore", invalid="ignore"):  # of rows masked out
            return self._score_learn(rows, values, ts_ms, learn_below)

    def _score_learn(
        self, arr: Ints, values: Floats, ts_ms: Ints, learn_below: Floats | float
    ) -> tuple[Floats, Floats]:
        c = self.cols
        rows = row_index(arr)
        n = c["n"][rows]
        slots = self._slots_of(rows, ts_ms)
        raw, averages, valid, fine = self._raw(rows, values, ts_ms, n, slots)
        warm = n >= max(self.warmup, 1)
        score = np.where(warm & self.scores_at(rows, raw, ts_ms), self._suppressed(rows, raw), 0.0)
        last_raw = np.where(warm, raw, 0.0)
        c["last_raw"][rows] = last_raw
        learn = last_raw < learn_below
        flagged = ~learn
        if flagged.any() and self.learn_recurring:
            for i in np.flatnonzero(flagged & (n >= RECURRING_AFTER)):
                if self._recurring_flag(int(arr[i]), int(ts_ms[i])):
                    learn[i] = True
        if learn.all():
            self._learn(rows, values, ts_ms, averages, valid, slots)
        elif learn.any():
            self._learn(arr[learn], values[learn], ts_ms[learn],
                        [a[learn] for a in averages], [v[learn] for v in valid],
                        _subset(slots, learn))  # fmt: skip
        self._push(rows, values, ts_ms, raw, fine)
        return score, last_raw

    def score_only(self, rows: Ints, values: Floats, ts_ms: Ints) -> Floats:
        """Scores, learning nothing (0 while warming up)."""
        n = self.cols["n"][rows]
        raw, _, _, _ = self._raw(rows, values, ts_ms, n, self._slots_of(rows, ts_ms))
        warm = n >= max(self.warmup, 1)
        return np.where(warm & self.scores_at(rows, raw, ts_ms), self._suppressed(rows, raw), 0.0)

    def scores_at(self, rows: Index, raw: Floats, ts_ms: Ints) -> npt.NDArray[np.bool_]:
        """Whether each evidence counts (see :meth:`counts`)."""
        first: Ints = self.cols["first_ts"][rows]
        out: npt.NDArray[np.bool_] = (raw >= self.quiet_below) | (
            (first != NO_TS) & (ts_ms - first >= self.quiet_ms)
        )
        return out

    def counts(self, row: int, evidence: float, ts_ms: int) -> bool:
        """Whether ``evidence`` at ``ts_ms`` scores for ``row`` (see
        :meth:`~nettel.detect.baseline.TrafficBaseline.counts`)."""
        if evidence >= self.quiet_below:
            return True
        first = int(self.cols["first_ts"][row])
        return first != NO_TS and ts_ms - first >= self.quiet_ms

    def _averages(self, rows: Index, values: Floats) -> tuple[list[Floats], list[Any]]:
        c = self.cols
        s = c["bucket_sum"][rows] + values
        n = c["bucket_n"][rows] + 1
        filled = c["filled"][rows]
        tails, tail_n = c["tails"][rows], c["tail_n"][rows]
        averages = [(tails[:, j] + s) / (tail_n[:, j] + n) for j in range(len(self._ms))]
        valid = [filled >= m - 1 for m in self._ms]
        return averages, valid

    def _slots_of(self, rows: Index, ts_ms: Ints) -> Slots | None:
        """The :data:`Slots` of ``rows`` at ``ts_ms`` (None without seasons). A level row
        made later by learning starts from these same values (see ``_pooled``)."""
        if not self.seasons:
            return None
        cols = self._slot_columns(ts_ms)
        return (cols, *self._slot_values(rows, cols))

    def _raw(
        self, rows: Index, values: Floats, ts_ms: Ints, n: Ints, slots: Slots | None
    ) -> tuple[Floats, list[Floats], list[Any], Floats]:
        """(evidence, moving averages, which are filled, fine excess) of each row."""
        c = self.cols
        averages, valid = self._averages(rows, values)
        lo, hi = c["lo"][rows], c["hi"][rows]
        span = hi - lo
        ranged = span > 0
        unit = np.where(ranged, span, 1.0)
        fast = c["k"][rows] > 1
        margin = np.where(fast, self.noise_margin * c["noise"][rows], 0.0)
        below = np.where(values < lo - margin, (lo - margin - values) / unit, 0.0)
        raw = np.where(values > hi + margin, (values - hi - margin) / unit, below)
        lows, highs = c["scale_lo"][rows], c["scale_hi"][rows]
        for i, j in enumerate(self._scale_at):
            v, low, high = averages[j], lows[:, i], highs[:, i]
            excess = np.where(v > high, (v - high) / unit,
                              np.where(v < low, (low - v) / unit, 0.0))  # fmt: skip
            raw = np.where(valid[j] & (high >= low), np.maximum(raw, excess), raw)
        fine = np.zeros(len(ts_ms))
        if slots is not None:
            seasonal, fine, any_on = self._seasonal(rows, values, ts_ms, averages, unit, slots)
            smooth_ok = valid[self._smooth_at] & any_on
            raw = np.where(smooth_ok, np.maximum(raw, self.seasonal_weight * seasonal), raw)
            fine = np.where(fast & ranged & (n > 0), fine, 0.0)
            both = np.minimum(fine, c["fine_last"][rows])
            raw = np.where(fast, np.maximum(raw, self.seasonal_weight * both), raw)
        raw = np.minimum(raw, 1e3)
        plain = np.where((values == hi) | (n == 0), 0.0, 1.0)
        raw = np.where(ranged, raw, plain)
        raw = np.where(n > 0, raw, 0.0)
        return raw, averages, valid, fine

    def _seasonal(
        self,
        rows: Index,
        values: Floats,
        ts_ms: Ints,
        averages: list[Floats],
        unit: Floats,
        slots: Slots,
    ) -> tuple[Floats, Floats, Any]:
        """(seasonal excess of the smoothed level, fine excess of the sample, whether any
        season scores) over the seasons that score and have a level at ts_ms's slot."""
        c = self.cols
        smooth = averages[self._smooth_at][:, None]
        first = c["first_ts"][rows]
        history = np.where(first != NO_TS, ts_ms - first, -1)[:, None]
        on = (c["residuals"][rows] >= self.seasonal_warmup) & (history >= self._needed_arr)
        if not on.any():
            zero = np.zeros(len(ts_ms))
            return zero, zero, np.zeros(len(ts_ms), dtype=bool)
        _, level, spread = slots
        on &= ~np.isnan(level)
        res_lo, res_hi = c["res_lo"][rows], c["res_hi"][rows]
        noise = (self.fine_margin * c["rel_noise"][rows])[:, None]
        per = unit[:, None]
        # Against its slot, a value's excess is measured in units of the metric's usual
        # cycle (the span of its slot levels), not of its whole range: one past spike,
        # learned into the range, would otherwise hide every later shift at a quiet hour.
        cycle = CYCLE_UNITS * c["cycle"][rows]
        per = np.where(cycle > 0, np.minimum(unit, cycle), unit)[:, None]
        d = smooth - level
        below = np.where(d < res_lo, (res_lo - smooth + level) / per, 0.0)
        excess = np.where(d > res_hi, (d - res_hi) / per, below)
        off = np.abs(values[:, None] - level) - noise * np.abs(level) - 3.0 * spread
        fine = np.maximum(0.0, off) / per
        any_on = on.any(axis=1)
        seasonal = np.where(on, excess, np.inf).min(axis=1)
        return seasonal, np.where(any_on, np.where(on, fine, np.inf).min(axis=1), 0.0), any_on

    def _suppressed(self, rows: Index, raw: Floats) -> Floats:
        """``raw``, or 0 where a detection within ``rest_ms`` was at least 1/refire_ratio
        of it (a repeat)."""
        if self._rest <= 0:
            return np.where(raw > 0, raw, 0.0)
        c = self.cols
        filled = np.minimum(c["filled"][rows], self._rest)
        if self._rest == self._depth and bool((filled == self._depth).all()):
            peaks = c["peaks"][rows].max(axis=1)  # every bucket of the ring is recent
        else:
            age = (c["pos"][rows][:, None] - np.arange(self._depth)) % self._depth
            peaks = np.where(age < filled[:, None], c["peaks"][rows], 0.0).max(axis=1)
        recent = np.maximum(peaks, c["bucket_peak"][rows])
        return np.where((raw > 0) & (self.refire_ratio * recent < raw), raw, 0.0)

    def _recurring_flag(self, row: int, ts_ms: int) -> bool:
        """Whether a point flagged now was flagged at this time of a previous period too
        (this slot or a neighbour); marks the slot either way."""
        at = self._pooled(row, "flag_row")  # first: it may grow the flags array
        flags = self.flags[at]
        shifted = ts_ms + MONDAY_OFFSET_MS
        seen = False
        for off, width, (period, slot) in zip(self._offsets, self._widths, self.seasons,
                                              strict=True):  # fmt: skip
            i = (shifted % period) // slot
            mark = min(shifted // period, 0xFFFE) + 1
            if width > 2 and any(0 < flags[off + j % width] < mark for j in (i - 1, i, i + 1)):
                seen = True
            flags[off + i] = mark
        return seen

    # -- learning -----------------------------------------------------------------------

    def _learn(
        self,
        rows: Index,
        values: Floats,
        ts_ms: Ints,
        averages: list[Floats],
        valid: list[Any],
        slots: Slots | None,
    ) -> None:
        c = self.cols
        lows, highs = c["scale_lo"][rows], c["scale_hi"][rows]
        for i, j in enumerate(self._scale_at):
            v, ok = averages[j], valid[j]
            lows[:, i] = np.where(ok, np.minimum(lows[:, i], v), lows[:, i])
            highs[:, i] = np.where(ok, np.maximum(highs[:, i], v), highs[:, i])
        c["scale_lo"][rows], c["scale_hi"][rows] = lows, highs
        c["lo"][rows] = np.minimum(c["lo"][rows], values)
        c["hi"][rows] = np.maximum(c["hi"][rows], values)
        first = c["first_ts"][rows]
        c["first_ts"][rows] = np.where(first == NO_TS, ts_ms, first)
        # Until the smoothing length is filled, the recent level is the mean of all so
        # far: the same sum, as the tails hold every bucket until then.
        level = averages[self._smooth_at]
        n = c["n"][rows]
        dt = c["dt"][rows]
        a = np.minimum(1.0, np.maximum(np.where(dt != 0, dt, self.bucket_ms) / self.noise_ms,
                                       1 / (n + 1)))  # fmt: skip
        off = np.abs(values - level)
        noise = c["noise"][rows]
        c["noise"][rows] = noise + a * (off - noise)
        rel = c["rel_noise"][rows]
        c["rel_noise"][rows] = np.where(level != 0, rel + a * (off / np.abs(level) - rel), rel)
        mean, spread = c["mean"][rows], c["spread"][rows]
        fresh = np.isnan(mean)
        c["spread"][rows] = np.where(fresh, spread, spread + a * (np.abs(level - mean) - spread))
        c["mean"][rows] = np.where(fresh, level, mean + a * (level - mean))
        smooth_ok = valid[self._smooth_at]
        if slots is not None and smooth_ok.any():
            if smooth_ok.all():
                self._learn_seasons(rows, level, ts_ms, dt, slots)
            else:
                self._learn_seasons(_array(rows)[smooth_ok], level[smooth_ok], ts_ms[smooth_ok],
                                    dt[smooth_ok], _subset(slots, smooth_ok))  # fmt: skip
        c["n"][rows] = n + 1

    def _learn_seasons(
        self, rows: Index, v: Floats, ts_ms: Ints, dt: Floats, slots: Slots | None = None
    ) -> None:
        c = self.cols
        dt = np.where(dt != 0, dt, float(self.seasons[0][1]))[:, None]
        level_rows = c["level_row"][rows]
        need = (level_rows < 0) & (v != 0)
        for i in np.flatnonzero(need):
            level_rows[i] = self._level_row(int(_array(rows)[i]))
        # before the visit is counted (a level row made just now holds the same values)
        if slots is None:
            cols = self._slot_columns(ts_ms)
            level, spread = self._slot_values(rows, cols)
        else:
            cols, level, spread = slots
        at = _array(rows)[:, None]
        count = c["visits"][at, cols].astype(np.int64)
        count = np.where(count < 0xFFFF, count + 1, count)
        c["visits"][at, cols] = count
        first = np.isnan(level)
        d = v[:, None] - level
        seen = ~first
        res_lo, res_hi = c["res_lo"][rows], c["res_hi"][rows]
        c["residuals"][rows] += seen
        c["res_lo"][rows] = np.where(seen & (d < res_lo), d, res_lo)
        c["res_hi"][rows] = np.where(seen & (d > res_hi), d, res_hi)
        made = level_rows >= 0
        if not made.any():
            return  # every row learned 0 only: its levels stay 0
        slot_ms = self._slot_arr
        r = self.seasonal_rate * np.minimum(dt, slot_ms) / slot_ms
        r = np.minimum(np.maximum(r, 1.0 / count), 1.0)
        new_level = np.where(first, v[:, None], level + r * d)
        new_spread = np.where(first, spread, spread + r * (np.abs(d) - spread))
        lr, cm = level_rows[made][:, None], cols[made]
        self.levels[lr, cm] = new_level[made]
        self.spreads[lr, cm] = new_spread[made]

    def _push(self, rows: Index, values: Floats, ts_ms: Ints, raw: Floats, fine: Floats) -> None:
        """The input window moves on whether or not the point was learned."""
        c = self.cols
        last = c["last_ts"][rows]
        later = (last != NO_TS) & (ts_ms > last)
        if later.any():
            dt = c["dt"][rows]
            step = (ts_ms - last).astype(np.float64)
            dt = np.where(later, np.where(dt == 0, step,
                                          np.where(step < 4 * dt, dt + 0.05 * (step - dt), dt)),
                          dt)  # fmt: skip
            c["dt"][rows] = dt
            k = np.maximum(1, np.rint(self.bucket_ms / np.where(dt > 0, dt, self.bucket_ms)))
            k = k.astype(np.int64)
            c["k"][rows] = np.where(later, k, c["k"][rows])
        c["last_ts"][rows] = ts_ms
        c["fine_last"][rows] = fine
        c["bucket_sum"][rows] += values
        bucket_n = c["bucket_n"][rows] + 1
        c["bucket_n"][rows] = bucket_n
        peak = c["bucket_peak"][rows]
        c["bucket_peak"][rows] = np.where(raw > peak, np.minimum(raw, 1e30), peak)
        full = bucket_n >= c["k"][rows]
        if full.any():
            self._close_buckets(_array(rows)[full])

    def _close_buckets(self, rows: Ints) -> None:
        c = self.cols
        depth = self._depth
        s = c["bucket_sum"][rows]
        n = np.minimum(c["bucket_n"][rows], 0xFFFF)
        pos, filled = c["pos"][rows], c["filled"][rows]
        sums, counts = c["sums"], c["counts"]
        for j, m in enumerate(self._ms):
            if m > 1:
                tail = c["tails"][rows, j] + s
                tail_n = c["tail_n"][rows, j] + n
                full = filled >= m - 1
                leaving = (pos - (m - 2)) % depth
                tail = np.where(full, tail - sums[rows, leaving], tail)
                tail_n = np.where(full, tail_n - counts[rows, leaving], tail_n)
                c["tails"][rows, j], c["tail_n"][rows, j] = tail, tail_n
        pos = (pos + 1) % depth
        c["pos"][rows] = pos
        sums[rows, pos] = s
        counts[rows, pos] = n
        c["peaks"][rows, pos] = c["bucket_peak"][rows]
        c["filled"][rows] = np.minimum(filled + 1, depth)
        c["bucket_sum"][rows] = 0.0
        c["bucket_n"][rows] = 0
        c["bucket_peak"][rows] = 0.0
        self._update_cycle(rows)
        for row in rows[pos == 0]:  # once per turn of the ring, sum afresh (no drift)
            self._resum(int(row))

    def _update_cycle(self, rows: Ints) -> None:
        """Each row's ``cycle``: the span of its slot levels (0 while it has none), once per
        bucket (the levels move little within one)."""
        level_rows = self.cols["level_row"][rows]
        made = level_rows >= 0
        if not made.any():
            return
        levels = self.levels[level_rows[made]]
        span = np.fmax.reduce(levels, axis=1) - np.fmin.reduce(levels, axis=1)
        self.cols["cycle"][rows[made]] = np.where(np.isnan(span), 0.0, span)

    def _resum(self, row: int) -> None:
        c = self.cols
        depth, pos, filled = self._depth, int(c["pos"][row]), int(c["filled"][row])
        sums, counts = c["sums"][row].tolist(), c["counts"][row].tolist()
        for j, m in enumerate(self._ms):
            at = [(pos - i) % depth for i in range(min(filled, m - 1))]
            c["tails"][row, j] = sum(sums[i] for i in at)
            c["tail_n"][row, j] = sum(counts[i] for i in at)

    # -- what a row knows ---------------------------------------------------------------

    def expected(self, rows: Ints, ts_ms: Ints) -> Floats:
        """The expected value of each row at ts_ms (the middle of :meth:`band`)."""
        out = np.full(len(ts_ms), np.nan)
        if self.seasons:
            level, _ = self._slot_values(rows, self._slot_columns(ts_ms))
            for j in self._by_period:
                out = np.where(np.isnan(out), level[:, j], out)
        recent = self.cols["mean"][rows]
        out = np.where(np.isnan(out), recent, out)
        return np.where(np.isnan(out), 0.0, out)

    def band(self, row: int, ts_ms: int) -> tuple[float, float, str]:
        """(expected, spread, basis) at ``ts_ms`` for ``row``: the longest period's slot
        that was seen, else the recent level ("recent"), else nothing ("")."""
        c = self.cols
        shifted = ts_ms + MONDAY_OFFSET_MS
        level_row = int(c["level_row"][row])
        for j in self._by_period:
            period, slot = self.seasons[j]
            col = self._offsets[j] + (shifted % period) // slot
            if level_row >= 0:
                level = float(self.levels[level_row, col])
                spread = float(self.spreads[level_row, col])
            else:
                level = 0.0 if c["visits"][row, col] > 0 else math.nan
                spread = 0.0
            if not math.isnan(level):
                spread = max(spread, float(c["spread"][row]) * 0.25)
                basis = "week" if period == WEEK_MS else "day" if period == DAY_MS else "slot"
                return level, spread, basis
        mean = float(c["mean"][row])
        if math.isnan(mean):
            return 0.0, 0.0, ""
        return mean, float(c["spread"][row]), "recent"

    def bands(self, rows: Ints, ts_ms: Ints) -> tuple[Floats, Floats]:
        """(expected, spread) of :meth:`band` for each of ``rows`` at its ``ts_ms``, at once
        (the same numbers, without the basis).

        Examples
        --------
        >>> from nettel.detect.baseline import TrafficBaseline
        >>> store = TrafficBaseline(warmup=2).new_store()
        >>> rows = np.array([store.add_row(), store.add_row()])
        >>> for i in range(50):
        ...     _ = store.score_learn(rows, np.array([10.0 + i % 3, 0.0]),
        ...                           np.full(2, i * 300_000, dtype=np.int64))
        >>> ts = np.full(2, 49 * 300_000, dtype=np.int64)
        >>> [store.band(r, 49 * 300_000)[:2] for r in rows.tolist()] == list(
        ...     zip(*(a.tolist() for a in store.bands(rows, ts))))
        True
        """
        c = self.cols
        level, spread = np.full(len(ts_ms), np.nan), np.zeros(len(ts_ms))
        if self.seasons:
            levels, spreads = self._slot_values(rows, self._slot_columns(ts_ms))
            for j in self._by_period:  # the longest period's slot that was seen
                take = np.isnan(level) & ~np.isnan(levels[:, j])
                level = np.where(take, levels[:, j], level)
                spread = np.where(take, spreads[:, j], spread)
            floor = c["spread"][rows] * 0.25
            spread = np.where(floor > spread, floor, spread)  # max(spread, floor), NaN kept
        mean = c["mean"][rows]
        recent = np.isnan(level)
        known = ~np.isnan(mean)
        level = np.where(recent, np.where(known, mean, 0.0), level)
        spread = np.where(recent, np.where(known, c["spread"][rows], 0.0), spread)
        return level, spread

    def value(self, name: str, row: int) -> float:
        """One per-row number (``n``, ``hi``, ``dt``, ``last_raw`` ...) as a float."""
        return float(self.cols[name][row])

    def warm_start(self, row: int, rows: Sequence[tuple[int, float, float, float]]) -> None:
        """Seed ``row`` from ``(slot_start_ms, mean, low, high)`` rows in time order."""
        c = self.cols
        self._level_row(row)
        r = np.array([row])
        for start_ms, mean, low, high in rows:
            c["lo"][row] = min(c["lo"][row], low)
            c["hi"][row] = max(c["hi"][row], high)
            c["scale_lo"][row] = np.minimum(c["scale_lo"][row], low)
            c["scale_hi"][row] = np.maximum(c["scale_hi"][row], high)
            if c["first_ts"][row] == NO_TS:
                c["first_ts"][row] = start_ms
            c["residuals"][row] = np.maximum(c["residuals"][row], self.seasonal_warmup)
            dt = float(min(s for _, s in self.seasons) if self.seasons else HOUR_MS)
            a = min(1.0, dt / self.noise_ms)
            m = float(c["mean"][row])
            if math.isnan(m):
                c["mean"][row] = mean
            else:
                c["spread"][row] += a * (abs(mean - m) - c["spread"][row])
                c["mean"][row] = m + a * (mean - m)
            self._learn_seasons(r, np.array([float(mean)]), np.array([start_ms]), np.array([dt]))
            c["res_lo"][row] = np.minimum(c["res_lo"][row], low - mean)
            c["res_hi"][row] = np.maximum(c["res_hi"][row], high - mean)
            c["n"][row] = max(int(c["n"][row]), self.warmup)
        self._update_cycle(r)

    def accept(self, row: int, value: float, ts_ms: int) -> None:
        """``value`` at ``ts_ms`` was normal: learn it and widen its slots to hold it."""
        c = self.cols
        c["scale_lo"][row] = np.minimum(c["scale_lo"][row], value)
        c["scale_hi"][row] = np.maximum(c["scale_hi"][row], value)
        c["lo"][row] = min(c["lo"][row], value)
        c["hi"][row] = max(c["hi"][row], value)
        level_row = self._level_row(row)
        shifted = ts_ms + MONDAY_OFFSET_MS
        for j, (period, slot) in enumerate(self.seasons):
            col = self._offsets[j] + (shifted % period) // slot
            level = float(self.levels[level_row, col])
            if level != level:
                self.levels[level_row, col] = level = value
            d = value - level
            c["res_lo"][row, j] = min(c["res_lo"][row, j], d)
            c["res_hi"][row, j] = max(c["res_hi"][row, j], d)
            spread = max(float(self.spreads[level_row, col]), 1.01 * abs(d) / 3.0)
            self.spreads[level_row, col] = spread  # float32: a margin above
