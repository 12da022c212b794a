"""NAB: run the service's detector over a NAB-format corpus and score it with NAB's rules.

    python -m bench.nab [--corpus DIR] [--out DIR] [--workers N]

DIR is laid out like NAB: ``data/<category>/<file>.csv`` (``timestamp,value``) and
``combined_windows.json``. It comes from ``--corpus`` (or ``--nab``), else the
``NETTEL_NAB_DIR`` env var, else ``../shared/bench/nab`` next to the repository.

Every series is read once, in order, by a fresh detector built by
:func:`nettel.detect.container.make_detector` (what ``nettel up`` and ``nettel detect``
build for each container, with the same defaults), fed as one metric of its own:
nothing about the file, its name or its category reaches it; the sampling interval is
learned from the timestamps. The series of a worker are scored together as a partition's
containers are: their models in one store, one sample of each per round
(``ContainerDetector.score_rows``, what ``FleetDetector.process_batch`` runs), which gives
each series the scores it gets alone (``update_metric``; ``tests/test_detect_store.py``).
Its score (1.0 = the service alerts) is mapped into [0, 1] as ``s / (1 + s)``, so the
shipped threshold is 0.5 there.
Scores go to ``<out>/<category>/<file>.csv`` as ``timestamp,anomaly_score`` when
``--out`` is given.

Three figures per profile (scoring in :mod:`nettel.detect.nab`):

- NAB's optimum: one threshold swept over the whole corpus, as NAB reports detectors;
- at the shipped threshold: what the service alerts at, no sweep;
- leave one category out: for each category, the threshold is swept on the other four
  and the category is scored at it. The threshold is the only setting the bench tunes;
  every other setting is the detector's default.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from bench.common import write_result

from nettel.detect.container import SHIPPED_THRESHOLD, ContainerDetector, make_detector
from nettel.detect.nab import (
    PROFILES,
    NabSeries,
    Profile,
    corpus_score,
    probation_rows,
    series_tally,
)
from nettel.detect.nab import series_raw_score as raw_at

REPO = Path(__file__).resolve().parent.parent
#: The series' one metric, as the detector knows it (no minimum volume applies).
METRIC = "value"
#: Where the shipped threshold lies once scores are mapped into [0, 1].
SHIPPED_MAPPED = 0.5


def detector_for_series() -> ContainerDetector:
    """The detector that reads one NAB series: the service's, as built for a container.

    Examples
    --------
    >>> detector_for_series()._get_params() == make_detector()._get_params()
    True
    """
    return make_detector()


def corpus_dir(arg: str | None) -> Path:
    """Where the corpus is: the flag, else NETTEL_NAB_DIR, else ../shared/bench/nab."""
    path = Path(arg or os.environ.get("NETTEL_NAB_DIR") or REPO.parent / "shared/bench/nab")
    if not (path / "combined_windows.json").is_file() or not (path / "data").is_dir():
        sys.exit(
            f"no NAB corpus at {path} (need data/<category>/<file>.csv and "
            "combined_windows.json): pass --corpus DIR or set NETTEL_NAB_DIR"
        )
    return path


def _ts_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def read_file(path: Path) -> tuple[list[str], list[float]]:
    """The timestamps and values of one series."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["timestamp"] for r in rows], [float(r["value"]) for r in rows]


def score_together(series: Sequence[tuple[Sequence[int], Sequence[float]]]) -> list[list[float]]:
    """Each series' scores mapped into [0, 1], every series scored in streaming order by a
    detector of its own, all of them a round (one sample of each) at a time."""
    dets = [detector_for_series() for _ in series]
    store = dets[0].new_store()
    for det in dets:
        det.attach(store)
    rows = np.array([det.row(METRIC) for det in dets], dtype=np.int64)
    out: list[list[float]] = [[] for _ in series]
    for k in range(max((len(ts) for ts, _ in series), default=0)):
        live = [i for i, (ts, _) in enumerate(series) if k < len(ts)]
        ts_ms = np.array([series[i][0][k] for i in live], dtype=np.int64)
        values = np.array([series[i][1][k] for i in live])
        score, _ = dets[0].score_rows(rows[live], values, ts_ms, np.zeros(len(live)), store)
        for i, s in zip(live, score.tolist(), strict=True):
            out[i].append(s / (1.0 + s))  # into [0, 1], same order
    return out


def run_files(
    paths: Sequence[Path], windows: Sequence[Sequence[Sequence[str]]], names: Sequence[str]
) -> list[tuple[NabSeries, list[str]]]:
    """Score several series together; each with its windows as row indices."""
    read = [read_file(p) for p in paths]
    times = [[_ts_ms(t) for t in stamps] for stamps, _ in read]
    scores = score_together([(t, values) for t, (_, values) in zip(times, read, strict=True)])
    out = []
    for (stamps, _), ts, sc, wins, name in zip(read, times, scores, windows, names, strict=True):
        rows: list[tuple[int, int]] = []
        for start, end in wins:
            lo_ms, hi_ms = _ts_ms(start.split(".")[0]), _ts_ms(end.split(".")[0])
            inside = [i for i, t in enumerate(ts) if lo_ms <= t <= hi_ms]
            rows.append((inside[0], inside[-1]))
        out.append((NabSeries(name, sc, rows, probation_rows(len(sc))), stamps))
    return out


def score_at(part: Sequence[NabSeries], profile: Profile, threshold: float) -> float:
    """NAB's normalised score of ``part`` at a fixed threshold (nan without windows)."""
    n = sum(len(s.windows) for s in part)
    null, perfect = -profile.fn_weight * n, profile.tp_weight * n
    raw = sum(raw_at(s, threshold, profile) for s in part)
    return 100.0 * (raw - null) / (perfect - null) if n else float("nan")


