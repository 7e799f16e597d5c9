"""One evaluation of the automation conditions of the whole graph (what the automation sensor does each tick),
timed on a real instance: the demo's (``CXR_HOME``/``DAGSTER_HOME`` of a finished ``make demo``, every asset
materialized, nothing stale). The first evaluation records state; the next ones are the sensor's steady ticks.

    CXR_HOME=.cxr DAGSTER_HOME=.cxr/dagster python benchmarks/bench_automation.py [--ticks 3] [--profile out.prof]

Prints each tick's seconds and what it requested (nothing, on a settled demo).
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import subprocess
import sys
import time
from datetime import date

import dagster as dg

from cxr_pipeline.definitions import defs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ticks", type=int, default=3)
    ap.add_argument("--profile", help="cProfile of the steady ticks, written here")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"bench_automation: {date.today()}, commit {commit}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}"
    )
    instance = dg.DagsterInstance.get()
    t = time.perf_counter()
    result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    print(f"first tick (records state): {time.perf_counter() - t:.2f} s, {result.total_requested} requested")
    prof = cProfile.Profile() if args.profile else None
    times = []
    for i in range(args.ticks):
        t = time.perf_counter()
        if prof:
            prof.enable()
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        if prof:
            prof.disable()
        times.append(time.perf_counter() - t)
        print(f"tick {i + 1}: {times[-1]:.2f} s, {result.total_requested} requested")
    print(f"steady tick: median {sorted(times)[len(times) // 2]:.2f} s over {len(times)}")
    if prof:
        prof.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
