"""Bootstrap resamples as one weight matrix, and the metrics of every resample at once.

A resample of ``n`` test images (with replacement, or whole patients with replacement when a patient has more
than one image) is the same thing as a multiplicity for each image: how many times it was drawn. Stacked, the
``B`` resamples are a ``(B, n)`` matrix ``W``, and every metric the intervals need is a weighted count over the
original images: confusion counts are ``W @ indicator``, the ROC AUC is the Mann-Whitney statistic with weights
(ties half), average precision is the step sum over the distinct scores, the binned ECE sums per bin. So the
1,000 resamples cost a few matrix products instead of 1,000 calls into scikit-learn, which dominated the
classifier steps (a loop of ``point_metrics`` per resample; #47).

The draws are the ones ``resample_indices`` made, resample by resample from the same generator, so the intervals
are those of the loop they replace: scikit-learn (and torchmetrics for the ECE) on each resample's rows is the
reference the tests compare with, to 1e-12 (1e-6 for the ECE, which torchmetrics sums in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Resamples:
    """``weights`` (B, n): how often each image is in each resample; ``unit``: "image" or "patient"."""

    weights: np.ndarray
    unit: str

    @property
    def n_boot(self) -> int:
        return int(self.weights.shape[0])


def _patient_groups(n: int, groups) -> tuple[np.ndarray, np.ndarray] | None:
    """(each item's group index, each group's size) when resampling is by group: some group has more than one
    item; None when it is by item."""
    if groups is None or len(groups) != n or not n:
        return None
    _, inverse, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    return (inverse.reshape(-1), counts) if counts.max() > 1 else None


def resample_indices(n: int, groups=None, rng=None) -> tuple[np.ndarray, str]:
    """One bootstrap resample of ``n`` items: items with replacement, or whole groups (patients) with replacement
    when some group has more than one item. Returns (indices, unit). The reference :func:`draw` reproduces."""
    rng = rng if rng is not None else np.random.default_rng()
    grouped = _patient_groups(n, groups)
    if grouped is not None:
        inverse, counts = grouped
        members = np.argsort(inverse, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        picked = rng.integers(0, len(counts), len(counts))
        return np.concatenate([members[starts[g] : starts[g] + counts[g]] for g in picked]), "patient"
    return rng.integers(0, n, n), "image"


def draw(n: int, groups, n_boot: int, rng: np.random.Generator) -> Resamples:
    """``n_boot`` resamples of ``n`` items as multiplicities, each taking exactly the generator call one
    :func:`resample_indices` call takes, in the same order (so the same seed gives the same resamples)."""
    grouped = _patient_groups(n, groups)
    if grouped is not None:
        inverse, counts = grouped
        g = len(counts)
        per_group = np.stack([np.bincount(rng.integers(0, g, g), minlength=g) for _ in range(n_boot)]) if n_boot else np.zeros((0, g))
        return Resamples(per_group[:, inverse].astype(np.float64), "patient")
    w = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]) if n_boot else np.zeros((0, n))
    return Resamples(w.astype(np.float64), "image")


def _by_score(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each resample's positive and negative weight at each distinct score, ascending: (B, K) twice. The scores are
    sorted once; one ``reduceat`` per class sums each run of equal scores."""
    order = np.argsort(p, kind="stable")
    ps = p[order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    ws = w[:, order]
    yo = y[order].astype(bool)
    return np.add.reduceat(ws * yo, starts, axis=1), np.add.reduceat(ws * ~yo, starts, axis=1)


def _auc_from(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower
    wp, wn = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((wp > 0) & (wn > 0), (pos * (below + 0.5 * neg)).sum(axis=1) / (wp * wn), np.nan)


def weighted_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC of (y, p) under each row of image weights ``w`` (resamples x images): the Mann-Whitney statistic,
    ties one half; NaN where a row has one class."""
    if not len(y):
        return np.full(w.shape[0], np.nan)
    return _auc_from(*_by_score(np.asarray(y), np.asarray(p, dtype=np.float64), w))


CHUNK = 250  # resamples computed together: a few (CHUNK, n) float64 matrices at a time, 10 MB each at n = 5,000


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, F1, sensitivity, specificity, ROC AUC and average precision of every resample (rows of ``w``),
    each as ``evaluate.point_metrics`` computes it on that resample's rows; NaN where a resample has one class.
    Computed ``CHUNK`` resamples at a time, so memory stays a few (CHUNK, n) matrices whatever the resamples."""
    if len(w) > CHUNK:
        parts = [binary_metrics(y, p, threshold, w[i : i + CHUNK]) for i in range(0, len(w), CHUNK)]
        return {m: np.concatenate([part[m] for part in parts]) for m in parts[0]}
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    call = p >= threshold
    tp, fp = w @ (y & call), w @ (~y & call)
    fn, tn = w @ (y & ~call), w @ (~y & ~call)
    pos, neg = tp + fn, fp + tn
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "accuracy": (tp + tn) / (pos + neg),
            "f1": np.where(denominator > 0, 2 * tp / np.where(denominator > 0, denominator, 1), 0.0),  # zero_division=0
            "sensitivity": tp / pos,
            "specificity": tn / neg,
        }
        wp, wn = _by_score(y, p, w)
        out["roc_auc"] = _auc_from(wp, wn)
        # average precision: from the highest distinct score down, each adds its recall step at its precision
        tp_at, fp_at = np.cumsum(wp[:, ::-1], axis=1), np.cumsum(wn[:, ::-1], axis=1)
        called = tp_at + fp_at
        precision = np.where(called > 0, tp_at / np.where(called > 0, called, 1), 0.0)
        out["average_precision"] = (wp[:, ::-1] * precision).sum(axis=1) / pos
    one_class = (pos == 0) | (neg == 0)
    for v in out.values():
        v[one_class] = np.nan
    return out


def ece(y: np.ndarray, p: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    """The binned ECE of every resample, binned exactly as ``calibration.ece`` (torchmetrics) bins: float32
    confidences, ``bucketize(confidence, linspace(0, 1, n_bins + 1), right=True) - 1``, which puts a confidence of
    exactly 1 in a bin of its own (``n_bins + 1`` bins); the sum of each bin's |positives - confidence| over the
    resample's size: one matrix product with the images' bins."""
    import torch

    conf = np.clip(np.asarray(p, dtype=np.float32), 0.0, 1.0)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32).numpy()
    in_bin = np.eye(n_bins + 1)[np.searchsorted(edges, conf, side="right") - 1]  # (n, bins) one-hot
    gap = w @ (in_bin * (np.asarray(y, dtype=np.float64) - conf.astype(np.float64))[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(gap).sum(axis=1) / w.sum(axis=1)


def percentile_interval(values: np.ndarray) -> tuple[float | None, float | None]:
    """The 95% percentile interval of the finite values, or (None, None) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if len(v) else (None, None)