def leave_one_category_out(corpus: Sequence[NabSeries], profile: Profile) -> dict[str, Any]:
    """Each category scored at the threshold swept on the other categories.

    A category without windows (artificialNoAnomaly) has no normalised score of its own:
    its raw score (false positives' cost) is given, and it counts in ``pooled``: every
    file scored at its own fold's threshold, normalised over the whole corpus.
    """
    categories = sorted({s.name.split("/")[0] for s in corpus})
    folds: dict[str, dict[str, Any]] = {}
    pooled_raw = 0.0
    for cat in categories:
        held = [s for s in corpus if s.name.startswith(cat + "/")]
        rest = [s for s in corpus if not s.name.startswith(cat + "/")]
        threshold = corpus_score(rest, profile).threshold
        raw = sum(raw_at(s, threshold, profile) for s in held)
        pooled_raw += raw
        fold = {"threshold": round(threshold, 6), "raw": round(raw, 3)}
        if any(s.windows for s in held):
            fold["score"] = round(score_at(held, profile, threshold), 2)
        folds[cat] = fold
    n = sum(len(s.windows) for s in corpus)
    null, perfect = -profile.fn_weight * n, profile.tp_weight * n
    scored = [f["score"] for f in folds.values() if "score" in f]
    return {
        "folds": folds,
        "mean": round(sum(scored) / len(scored), 2),
        "pooled": round(100.0 * (pooled_raw - null) / (perfect - null), 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nab", description=__doc__)
    parser.add_argument("--corpus", "--nab", dest="corpus", help="NAB-format corpus dir")
    parser.add_argument("--out", help="write <out>/<category>/<file>.csv score files")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    root = corpus_dir(args.corpus)
    windows: dict[str, list[list[str]]] = json.loads((root / "combined_windows.json").read_text())
    names = sorted(str(p.relative_to(root / "data")) for p in (root / "data").glob("*/*.csv"))
    started = time.perf_counter()
    groups = [names[w :: args.workers] for w in range(args.workers)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_files, [root / "data" / n for n in group],
                               [windows.get(n, []) for n in group], group)
                   for group in groups if group]  # fmt: skip
        by_name = {series.name: (series, stamps) for f in futures for series, stamps in f.result()}
        results = [by_name[n] for n in names]
    seconds = time.perf_counter() - started
    corpus = [series for series, _ in results]
    if args.out:
        for series, stamps in results:
            dest = Path(args.out) / series.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["timestamp", "anomaly_score"])
                w.writerows(zip(stamps, (f"{s:.6f}" for s in series.scores), strict=True))
    categories = sorted({s.name.split("/")[0] for s in corpus})
    overall = {p.name: corpus_score(corpus, p) for p in PROFILES}
    optimum: dict[str, dict[str, float]] = {}
    shipped: dict[str, dict[str, float]] = {}
    for cat in [*categories, "overall"]:
        part = [s for s in corpus if cat == "overall" or s.name.startswith(cat + "/")]
        if any(s.windows for s in part):
            optimum[cat] = {p.name: score_at(part, p, overall[p.name].threshold) for p in PROFILES}
            shipped[cat] = {p.name: score_at(part, p, SHIPPED_MAPPED) for p in PROFILES}
    loco = {p.name: leave_one_category_out(corpus, p) for p in PROFILES}
    print(f"{'category':24s} {'standard':>9s} {'low FP':>9s} {'low FN':>9s}   (at NAB's optimum)")
    for cat, row in optimum.items():
        print(f"{cat:24s} " + " ".join(f"{row[p.name]:9.1f}" for p in PROFILES))
    print(f"{'shipped threshold':24s} "
          + " ".join(f"{shipped['overall'][p.name]:9.1f}" for p in PROFILES))  # fmt: skip
    print(f"{'leave-one-category-out':24s} "
          + " ".join(f"{loco[p.name]['mean']:9.1f}" for p in PROFILES))  # fmt: skip
    shipped_counts = {}
    for p in PROFILES:
        tallies = [series_tally(s, SHIPPED_MAPPED, p) for s in corpus]
        shipped_counts[p.name] = {k: sum(t[i] for t in tallies)
                                  for i, k in ((1, "tp"), (2, "fp"), (3, "fn"))}  # fmt: skip
    figures = {
        "files": len(corpus),
        "rows": sum(len(s.scores) for s in corpus),
        "windows": sum(len(s.windows) for s in corpus),
        "detector": "nettel.detect.container.make_detector() (the service's), one metric",
        "settings": repr(detector_for_series()).split(),
        "shipped_threshold": {"evidence": SHIPPED_THRESHOLD, "mapped": SHIPPED_MAPPED},
        "scores": {k: {p: round(v, 2) for p, v in row.items()} for k, row in optimum.items()},
        "thresholds": {n: r.threshold for n, r in overall.items()},
        "counts": {n: {"tp": r.tp, "fp": r.fp, "fn": r.fn} for n, r in overall.items()},
        "at_shipped_threshold": {
            "scores": {k: {p: round(v, 2) for p, v in row.items()} for k, row in shipped.items()},
            "counts": shipped_counts,
        },
        "leave_one_category_out": loco,
        "seconds": round(seconds, 1),
        "published_on_these_41_files": {"CAD OSE": 75.9, "Numenta HTM": 75.5, "ARTime": 74.6},
    }
    write_result("nab", figures, "python -m bench.nab " + " ".join(argv or sys.argv[1:]))


if __name__ == "__main__":
    main()
