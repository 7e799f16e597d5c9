"""Calibrated probabilities: a map fitted on the validation split, shipped with the checkpoint.

A classifier trained with ``pos_weight`` (the default) is pushed on purpose to score positives higher than their
frequency: its score ranks images well but is not a probability anyone can read as one. A temperature alone
(dividing the logit) cannot remove that offset, so the map is **Platt scaling**: a logistic regression of the
validation labels on the model's logit, ``p' = sigmoid(a * logit(p) + b)``, two parameters, fitted on validation
only (scikit-learn's ``LogisticRegression`` without a penalty, ``C=inf``, on Platt's smoothed targets: the fit
``CalibratedClassifierCV(method="sigmoid")`` makes, here on probabilities already computed rather than an estimator). With ``a > 0`` the map is
strictly increasing between the clip (``_EPS``: the logit of a score within 1e-6 of 0 or 1 is that of ``_EPS`` or
``1 - _EPS``) and non-decreasing across it: at the clip different scores become one probability, so a call is read
on the network's score at the validation threshold, never on a calibrated probability against the threshold carried
through the map (that carried threshold is for display).
Isotonic regression is not used: it is a step function, so it ties scores (the ROC curve and the calls move) and
on a validation split of a few dozen positives it overfits.

A validation split with one class, or a fit whose slope is not positive, gives the identity map, stated as such
(``method: "none"`` with the reason). A checkpoint written before calibration has no ``calibration`` entry: it
loads as uncalibrated and says so.

The measures: expected calibration error binned exactly as torchmetrics' ``binary_calibration_error`` (10
equal-width bins, L1: the weighted mean gap between the mean score and the positive rate of each bin), computed by
``resampling.ece`` (the bootstrap's own code, one resample of weight 1; torchmetrics is the reference its tests
compare with, not imported here: its import took 2 s of every classifier run's process); the Brier score from
scikit-learn; the reliability diagram from scikit-learn's ``calibration_curve``.

Binned ECE is biased upward: each bin's gap is measured on a sample, its noise adds to the gap, and a perfectly
calibrated model scores above 0 (0.05 on 250 test images). Each bootstrap resample's ECE carries that bias again,
so the percentile interval is an interval of a biased statistic: it sits above the true ECE on a small test split
and can exclude it (``ECE_INTERVAL_NOTE``, said where the intervals are shown). No debiased ECE is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cxr_pipeline.files import png_figure
from cxr_pipeline.vision.resampling import draw
from cxr_pipeline.vision.resampling import ece as resampled_ece

ECE_BINS = 10
ECE_BINNING = f"{ECE_BINS} equal-width bins over [0, 1], L1 (as torchmetrics' binary_calibration_error)"
CALIBRATION_COLUMNS = (
    *(f"ece_{w}{b}" for w in ("before", "after") for b in ("", "_lo", "_hi")),
    "brier_before",
    "brier_after",
)
ECE_INTERVAL_NOTE = (
    "ECE is biased upward (bin noise adds to every gap: a calibrated model scores above 0 on a finite test split) and "
    "its interval is a percentile interval of that biased statistic: it can lie wholly above the true ECE"
)
UNCALIBRATED = {"method": "none", "reason": "registered before calibration: scores are the network's own"}
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def fit_platt(y_val, p_val) -> dict:
    """The calibration map fitted on the validation split: ``{"method": "platt", "a", "b", "n", "n_pos"}``,
    or the identity (``method: "none"``) with the reason when it cannot be fitted."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y_val).astype(int)
    p = np.asarray(p_val, dtype=np.float64)
    base = {"fitted_on": "validate", "n": int(len(y)), "n_pos": int(y.sum()) if len(y) else 0}
    if len(y) == 0 or y.min() == y.max():
        return {"method": "none", "reason": "validation split has one class", **base}
    # Platt's (1999) targets, as scikit-learn's sigmoid calibration uses: (n+ + 1) / (n+ + 2) for a positive and
    # 1 / (n- + 2) for a negative, not 1 and 0, so a validation split the scores separate perfectly (common with a
    # few dozen positives) gives a finite slope rather than a step to 0 and 1. Soft targets are fitted as each image
    # twice, once positive and once negative, weighted by its target.
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.concatenate([_logit(p), _logit(p)])[:, None]
    labels = np.concatenate([np.ones(len(y), int), np.zeros(len(y), int)])
    lr = LogisticRegression(C=np.inf, solver="lbfgs", max_iter=1000)  # C=inf: no penalty
    lr.fit(x, labels, sample_weight=np.concatenate([target, 1 - target]))
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    if not (a > 0 and np.isfinite(a) and np.isfinite(b)):
        return {"method": "none", "reason": f"fitted slope {a:.3g} is not positive: the scores do not rank validation", **base}
    return {"method": "platt", "a": a, "b": b, **base}


