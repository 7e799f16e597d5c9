"""A classifier from its data to saved files: one skeleton for both model kinds (train, fp32 scores, the metrics
rows, every shard image's score, the checkpoint, the metrics file), each kind supplying only what differs: how its
rows, thresholds and calibration maps are computed and what its predictions columns are called. The per-finding
kind is here (``fit_and_save``); the multi-label kind is ``vision.multilabel``.

The Dagster asset calls ``vision.splits.load_data`` then either ``record_untrainable`` or
``fit_and_save``; the CLI and benchmarks can do the same without Dagster. What
lands in the classifier folder (``vision.checkpoint.ClassifierFiles``):

- ``checkpoint/`` (``vision.checkpoint.write_checkpoint``: weights and the configuration applying them needs:
  architecture, size, normalisation, validation-chosen thresholds, calibration maps, the recipe): the registered
  model's source;
- ``metrics.json``: the metrics rows (or the reason the finding is not trainable);
- ``predictions.parquet``: a score for every manifest image with a shard;
- ``test_scores.parquet`` and ``roc_pr.png`` (per-finding): the test split's scores and curves.

A label that cannot be trained on the current data leaves no model files
behind from an earlier run (they would read as current).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from cxr_pipeline.data.shard_reader import Shards, open_images
from cxr_pipeline.data.voi import WindowPrior
from cxr_pipeline.fields import record
from cxr_pipeline.files import write_parquet
from cxr_pipeline.vision.calibration import calibration_row, fit_platt
from cxr_pipeline.vision.calibration import describe as describe_calibration
from cxr_pipeline.vision.checkpoint import CheckpointConfig, ClassifierFiles, write_checkpoint, write_json
from cxr_pipeline.vision.evaluate import evaluate, roc_auc_or_nan, save_curves
from cxr_pipeline.vision.splits import RADIOLOGIST, ClassifierData, patients
from cxr_pipeline.vision.train import NORMALISE_MEAN, NORMALISE_STD, TrainConfig, TrainResult, loader_workers, predict, train

EVAL_PRECISION = "fp32"
SCORED = ("validate", "test", RADIOLOGIST)  # the splits every fit scores before it evaluates


class Evaluated(NamedTuple):
    """What a model kind computes from its scores: its metrics rows and, per finding (slug), the threshold on the
    network's scores and the calibration map, both from validate."""

    rows: list[dict]
    thresholds: dict[str, float | None]
    calibration: dict[str, dict | None]


@dataclass
class Fitted:
    """A finished fit: its metrics rows, the training result, its files, and each scored split's network scores
    (n, outputs)."""

    rows: list[dict]
    trained: TrainResult
    files: ClassifierFiles
    scores: dict[str, np.ndarray]

    @property
    def row(self) -> dict:
        """The per-finding fit's row on the test split with the automatic labels."""
        return self.rows[0]

    @property
    def radiologist_row(self) -> dict:
        """The per-finding fit's row on the radiologist-labelled test studies, with the radiologist's labels."""
        return self.rows[1]


def fit_model(
    data: Any,
    manifest: pl.DataFrame,
    shards: Shards,
    cfg: TrainConfig,
    device,
    files: ClassifierFiles,
    *,
    labels: Sequence[str],
    evaluate_scores: Callable[[dict[str, np.ndarray], TrainResult], Evaluated],
    prediction_columns: Sequence[str],
    extra: Callable[[dict[str, np.ndarray], Evaluated], None] | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    window_prior: WindowPrior | None = None,
) -> Fitted:
    """The skeleton both kinds run. ``data``: a ``ClassifierData`` or ``MultilabelData`` (``splits``, ``size``,
    ``digest()``); ``labels``: the findings in output order; ``evaluate_scores``: the kind's rows from the scored
    splits (``SCORED``); ``prediction_columns``: the predictions file's score column per output; ``extra``: the
    kind's further files from the scores and rows, written before the checkpoint (so a killed run leaves no checkpoint
    without them); ``window_prior``: the windows the training images were read through, which the checkpoint
    carries for the served model (``CheckpointConfig.window_prior``). Trains (resuming a killed run of the same config and data), scores in fp32, writes the folder."""
    files.dir.mkdir(parents=True, exist_ok=True)
    sp = data.splits
    result = train(
        sp["train"].images, sp["train"].targets, sp["validate"].images, sp["validate"].targets, cfg, device,
        checkpoint_dir=files.dir, log=log, on_epoch=on_epoch, data_digest=data.digest(),
    )  # fmt: skip

    def scores(images) -> np.ndarray:
        # fp32 whatever the training precision: bf16 logits have 8 significant bits, and the ties
        # they create move ROC-AUC and the chosen threshold
        p = predict(result.model, images, device, cfg.eval_batch_size, EVAL_PRECISION, cfg.channels_last, loader_workers(cfg, device))
        return p.reshape(-1, len(labels))

    # every manifest image that has a shard gets a score (report generation uses them), streamed in order from
    # the shards: never a second copy of the images; the scored splits are read from that one pass (each of their
    # images is a manifest image with a shard), not scored again
    all_imgs, all_rows = open_images(shards, manifest.select("dicom_id", "split"))
    p_all = scores(all_imgs)
    scored = {s: p_all[_positions(all_rows, sp[s].rows)] for s in SCORED}
    evaluated = evaluate_scores(scored, result)
    columns = (pl.Series(c, p_all[:, j], dtype=pl.Float32) for j, c in enumerate(prediction_columns))
    write_parquet(all_rows.select("dicom_id", "split").with_columns(columns), files.predictions)
    if extra is not None:
        extra(scored, evaluated)
    config = CheckpointConfig(
        arch=cfg.arch,
        size=data.size,
        labels=tuple(labels),
        thresholds=evaluated.thresholds,
        calibration=evaluated.calibration,
        dropout=cfg.dropout,
        normalise={"mean": NORMALISE_MEAN, "std": NORMALISE_STD},
        training_config=trained_with(cfg, data.size),
        window_prior=window_prior.windows if window_prior is not None else (),
    )
    write_checkpoint(result.model, files, config)
    write_json(files.metrics, evaluated.rows)
    files.resume.unlink(missing_ok=True)  # finished: the next materialization trains afresh
    return Fitted(evaluated.rows, result, files, scored)


