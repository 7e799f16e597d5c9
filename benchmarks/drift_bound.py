"""Could any correction of CBPE shared by a window's findings meet #51's per-level goal? Bounds from the labels.

#51 asks that CBPE's estimated AUC be within 0.05 of the measured one, as the median over findings, at every shift
level of ``benchmarks/drift.py``. CBPE misses it at the levels whose images break the champion's calibration. A
shift-aware estimator would correct CBPE from what the window shows, and the simplest such correction is one shared
by the window's findings: it learns from the drift how much AUC the window lost, not which findings lost it. This
script asks what the best such correction could reach. Each of three forms has one parameter shared by the
level's findings, and each is handed its best value, chosen on the level's own labels (the value, on a grid of 4,001
between the findings' own, whose median |error| over the findings is smallest):

- ``shared drop``: each finding's AUC on the unshifted set (the same patients: ``drift.py``'s levels are paired)
  less one drop;
- ``shared shrink``: each finding's unshifted AUC moved towards 0.5 by one proportional loss;
- ``CBPE less a shared bias``: CBPE's expected AUC less one bias.

None of them is an estimator (each reads the labels it would estimate): each is the least error its form can reach,
and a level over 0.05 under all three is one that no correction of these forms meets.

A fourth column, ``shrink by r``, is the shared shrink at the level's mean proportional loss r (the mean over
findings of (unshifted - shifted) / (unshifted - 0.5)), which is not its best value.

Then estimators learned from the ``--validation`` seeds' runs are scored on the other runs, each still handed the
scored run's unshifted AUCs (which a deployed estimator would not have):

- ``the drift score's shared shrink``: a monotone (isotonic) map from the window's drift score ``d`` (the alarm's:
  the unbiased energy distance between the reference's calibrated outputs and those of a draw of up to 500 of the
  level's frontal images) to the level's best shared shrink, fitted on the validation levels (and the unshifted
  sets, at 0);
- two that are told which of the 16 levels the window is, a ceiling for any estimator that recognises the kind and
  strength of a change: ``told the level, its shared shrink`` (the mean over the validation seeds of the level's
  best shared shrink) and ``told the level, each finding's own loss`` (each finding's mean proportional loss at the
  level over the validation seeds).

Printed per level:
the AUC drop, CBPE's error as ``drift.py`` prints it (median over findings of |expected - measured|, every frontal
image of the level's 400 patients, findings with at least 20 of each class), each bound's error the same way, and
the measured AUC's median standard error (Hanley and McNeil 1982: the part of any error that is the measurement's
own noise). ``--findings``: each finding's unshifted and shifted AUC, CBPE's estimate, and how far its mean calibrated
probability moved from its prevalence (what a label-free signal sees of it). Whether that movement says which
findings lost AUC (what a per-finding correction would need) is printed for every run: the Spearman correlation,
over a level's findings, between |mean calibrated probability - prevalence| and the finding's AUC drop, at each
level whose drop is at least 0.05. Reads runs that ``drift.py`` kept (their champion under ``OUT/home``, their replicas under ``OUT/ext``;
nothing is trained or drawn again):

    python benchmarks/drift_bound.py /tmp/bench_drift_s5 /tmp/bench_drift_s7 /tmp/bench_drift_s37 [...] [--validation 5,7] [--findings]

Last line: ``drift bound: levels over 0.05 per run (seeds ...): CBPE ..., shared drop ..., shared shrink ..., CBPE
less a shared bias ..., shrink by r ..., the best of the three at each level ...; learned on seeds ..., at seeds ...:
the drift score's shared shrink ..., told the level, its shared shrink ..., told the level, each finding's own loss
...``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
from drift import COMBINED, LEVELS, commit, external, measured_and_expected, reference_images

BOUNDS = ("shared drop", "shared shrink", "CBPE less a shared bias")
GRID = 4001


def hanley_mcneil(auc: float, n1: int, n0: int) -> float:
    """The standard error of an AUC measured on ``n1`` positives and ``n0`` negatives (Hanley and McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    return float(np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0)))


