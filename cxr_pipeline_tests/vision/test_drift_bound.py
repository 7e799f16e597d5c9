"""``benchmarks/drift_bound.py`` publishes each correction form's least error as a bound on what any correction of
that form could reach (#51); the figure is only a bound if the search finds the true minimum."""

from __future__ import annotations

import itertools

import numpy as np

from cxr_pipeline_tests.services import ROOT, benchmark


def exact_least_median(u: np.ndarray, v: np.ndarray) -> float:
    """min over t of median |u - v t| by brute force: the median of absolute linear functions is piecewise linear
    in t, so its minimum is at a breakpoint (a root u_i / v_i, or where two of them cross)."""
    points = list(u / v)
    for i, j in itertools.combinations(range(len(u)), 2):
        for sign in (1, -1):
            if abs(v[i] - sign * v[j]) > 1e-12:
                points.append((u[i] - sign * u[j]) / (v[i] - sign * v[j]))
    return min(float(np.median(np.abs(u - v * t))) for t in points)


def test_the_published_bound_is_the_least_median_error_of_its_form(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # drift_bound imports drift.py as a script does
    least_median = benchmark("drift_bound").least_median
    rng = np.random.default_rng(0)
    for n in (9, 10, 11):
        for _ in range(20):
            u = rng.normal(0.1, 0.15, n)  # a finding's AUC drop (or CBPE's error)
            v = rng.uniform(0.05, 0.5, n)  # its unshifted AUC above 0.5 (the shrink), or 1 (a shared drop)
            for vv in (v, np.ones(n)):
                exact = exact_least_median(u, vv)
                found, t = least_median(u, vv)
                assert exact - 1e-12 <= found <= exact + 1e-3
                assert np.median(np.abs(u - vv * t)) == found


def _run(seed: int, losses: dict[str, list[float]], d: float = 1.0) -> tuple[int, list[dict]]:
    """A run as ``level_rows`` returns it: the unshifted set, then per level each finding's proportional loss."""
    a0 = np.array([0.95, 0.9, 0.85, 0.8, 0.75])
    rows = [{"level": "none", "d": 0.0, "r": 0.0}]
    for level, loss in losses.items():
        v = a0 - 0.5
        u = v * np.array(loss)
        rows.append({"level": level, "d": d, "findings": list("abcde"), "u": u, "v": v, "t": float(np.median(loss))})
    return seed, rows


def test_the_learned_estimators_learn_only_from_validation_seeds_and_score_the_others(monkeypatch):
    """The blocked verdict on #51 rests on ``learned_estimators``: what the validation seeds lost is looked up for
    the other runs, and a run it scores never enters what it learns."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    learned = benchmark("drift_bound").learned_estimators
    same = {"exposure 2.2": [0.6, 0.6, 0.6, 0.6, 0.6]}
    other = {"exposure 2.2": [0.1, 0.9, 0.1, 0.9, 0.1]}  # the same level, each finding losing another amount
    runs = [_run(1, same), _run(2, same), _run(3, same), _run(4, other)]
    out = learned(runs, {1, 2})
    assert out["told the level, each finding's own loss"] == [0, 1]  # seeds 3 and 4 scored, 1 and 2 not
    assert out["told the level, its shared shrink"] == [0, 1]
    # a scored run's own rows never enter the fit: changing seed 4 leaves seed 3's score as it was
    assert learned([*runs[:3], _run(4, {"exposure 2.2": [0.0] * 5})], {1, 2})["told the level, its shared shrink"][0] == 0
    # fitted on seed 4's losses instead, seed 3 (which lost 0.6 everywhere) is missed
    assert learned([_run(4, other), _run(3, same)], {4})["told the level, each finding's own loss"] == [1]
