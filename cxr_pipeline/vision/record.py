"""A finished fit recorded where people look for it: its MLflow run (test metrics, the MLflow model, the metrics
rows, curves, the rows each split used), the registry (a new version, champion on **validation** AUC:
``vision.checkpoint.register``), its model card and its Grad-CAM sheet.

Both model kinds go through here, so the per-finding and multi-label assets differ only in what they pass.
Plain Python (no Dagster): the assets turn the :class:`Recorded` it returns into their metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cxr_pipeline.data.shard_reader import Shards
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.tracking import TrackedRun
from cxr_pipeline.vision.checkpoint import METRICS, MULTILABEL, PublishedCard, publish_model_card, register
from cxr_pipeline.vision.fit import Fitted
from cxr_pipeline.vision.registry import registered_name, validation_digest
from cxr_pipeline.vision.splits import RADIOLOGIST

TEST_METRICS = ("accuracy", "f1", "sensitivity", "specificity", "roc_auc", "average_precision", "threshold")


@dataclass(frozen=True)
class Recorded:
    """What recording a fit produced: its registration (``register``'s dict), its published card, its sheet."""

    registration: dict[str, Any]
    card: PublishedCard
    saliency: Path | None


def epoch_logger(run: TrackedRun) -> Callable[[dict], None]:
    """Each epoch's training row as MLflow metrics at that step."""
    return lambda row: run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_datasets(run: TrackedRun, data, shards: Shards, targets: Sequence[str]) -> None:
    """The rows each split used (ids, image content hashes, the policy's targets) as MLflow datasets."""
    splits = {s: data.splits[s].rows.select("dicom_id", "content_hash", *targets) for s in ("train", "validate", "test")}
    run.log_datasets(f"mimic-cxr-{shards.size}px", splits, shards.root)


def _log_fit(run: TrackedRun, fitted: Fitted) -> None:
    """The training speed, the MLflow model and the metrics rows, in the fit's run."""
    from cxr_pipeline.vision.serving import log_model

    res = fitted.trained
    run.log_metrics({"best_epoch": res.best_epoch, "train_images_per_second": res.images_per_second, "train_seconds": res.seconds})
    log_model(run, fitted.files.checkpoint)
    run.log_dict({"rows": fitted.rows}, METRICS)


def _sheet(run: TrackedRun, fitted: Fitted, images, y: np.ndarray) -> Path | None:
    from cxr_pipeline.vision.serving import saliency_for

    p = fitted.scores["test"]
    sheet = saliency_for(fitted.files.checkpoint, images, y, p[:, 0] if p.shape[1] == 1 else p, fitted.files.saliency)
    if sheet is not None:
        run.log_artifact(sheet)
    return sheet


def _views(manifest: pl.DataFrame) -> list[str]:
    return sorted(v for v in manifest["view_position"].unique().to_list() if v) if "view_position" in manifest.columns else []


def record_finding(run: TrackedRun, data, fitted: Fitted, manifest: pl.DataFrame, raw_dir: Path | None) -> Recorded:
    """A per-finding fit: test metrics on both label sources, the model, curves, registration (champion on a better
    validation AUC; the test AUC a tag beside it), the card and the sheet."""
    row, rad = fitted.row, fitted.radiologist_row
    run.log_metrics({f"test_{k}": v for k, v in row.items() if k in TEST_METRICS and v is not None})
    run.log_metrics({f"test_radiologist_{k}": v for k, v in rad.items() if k in TEST_METRICS and v is not None})
    _log_fit(run, fitted)
    if fitted.files.curves.exists():
        run.log_artifact(fitted.files.curves)
    reg = register_finding(run, data, row)
    c = data.counts
    counts = {s: {"images": c[f"n_{s}"], "positives": c[f"n_{s}_pos"]} for s in ("train", "validate", "test")}
    card = publish_model_card(run, reg, fitted.files, fitted.rows, counts, _views(manifest), data.digest(), raw_dir)
    test = data.splits["test"]
    return Recorded(reg, card, _sheet(run, fitted, test.images, test.targets.numpy()))


def register_finding(run: TrackedRun, data, row: dict) -> dict:
    """A per-finding fit's MLflow model as a new registry version, scored on its validation AUC (the test AUC a tag
    beside it: selecting on it would make the champion's test figure optimistic)."""
    val_auc, test_auc = row.get("val_roc_auc"), row["roc_auc"] if row["evaluable"] else None
    return register(
        run,
        registered_name(data.label_slug),
        score=val_auc if val_auc is not None and val_auc == val_auc else None,
        description=f"Binary {data.label} classifier on chest radiographs (cxr_pipeline)",
        tags={"pathology": data.label, "test_auc": "nan" if test_auc is None else f"{test_auc:.6f}"},
        data_version=validation_digest(data),
    )


def record_multilabel(run: TrackedRun, data, fitted: Fitted, manifest: pl.DataFrame, raw_dir: Path | None) -> Recorded:
    """The multi-label fit: the model, each label's test AUC, registration (champion on the mean validation AUC),
    the card and the sheet (each finding's most confident test true positive)."""
    _log_fit(run, fitted)
    test = data.splits["test"]
    sheet = _sheet(run, fitted, test.images, test.targets.numpy())
    auto = [r for r in fitted.rows if r["test_labels"] != RADIOLOGIST]
    vals = [r["val_roc_auc"] for r in auto if r["val_roc_auc"] is not None and not math.isnan(r["val_roc_auc"])]
    tests = [r["roc_auc"] for r in auto if r["evaluable"]]
    run.log_metrics({f"{r['slug']}.test_roc_auc": r["roc_auc"] for r in auto if r["evaluable"]})
    reg = register(
        run,
        registered_name(MULTILABEL),
        score=sum(vals) / len(vals) if vals else None,
        description=f"Multi-label CNN, {len(SLUGS)} CheXpert observations, on chest radiographs (cxr_pipeline)",
        tags={"labels": str(len(SLUGS)), "test_auc": f"{sum(tests) / len(tests):.6f}" if tests else "nan"},
        data_version=validation_digest(data),
    )
    reg = {**reg, "mean_test_roc_auc": round(sum(tests) / len(tests), 4) if tests else float("nan"), "evaluable_labels": len(tests)}
    counts = {s: {"images": data.splits[s].rows.height} for s in ("train", "validate", "test")}
    card = publish_model_card(run, reg, fitted.files, fitted.rows, counts, _views(manifest), data.digest(), raw_dir)
    return Recorded(reg, card, sheet)