def apply(calibration: Mapping | None, p) -> np.ndarray:
    """Calibrated probabilities for scores ``p`` (the identity for ``None`` or ``method: "none"``)."""
    p = np.asarray(p, dtype=np.float64)
    if not calibration or calibration.get("method") != "platt":
        return p
    return 1.0 / (1.0 + np.exp(-(calibration["a"] * _logit(p) + calibration["b"])))


def calibrated_threshold(calibration: Mapping | None, threshold: float) -> float:
    """The validation threshold carried through the map, to show beside calibrated probabilities. Not for
    deciding a call: ``p >= t`` implies ``apply(p) >= apply(t)``, but at the clip (``_EPS``) a score below the
    threshold maps to the same probability (raw 0.9999992 and 0.9999997 both read as ``1 - _EPS``), so a call
    is read on the network's score at ``threshold``."""
    return float(apply(calibration, np.array([threshold]))[0])


def describe(calibration: Mapping | None) -> str:
    """One line for metadata and model cards."""
    if not calibration:
        return "none: " + UNCALIBRATED["reason"]
    if calibration.get("method") != "platt":
        return f"none: {calibration.get('reason', '')}"
    return (
        f"Platt scaling on validate (n={calibration['n']}, {calibration['n_pos']} positive): "
        f"p' = sigmoid({calibration['a']:.3f} * logit(p) {'+' if calibration['b'] >= 0 else '-'} {abs(calibration['b']):.3f})"
    )


def ece(y, p) -> float:
    """Expected calibration error (``ECE_BINNING``); NaN for no images. Labels other than 0 and 1, or a score that
    is not a number, are an error (torchmetrics raised on the first and read NaN as 0)."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"ece: labels must be 0 or 1, found {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    if np.isnan(p).any():
        raise ValueError(f"ece: {int(np.isnan(p).sum())} scores are NaN")
    return float(resampled_ece(y.astype(int), p, np.ones((1, len(y))), ECE_BINS)[0])


def brier(y, p) -> float:
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y).astype(int)
    return float(brier_score_loss(y, np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0))) if len(y) else float("nan")


def calibration_row(y_test, p_raw, calibration: Mapping | None, groups=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """ECE and Brier on the test split before (the network's scores) and after the map, ECE with 95% intervals
    from the same patient resamples as the other metrics (``vision.resampling``, all at once): percentile intervals of
    an upward-biased statistic (``ECE_INTERVAL_NOTE``), a statement of its spread, not of where the true ECE lies."""

    y = np.asarray(y_test).astype(int)
    before, after = np.asarray(p_raw, dtype=np.float64), apply(calibration, p_raw)
    row = {
        "calibration": (calibration or UNCALIBRATED).get("method", "none"),
        "ece_binning": ECE_BINNING,
        "ece_before": ece(y, before),
        "ece_after": ece(y, after),
        "brier_before": brier(y, before),
        "brier_after": brier(y, after),
    }
    resamples = draw(len(y), groups, n_boot if len(y) else 0, np.random.default_rng(seed))  # as evaluate draws them
    for k, p in (("before", before), ("after", after)):
        values = resampled_ece(y, p, resamples.weights, ECE_BINS) if resamples.n_boot else np.zeros(0)
        lo, hi = (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if len(values) else (None, None)
        row[f"ece_{k}_lo"], row[f"ece_{k}_hi"] = lo, hi
    return row


def reliability_diagram(curves: Mapping[str, tuple], path: Path, title: str = "") -> Path | None:
    """One figure, every finding: the positive rate against the mean score in 10 equal-width bins, before
    (dotted) and after (solid) calibration. ``curves``: name -> (y, p_before, p_after)."""
    from sklearn.calibration import calibration_curve

    drawable = {k: v for k, v in curves.items() if len(v[0]) and np.asarray(v[0]).min() != np.asarray(v[0]).max()}
    if not drawable:
        return None
    with png_figure(path, 1, 1, figsize=(6.5, 6)) as (fig, ax):
        for i, (name, (y, before, after)) in enumerate(drawable.items()):
            colour = f"C{i % 10}"
            for p, style, label in ((before, ":", None), (after, "-", name)):
                frac, mean = calibration_curve(np.asarray(y).astype(int), np.clip(p, 0, 1), n_bins=ECE_BINS, strategy="uniform")
                ax.plot(mean, frac, style, marker="o", ms=3, color=colour, label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="mean predicted probability", ylabel="fraction positive", xlim=(0, 1), ylim=(0, 1))
        ax.set_title(title or "Reliability (test split): dotted before, solid after calibration")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    return path
