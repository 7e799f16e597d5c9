"""One pathology's classifier from its data to saved files: fit, evaluate, save (the multi-label model is
``vision.multilabel``, which saves the same way).

The Dagster asset calls ``vision.splits.load_data`` then either ``record_untrainable`` or
``fit_and_save``; the CLI and benchmarks can do the same without Dagster. What
lands in the classifier folder (``settings.ClassifierFiles``):

- ``checkpoint/model.safetensors`` + ``config.json`` (architecture, size,
  normalisation, validation-chosen threshold): the registered model's source;
- ``metrics.json``: the metrics row (or the reason it is not trainable);
- ``predictions.parquet``: a probability for every manifest image with a shard;
- ``test_scores.parquet`` and ``roc_pr.png``: the test split's scores and curves.

A label that cannot be trained on the current data leaves no model files
behind from an earlier run (they would read as current).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cxr_pipeline.data.shard_reader import Shards, open_images
from cxr_pipeline.fields import record
from cxr_pipeline.files import atomic_path, write_parquet
from cxr_pipeline.settings import ClassifierFiles
from cxr_pipeline.vision.calibration import calibration_row, fit_platt
from cxr_pipeline.vision.calibration import describe as describe_calibration
from cxr_pipeline.vision.evaluate import evaluate, roc_auc_or_nan, save_curves
from cxr_pipeline.vision.splits import RADIOLOGIST, ClassifierData, patients
from cxr_pipeline.vision.train import NORMALISE_MEAN, NORMALISE_STD, TrainConfig, TrainResult, loader_workers, predict, train

EVAL_PRECISION = "fp32"


@dataclass
class FitOutcome:
    row: dict  # the metrics row on the test split with the automatic labels
    trained: TrainResult
    files: ClassifierFiles
    test_curve: tuple  # (y, p) of the test split
    radiologist_row: dict  # the radiologist-labelled test studies with the radiologist's labels

    @property
    def rows(self) -> list[dict]:
        """Both rows, as in metrics.json."""
        return [self.row, self.radiologist_row]


def _clear_model_files(files: ClassifierFiles) -> None:
    shutil.rmtree(files.checkpoint, ignore_errors=True)
    for f in (files.predictions, files.test_scores, files.curves, files.saliency, files.resume):
        f.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def record_untrainable(data: ClassifierData, files: ClassifierFiles) -> list[dict]:
    """'Not trainable' metrics rows (one per test label source); the previous model's files are removed,
    not left as if current."""
    rows = []
    for split, source in (("test", data.label_source), (RADIOLOGIST, RADIOLOGIST)):
        n, pos = data.splits[split].rows.height, int(data.splits[split].targets.sum())
        row = {"pathology": data.label, "slug": data.label_slug, "test_labels": source, "evaluable": False}
        row.update(uncertain_policy=data.uncertain, blank_policy=data.blank)
        rows.append({**row, "reason": data.untrainable_reason, "n_test": n, "n_pos": pos, "n_neg": n - pos})
    _clear_model_files(files)
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
) -> FitOutcome:
    """Train (resuming a killed run of the same config and data), evaluate on ``device``, write the folder."""
    files.dir.mkdir(parents=True, exist_ok=True)
    sp = data.splits
    result = train(
        sp["train"].images,
        sp["train"].targets,
        sp["validate"].images,
        sp["validate"].targets,
        cfg,
        device,
        checkpoint_dir=files.dir,
        log=log,
        on_epoch=on_epoch,
        data_digest=data.digest(),
    )

    def probs(images):
        # fp32 whatever the training precision: bf16 logits have 8 significant bits, and the ties
        # they create move ROC-AUC and the chosen threshold
        return predict(result.model, images, device, cfg.eval_batch_size, EVAL_PRECISION, cfg.channels_last, loader_workers(cfg, device))

    p_val, p_test, p_rad = probs(sp["validate"].images), probs(sp["test"].images), probs(sp[RADIOLOGIST].images)
    y_test, y_val = sp["test"].targets.numpy(), sp["validate"].targets.numpy()
    common = {"pathology": data.label, "slug": data.label_slug, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    common.update(train_seconds=round(result.seconds, 1), val_roc_auc=roc_auc_or_nan(y_val, p_val))
    common.update(uncertain_policy=data.uncertain, blank_policy=data.blank)
    # both test sets use the threshold chosen on validation (automatic labels); resampling is by
    # patient whenever a patient has more than one test image
    row = evaluate(y_test, p_test, y_val, p_val, n_boot=cfg.bootstrap, seed=cfg.seed, groups=patients(sp["test"].rows))
    # the calibration map, fitted on validate only; measured on both test label sources, shipped in config.json
    calibration = fit_platt(y_val, p_val)
    common["calibration_fit"] = describe_calibration(calibration)
    row.update(calibration_row(y_test, p_test, calibration, patients(sp["test"].rows), cfg.bootstrap, cfg.seed))
    row = {**row, **common, "test_labels": data.label_source}
    rad = evaluate(
        sp[RADIOLOGIST].targets.numpy(), p_rad, y_val, p_val, n_boot=cfg.bootstrap, seed=cfg.seed, groups=patients(sp[RADIOLOGIST].rows)
    )
    if not sp[RADIOLOGIST].rows.height:
        rad["reason"] = "no radiologist-labelled test images"
    rad.update(
        calibration_row(sp[RADIOLOGIST].targets.numpy(), p_rad, calibration, patients(sp[RADIOLOGIST].rows), cfg.bootstrap, cfg.seed)
    )
    rad_row = {**rad, **common, "test_labels": RADIOLOGIST}

    # every manifest image that has a shard gets a probability (report generation uses them), streamed in
    # order from the shards: never a second copy of the images
    all_imgs, all_rows = open_images(shards, manifest.select("dicom_id", "split"))
    write_parquet(
        all_rows.select("dicom_id", "split").with_columns(pl.Series("prob", probs(all_imgs), dtype=pl.Float32)), files.predictions
    )
    scores = sp["test"].rows.select("dicom_id", "target").with_columns(pl.Series("prob", p_test, dtype=pl.Float32))
    write_parquet(scores, files.test_scores)

    save_checkpoint(result.model, files, checkpoint_config(cfg, data, row["threshold"], calibration))
    write_json(files.metrics, [row, rad_row])
    files.resume.unlink(missing_ok=True)  # finished: the next materialization trains afresh
    if row["evaluable"]:
        save_curves({data.label: (y_test, p_test)}, files.curves, title=f"{data.label} ({cfg.arch})")
    else:
        files.curves.unlink(missing_ok=True)
    return FitOutcome(row=row, trained=result, files=files, test_curve=(y_test, p_test), radiologist_row=rad_row)


def save_checkpoint(model, files: ClassifierFiles, config: dict) -> None:
    """``model.safetensors`` (no pickle) and ``config.json``, each written atomically."""
    from safetensors.torch import save_file

    files.checkpoint.mkdir(parents=True, exist_ok=True)
    with atomic_path(files.checkpoint / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.cpu().state_dict().items()}, str(tmp))
    write_json(files.checkpoint / "config.json", config)


def checkpoint_config(cfg: TrainConfig, data: ClassifierData, threshold: float, calibration: dict | None = None) -> dict:
    """What a reader of the checkpoint needs to apply it (no pickle: the weights are safetensors). ``threshold``
    is on the network's scores; ``calibration`` the map to probabilities fitted on validate (``vision.calibration``)."""
    return {
        "arch": cfg.arch,
        "dropout": cfg.dropout,
        "size": data.size,
        "pathology": data.label,
        "threshold": threshold,
        "calibration": calibration,
        "normalise": {"mean": NORMALISE_MEAN, "std": NORMALISE_STD},
        "input": "grey uint8 letterboxed, repeated to 3 channels",
        "training_config": trained_with(cfg, data.size),
    }


def trained_with(cfg: TrainConfig, size: int) -> dict:
    """The resolved recipe a checkpoint was trained with, recorded whole in its ``config.json``."""
    import dataclasses

    return record(dataclasses.replace(cfg, size=size, loader_workers=loader_workers(cfg)))
