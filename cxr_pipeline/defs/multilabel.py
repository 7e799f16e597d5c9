"""image_shards + manifest -> multilabel_classifier -> report_hints: the multi-label model and the classifier
probabilities the report branch reads.

The work is in ``vision.multilabel`` (the model) and ``vision.folds`` (its fold models and the hints table);
these assets read their configuration, call them, and record the results in MLflow, the registry and
their metadata. Both read the ``multilabel_classifier`` section of ``pipeline.yaml`` (the per-pathology
recipe, then this model's own fields, ``oof_folds`` among them).
"""

import math

import dagster as dg
import polars as pl

from cxr_pipeline.defs import needs
from cxr_pipeline.defs.classifier import (
    MODEL_ARTIFACT,
    TRAINING_INPUTS,
    classifiers_asset,
    epoch_logger,
    log_datasets,
    log_model,
    publish_model_card,
    registered_label,
    saliency_sheet,
)
from cxr_pipeline.defs.io import ShardSet
from cxr_pipeline.defs.keys import CLASSIFIER_METRICS, CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER, REPORT_HINTS
from cxr_pipeline.defs.metadata import asset_metadata, resolved_metadata
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.fields import params
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.settings import ClassifierFiles
from cxr_pipeline.tracking import TrackedRun, register_version
from cxr_pipeline.vision.multilabel import MultilabelConfig as MultilabelSettings
from cxr_pipeline.vision.registry import registered_name, validation_digest
from cxr_pipeline.vision.splits import MULTILABEL, RADIOLOGIST

MultilabelConfig = dagster_config(MULTILABEL_CLASSIFIER, "MultilabelConfig")
ReportHintsConfig = dagster_config(MULTILABEL_CLASSIFIER, "ReportHintsConfig")  # the fold models follow the model's recipe


def _split_counts(data) -> dict[str, int]:
    return {f"n_{s}": data.splits[s].rows.height for s in ("train", "validate", "test")}


@classifiers_asset(
    MULTILABEL_CLASSIFIER,
    [],
    "One CNN with 14 outputs (the field's standard: CheXNet, TorchXRayVision): masked loss over the labels usable under the "
    "policy, the per-pathology recipe (pipeline.yaml's classifier section), each label evaluated like a per-pathology model.",
    {"pytorch", "safetensors"},
    ins=TRAINING_INPUTS,
    **needs.CNN.asset_args(),
)
def multilabel_classifier(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    image_shards: ShardSet,
    config: MultilabelConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    from cxr_pipeline.vision.multilabel import fit_multilabel, load_multilabel_data

    paths = storage.paths
    cfg: MultilabelSettings = run_settings(context, paths)  # the classifier section, then this asset's own
    hw, files, shards = compute.resolved(paths), paths.classifier(MULTILABEL), image_shards.at(cfg.size)
    data = load_multilabel_data(manifest, shards, cfg, hw.device)
    counts = _split_counts(data)
    context.log.info(f"multi-label: {counts} on {hw.description}, images {data.mode}")
    with mlflow.run(context, {"model": MULTILABEL}) as run:
        run.log_params({**params(cfg), **hw.params, **counts, "images": data.mode})
        log_datasets(run, data, shards, [f"t_{s}" for s in SLUGS])
        rows, result = fit_multilabel(data, manifest, shards, cfg, hw.device, files, log=context.log.info, on_epoch=epoch_logger(run))
        md, reg = _record_multilabel(run, data, rows, result, files)
        counts_by_split = {s: {"images": data.splits[s].rows.height} for s in ("train", "validate", "test")}
        md.update(publish_model_card(run, reg, files, rows, counts_by_split, manifest, data.digest(), paths.raw))
    return dg.MaterializeResult(metadata=asset_metadata(run, **counts, images=data.mode, **md, **resolved_metadata(cfg)))


def _record_multilabel(run: TrackedRun, data, rows: list[dict], result, files: ClassifierFiles) -> tuple[dict, dict]:
    """The multi-label fit in MLflow (metrics, model), its Grad-CAM sheet and registry version; its metadata and
    the registry version."""
    run.log_metrics({"best_epoch": result.best_epoch, "train_images_per_second": result.images_per_second, "train_seconds": result.seconds})
    log_model(run, files.checkpoint)
    run.log_dict({"rows": rows}, "metrics.json")
    test = data.splits["test"]
    p_test = test.rows.select("dicom_id").join(pl.read_parquet(files.predictions), on="dicom_id", how="left").select(SLUGS)
    sheet = saliency_sheet(run, files.checkpoint, test.images, test.targets.numpy(), p_test.to_numpy(), files.saliency)
    reg = _register_multilabel(run, data, rows)
    md = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "train_seconds": round(result.seconds, 1)}
    md.update(mean_test_roc_auc=reg["mean_test_roc_auc"], evaluable_labels=reg["evaluable_labels"], registered_model=registered_label(reg))
    return {**md, "checkpoint": dg.MetadataValue.path(str(files.checkpoint)), **sheet}, reg