def _positions(every: pl.DataFrame, rows: pl.DataFrame) -> np.ndarray:
    """Where each of ``rows``' images sits in ``every`` (both with ``dicom_id``); an image missing there is an error."""
    at = every.select("dicom_id").with_row_index("_at")
    found = rows.select("dicom_id").join(at, on="dicom_id", how="left", maintain_order="left")["_at"]
    if found.null_count():
        missing = rows["dicom_id"].filter(found.is_null())
        raise ValueError(f"{len(missing)} split images are not among the manifest's images with a shard (first: {missing[0]})")
    return found.to_numpy().astype(np.int64)


def trained_with(cfg: TrainConfig, size: int) -> dict:
    """The resolved recipe a checkpoint was trained with, recorded whole in its configuration."""
    return record(dataclasses.replace(cfg, size=size, loader_workers=loader_workers(cfg)))


def record_untrainable(data: ClassifierData, files: ClassifierFiles) -> list[dict]:
    """'Not trainable' metrics rows (one per test label source); the previous model's files are removed,
    not left as if current."""
    rows = []
    for split, source in (("test", data.label_source), (RADIOLOGIST, RADIOLOGIST)):
        n, pos = data.splits[split].rows.height, int(data.splits[split].targets.sum())
        row = {"pathology": data.label, "slug": data.label_slug, "test_labels": source, "evaluable": False}
        row.update(uncertain_policy=data.uncertain, blank_policy=data.blank)
        rows.append({**row, "reason": data.untrainable_reason, "n_test": n, "n_pos": pos, "n_neg": n - pos})
    files.clear_model()
    write_json(files.metrics, rows)
    return rows


def fit_and_save(
    data: ClassifierData,
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
    """One finding's model through the skeleton: its two rows (both test label sources at the threshold chosen on
    validation with the automatic labels; resampling by patient), its calibration map, its test scores and curves."""
    sp = data.splits
    y_test, y_val = sp["test"].targets.numpy(), sp["validate"].targets.numpy()

    def evaluate_scores(p: dict[str, np.ndarray], result: TrainResult) -> Evaluated:
        p_val, p_test, p_rad = (p[s][:, 0] for s in SCORED)
        common = {"pathology": data.label, "slug": data.label_slug, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
        common.update(train_seconds=round(result.seconds, 1), val_roc_auc=roc_auc_or_nan(y_val, p_val))
        common.update(uncertain_policy=data.uncertain, blank_policy=data.blank)
        row = evaluate(y_test, p_test, y_val, p_val, n_boot=cfg.bootstrap, seed=cfg.seed, groups=patients(sp["test"].rows))
        # the calibration map, fitted on validate only; measured on both test label sources, shipped in the checkpoint
        calibration = fit_platt(y_val, p_val)
        common["calibration_fit"] = describe_calibration(calibration)
        row.update(calibration_row(y_test, p_test, calibration, patients(sp["test"].rows), cfg.bootstrap, cfg.seed))
        row = {**row, **common, "test_labels": data.label_source}
        y_rad, g_rad = sp[RADIOLOGIST].targets.numpy(), patients(sp[RADIOLOGIST].rows)
        rad = evaluate(y_rad, p_rad, y_val, p_val, n_boot=cfg.bootstrap, seed=cfg.seed, groups=g_rad)
        if not sp[RADIOLOGIST].rows.height:
            rad["reason"] = "no radiologist-labelled test images"
        rad.update(calibration_row(y_rad, p_rad, calibration, g_rad, cfg.bootstrap, cfg.seed))
        rad_row = {**rad, **common, "test_labels": RADIOLOGIST}
        return Evaluated([row, rad_row], {data.label_slug: row["threshold"]}, {data.label_slug: calibration})

    def test_files(p: dict[str, np.ndarray], evaluated: Evaluated) -> None:
        p_test = p["test"][:, 0]
        scores = sp["test"].rows.select("dicom_id", "target").with_columns(pl.Series("prob", p_test, dtype=pl.Float32))
        write_parquet(scores, files.test_scores)
        if evaluated.rows[0]["evaluable"]:
            save_curves({data.label: (y_test, p_test)}, files.curves, title=f"{data.label} ({cfg.arch})")
        else:
            files.curves.unlink(missing_ok=True)

    return fit_model(
        data, manifest, shards, cfg, device, files, labels=[data.label], evaluate_scores=evaluate_scores,
        prediction_columns=["prob"], extra=test_files, log=log, on_epoch=on_epoch, window_prior=window_prior,
    )  # fmt: skip
