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
