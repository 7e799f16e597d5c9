"""image_shards + manifest -> multilabel_classifier -> report_hints: the multi-label model and the classifier
probabilities the report branch reads.

The work is in ``vision.multilabel`` (the model) and ``vision.folds`` (its fold models and the hints table);
these assets read their configuration, call them, and record the results in MLflow, the registry and
their metadata. Both read the ``multilabel_classifier`` section of ``pipeline.yaml`` (the per-pathology
recipe, then this model's own fields, ``oof_folds`` among them).
"""

import dagster as dg
import polars as pl

from cxr_pipeline.defs import needs
from cxr_pipeline.defs.io import ShardSet
from cxr_pipeline.defs.keys import CLASSIFIER_METRICS, CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER, REPORT_HINTS
from cxr_pipeline.defs.metadata import asset_metadata, fit_metadata, resolved_metadata
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import ALL_CLASSIFIERS_IN, TRAINING_INPUTS, classifiers_asset
from cxr_pipeline.fields import params
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.vision.checkpoint import MULTILABEL, ClassifierFiles, ClassifierSet
from cxr_pipeline.vision.folds import per_finding_calibrations
from cxr_pipeline.vision.folds import report_hints as build_hints
from cxr_pipeline.vision.multilabel import MultilabelConfig as MultilabelSettings
from cxr_pipeline.vision.multilabel import fit_multilabel, load_multilabel_data
from cxr_pipeline.vision.record import epoch_logger, log_datasets, record_multilabel

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

    paths = storage.paths
    cfg: MultilabelSettings = run_settings(context, paths)  # the classifier section, then this asset's own
    hw, files, shards = compute.resolved(paths), ClassifierSet.of(paths).classifier(MULTILABEL), image_shards.at(cfg.size)
    data = load_multilabel_data(manifest, shards, cfg, hw.device)
    counts = _split_counts(data)
    context.log.info(f"multi-label: {counts} on {hw.description}, images {data.mode}")
    with mlflow.run(context, {"model": MULTILABEL}) as run:
        run.log_params({**params(cfg), **hw.params, **counts, "images": data.mode})
        log_datasets(run, data, shards, [f"t_{s}" for s in SLUGS])
        # the served model reads a windowless file as external validation does
        prior = image_shards.window_prior(cfg.size, context.log.warning)
        fitted = fit_multilabel(
            data, manifest, shards, cfg, hw.device, files, log=context.log.info, on_epoch=epoch_logger(run), window_prior=prior
        )
        recorded = record_multilabel(run, data, fitted, manifest, paths.raw)
    result, reg = fitted.trained, recorded.registration
    md = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "train_seconds": round(result.seconds, 1)}
    md.update(mean_test_roc_auc=reg["mean_test_roc_auc"], evaluable_labels=reg["evaluable_labels"], **fit_metadata(recorded, files))
    return dg.MaterializeResult(metadata=asset_metadata(run, **counts, images=data.mode, **md, **resolved_metadata(cfg)))


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
        "classifier": ALL_CLASSIFIERS_IN,  # the per-pathology checkpoints: their calibration maps
        "classifier_predictions": dg.AssetIn(CLASSIFIER_PREDICTIONS),
        "classifier_metrics": dg.AssetIn(CLASSIFIER_METRICS),
    },
    **needs.CNN_FOLDS.asset_args(),
)
def report_hints(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    image_shards: ShardSet,
    multilabel_classifier: ClassifierFiles,
    classifier: ClassifierSet,
    classifier_predictions: pl.DataFrame,
    classifier_metrics: pl.DataFrame,
    config: ReportHintsConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.Output:

    paths = storage.paths
    cfg: MultilabelSettings = run_settings(context, paths, MULTILABEL_CLASSIFIER)
    hw = compute.resolved(paths)
    load = lambda: load_multilabel_data(manifest, image_shards.at(cfg.size), cfg, hw.device)  # noqa: E731  (only for fold models)
    with mlflow.run(context, {"model": MULTILABEL}) as run:
        run.log_params({**params(cfg), **hw.params})
        calibrations = per_finding_calibrations(classifier, classifier_metrics)
        hints = build_hints(
            cfg, hw.device, multilabel_classifier, classifier_predictions, classifier_metrics, load, context.log.info, calibrations
        )
        run.log_params({"oof_images": hints.out_of_fold_images, "hint_source": hints.source})
    context.log.info(f"report hints: {hints.table.height} images, {hints.source} ({hints.folds} fold models)")
    md = {"hint_source": hints.source, "fold_models": hints.folds, "out_of_fold_images": hints.out_of_fold_images}
    return dg.Output(hints.table, metadata=asset_metadata(run, **md, **resolved_metadata(cfg)))
