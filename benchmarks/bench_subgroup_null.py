"""Is the subgroup audit's gap p-value calibrated? A simulation with no true gap, beside the null it replaced.

Each repetition draws a group of ``size`` patients at prevalence ``prevalence`` (a patient has the finding on all
its images or on none) and 200 other patients at prevalence 0.5, two images a patient; every positive image is
called with probability 0.7 and every negative with 0.2, in the group and out of it: no gap. Two more cells at
prevalence 0.5 give the group's patients fewer images than the rest's (one each against six; Poisson 1.5 against
3.5 extra), where a raw gap's null is too narrow. The group's TPR and
FPR gaps get a p-value from:

- ``stratified`` (``vision.gap_statistics``, the audit's null): random groups keep the group's patients with a
  positive image (TPR) or a negative one (FPR), the gap studentized; p = (k + 1) / (B + 1);
- ``size only`` (the null before it): random groups of as many patients, the gap over their spread read on the
  normal.

A calibrated test rejects at p < 0.05 in at most 5% of repetitions (plus Monte-Carlo error: the bound printed is
0.05 + 2 standard errors at 0.05). A cell where ``min_positives`` (5) leaves the TPR gap unscored counts as
unscored, not as a rejection, as does one the audit leaves without a p-value (its patients' image counts are
the group: ``gap_statistics.CONFOUNDED``). Exit 1 if the stratified null exceeds the bound in any cell.

    python benchmarks/bench_subgroup_null.py [--reps 1000] [--permutations 1000]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from datetime import date

import numpy as np

from cxr_pipeline.vision.gap_statistics import null_gaps, permutation_p

REST, IMAGES, TPR, FPR, MIN_POSITIVES = 200, 2, 0.7, 0.2, 5


IMAGE_COUNTS = {
    "2 each": None,
    "1 vs 6": (1, 6),  # the group's patients one image each, the rest's six
    "Poisson": "poisson",  # 1 + Poisson(1.5) in the group, 1 + Poisson(3.5) in the rest
}


def draw(size: int, prevalence: float, rng: np.random.Generator, images: str = "2 each"):
    """One repetition's images: (y, called, patient, in_group)."""
    n = size + REST
    prev = np.where(np.arange(n) < size, prevalence, 0.5)
    sick = rng.random(n) < prev
    spec = IMAGE_COUNTS[images]
    if spec is None:
        per = np.full(n, IMAGES)
    elif spec == "poisson":
        per = 1 + rng.poisson(np.where(np.arange(n) < size, 1.5, 3.5))
    else:
        per = np.where(np.arange(n) < size, spec[0], spec[1])
    pid = np.repeat(np.arange(n), per)
    y = sick[pid].astype(int)
    called = rng.random(pid.size) < np.where(y == 1, TPR, FPR)
    return y, called, pid, pid < size


def size_only_p(y, called, pid, in_group, permutations, rng) -> dict[str, float]:
    """The replaced null: membership permuted over all patients, the gap's z on the null's spread (normal tail)."""
    from scipy.stats import norm

    n = pid.max() + 1
    member = np.zeros(n, bool)
    member[np.unique(pid[in_group])] = True
    out = {}
    for gap, label in (("tpr_gap", 1), ("fpr_gap", 0)):
        t = np.bincount(pid, weights=(y == label).astype(float), minlength=n)
        h = np.bincount(pid, weights=((y == label) & called).astype(float), minlength=n)
        m = (np.argsort(rng.random((permutations, n)), axis=1) < member.sum()).astype(float)  # random sets of as many
        with np.errstate(invalid="ignore", divide="ignore"):
            null = m @ h / (m @ t) - (1 - m) @ h / ((1 - m) @ t)
            obs = h[member].sum() / t[member].sum() - h[~member].sum() / t[~member].sum()
        null = null[~np.isnan(null)]
        sd = np.sqrt(np.mean(null**2))
        out[gap] = float(2 * norm.sf(abs(obs) / sd)) if sd > 0 and not np.isnan(obs) else float("nan")
    return out


def scored(y, pid, in_group, label: int) -> bool:
    """``min_positives`` patients with (without) the finding on both sides."""
    m = y == label
    return min(np.unique(pid[m & in_group]).size, np.unique(pid[m & ~in_group]).size) >= MIN_POSITIVES


def run(size: int, prevalence: float, reps: int, permutations: int, seed: int, images: str = "2 each") -> dict:
    rng = np.random.default_rng(seed)
    hits = {k: {"tpr_gap": [], "fpr_gap": []} for k in ("stratified", "size only")}
    unscored = {"tpr_gap": 0, "fpr_gap": 0}
    for r in range(reps):
        y, called, pid, in_group = draw(size, prevalence, rng, images)
        new = null_gaps(y, called, pid, in_group, permutations, seed=r)
        old = size_only_p(y, called, pid, in_group, permutations, rng)
        for gap, label in (("tpr_gap", 1), ("fpr_gap", 0)):
            p = permutation_p(*new[gap])
            if not scored(y, pid, in_group, label) or np.isnan(p):  # min_positives, or a group that is its image mix
                unscored[gap] += 1
                continue
            hits["stratified"][gap].append(p < 0.05)
            hits["size only"][gap].append(old[gap] < 0.05)
    return {"hits": hits, "unscored": unscored}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1000)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(
        f"bench_subgroup_null: {date.today()}, commit {commit}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}"
    )
    print(f"{a.reps} repetitions a cell, {a.permutations} random groups a gap; no true gap (TPR {TPR}, FPR {FPR} everywhere)")
    t0, failed = time.perf_counter(), False
    print(f"{'size':>5} {'prev':>5} {'images':>8} {'gap':>8} {'scored':>7} {'bound':>6} {'stratified':>11} {'size only':>10}  ratio")
    grid = [(s, p, "2 each") for s in (30, 60) for p in (0.1, 0.5, 0.9)] + [(s, 0.5, i) for s in (30, 60) for i in ("1 vs 6", "Poisson")]
    for size, prevalence, images in grid:
        res = run(size, prevalence, a.reps, a.permutations, a.seed, images)
        for gap in ("tpr_gap", "fpr_gap"):
            new, old = (np.asarray(res["hits"][k][gap], float) for k in ("stratified", "size only"))
            n = len(new)
            if not n:
                print(
                    f"{size:>5} {prevalence:>5} {images:>8} {gap:>8} {0:>7}  (unscored in every repetition: min_positives, or no p-value)"
                )
                continue
            bound = 0.05 + 2 * np.sqrt(0.05 * 0.95 / n)
            ok = new.mean() <= bound
            failed |= not ok
            ratio = old.mean() / new.mean() if new.mean() else float("inf")
            print(
                f"{size:>5} {prevalence:>5} {images:>8} {gap:>8} {n:>7} {bound:>6.3f} {new.mean():>10.3f}{'' if ok else '!'} {old.mean():>10.3f}  {ratio:.2f}"
            )
    print(f"done in {time.perf_counter() - t0:.0f} s; stratified null {'FAILS' if failed else 'within the bound in every scored cell'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
