"""The subgroup audit's statistics, vectorised over resamples: patient-bootstrap intervals and a permutation null
that keeps the group's positive (negative) patients.

Everything a cell needs reduces to per-patient sums (a patient's positive and called-positive images inside the
group and outside it, the same for negatives), so a resample is a vector of patient weights and all resamples
at once are one matrix product; only the AUC needs the images themselves (their scores' order), and it too is
one pass over the sorted scores for every resample together.

**The null** (``null_gaps``): a gap's p-value asks how often a group drawn at random would stray as far from the
rest. A TPR gap's spread depends on how many patients with the finding the group has, not on its size: a group of
60 patients with 6 positives against a rest at prevalence 0.5 strays far more than one with 30 positives. So the
random groups keep the group's count of patients with a positive image (for TPR gaps; with a negative image for
FPR gaps) and each patient's images together: membership is permuted among the patients with a positive image,
the only ones a TPR depends on. The statistic compared is the gap over its patient-clustered standard error: a
group whose patients have one image each against a rest with six strays further than random groups of the same
patients would, and only a studentized gap's null does not depend on that. The p-value is the Monte-Carlo one, ``(k + 1) / (B + 1)`` with ``k`` random gaps
at least as far from 0 as the observed (Phipson & Smyth 2010), exact for the permutation test up to Monte-Carlo
error; ``B`` is chosen so that the smallest attainable p-value can pass Benjamini-Hochberg at 0.05 in the largest
panel (``permutations_for``).

Written here rather than with a library: scipy's ``permutation_test`` permutes observations, not patients within
strata, and calls the statistic once per resample (minutes for the audit's thousands of cells).
"""

from __future__ import annotations

import numpy as np

from cxr_pipeline.vision.resampling import weighted_auc

METRICS = ("auc", "tpr", "fpr", "tpr_gap", "fpr_gap")
GAPS = ("tpr_gap", "fpr_gap")
IMAGE_BINS = (2, 3, 5)  # a patient's positive (negative) images: 1, 2, 3-4, 5 or more
CONFOUNDED = 0.5  # below this share of the group's patients in a bin that also holds others, a gap has no p-value
FDR = 0.05  # the level the panels' Benjamini-Hochberg q-values are read at


def permutations_for(largest_panel: int, floor: int = 1000) -> int:
    """Random groups per gap so that the smallest p-value a permutation test can give, 1 / (B + 1), passes
    Benjamini-Hochberg at ``FDR`` when it is the smallest of ``largest_panel`` tests (BH rejects the smallest
    p-value of m only if it is at most FDR / m): B + 1 >= m / FDR, and never fewer than ``floor``."""
    return max(floor, int(np.ceil(largest_panel / FDR)))


def _patient_sums(y: np.ndarray, called: np.ndarray, codes: np.ndarray, n_patients: int, in_group: np.ndarray) -> np.ndarray:
    """(n_patients, 8): per patient, inside the group then outside it: positives, true positives, negatives, false
    positives."""
    cols = []
    for side in (in_group, ~in_group):
        for mask in ((y == 1), (y == 1) & called, (y == 0), (y == 0) & called):
            cols.append(np.bincount(codes, weights=(side & mask).astype(float), minlength=n_patients))
    return np.stack(cols, axis=1)


def _rates(sums: np.ndarray) -> dict[str, np.ndarray]:
    """TPR and FPR in the group and their gaps to the rest, from weighted sums (..., 8)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr_g, fpr_g = sums[..., 1] / sums[..., 0], sums[..., 3] / sums[..., 2]
        tpr_r, fpr_r = sums[..., 5] / sums[..., 4], sums[..., 7] / sums[..., 6]
    return {"tpr": tpr_g, "fpr": fpr_g, "tpr_gap": tpr_g - tpr_r, "fpr_gap": fpr_g - fpr_r}


def cell_statistics(
    y: np.ndarray, p: np.ndarray, called: np.ndarray, patients: np.ndarray, in_group: np.ndarray, bootstrap: int, seed: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The group's AUC, TPR and FPR and its TPR and FPR gaps to the rest: point estimates and ``bootstrap`` paired
    patient resamples of each (both sides of a gap from the same resample)."""
    _, codes = np.unique(patients, return_inverse=True)
    n = int(codes.max()) + 1 if len(codes) else 0
    sums = _patient_sums(y, called, codes, n, in_group)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap).astype(float) if n else np.zeros((bootstrap, 0))
    point = {k: float(v) for k, v in _rates(sums.sum(axis=0)).items()}
    draws = _rates(counts @ sums)
    g = np.flatnonzero(in_group)
    point["auc"] = float(weighted_auc(y[g], p[g], np.ones((1, g.size)))[0])
    draws["auc"] = weighted_auc(y[g], p[g], counts[:, codes[g]])
    return point, draws


