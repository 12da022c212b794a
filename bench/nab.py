"""NAB: run the service's detector over a NAB-format corpus and score it with NAB's rules.

    python -m bench.nab [--corpus DIR] [--out DIR] [--workers N]

DIR is laid out like NAB: ``data/<category>/<file>.csv`` (``timestamp,value``) and
``combined_windows.json``. It comes from ``--corpus`` (or ``--nab``), else the
``NETTEL_NAB_DIR`` env var, else ``../shared/bench/nab`` next to the repository. Every
series is read once, in order, by a fresh :class:`nettel.detect.baseline.TrafficBaseline`
behind a :class:`nettel.detect.baseline.LearningGuard` (the same classes and settings for
every file: NAB's series are sampled every 5 minutes, so the seasonal slots are 5-minute
slots of the day). Scores go to ``<out>/<category>/<file>.csv`` as
``timestamp,anomaly_score`` in [0, 1] when ``--out`` is given. The scoring
(:mod:`nettel.detect.nab`) sweeps one threshold per profile over the whole corpus.
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

from bench.common import write_result

from nettel.detect.baseline import LearningGuard
from nettel.detect.container import ContainerDetector, service_baseline
from nettel.detect.nab import (
    NAB_GUARD_RUN,
    NAB_GUARD_THRESHOLD,
    PROFILES,
    NabSeries,
    corpus_score,
    nab_detector,
    probation_rows,
)

REPO = Path(__file__).resolve().parent.parent


def make_detector(config: str = "nab") -> LearningGuard:
    """The detector: as configured for NAB's 5-minute series (the same for every file), or
    exactly as the service runs it on each metric of a container (``service``)."""
    if config == "service":
        probe = ContainerDetector()
        return LearningGuard(service_baseline(), probe.threshold, probe.max_protected_run)
    return nab_detector()


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


def run_file(
    path: Path, windows: Sequence[Sequence[str]], name: str, config: str = "nab"
) -> tuple[NabSeries, list[str]]:
    """Score one series in streaming order; its windows as row indices."""
    stamps: list[str] = []
    scores: list[float] = []
    det = make_detector(config)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            stamps.append(row["timestamp"])
            s = det.score_learn({"value": float(row["value"]), "ts_ms": _ts_ms(row["timestamp"])})
            scores.append(s / (1.0 + s))  # into [0, 1], same order
    rows: list[tuple[int, int]] = []
    times = [_ts_ms(t) for t in stamps]
    for start, end in windows:
        lo_ms, hi_ms = _ts_ms(start.split(".")[0]), _ts_ms(end.split(".")[0])
        inside = [i for i, t in enumerate(times) if lo_ms <= t <= hi_ms]
        rows.append((inside[0], inside[-1]))
    return NabSeries(name, scores, rows, probation_rows(len(scores))), stamps


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
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_file, root / "data" / n, windows.get(n, []), n) for n in names]
        results = [f.result() for f in futures]
        service_futures = [
            pool.submit(run_file, root / "data" / n, windows.get(n, []), n, "service")
            for n in names
        ]
        service = [f.result()[0] for f in service_futures]
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
    table: dict[str, dict[str, float]] = {}
    overall = {p.name: corpus_score(corpus, p) for p in PROFILES}
    for cat in categories:
        part = [s for s in corpus if s.name.startswith(cat + "/")]
        if any(s.windows for s in part):
            # Per category: the corpus-wide threshold applied to the category's files.
            table[cat] = {
                p.name: _at_threshold(part, p, overall[p.name].threshold) for p in PROFILES
            }
    table["overall"] = {name: r.score for name, r in overall.items()}
    print(f"{'category':24s} {'standard':>9s} {'low FP':>9s} {'low FN':>9s}")
    for cat, row in table.items():
        print(f"{cat:24s} " + " ".join(f"{row[p.name]:9.1f}" for p in PROFILES))
    figures = {
        "files": len(corpus),
        "rows": sum(len(s.scores) for s in corpus),
        "windows": sum(len(s.windows) for s in corpus),
        "scores": {k: {p: round(v, 2) for p, v in row.items()} for k, row in table.items()},
        "thresholds": {n: r.threshold for n, r in overall.items()},
        "counts": {n: {"tp": r.tp, "fp": r.fp, "fn": r.fn} for n, r in overall.items()},
        "detector": "LearningGuard(TrafficBaseline)",
        "settings": repr(make_detector()).split(),
        "guard": {"threshold": NAB_GUARD_THRESHOLD, "run": NAB_GUARD_RUN},
        "seconds": round(seconds, 1),
        "service_configuration": {
            "note": "the service's own settings (hour-of-day/week slots, 1-min smoothing, "
            "5-s sampling assumed), run unchanged on NAB's 5-min series",
            "scores": {p.name: round(corpus_score(service, p).score, 2) for p in PROFILES},
        },
        "published_on_these_41_files": {"CAD OSE": 75.9, "Numenta HTM": 75.5, "ARTime": 74.6},
    }
    write_result("nab", figures, "python -m bench.nab " + " ".join(argv or sys.argv[1:]))


def _at_threshold(part: list[NabSeries], profile: Any, threshold: float) -> float:
    from nettel.detect.nab import series_raw_score

    n = sum(len(s.windows) for s in part)
    null, perfect = -profile.fn_weight * n, profile.tp_weight * n
    raw = sum(series_raw_score(s, threshold, profile) for s in part)
    return 100.0 * (raw - null) / (perfect - null)


if __name__ == "__main__":
    main()
