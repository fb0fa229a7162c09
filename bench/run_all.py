"""Run every benchmark in bench/ in turn (each in its own process), results as JSON in bench/results/.

    .venv/bin/python bench/run_all.py           # full runs: about an hour on 2 cores (objectives at V=152k dominate)
    .venv/bin/python bench/run_all.py --quick   # each benchmark's --quick smoke run, a few minutes
    .venv/bin/python bench/run_all.py bench_realscale.py   # by name: the real-model ones (need the `real` extra)

Benchmarks measure ratios side by side in one run (ours against a peer or a naive baseline); nothing here asserts
a time. A benchmark that fails is reported and the others still run; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = ["bench_objectives.py", "bench_decoding.py", "bench_distill.py", "bench_serve.py"]
# need the `real` extra (SmolLM2-135M-Instruct, converted) and its chat data: run by name only
OPTIONAL = ["bench_realscale.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("names", nargs="*", help=f"a subset of {', '.join(BENCHMARKS)}")
    args = ap.parse_args()
    names = args.names or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS + OPTIONAL]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS + OPTIONAL)}")
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / name)] + (["--quick"] if args.quick else [])
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
