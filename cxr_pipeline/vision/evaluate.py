"""Test-split metrics with a validation-chosen threshold and bootstrap intervals.

scikit-learn computes every metric; this module only decides *where*: the
threshold is chosen on the validation split (Youden's J: the ROC point
farthest above chance), never on test and never a fixed 0.5; intervals are
percentile bootstraps (1,000 resamples, seeded; all computed at once, ``vision.resampling``) over test images, or over
patients whenever a patient has more than one test image (their images are not
independent); resamples with one class only are skipped and counted
(``bootstrap_skipped``). A test set
with one class only gets a "not evaluable" row with the reason, never a crash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_pipeline.files import png_figure
from cxr_pipeline.vision.resampling import binary_metrics, draw, percentile_interval

METRICS = ("accuracy", "f1", "sensitivity", "specificity", "roc_auc", "average_precision")

# The 2024 seeds' published test ROC-AUC (ResNet-18, MIMIC-CXR-JPG PA), with the three
# rows their notebook shifted by one put back under the right pathology.
REFERENCE_AUC = {
    "Pneumonia": 0.6914,
    "Pleural Effusion": 0.8618,
    "Pneumothorax": 0.6667,
    "Cardiomegaly": 0.8279,
    "Consolidation": 0.6000,
    "Edema": 0.7270,
}


def roc_auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if len(y) == 0 or y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, p))


def choose_threshold(y_val: np.ndarray, p_val: np.ndarray) -> tuple[float, str]:
    """Youden's J on the validation split; 0.5 (stated as such) when it has one class."""
    from sklearn.metrics import roc_curve

    y_val = np.asarray(y_val)
    if len(y_val) == 0 or y_val.min() == y_val.max():
        return 0.5, "default 0.5 (validation split has one class)"
    fpr, tpr, thr = roc_curve(y_val, p_val)
    k = int(np.argmax(tpr - fpr))
    t = float(thr[k])
    return (min(t, 1.0) if np.isfinite(t) else 1.0), "youden_j_on_validation"


def stored_threshold(t: float | None) -> float:
    """A threshold read back from a checkpoint or metrics row: 0.5 only where none was chosen (0.0 is a threshold)."""
    return 0.5 if t is None or t != t else float(t)


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, f1_score, roc_auc_score

    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "roc_auc": float(roc_auc_score(y, p)),
        "average_precision": float(average_precision_score(y, p)),
    }


def evaluate(y_test, p_test, y_val, p_val, n_boot: int = 1000, seed: int = 0, groups=None) -> dict:
    """One row: n_pos, n_neg, threshold, each metric with its 95% CI, or not evaluable.

    ``groups`` (e.g. the test images' subject ids): resample patients when one has several images.
    """
    threshold, how = choose_threshold(np.asarray(y_val).astype(int), np.asarray(p_val, dtype=float))
    return evaluate_at(y_test, p_test, threshold, how, n_boot, seed, groups)


def evaluate_at(y_test, p_test, threshold: float, how: str = "given", n_boot: int = 1000, seed: int = 0, groups=None) -> dict:
    """``evaluate`` at a threshold chosen elsewhere (an external set is read at the internal validation threshold)."""
    y_test = np.asarray(y_test).astype(int)
    p_test = np.asarray(p_test, dtype=float)
    row: dict = {
        "n_test": int(len(y_test)),
        "n_pos": int(y_test.sum()),
        "n_neg": int(len(y_test) - y_test.sum()),
        "threshold": threshold,
        "threshold_rule": how,
    }
    if len(y_test) == 0 or y_test.min() == y_test.max():
        row["evaluable"] = False
        row["reason"] = "no test images" if len(y_test) == 0 else f"test split has only {'positives' if y_test.min() == 1 else 'negatives'}"
        for m in METRICS:
            row[m] = row[f"{m}_lo"] = row[f"{m}_hi"] = None
        return row
    row["evaluable"] = True
    row["reason"] = ""
    row.update(point_metrics(y_test, p_test, threshold))
    # every resample at once (vision.resampling): the same draws as one resample_indices call per resample, the
    # same values as point_metrics on each resample's rows
    resamples = draw(len(y_test), groups, n_boot, np.random.default_rng(seed))
    boots = binary_metrics(y_test, p_test, threshold, resamples.weights)
    skipped = int(np.isnan(boots["roc_auc"]).sum())  # resamples with one class only
    row.update(bootstrap_resamples=n_boot, bootstrap_skipped=skipped, bootstrap_unit=resamples.unit)
    for m in METRICS:
        row[f"{m}_lo"], row[f"{m}_hi"] = percentile_interval(boots[m])
    return row


def save_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """ROC and PR curves for several pathologies, written to a PNG (the figure is closed)."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    with png_figure(path, 1, 2, figsize=(11, 5)) as (fig, (ax1, ax2)):
        for name, (y, p) in curves.items():
            y = np.asarray(y).astype(int)
            if len(y) == 0 or y.min() == y.max():
                continue
            fpr, tpr, _ = roc_curve(y, p)
            ax1.plot(fpr, tpr, label=f"{name} ({roc_auc_or_nan(y, p):.2f})")
            prec, rec, _ = precision_recall_curve(y, p)
            ax2.plot(rec, prec, label=name)
        ax1.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax1.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test split)")
        ax2.set(xlabel="recall", ylabel="precision", title="Precision-recall (test split)")
        for ax in (ax1, ax2):
            ax.legend(fontsize=7, loc="lower right" if ax is ax1 else "lower left")
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
    return path