def least_median(u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """min over t of the median over findings of |u - v t|, and the t that reaches it: a form's error at its best
    shared parameter, searched on ``GRID`` values between the findings' own (u / v), where the minimum lies (outside
    that range every |u - v t| grows as t moves away; v > 0: an unshifted AUC above 0.5)."""
    own = u[v > 1e-9] / v[v > 1e-9]
    t = np.linspace(min(own.min(), 0.0), max(own.max(), 0.0), GRID)
    medians = np.median(np.abs(u[None, :] - t[:, None] * v[None, :]), axis=1)
    k = int(np.argmin(medians))
    return float(medians[k]), float(t[k])


def bounds(base: dict[str, float], per: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Median |error| over the findings both sets score, of CBPE and of each form at its best (module docstring).
    Each form's error is linear in its parameter t: u - v t."""
    f = sorted(set(base) & set(per))
    a0 = np.array([base[s] for s in f])
    a, e = (np.array([per[s][k] for s in f]) for k in (0, 1))
    ones = np.ones(len(f))
    u, v = a0 - a, a0 - 0.5  # a shrink by t errs by u - v t: (0.5 + (a0 - 0.5) (1 - t)) - a
    r = float(np.mean(u / v))  # the level's mean proportional loss
    shrink, t = least_median(u, v)
    return {
        "findings": f,  # with u and v, what the estimators in main are scored on
        "u": u,
        "v": v,
        "r": r,
        "t": t,  # the shared shrink's best value, from the labels
        "CBPE": float(np.median(np.abs(e - a))),
        "shared drop": least_median(u, ones)[0],  # (a0 - t) - a
        "shared shrink": shrink,
        "CBPE less a shared bias": least_median(e - a, ones)[0],  # (e - t) - a
        "shrink by r": float(np.median(np.abs(u - v * r))),
    }


def level_rows(run: Path, findings: bool = False) -> tuple[int, list[dict]]:
    """The run's seed and, per level, its AUC drop, each error (``bounds``) and the measured AUC's median SE;
    ``findings``: each finding's line too (module docstring)."""
    from scipy.stats import spearmanr

    from cxr_pipeline.tracking import get_client
    from cxr_pipeline.vision.checkpoint import MULTILABEL
    from cxr_pipeline.vision.drift import labelled, mmd_test
    from cxr_pipeline.vision.external import load_champions
    from cxr_pipeline.vision.registry import registered_name

    os.environ["CXR_HOME"], os.environ["CXR_RAW_DIR"] = str(run / "home"), str(run / "raw")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    seed = json.loads((run / "home" / "trained.json").read_text())["seed"]
    client, uri = get_client()
    (champ,) = load_champions(client, uri, [registered_name(MULTILABEL)])
    base_seed = 1000 * seed + 21  # drift.py's: the CheXpert-format baseline's and every level's seed
    images, rows = external(run / "ext" / f"chexpert-none-s{base_seed}", "chexpert", 400, base_seed)
    base = {s: auc for s, (auc, _) in measured_and_expected(champ, rows, champ.model.probabilities(images), "chexpert").items()}
    m = champ.model
    reference = m.calibrate(m.probabilities(reference_images(500, seed)))

    def score(prob: np.ndarray) -> float:
        """The alarm's drift score (unbiased energy distance of the calibrated outputs to the reference's, as the
        asset's default) on a draw of up to 500 of the set's frontal images."""
        pick = np.random.default_rng(0).permutation(len(prob))[:500]
        return mmd_test(reference, prob[pick], 1, 0, "energy", None).statistic

    out = [{"level": "none", "drop": 0.0, "d": score(m.calibrate(m.probabilities(images))), "r": 0.0}]
    for kind, value, shift in [(k, v, {k: v}) for k, vs in LEVELS.items() for v in vs] + [("combined", 0.0, COMBINED)]:
        folder = run / "ext" / f"chexpert-{kind}-{value}-s{base_seed}"
        if not folder.exists():
            raise SystemExit(f"{folder} is missing: {run} is not a finished benchmarks/drift.py run")
        images, rows = external(folder, "chexpert", 400, base_seed, **shift)
        per = measured_and_expected(champ, rows, champ.model.probabilities(images), "chexpert")
        indexed = rows.with_row_index("_i")
        prob = champ.model.calibrate(champ.model.probabilities(images))
        se, lines, moves = [], [], []
        for s, (auc, expected) in per.items():
            idx, y = labelled(indexed, s, champ.policy, "chexpert")
            se.append(hanley_mcneil(auc, int(y.sum()), int(len(y) - y.sum())))
            moved = prob[idx, champ.model.slugs.index(s)].mean() - y.mean()
            if s in base:
                moves.append((abs(moved), base[s] - auc))
            lines.append(
                f"    {s:28s} AUC {base.get(s, np.nan):.3f} -> {auc:.3f}, CBPE {expected:.3f}, mean probability - prevalence {moved:+.3f}"
            )
        drop = float(np.mean([base[s] - per[s][0] for s in set(base) & set(per)]))
        rho = float(spearmanr(*np.array(moves).T).statistic)
        row = {"level": f"{kind} {value}", "drop": drop, "se": float(np.median(se)), "rho": rho, "d": score(prob), **bounds(base, per)}
        out.append({**row, "lines": lines if findings else []})
    return seed, out


def learned_estimators(runs: list[tuple[int, list[dict]]], fit_on: set[int]) -> dict[str, list[int]]:
    """Estimators learned from the ``fit_on`` seeds' runs and scored on every other run: levels over 0.05 per scored
    run, each estimator's misses printed per run (module docstring). Each is handed the scored run's unshifted AUCs."""
    from sklearn.isotonic import IsotonicRegression

    fitted = [rows for seed, rows in runs if seed in fit_on]
    if not fitted:
        return {}
    fit = np.array([(r["d"], r.get("t", 0.0)) for rows in fitted for r in rows])
    loss = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(fit[:, 0], fit[:, 1])
    per_level: dict[str, list[float]] = {}  # the level's best shared shrink, at each fitted seed
    per_finding: dict[tuple[str, str], list[float]] = {}  # each finding's proportional loss at the level, likewise
    for rows in fitted:
        for r in rows[1:]:
            per_level.setdefault(r["level"], []).append(r["t"])
            for f, u, v in zip(r["findings"], r["u"], r["v"], strict=True):
                per_finding.setdefault((r["level"], f), []).append(u / v)
    guesses = {
        "the drift score's shared shrink": lambda r: np.full(len(r["u"]), loss.predict([r["d"]])[0]),
        "told the level, its shared shrink": lambda r: np.full(len(r["u"]), np.mean(per_level[r["level"]])),
        "told the level, each finding's own loss": lambda r: np.array(
            [np.mean(per_finding.get((r["level"], f), per_level[r["level"]])) for f in r["findings"]]
        ),
    }
    out: dict[str, list[int]] = {k: [] for k in guesses}
    for seed, rows in runs:
        if seed in fit_on:
            continue
        for name, guess in guesses.items():
            missed = []
            for r in rows[1:]:
                g = guess(r)
                e = float(np.median(np.abs(r["u"] - r["v"] * g)))
                if e > 0.05:
                    missed.append(f"{r['level']} {e:.3f} (best shrink {r['t']:.2f}, estimated {np.median(g):.2f})")
            out[name].append(len(missed))
            print(f"seed {seed} (test), {name}: over 0.05 at {len(missed)} levels: {'; '.join(missed) or 'none'}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="--out folders of finished benchmarks/drift.py runs")
    ap.add_argument("--findings", action="store_true", help="each finding's figures under its level")
    ap.add_argument("--validation", default="5,7", help="seeds whose runs the estimators learn from (the other runs score them)")
    a = ap.parse_args()
    fit_on = {int(x) for x in a.validation.split(",") if x}
    names = ("CBPE", *BOUNDS, "shrink by r")
    counts: dict[str, list[int]] = {k: [] for k in (*names, "best")}
    runs: list[tuple[int, list[dict]]] = []
    rhos: list[float] = []
    for run in a.runs:
        seed, rows = level_rows(run, a.findings)
        runs.append((seed, rows))
        print(f"seed {seed} ({run}): median |estimated - measured AUC| over findings, per level; d: drift score, r: mean proportional loss")
        print(f"  {'level':16s} {'drop':>7s} " + " ".join(f"{k:>18s}" for k in names) + f" {'measured SE':>12s} {'d':>6s} {'r':>6s}")
        print(f"  {'none':16s} {0:+.3f} " + " ".join(f"{'':18s}" for _ in names) + f" {'':12s} {rows[0]['d']:6.3f} {0:6.3f}")
        for r in rows[1:]:
            said = " ".join(f"{r[k]:18.3f}" for k in names)
            print(f"  {r['level']:16s} {r['drop']:+.3f} {said} {r['se']:12.3f} {r['d']:6.3f} {r['r']:6.3f}")
            for line in r["lines"]:
                print(line)
        for k in names:
            counts[k].append(sum(r[k] > 0.05 for r in rows[1:]))
        counts["best"].append(sum(min(r[k] for k in BOUNDS) > 0.05 for r in rows[1:]))
        over = [r["level"] for r in rows[1:] if min(r[k] for k in BOUNDS) > 0.05]
        print(f"  levels over 0.05 under all three bounds: {', '.join(over) or 'none'} (of {len(rows) - 1})")
        big = [r["rho"] for r in rows[1:] if r["drop"] >= 0.05]
        rhos.extend(big)
        print(
            f"  spearman(|mean probability - prevalence|, AUC drop) over findings, at the {len(big)} levels with drop >= 0.05: "
            + ", ".join(f"{x:+.2f}" for x in big),
            flush=True,
        )
    learned = learned_estimators(runs, fit_on)
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}; commit {commit()}")
    if rhos:
        print(
            f"spearman(|mean probability - prevalence|, AUC drop) over findings at {len(rhos)} levels with drop >= 0.05: "
            f"median {np.median(rhos):+.2f}, from {min(rhos):+.2f} to {max(rhos):+.2f}"
        )
    said = ", ".join(f"{k} {'/'.join(map(str, counts[k]))}" for k in names)
    print(
        f"drift bound: levels over 0.05 per run (seeds {'/'.join(str(seed) for seed, _ in runs)}, of 16): {said}, "
        f"the best of the three at each level {'/'.join(map(str, counts['best']))}; learned on seeds "
        f"{'/'.join(map(str, sorted(fit_on))) or 'none'}, at seeds {'/'.join(str(seed) for seed, _ in runs if seed not in fit_on)}: "
        + (", ".join(f"{k} {'/'.join(map(str, v))}" for k, v in learned.items()) or "nothing learned")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