def _studentized(m: np.ndarray, t: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The gap (members' rate - the others') over its patient-clustered standard error, for each row of the 0/1
    membership matrix ``m`` (patients' totals ``t`` and hits ``h``): the ratio estimator's sandwich variance on each
    side, as a cluster-robust standard error of a proportion is computed, with the n / (n - 1) correction."""

    pooled = h.sum() / t.sum()  # under "no gap" both sides share the overall rate: residuals about it (a score test's)

    def side(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tw, hw, n = w @ t, w @ h, w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = hw / tw
            ss = w @ (h * h) - 2 * pooled * (w @ (h * t)) + pooled**2 * (w @ (t * t))
            var = np.where(n > 1, ss / tw**2 * n / np.maximum(n - 1, 1), np.nan)
        return rate, var

    rg, vg = side(m)
    rr, vr = side(1.0 - m)
    gap, se = rg - rr, np.sqrt(np.maximum(vg, 0) + np.maximum(vr, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(se > 0, gap / se, np.where(gap == 0, 0.0, np.sign(gap) * np.inf))


def null_gaps(
    y: np.ndarray, called: np.ndarray, patients: np.ndarray, in_group: np.ndarray, permutations: int, seed: int
) -> dict[str, tuple[float, np.ndarray]]:
    """For the TPR and the FPR gap: the observed studentized gap and those of ``permutations`` random groups. A
    patient is a member when any of its images is in the group; membership is permuted among the patients with a
    positive image (TPR: the group keeps its count of them) and, apart, among those with a negative image (FPR),
    each patient's images together, and within bins of how many such images a patient has (``IMAGE_BINS``), so a
    random group has the group's mix of one-image and many-image patients. The test is conditional on that mix:
    where fewer than half of the group's patients share a bin with other patients (``CONFOUNDED``), the group is its
    image mix and the gap gets no p-value (null, reported) rather than a p of 1 from random groups that are the
    group itself. The gap is studentized (``_studentized``) because the random groups differ
    from the group in how many images their patients have: a raw gap's spread depends on that, a studentized one's
    far less (a permutation test of a studentized statistic stays valid when the groups' variances differ: Janssen
    1997; Chung & Romano 2013)."""
    _, codes = np.unique(patients, return_inverse=True)
    n = int(codes.max()) + 1 if len(codes) else 0
    member = np.zeros(n, dtype=bool)
    member[codes[in_group]] = True
    rng = np.random.default_rng(seed)
    out = {}
    for gap, label in (("tpr_gap", 1), ("fpr_gap", 0)):
        total = np.bincount(codes, weights=(y == label).astype(float), minlength=n)
        hit = np.bincount(codes, weights=((y == label) & called).astype(float), minlength=n)
        stratum = np.flatnonzero(total > 0)  # the patients this rate depends on
        k = int(member[stratum].sum())
        if k == 0 or k == stratum.size:
            out[gap] = (float("nan"), np.full(permutations, np.nan))
            continue
        t, h = total[stratum], hit[stratum]
        observed = float(_studentized(member[stratum][None].astype(float), t, h)[0])
        m = np.zeros((permutations, stratum.size))
        bins = np.digitize(t, IMAGE_BINS)  # permuted within patients with about as many such images
        exchangeable = 0
        for b in np.unique(bins):
            idx = np.flatnonzero(bins == b)
            kb = int(member[stratum][idx].sum())
            if kb == 0:
                continue
            exchangeable += kb if kb < idx.size else 0
            pick = np.argpartition(rng.random((permutations, idx.size)), kb - 1, axis=1)[:, :kb]
            m[np.arange(permutations)[:, None], idx[pick]] = 1.0
        if exchangeable < CONFOUNDED * k:  # the group is its image mix: no random group can tell them apart
            out[gap] = (float("nan"), np.full(permutations, np.nan))
            continue
        out[gap] = (observed, _studentized(m, t, h))
    return out


def permutation_p(point: float, null: np.ndarray) -> float:
    """Two-sided Monte-Carlo p-value of "no gap": (k + 1) / (B + 1), k the random gaps at least as far from 0 as
    ``point`` (a relative tolerance keeps a random gap equal to the observed one, as ties are in a discrete
    statistic, among the k)."""
    d = np.asarray(null, dtype=float)
    d = d[~np.isnan(d)]
    if np.isnan(point) or not len(d):
        return float("nan")
    k = int((np.abs(d) >= abs(point) * (1 - 1e-9) - 1e-12).sum())
    return float((k + 1) / (len(d) + 1))
