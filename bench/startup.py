"""How fast ``nettel`` starts: ``--help`` and ``doctor`` as a user runs them.

Runs the installed ``nettel`` entry point (the same one users run) ``--runs`` times each,
after one warm-up run that leaves Python's bytecode cache as a user's first run does,
and takes the median wall time, and the median CPU time (which the load of a shared
machine changes far less): ``nettel --help``, ``nettel up --help``, and ``nettel
doctor`` (its checks included: engine socket, /proc, broker port, data dir). Also
records what importing the command line costs (``python -X importtime``, the top
imports) so a regression names its cause.

    python bench/startup.py [--runs 7]

Writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result

NETTEL = str(Path(sys.executable).with_name("nettel"))
DOCTOR_IMPORTS = "import nettel.cli, nettel.broker, structlog.dev, http.client"


def wall_s(argv: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    """Median, min and max wall time of ``argv`` over ``runs`` runs, and its median CPU
    time (user + system: what it costs on an idle machine, whatever the load now)."""
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False, timeout=120)  # fmt: skip
        times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
            "cpu_median_s": round(statistics.median(cpu), 3)}  # fmt: skip


def top_imports(command: str, env: dict[str, str], n: int = 8) -> list[dict[str, Any]]:
    """The ``n`` costliest top-level imports of ``python -m nettel.cli <command>``."""
    argv = [sys.executable, "-X", "importtime", "-m", "nettel.cli", *command.split()]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=120)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.removeprefix("import time:").split("|")
        name = name.removeprefix(" ")  # nested imports are indented further
        if cumulative.strip().isdigit() and not name.startswith(" "):
            rows.append({"module": name, "ms": round(int(cumulative) / 1000, 1)})
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "NETTEL_DATA_DIR": data, "NETTEL_BROKER_PORT": "1",
               "NETTEL_MCP_PORT": "1"}  # fmt: skip
        env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        # as on a user's machine: Python caches the bytecode of what it imports (the test
        # machines set PYTHONDONTWRITEBYTECODE, which recompiles every module every run)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for warm_up in (["--help"], ["doctor"]):
            subprocess.run([NETTEL, *warm_up], env=env, capture_output=True, check=False)
        baseline = wall_s([sys.executable, "-c", "pass"], env, args.runs)
        figures: dict[str, Any] = {
            "runs": args.runs,
            "python_alone": baseline,
            "help": wall_s([NETTEL, "--help"], env, args.runs),
            "up_help": wall_s([NETTEL, "up", "--help"], env, args.runs),
            "doctor": wall_s([NETTEL, "doctor"], env, args.runs),
            # what doctor loads before its first check (the rest is the checks: the
            # engine's API, /proc, the ports, the data dir)
            "doctor_imports": wall_s([sys.executable, "-c", DOCTOR_IMPORTS], env, args.runs),
            "help_top_imports": top_imports("--help", env),
        }
    for name in ("help", "doctor"):
        figures[f"{name}_under_1s"] = {"wall": figures[name]["median_s"] < 1.0,
                                       "cpu": figures[name]["cpu_median_s"] < 1.0}  # fmt: skip
    figures["load_average_1m"] = os.getloadavg()[0]
    write_result("startup", figures, f"python bench/startup.py --runs {args.runs}")


if __name__ == "__main__":
    main()
