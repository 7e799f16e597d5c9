"""A classifier step's time outside its training loop, as the in-process demo runs the steps: three per-finding
steps one after another in one process on a finished demo's data (``CXR_HOME`` of ``make demo``), each timed in
full and its training loop (``TrainResult.seconds``) apart. The first step of a process also pays one-off imports
and MLflow's scan of installed packages; the second and third show a step's own cost.

    CXR_HOME=.cxr python benchmarks/bench_step.py [--findings atelectasis,cardiomegaly,edema]

Writes into ``$CXR_HOME/bench/step`` (its own classifier folder and MLflow database), nothing of the demo's.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import date

import polars as pl
import torch

from cxr_pipeline.defs.io import ShardSet
from cxr_pipeline.settings import paths
from cxr_pipeline.tracking import tracked_run
from cxr_pipeline.vision.checkpoint import ClassifierSet
from cxr_pipeline.vision.fit import fit_and_save
from cxr_pipeline.vision.record import log_datasets, record_finding
from cxr_pipeline.vision.splits import load_data
from cxr_pipeline.vision.train import TrainConfig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--findings", default="atelectasis,cardiomegaly,edema")
    args = ap.parse_args()
    p = paths()
    out = p.bench("step")
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlflow.db"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"bench_step: {date.today()}, commit {commit}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    manifest = pl.read_parquet(p.manifest)
    cfg = TrainConfig(size=64, epochs=4, blank="zeros", bootstrap=300)  # the demo's classifier section
    shards, device = ShardSet(p).at(cfg.size), torch.device("cpu")
    for k, slug in enumerate(args.findings.split(",")):
        files = ClassifierSet(out / "classifier").classifier(slug)
        t0 = time.perf_counter()
        data = load_data(manifest, shards, slug, cfg, device)
        with tracked_run(f"bench_step[{slug}]") as run:
            log_datasets(run, data, shards, ["target"])
            fitted = fit_and_save(data, manifest, shards, cfg, device, files)
            record_finding(run, data, fitted, manifest, p.raw)
        step = time.perf_counter() - t0
        loop = fitted.trained.seconds
        print(f"step {k + 1} ({slug}): {step:.2f} s, training loop {loop:.2f} s, outside it {step - loop:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
