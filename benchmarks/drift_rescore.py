"""Score candidate alarms on the windows a ``benchmarks/drift.py --dump`` run kept, without retraining: how the
alarm's signal (``image_drift.signal``) was chosen, on validation seeds 5 and 7 (#51).

Each candidate is the MMD test (under each of ``--kernels``, by default the energy distance, the asset's default
kernel; 500 permutations, the benchmark's
permutation seeds: held-out windows 1, the CheXpert, NIH and PadChest sets 2 to 4, the levels 10 onwards, times
1000 plus the window's number) of one representation of a window against the same representation of the
reference, with p < ``--alpha`` the alarm and the median MMD² over a level's windows its score:

- ``features``: the multi-label champion's pooled backbone features; ``features-standardised``: the same, each
  dimension scaled by the reference's mean and standard deviation;
- ``scores`` and ``logits``: the network's own probabilities and their logits;
- ``calibrated`` and ``calibrated-logits``: the Platt-calibrated probabilities (the champion's maps, read from the
  run's registry) and their logits.

Printed per candidate, in the benchmark's terms but on significance alone (p < alpha, no tolerance): no-shift windows
significant (held-out and format-alone), windows significant
at levels whose AUC drop is at least 0.05, and Spearman between score and AUC drop over the 15 graded levels.
Then, pooled over the runs given, each (candidate, kernel)'s alarm tolerance by ``tolerance_rule``: how
``vision.drift.TOLERANCES`` was set, from validation seeds 5 and 7 (the calibrated candidate is the ``outputs``
signal, ``features`` the features one).

    python benchmarks/drift_rescore.py /tmp/bench_drift_s5 [/tmp/bench_drift_s7 ...] [--candidates calibrated,features] [--kernels energy,multiscale]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

NULLS = ("held-out", "chexpert", "nih", "padchest")
CANDIDATES = ("features", "features-standardised", "scores", "logits", "calibrated", "calibrated-logits")


def windows(run: Path) -> tuple[dict[str, np.ndarray], dict[str, list[dict[str, np.ndarray]]], list[dict]]:
    """The reference's arrays, each set's windows in order (``emb``: features, ``score``: network scores), the levels."""
    z = np.load(run / "windows.npz")
    sets: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key in z.files:
        name, rest = key.split("/", 1)
        if name != "reference":
            w, what = rest.split("/")
            sets.setdefault(name, {}).setdefault(int(w[1:]), {})[what] = z[key]
    reference = {"emb": z["reference/emb"], "score": z["reference/score"]}
    return reference, {n: [ws[k] for k in sorted(ws)] for n, ws in sets.items()}, json.loads((run / "levels.json").read_text())


def represent(kind: str, side: dict[str, np.ndarray], reference: dict[str, np.ndarray], calibrate) -> np.ndarray:
    """One side (window or reference) in the candidate's representation."""

    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    if kind == "features":
        return side["emb"]
    if kind == "features-standardised":
        return (side["emb"] - reference["emb"].mean(0)) / (reference["emb"].std(0) + 1e-6)
    if kind in ("scores", "logits"):
        return side["score"] if kind == "scores" else logit(side["score"])
    p = calibrate(side["score"])
    return p if kind == "calibrated" else logit(p)


def champion_calibration(run: Path):
    """The run's multi-label champion's calibration (the benchmark registered it under ``run/home``)."""
    os.environ["CXR_HOME"] = str(run / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from cxr_pipeline.tracking import get_client
    from cxr_pipeline.vision.checkpoint import MULTILABEL
    from cxr_pipeline.vision.external import load_champions
    from cxr_pipeline.vision.registry import registered_name

    client, uri = get_client()
    (champ,) = load_champions(client, uri, [registered_name(MULTILABEL)])
    return champ.model.calibrate


def tolerance_rule(no_shift: list[float], must_detect: list[float]) -> float:
    """The alarm's tolerance (``image_drift.tolerance``) from validation windows: the geometric midpoint of the gap
    between the largest no-shift window's MMD² and the smallest one's at a level whose AUC drop is at least 0.05, to
    two significant figures (where there is no gap, the largest no-shift MMD²: no tolerance then separates them).
    Written before it was first run (#51); the rule and the values it gave were committed together."""
    lo, hi = max(no_shift), min(must_detect)
    value = float(np.sqrt(lo * hi)) if 0 < lo < hi else lo
    return float(f"{value:.2g}")


def main() -> int:
    from scipy.stats import spearmanr

    from cxr_pipeline.vision.drift import KERNELS, median_distance, mmd_test

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="--out folders of benchmarks/drift.py --dump runs")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--kernels", default="energy", help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--permutations", type=int, default=500)
    a = ap.parse_args()
    gaps: dict[str, tuple[list[float], list[float]]] = {}
    for run in a.runs:
        reference, sets, levels = windows(run)
        calibrate = champion_calibration(run)
        test_seed = {"held-out": 1, **{n: 2 + k for k, n in enumerate(NULLS[1:])}}
        test_seed.update({f"{lv['kind']} {lv['value']}": 10 + k for k, lv in enumerate(levels)})
        graded = [lv for lv in levels if lv["kind"] != "combined"]
        for kind in a.candidates.split(","):
            ref = represent(kind, reference, reference, calibrate)
            for kernel in a.kernels.split(","):
                sigma = median_distance(ref) if kernel == "gaussian-reference" else None
                res = {
                    name: [
                        mmd_test(
                            ref,
                            represent(kind, w, reference, calibrate),
                            a.permutations,
                            test_seed[name] * 1000 + k,
                            kernel.removesuffix("-reference"),
                            sigma,
                        )
                        for k, w in enumerate(ws)
                    ]
                    for name, ws in sets.items()
                }
                flag = lambda ts: sum(t.p_value < a.alpha for t in ts)  # noqa: E731
                nulls = [t for n in NULLS for t in res[n]]
                big = [t for lv in levels if lv["drop"] >= 0.05 for t in res[f"{lv['kind']} {lv['value']}"]]
                score = [float(np.median([t.statistic for t in res[f"{lv['kind']} {lv['value']}"]])) for lv in graded]
                rho = float(spearmanr(score, [lv["drop"] for lv in graded]).statistic)
                by_set = ", ".join(f"{n} {flag(res[n])}/{len(res[n])}" for n in NULLS)
                gap = gaps.setdefault(f"{kind}/{kernel}", ([], []))
                gap[0].extend(t.statistic for t in nulls)
                gap[1].extend(t.statistic for t in big)
                print(
                    f"{run.name} {kind}/{kernel}: significant at p < {a.alpha}: no shift {flag(nulls)}/{len(nulls)} ({by_set}), "
                    f"{flag(big)}/{len(big)}, spearman {rho:.2f} over {len(graded)} levels; MMD² largest no-shift "
                    f"{max(gap[0][-len(nulls) :]):.4f}, smallest at AUC drop >= 0.05 {min(gap[1][-len(big) :]):.4f}",
                    flush=True,
                )
    for rule, (no_shift, must) in gaps.items():
        print(
            f"tolerance {rule} over {len(a.runs)} runs: {tolerance_rule(no_shift, must)} (largest no-shift {max(no_shift):.4f}, smallest to detect {min(must):.4f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
