"""The bootstrap intervals of the classifier metrics and of the ECE: one resample at a time (the loop they
replaced: scikit-learn's metrics and torchmetrics' ECE on each resample's rows) against all resamples at once
(``vision.resampling`` behind ``evaluate.evaluate_at`` and ``calibration.calibration_row``), on the same inputs,
the same seed and so the same draws; the intervals must agree (printed: the largest difference).

Two sizes: the demo's test split (257 images of 67 patients, one finding) and MIMIC-CXR's (about 5,000 test images
of 1,300 patients; a classifier step evaluates 14 findings x 2 models x 2 label sources = 56 rows, timed in full
for the vectorised path; the loop is timed on ``--loop-rows`` of them and scaled, as printed).

    python benchmarks/bench_resampling.py [--boot 1000] [--loop-rows 2]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from datetime import date

import numpy as np

from cxr_pipeline.vision.calibration import ECE_BINS, apply, calibration_row
from cxr_pipeline.vision.evaluate import METRICS, evaluate_at, point_metrics
from cxr_pipeline.vision.gap_statistics import cell_statistics, null_gaps
from cxr_pipeline.vision.resampling import resample_indices

CALIBRATION = {"method": "platt", "a": 1.2, "b": -0.3, "n": 100, "n_pos": 30, "fitted_on": "validate"}


def torchmetrics_ece(y, p) -> float:
    """The loop's ECE and the tests' reference: torchmetrics' binned ECE on the rows given (what ``calibration.ece``
    computed with until #47)."""
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    preds = torch.from_numpy(np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0))
    return float(binary_calibration_error(preds, torch.from_numpy(np.asarray(y).astype(int)), n_bins=ECE_BINS, norm="l1"))


def inputs(images: int, patients: int, seed: int):
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, patients, images))
    y = (rng.random(images) < 0.25).astype(int)
    p = np.clip(rng.normal(0.35 + 0.25 * y, 0.18), 0, 1).astype(np.float32).astype(np.float64)
    return y, p, groups


def loop(y, p, groups, threshold: float, n_boot: int, seed: int) -> dict:
    """The per-resample loop (as evaluate_at and calibration_row ran before #47)."""
    rng, boots = np.random.default_rng(seed), {m: [] for m in METRICS}
    for _ in range(n_boot):
        idx, _unit = resample_indices(len(y), groups, rng)
        if y[idx].min() == y[idx].max():
            continue
        for m, v in point_metrics(y[idx], p[idx], threshold).items():
            boots[m].append(v)
    row = {}
    for m in METRICS:
        vals = np.asarray([v for v in boots[m] if v == v])
        row[f"{m}_lo"], row[f"{m}_hi"] = float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))
    after, rng = apply(CALIBRATION, p), np.random.default_rng(seed)
    draws = {"before": [], "after": []}
    for _ in range(n_boot):
        idx, _unit = resample_indices(len(y), groups, rng)
        draws["before"].append(torchmetrics_ece(y[idx], p[idx]))
        draws["after"].append(torchmetrics_ece(y[idx], after[idx]))
    for k, v in draws.items():
        row[f"ece_{k}_lo"], row[f"ece_{k}_hi"] = float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))
    return row


def vectorised(y, p, groups, threshold: float, n_boot: int, seed: int) -> dict:
    row = evaluate_at(y, p, threshold, n_boot=n_boot, seed=seed, groups=groups)
    row.update(calibration_row(y, p, CALIBRATION, groups, n_boot, seed))
    return row


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--loop-rows", type=int, default=2, help="rows the loop is timed on at MIMIC-CXR's size (then scaled to 56)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"bench_resampling: {date.today()}, commit {commit}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}"
    )
    print(f"{args.boot} resamples by patient; intervals of accuracy, F1, sensitivity, specificity, ROC AUC, AP, ECE before/after\n")
    print(f"{'size':<34} {'loop s':>9} {'at once s':>10} {'ratio':>7} {'max |interval diff|':>20}")
    y, p, g = inputs(257, 67, 0)
    vectorised(y, p, g, 0.45, 10, 0)  # warm: imports, torch's first call
    ref, t_loop = timed(loop, y, p, g, 0.45, args.boot, 0)
    new, t_new = timed(vectorised, y, p, g, 0.45, args.boot, 0)
    diff = max(abs(new[k] - v) for k, v in ref.items())
    print(f"{'demo: 257 images, 1 row':<34} {t_loop:>9.2f} {t_new:>10.3f} {t_loop / t_new:>6.1f}x {diff:>20.2e}")
    rows = 56
    y, p, g = inputs(5000, 1300, 1)
    t_loop = diff = 0.0
    for r in range(args.loop_rows):
        ref, t = timed(loop, y, p, g, 0.45, args.boot, r)
        t_loop += t
        new = vectorised(y, p, g, 0.45, args.boot, r)
        diff = max(diff, max(abs(new[k] - v) for k, v in ref.items()))
    t_loop *= rows / args.loop_rows
    t_new = sum(timed(vectorised, y, p, g, 0.45, args.boot, r)[1] for r in range(rows))
    label = f"MIMIC: 5,000 images, {rows} rows"
    print(
        f"{label:<34} {t_loop:>9.1f} {t_new:>10.2f} {t_loop / t_new:>6.1f}x {diff:>20.2e}  (loop: {args.loop_rows} rows timed, x{rows / args.loop_rows:g})"
    )
    print(f"\n(ECE bins: {ECE_BINS} + 1 for a confidence of exactly 1, as torchmetrics bins; the ECE differs by float32 sums only)")
    audit(args.boot)
    return 0


def audit(n: int) -> None:
    """The subgroup audit's cell (``gap_statistics``): ``n`` paired patient resamples and ``n`` random groups at
    once, against the same computation one resample (one random group) per call. The loop's calls draw their own
    resamples (a seed each), so here only the times compare."""
    y, p, patients = inputs(257, 67, 2)
    called = p >= 0.45
    in_group = np.isin(patients, np.arange(0, 67, 3))  # every third patient: a group of 23
    rows = []
    for name, at_once, one_at_a_time in (
        ("audit cell: paired bootstrap", lambda: cell_statistics(y, p, called, patients, in_group, n, 0),
         lambda: [cell_statistics(y, p, called, patients, in_group, 1, b) for b in range(n)]),
        ("audit cell: random groups", lambda: null_gaps(y, called, patients, in_group, n, 0),
         lambda: [null_gaps(y, called, patients, in_group, 1, b) for b in range(n)]),
    ):  # fmt: skip
        t_new, t_loop = timed(at_once)[1], timed(one_at_a_time)[1]
        rows.append(f"{name + ', 257 images':<34} {t_loop:>9.2f} {t_new:>10.3f} {t_loop / t_new:>6.1f}x {'(own draws)':>20}")
    print("\n".join(["", *rows]))


if __name__ == "__main__":
    sys.exit(main())