def _register_multilabel(run: TrackedRun, data, rows: list[dict]) -> dict:
    """The multi-label checkpoint as a registry version; champion on mean **validation** AUC (see ``defs.classifier.register_classifier``)."""
    auto = [r for r in rows if r["test_labels"] != RADIOLOGIST]
    vals = [r["val_roc_auc"] for r in auto if r["val_roc_auc"] is not None and not math.isnan(r["val_roc_auc"])]
    tests = [r["roc_auc"] for r in auto if r["evaluable"]]
    run.log_metrics({f"{r['slug']}.test_roc_auc": r["roc_auc"] for r in auto if r["evaluable"]})
    reg = register_version(
        run,
        registered_name(MULTILABEL),
        MODEL_ARTIFACT,
        score_tag="val_auc",
        score=sum(vals) / len(vals) if vals else None,
        description="Multi-label CNN, 14 CheXpert observations, on chest radiographs (cxr_pipeline)",
        tags={"labels": "14", "test_auc": f"{sum(tests) / len(tests):.6f}" if tests else "nan"},
        data_version=validation_digest(data),
    )
    return {**reg, "mean_test_roc_auc": round(sum(tests) / len(tests), 4) if tests else float("nan"), "evaluable_labels": len(tests)}


@classifiers_asset(
    REPORT_HINTS,
    [],
    "The classifier probabilities the report prompts and the retrieval baseline read, and the thresholds they are read at: "
    "out-of-fold for training images (oof_folds models of the multi-label recipe over the training patients, so no hint "
    "comes from a model that saw its image), the multi-label model's for the other splits; with oof_folds 0 or 1, the "
    "per-pathology predictions (in-sample on training images, named so).",
    {"pytorch", "polars", "parquet"},
    ins={
        **TRAINING_INPUTS,
        "multilabel_classifier": dg.AssetIn(MULTILABEL_CLASSIFIER, input_manager_key="handles"),
        "classifier_predictions": dg.AssetIn(CLASSIFIER_PREDICTIONS),
        "classifier_metrics": dg.AssetIn(CLASSIFIER_METRICS),
    },
    **needs.CNN.asset_args(),
)
def report_hints(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    image_shards: ShardSet,
    multilabel_classifier: ClassifierFiles,
    classifier_predictions: pl.DataFrame,
    classifier_metrics: pl.DataFrame,
    config: ReportHintsConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.Output:
    from cxr_pipeline.vision.folds import per_finding_calibrations
    from cxr_pipeline.vision.folds import report_hints as build_hints
    from cxr_pipeline.vision.multilabel import load_multilabel_data

    paths = storage.paths
    cfg: MultilabelSettings = run_settings(context, paths, MULTILABEL_CLASSIFIER)
    hw = compute.resolved(paths)
    load = lambda: load_multilabel_data(manifest, image_shards.at(cfg.size), cfg, hw.device)  # noqa: E731  (only for fold models)
    with mlflow.run(context, {"model": MULTILABEL}) as run:
        run.log_params({**params(cfg), **hw.params})
        calibrations = per_finding_calibrations(paths, classifier_metrics)
        hints = build_hints(
            cfg, hw.device, multilabel_classifier, classifier_predictions, classifier_metrics, load, context.log.info, calibrations
        )
        run.log_params({"oof_images": hints.out_of_fold_images, "hint_source": hints.source})
    context.log.info(f"report hints: {hints.table.height} images, {hints.source} ({hints.folds} fold models)")
    md = {"hint_source": hints.source, "fold_models": hints.folds, "out_of_fold_images": hints.out_of_fold_images}
    return dg.Output(hints.table, metadata=asset_metadata(run, **md, **resolved_metadata(cfg)))
