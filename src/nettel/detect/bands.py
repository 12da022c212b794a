"""Which of a fleet's hourly bands changed since they were last written.

The MCP server and the reports read what the detector expects of each container
(:meth:`~nettel.detect.container.ContainerDetector.weekly_bands`: 168 hours of the week
per metric) from the ``bands`` table, never from detector state. At each checkpoint the
detector asks a :class:`BandTracker` for the rows that changed: only containers that
learned something since (or were given feedback) are looked at, and of those only the
slots whose band moved are returned.

Examples
--------
>>> from nettel.models import StatEvent
>>> from nettel.detect.fleet import FleetDetector
>>> fleet, tracker = FleetDetector(), BandTracker()
>>> for i in range(80):
...     _ = fleet.process(StatEvent(ts_ms=i * 5000, host="h", container_id="c",
...                                 identity="web", name="web", interval_ms=5000,
...                                 rx_bytes=5000 + i % 3))
>>> rows = tracker.changes(fleet)
>>> len(rows) == 168 * len(fleet.detector("web").metrics), sorted(rows[0])[:3]
(True, ['basis', 'container', 'expected'])
>>> tracker.written(rows)
>>> tracker.changes(fleet)  # nothing learned since
[]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nettel.detect.fleet import FleetDetector

#: One slot's band as written: (low, expected, high, basis).
SlotBand = tuple[float, float, float, str]


class BandTracker:
    """The bands of one fleet as last written, to find what changed."""

    def __init__(self) -> None:
        self._bands: dict[tuple[str, str], list[SlotBand | None]] = {}
        self._learned: dict[str, int] = {}
        self._looked_at: dict[str, int] = {}

    def changes(self, fleet: FleetDetector, force: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Rows (container, metric, slot, low, expected, high, basis, learned_samples)
        whose band differs from the one last written; containers in ``force`` (e.g. given
        feedback) are looked at even when they learned nothing."""
        forced = set(force)
        rows: list[dict[str, Any]] = []
        self._looked_at = {}
        known = set(fleet.identities)  # forget what the fleet forgot (bounded state)
        self._learned = {i: n for i, n in self._learned.items() if i in known}
        self._bands = {k: v for k, v in self._bands.items() if k[0] in known}
        for identity in fleet.identities:
            det = fleet.detector(identity)
            if det is None:
                continue
            learned = det.n_learned
            if identity not in forced and self._learned.get(identity) == learned:
                continue
            self._looked_at[identity] = learned
            for metric in det.metrics:
                old = self._bands.get((identity, metric))
                for slot, b in enumerate(det.weekly_bands(metric)):
                    band = (b.low, b.expected, b.high, b.basis)
                    if old is None or old[slot] != band:
                        rows.append({"container": identity, "metric": metric, "slot": slot,
                                     "low": b.low, "expected": b.expected, "high": b.high,
                                     "basis": b.basis, "learned_samples": learned})  # fmt: skip
        return rows

    def written(self, rows: Iterable[dict[str, Any]]) -> None:
        """``rows`` (from the last :meth:`changes`) are in the table now."""
        for r in rows:
            slots = self._bands.setdefault((r["container"], r["metric"]), [None] * 168)
            slots[r["slot"]] = (r["low"], r["expected"], r["high"], r["basis"])
        self._learned.update(self._looked_at)
        self._looked_at = {}
