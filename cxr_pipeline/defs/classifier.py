"""image_shards + manifest -> classifier[14 pathologies]: one binary CNN per finding, registered in MLflow.

The work is in ``vision.splits`` (the data), ``vision.fit`` (train, evaluate, save) and ``vision.record`` (the
run, the registry, the model card, the Grad-CAM sheet); this asset reads its configuration, calls them, and turns
the result into its metadata. The multi-label model and the report hints are ``defs.multilabel``; the tables read
from the classifier folders are ``defs.classifier_tables``.
"""

import dagster as dg
import polars as pl

from cxr_pipeline.defs import needs
from cxr_pipeline.defs.io import ShardSet
from cxr_pipeline.defs.keys import CLASSIFIER
from cxr_pipeline.defs.metadata import asset_metadata, fit_metadata, resolved_metadata
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import TRAINING_INPUTS, classifiers_asset
from cxr_pipeline.fields import params
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.tracking import TrackedRun
from cxr_pipeline.vision.checkpoint import ClassifierFiles, ClassifierSet, registered_label, retire_aliases
from cxr_pipeline.vision.fit import fit_and_save, record_untrainable
from cxr_pipeline.vision.record import epoch_logger, log_datasets, record_finding
from cxr_pipeline.vision.registry import registered_name
from cxr_pipeline.vision.splits import load_data
from cxr_pipeline.vision.train import TrainConfig

label_partitions = dg.StaticPartitionsDefinition(list(SLUGS))
HEADLINE = ("roc_auc", "average_precision", "accuracy", "f1", "threshold", "n_pos", "n_neg")


ClassifierConfig = dagster_config(CLASSIFIER, "ClassifierConfig")


def _headline(row: dict, keys: tuple[str, ...], prefix: str = "") -> dict:
    """The metrics shown in the asset's metadata, rounded."""
    return {prefix + k: (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in keys if row.get(k) is not None}


@classifiers_asset(
    CLASSIFIER,
    [],
    "One binary CNN per CheXpert observation: best-validation-loss weights (safetensors), test metrics with CIs, MLflow run and registered model.",
    {"pytorch", "safetensors"},
    partitions_def=label_partitions,
    ins=TRAINING_INPUTS,
    **needs.CNN.asset_args(),
)
def classifier(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    image_shards: ShardSet,
    config: ClassifierConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:

    label_slug, paths = context.partition_key, storage.paths
    cfg: TrainConfig = run_settings(context, paths)
    hw = compute.resolved(paths)
    files, shards = ClassifierSet.of(paths).classifier(label_slug), image_shards.at(cfg.size)
    data = load_data(manifest, shards, label_slug, cfg, hw.device)
    context.log.info(f"{data.label}: {data.counts} on {hw.description}, images {data.mode}")
    with mlflow.run(context, {"pathology": data.label}) as run:
        run.log_params({**params(cfg), **hw.params, **data.counts, "images": data.mode})
        if data.untrainable_reason:  # rare labels on small subsets: record why, keep no model, never crash the backfill
            return _untrainable(context, run, data, files, cfg)
        log_datasets(run, data, shards, ["target"])
        # the served model reads a windowless file as external validation does
        prior = image_shards.window_prior(cfg.size, context.log.warning)
        fitted = fit_and_save(
            data, manifest, shards, cfg, hw.device, files, log=context.log.info, on_epoch=epoch_logger(run), window_prior=prior
        )
        recorded = record_finding(run, data, fitted, manifest, paths.raw)
    result = fitted.trained
    md = {**_headline(fitted.row, HEADLINE), **_headline(fitted.radiologist_row, ("roc_auc", "n_pos", "n_neg"), "radiologist_")}
    md.update(evaluable=fitted.row["evaluable"], reason=fitted.row["reason"], best_epoch=result.best_epoch, epochs_run=result.epochs_run)
    md.update(resumed_from_epoch=result.resumed_from, train_images_per_second=round(result.images_per_second, 1))
    md.update(fit_metadata(recorded, files))
    context.log.info(f"registered {registered_label(recorded.registration)}")
    md.update(data.counts, images=data.mode, **hw.placement)
    return dg.MaterializeResult(metadata=asset_metadata(run, **md, **resolved_metadata(cfg)))


def _untrainable(
    context: dg.AssetExecutionContext, run: TrackedRun, data, files: ClassifierFiles, cfg: TrainConfig
) -> dg.MaterializeResult:
    """A label the current data cannot train: its 'not trainable' rows, no model files, and the registry's aliases retired."""

    context.log.warning(f"{data.label}: {data.untrainable_reason}")
    record_untrainable(data, files)
    retired = retire_aliases(run.client, registered_name(data.label_slug), data.untrainable_reason)
    md = {"evaluable": False, "reason": data.untrainable_reason, "retired_aliases": dg.MetadataValue.json(retired)}
    return dg.MaterializeResult(metadata=asset_metadata(run, **md, **data.counts, **resolved_metadata(cfg)))
