"""The multi-label model: one backbone, 14 logits, a masked loss over the labels the policy can use; each
label evaluated exactly as a per-pathology model is. Its fold models (``vision.folds``) give the report
prompts out-of-fold hints."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from cxr_pipeline.data.shard_reader import Shards
from cxr_pipeline.data.voi import WindowPrior
from cxr_pipeline.fields import setting
from cxr_pipeline.labels import LABEL_BY_SLUG, SLUGS
from cxr_pipeline.vision.calibration import calibration_row, fit_platt
from cxr_pipeline.vision.calibration import describe as describe_calibration
from cxr_pipeline.vision.checkpoint import MULTILABEL, ClassifierFiles
from cxr_pipeline.vision.evaluate import evaluate, roc_auc_or_nan
from cxr_pipeline.vision.fit import SCORED, Evaluated, Fitted, fit_model
from cxr_pipeline.vision.splits import RADIOLOGIST, SPLITS, Split, label_source, patients, place_splits
from cxr_pipeline.vision.targets import targets
from cxr_pipeline.vision.train import TrainConfig, TrainResult


@dataclass(frozen=True)
class MultilabelConfig(TrainConfig):
    """The per-pathology recipe (``pipeline.yaml``'s ``classifier`` section, read first) and the report hints
    (the ``multilabel_classifier`` section, which may also override any recipe field for this model)."""

    oof_folds: int = setting(
        5,
        "k-fold over training patients for the report prompts' hints: each training image's hint comes from a model "
        "that did not see it (k more trainings of this model); 0 or 1: no out-of-fold hints",
    )


@dataclass
class MultilabelData:
    """Every manifest image with at least one usable label; targets (n, 14) in ``SLUGS`` order, NaN where
    the policy leaves a label out (the loss does not count it)."""

    size: int
    uncertain: str
    blank: str
    splits: dict[str, Split]
    label_source: str = "chexpert"
    mode: str = "resident"

    def digest(self) -> str:
        h = hashlib.sha256(f"{MULTILABEL}:{self.size}:{self.uncertain}:{self.blank}\n".encode())
        for s in ("train", "validate"):
            sp = self.splits[s]
            for (did, ch), y in zip(sp.rows.select("dicom_id", "content_hash").iter_rows(), sp.targets.numpy().tolist(), strict=True):
                h.update(f"{s}\t{did}\t{ch}\t{y}\n".encode())
        return h.hexdigest()[:24]


def target_matrix(rows: pl.DataFrame, uncertain: str, blank: str) -> pl.DataFrame:
    """``rows`` with one Float32 column per label (``t_<slug>``): the policy's 0/1 target, null if unusable."""
    out = rows
    for s in SLUGS:
        t = targets(rows, s, uncertain, blank).select("dicom_id", pl.col("target").cast(pl.Float32).alias(f"t_{s}"))
        out = out.join(t, on="dicom_id", how="left", maintain_order="left")
    return out


def load_multilabel_data(manifest: pl.DataFrame, shards: Shards, cfg: TrainConfig, device=None) -> MultilabelData:
    """All 14 labels' targets under the policy, joined with the shard images of each split (resident or streamed)."""
    import torch

    size, uncertain, blank = cfg.size, cfg.uncertain, cfg.blank

    tcols = [f"t_{s}" for s in SLUGS]
    m = target_matrix(manifest, uncertain, blank)
    m = m.filter(pl.any_horizontal(pl.col(tcols).is_not_null()))
    rad = None
    if "radiologist_labelled" in manifest.columns:
        rad = manifest.filter((pl.col("split") == "test") & pl.col("radiologist_labelled"))
        rad = target_matrix(rad.with_columns(pl.col(f"radiologist_{s}").alias(s) for s in SLUGS), uncertain, "zeros")

    def target(rows: pl.DataFrame):
        y = rows.select(tcols).to_numpy().astype("float32") if rows.height else torch.zeros(0, len(SLUGS)).numpy()
        return torch.from_numpy(y).reshape(-1, len(SLUGS))

    named = [*((s, m.filter(pl.col("split") == s)) for s in SPLITS), (RADIOLOGIST, m.clear() if rad is None else rad)]
    splits, mode = place_splits(named, shards, cfg, device, target)
    return MultilabelData(size, uncertain, blank, splits, label_source(manifest), mode)


def fit_multilabel(
    data: MultilabelData,
    manifest: pl.DataFrame,
    shards: Shards,
    cfg: TrainConfig,
    device,
    files: ClassifierFiles,
    *,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    window_prior: WindowPrior | None = None,
) -> Fitted:
    """The multi-label model through the skeleton (``vision.fit.fit_model``), each label evaluated exactly as a
    per-pathology model is (its own validation-chosen threshold and calibration map, bootstrap CIs by patient,
    both test label sources); rows carry ``model: multilabel``; the predictions file has one column per label;
    ``window_prior``: what the checkpoint carries for the served model (``fit_model``)."""
    sp = data.splits
    y_val, y_test, y_rad = (sp[s].targets.numpy() for s in SCORED)

    def evaluate_scores(p: dict[str, np.ndarray], result: TrainResult) -> Evaluated:
        p_val, p_test, p_rad = (p[s] for s in SCORED)
        rows, thresholds, calibrations = [], {}, {}
        for j, s in enumerate(SLUGS):
            kv = ~np.isnan(y_val[:, j])
            calibrations[s] = fit_platt(y_val[kv, j], p_val[kv, j])  # each output its own map, on its validation labels
            common = {"pathology": LABEL_BY_SLUG[s], "slug": s, "model": MULTILABEL, "best_epoch": result.best_epoch}
            common.update(epochs_run=result.epochs_run, train_seconds=round(result.seconds, 1), uncertain_policy=data.uncertain)
            common.update(blank_policy=data.blank, val_roc_auc=roc_auc_or_nan(y_val[kv, j], p_val[kv, j]))
            common.update(calibration_fit=describe_calibration(calibrations[s]))
            for split, source, y, pj in (("test", data.label_source, y_test, p_test), (RADIOLOGIST, RADIOLOGIST, y_rad, p_rad)):
                k = ~np.isnan(y[:, j])
                groups = patients(sp[split].rows.filter(pl.Series(k))) if len(k) else None
                row = evaluate(y[k, j], pj[k, j], y_val[kv, j], p_val[kv, j], n_boot=cfg.bootstrap, seed=cfg.seed, groups=groups)
                row.update(calibration_row(y[k, j], pj[k, j], calibrations[s], groups, cfg.bootstrap, cfg.seed))
                rows.append({**row, **common, "test_labels": source})
            thresholds[s] = rows[-2]["threshold"]
        return Evaluated(rows, thresholds, calibrations)

    return fit_model(
        data, manifest, shards, cfg, device, files, labels=[LABEL_BY_SLUG[s] for s in SLUGS],
        evaluate_scores=evaluate_scores, prediction_columns=SLUGS, log=log, on_epoch=on_epoch, window_prior=window_prior,
    )  # fmt: skip
