"""vision.resampling: every resample's metrics at once, checked against scikit-learn (and torchmetrics for the ECE)
on each resample's own rows, drawn by the same generator calls the per-resample loop made."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_pipeline.vision import resampling
from cxr_pipeline.vision.calibration import ECE_BINS, calibration_row
from cxr_pipeline.vision.evaluate import METRICS, evaluate_at, point_metrics
from cxr_pipeline.vision.resampling import resample_indices
from cxr_pipeline_tests.services import benchmark

ece = benchmark("bench_resampling").torchmetrics_ece  # the reference: torchmetrics on the rows given


def test_the_point_ece_is_torchmetrics_ece():
    from cxr_pipeline.vision.calibration import ece as point_ece

    for n in (257, 61, 9):
        y, p = _scores(n, n)
        assert point_ece(y, p) == pytest.approx(ece(y, p), abs=1e-6)
    y, p = _scores(40, 3)
    assert point_ece(y[:0], p[:0]) != point_ece(y[:0], p[:0])  # no images: NaN
    # bin edges in float32 (torchmetrics' linspace), exactly 0 and 1: the same bins
    edges = np.linspace(0, 1, ECE_BINS + 1, dtype=np.float32).astype(np.float64)
    y_edges = np.arange(len(edges)) % 2
    assert point_ece(y_edges, edges) == pytest.approx(ece(y_edges, edges), abs=1e-7)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        point_ece(np.array([0, 1, 2]), np.array([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match="1 scores are NaN"):
        point_ece(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.9]))


def _scores(n: int, seed: int):
    """Labels at 30% prevalence, scores on a coarse grid (ties across classes), some exactly 0 and 1."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.round(np.clip(rng.random(n) * 0.6 + 0.3 * y, 0, 1), 2)
    p[:2], p[2:4] = 1.0, 0.0
    return y, p


@pytest.mark.parametrize("n,grouped", [(257, True), (61, False), (9, True)])
def test_each_resample_scores_as_scikit_learn_scores_its_rows(n, grouped):
    y, p = _scores(n, n)
    groups = np.random.default_rng(1).integers(0, max(2, n // 2), n) if grouped else None
    drawn = resampling.draw(n, groups, 150, np.random.default_rng(5))
    vec = resampling.binary_metrics(y, p, 0.45, drawn.weights)
    eces = resampling.ece(y, p, drawn.weights, ECE_BINS)
    rng, scored = np.random.default_rng(5), 0
    for b in range(drawn.n_boot):
        idx, unit = resample_indices(n, groups, rng)  # the loop's draw: the same generator calls
        assert unit == drawn.unit and np.array_equal(np.bincount(idx, minlength=n), drawn.weights[b])
        assert eces[b] == pytest.approx(ece(y[idx], p[idx]), abs=1e-6)  # torchmetrics sums in float32
        if y[idx].min() == y[idx].max():
            assert all(np.isnan(vec[m][b]) for m in METRICS)  # one class: skipped, as the loop skipped it
            continue
        scored += 1
        for m, v in point_metrics(y[idx], p[idx], 0.45).items():
            assert vec[m][b] == pytest.approx(v, rel=1e-12, abs=1e-12), (m, b)
    assert scored > 0


def _loop_row(y, p, threshold, n_boot, seed, groups):
    """The intervals as the per-resample loop computed them (scikit-learn on each resample)."""
    rng, boots, skipped = np.random.default_rng(seed), {m: [] for m in METRICS}, 0
    for _ in range(n_boot):
        idx, _unit = resample_indices(len(y), groups, rng)
        if y[idx].min() == y[idx].max():
            skipped += 1
            continue
        for m, v in point_metrics(y[idx], p[idx], threshold).items():
            boots[m].append(v)
    out = {"bootstrap_skipped": skipped}
    for m in METRICS:
        vals = np.asarray([v for v in boots[m] if v == v])
        out[f"{m}_lo"], out[f"{m}_hi"] = float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))
    return out


def test_evaluate_and_calibration_give_the_loop_s_intervals_for_the_same_seed():
    y, p = _scores(120, 3)
    groups = np.repeat(np.arange(60), 2)
    row = evaluate_at(y, p, 0.45, n_boot=300, seed=11, groups=groups)
    for k, v in _loop_row(y, p, 0.45, 300, 11, groups).items():
        assert row[k] == pytest.approx(v, rel=1e-12), k
    cal = {"method": "platt", "a": 1.3, "b": -0.2, "n": 50, "n_pos": 20, "fitted_on": "validate"}
    crow = calibration_row(y, p, cal, groups, n_boot=200, seed=4)
    rng, before = np.random.default_rng(4), []
    for _ in range(200):
        idx, _ = resample_indices(len(y), groups, rng)
        before.append(ece(y[idx], p[idx]))
    assert crow["ece_before_lo"] == pytest.approx(np.percentile(before, 2.5), abs=1e-6)
    assert crow["ece_before_hi"] == pytest.approx(np.percentile(before, 97.5), abs=1e-6)


def test_a_weighted_auc_counts_ties_as_half_and_one_class_as_undefined():
    y, p = np.array([0, 1, 0, 1]), np.array([0.2, 0.2, 0.1, 0.9])
    w = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 3.0, 0.0]])
    auc = resampling.binary_metrics(y, p, 0.5, w)["roc_auc"]
    # row 0: pairs (0.2 vs 0.2) half, (0.2 vs 0.1) 1, (0.9 vs both) 2 -> 3.5 / 4; row 1: one tie, weight 2 -> 0.5
    assert auc[0] == pytest.approx(3.5 / 4) and auc[1] == pytest.approx(0.5) and np.isnan(auc[2])
