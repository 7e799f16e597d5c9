"""image_shards + manifest -> classifier[14 pathologies], multilabel_classifier -> classifier_metrics, classifier_predictions.

The work is in ``vision.fit``; these assets read config, call it, log to MLflow
and return metadata.
"""

import dagster as dg
import polars as pl

from cxr_pipeline.config import params
from cxr_pipeline.data.io import write_parquet
from cxr_pipeline.defs.helpers import (
    asset_factory,
    asset_metadata,
    dagster_config,
    every_partition_of,
    gpu_asset,
    inline_png,
    resolved_metadata,
    run_settings,
    table_metadata,
)
from cxr_pipeline.defs.io import ShardSet
from cxr_pipeline.defs.manifest import MANIFEST
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.shards import IMAGE_SHARDS
from cxr_pipeline.labels import SLUGS, slug
from cxr_pipeline.settings import ClassifierSet
from cxr_pipeline.tracking import TrackedRun, register_version, retire_aliases
from cxr_pipeline.vision.fit import MULTILABEL, registered_name, validation_digest
from cxr_pipeline.vision.fit import MultilabelConfig as MultilabelSettings
from cxr_pipeline.vision.train import TrainConfig

CLASSIFIER = "classifier"
CLASSIFIER_METRICS = "classifier_metrics"
CLASSIFIER_PREDICTIONS = "classifier_predictions"
MULTILABEL_CLASSIFIER = "multilabel_classifier"
CLASSIFIER_CODE_VERSION = "1"
label_partitions = dg.StaticPartitionsDefinition(list(SLUGS))
HEADLINE = ("roc_auc", "average_precision", "accuracy", "f1", "threshold", "n_pos", "n_neg")
TEST_METRICS = ("accuracy", "f1", "sensitivity", "specificity", "roc_auc", "average_precision", "threshold")


ClassifierConfig = dagster_config(CLASSIFIER, "ClassifierConfig")
MultilabelConfig = dagster_config(MULTILABEL_CLASSIFIER, "MultilabelConfig")


MODEL_ARTIFACT = "model"  # the run's MLflow model folder: the registered source (see vision.serving)


def log_model(run: TrackedRun, checkpoint) -> None:
    from cxr_pipeline.vision.serving import log_model as log

    log(run, checkpoint, MODEL_ARTIFACT)


def _log_fit(run: TrackedRun, outcome) -> None:
    """The test metrics, training speed, MLflow model, metrics row and curves of a fit, in its MLflow run."""
    row, files = outcome.row, outcome.files
    run.log_metrics({f"test_{k}": v for k, v in row.items() if k in TEST_METRICS and v is not None})
    run.log_metrics({f"test_radiologist_{k}": v for k, v in outcome.radiologist_row.items() if k in TEST_METRICS and v is not None})
    run.log_metrics({"best_epoch": outcome.trained.best_epoch, "train_images_per_second": outcome.trained.images_per_second})
    log_model(run, files.checkpoint)
    run.log_dict({"rows": outcome.rows}, "metrics.json")
    if files.curves.exists():
        run.log_artifact(files.curves)


_asset = asset_factory("classifiers", CLASSIFIER_CODE_VERSION)


def _log_datasets(run: TrackedRun, data, size: int, shard_root, targets: list[str]) -> None:
    """The rows each split used (ids, image content hashes, the policy's targets) as MLflow datasets."""
    splits = {s: data.splits[s].rows.select("dicom_id", "content_hash", *targets) for s in ("train", "validate", "test")}
    run.log_datasets(f"mimic-cxr-{size}px", splits, shard_root)


def _saliency(run: TrackedRun, checkpoint, images, y, p, out) -> dict:
    """Grad-CAM sheet of a few test TPs / FPs / FNs (per finding's best TP for the multi-label model):
    a file, an MLflow artifact and inline metadata. ``y``, ``p``: (n,) or (n, labels) test targets and probabilities."""
    from cxr_pipeline.vision.serving import classifier_saliency_sheet, load_checkpoint, multilabel_saliency_sheet

    model = load_checkpoint(checkpoint)
    if len(model.slugs) > 1:
        sheet = multilabel_saliency_sheet(model, images, y, p, out)
    else:
        sheet = classifier_saliency_sheet(model, images, y, p, out)
    if sheet is None:
        return {"saliency": "no test case to show"}
    run.log_artifact(sheet)
    return {"saliency": inline_png(sheet, "Grad-CAM on test images")}


def _headline(row: dict, keys: tuple[str, ...], prefix: str = "") -> dict:
    """The metrics shown in the asset's metadata, rounded."""
    return {prefix + k: (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in keys if row.get(k) is not None}


def _register(run: TrackedRun, data, row: dict) -> dict:
    """The fit's checkpoint as a new registry version; champion on a better **validation** AUC.

    Selecting on test AUC would make the champion's test figure optimistic (it won on that very
    set); the test AUC is recorded as a tag beside it.
    """
    val_auc = row.get("val_roc_auc")
    test_auc = row["roc_auc"] if row["evaluable"] else None
    return register_version(
        run,
        registered_name(data.label_slug),
        MODEL_ARTIFACT,
        score_tag="val_auc",
        score=val_auc if val_auc is not None and val_auc == val_auc else None,
        description=f"Binary {data.label} classifier on chest radiographs (cxr_pipeline)",
        tags={"pathology": data.label, "test_auc": "nan" if test_auc is None else f"{test_auc:.6f}"},
        data_version=validation_digest(data),
    )


ALL_CLASSIFIERS = every_partition_of(CLASSIFIER)
# what a classifier reads: the manifest (a table), every shard partition (a handle to the files)
TRAINING_INPUTS = {
    "manifest": dg.AssetIn(MANIFEST),
    "image_shards": dg.AssetIn(IMAGE_SHARDS, partition_mapping=dg.AllPartitionMapping(), input_manager_key="handles"),
}


def _fit_metadata(outcome, reg: dict, files) -> dict:
    """A trained classifier's materialization metadata: headline test metrics, training, registry."""
    row, result = outcome.row, outcome.trained
    md = {**_headline(row, HEADLINE), **_headline(outcome.radiologist_row, ("roc_auc", "n_pos", "n_neg"), "radiologist_")}
    md.update(evaluable=row["evaluable"], reason=row["reason"], best_epoch=result.best_epoch, epochs_run=result.epochs_run)
    md.update(resumed_from_epoch=result.resumed_from, train_images_per_second=round(result.images_per_second, 1))
    md.update(checkpoint=dg.MetadataValue.path(str(files.checkpoint)), registered_model=_registered(reg))
    return md


def _registered(reg: dict) -> str:
    return f"{reg['name']} v{reg['version']}" + (" (champion)" if reg["champion"] else "")


def _epoch_logger(run: TrackedRun):
    return lambda row: run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


@_asset(
    CLASSIFIER,
    [],
    "One binary CNN per CheXpert observation: best-validation-loss weights (safetensors), test metrics with CIs, MLflow run and registered model.",
    {"pytorch", "safetensors"},
    partitions_def=label_partitions,
    ins=TRAINING_INPUTS,
    **gpu_asset(),
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
    from cxr_pipeline.vision.fit import fit_and_save, load_data, record_untrainable

    label_slug, paths = context.partition_key, storage.paths
    cfg: TrainConfig = run_settings(context, paths)
    device, files, shards = compute.torch_device(paths), paths.classifier(label_slug), image_shards.root(cfg.size)
    data = load_data(manifest, shards, label_slug, cfg, device)
    context.log.info(f"{data.label}: {data.counts} on {compute.describe(paths)}, images {data.mode}")
    with mlflow.run(context, {"pathology": data.label}) as run:
        run.log_params({**params(cfg), **compute.params(paths), **data.counts, "images": data.mode})
        if data.untrainable_reason:  # rare labels on small subsets: record why, keep no model, never crash the backfill
            context.log.warning(f"{data.label}: {data.untrainable_reason}")
            record_untrainable(data, files)
            retired = retire_aliases(run.client, registered_name(label_slug), data.untrainable_reason)
            md = {"evaluable": False, "reason": data.untrainable_reason, "retired_aliases": dg.MetadataValue.json(retired)}
            return dg.MaterializeResult(metadata=asset_metadata(run, **md, **data.counts, **resolved_metadata(cfg)))
        _log_datasets(run, data, cfg.size, shards, ["target"])
        outcome = fit_and_save(data, manifest, shards, cfg, device, files, log=context.log.info, on_epoch=_epoch_logger(run))
        _log_fit(run, outcome)
        reg = _register(run, data, outcome.row)
        sheet = _saliency(run, files.checkpoint, data.splits["test"].images, *outcome.test_curve, files.saliency)
    context.log.info(f"registered {_registered(reg)}")
    md = {**_fit_metadata(outcome, reg, files), **data.counts, "images": data.mode}  # split sizes and the data mode, as logged
    return dg.MaterializeResult(metadata=asset_metadata(run, **md, **sheet, **resolved_metadata(cfg)))


def _register_multilabel(run: TrackedRun, data, rows: list[dict]) -> dict:
    """The multi-label checkpoint as a registry version; champion on mean **validation** AUC (see ``_register``)."""
    import math

    auto = [r for r in rows if r["test_labels"] != "radiologist"]
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


def _report_hints(run: TrackedRun, data, cfg, device, files, log) -> str:
    """Out-of-fold hint probabilities for the report prompts (``oof_folds`` models over training patients)."""
    from cxr_pipeline.vision.fit import fit_out_of_fold, hint_predictions

    if cfg.oof_folds <= 1:
        files.hints.unlink(missing_ok=True)
        return "none"
    oof, _ = fit_out_of_fold(data, cfg, device, cfg.oof_folds, log=log)
    write_parquet(hint_predictions(oof, pl.read_parquet(files.predictions)), files.hints)
    run.log_params({"oof_images": oof.height})
    return f"out-of-fold, {cfg.oof_folds} folds over training patients"


@_asset(
    MULTILABEL_CLASSIFIER,
    [],
    "One CNN with 14 outputs (the field's standard: CheXNet, TorchXRayVision): masked loss over the labels usable under the "
    "policy, the per-pathology recipe (pipeline.yaml's classifier section), each label evaluated like a per-pathology model.",
    {"pytorch", "safetensors"},
    ins=TRAINING_INPUTS,
    **gpu_asset(),
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
    from cxr_pipeline.vision.fit import fit_multilabel, load_multilabel_data

    paths = storage.paths
    cfg: MultilabelSettings = run_settings(context, paths)  # the classifier section, then this asset's own
    device, files, shards = compute.torch_device(paths), paths.classifier(MULTILABEL), image_shards.root(cfg.size)
    data = load_multilabel_data(manifest, shards, cfg, device)
    counts = {f"n_{s}": data.splits[s].rows.height for s in ("train", "validate", "test")}
    context.log.info(f"multi-label: {counts} on {compute.describe(paths)}, images {data.mode}")
    with mlflow.run(context, {"model": MULTILABEL}) as run:
        run.log_params({**params(cfg), **compute.params(paths), **counts, "images": data.mode})
        _log_datasets(run, data, cfg.size, shards, [f"t_{s}" for s in SLUGS])
        rows, result = fit_multilabel(data, manifest, shards, cfg, device, files, log=context.log.info, on_epoch=_epoch_logger(run))
        run.log_metrics(
            {"best_epoch": result.best_epoch, "train_images_per_second": result.images_per_second, "train_seconds": result.seconds}
        )
        log_model(run, files.checkpoint)
        run.log_dict({"rows": rows}, "metrics.json")
        test = data.splits["test"]
        p_test = test.rows.select("dicom_id").join(pl.read_parquet(files.predictions), on="dicom_id", how="left").select(SLUGS)
        sheet = _saliency(run, files.checkpoint, test.images, test.targets.numpy(), p_test.to_numpy(), files.saliency)
        reg = _register_multilabel(run, data, rows)
        hints = _report_hints(run, data, cfg, device, files, context.log.info)
    md = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "train_seconds": round(result.seconds, 1)}
    md.update(mean_test_roc_auc=reg["mean_test_roc_auc"], evaluable_labels=reg["evaluable_labels"], registered_model=_registered(reg))
    md.update(checkpoint=dg.MetadataValue.path(str(files.checkpoint)), report_hints=hints)
    return dg.MaterializeResult(metadata=asset_metadata(run, **counts, images=data.mode, **md, **sheet, **resolved_metadata(cfg)))


METRICS_SHOWN = (
    "model",
    "pathology",
    "test_labels",
    "evaluable",
    "n_pos",
    "n_neg",
    "roc_auc",
    "roc_auc_lo",
    "roc_auc_hi",
    "average_precision",
    "accuracy",
    "f1",
    "sensitivity",
    "specificity",
    "threshold",
    "val_roc_auc",
    "uncertain_policy",
    "blank_policy",
    "bootstrap_skipped",
    "reference_auc",
    "reason",
)


ALL_CLASSIFIERS_IN = {"classifier": dg.AssetIn(CLASSIFIER, partition_mapping=dg.AllPartitionMapping(), input_manager_key="handles")}


@_asset(
    CLASSIFIER_METRICS,
    [MULTILABEL_CLASSIFIER],  # its folder is inside the classifiers' (read through the same handle)
    "Model (per-pathology, multi-label) x pathology x accuracy / F1 / sensitivity / specificity / ROC-AUC / AP with 95% bootstrap CIs, "
    "next to the 2024 seeds' AUC.",
    {"polars", "parquet"},
    ins=ALL_CLASSIFIERS_IN,
)
def classifier_metrics(
    context: dg.AssetExecutionContext, classifier: ClassifierSet, mlflow: MlflowTracking, storage: CxrStorage
) -> dg.Output:
    from cxr_pipeline.vision.evaluate import save_curves
    from cxr_pipeline.vision.fit import curves_of_test_split, metrics_table, test_scores_table

    df = metrics_table(classifier)
    if df.height == 0:
        raise dg.Failure("no classifier partition has been materialized yet")
    show, curves = df.select(METRICS_SHOWN), storage.paths.classifier_curves
    with mlflow.run(context) as run:
        run.log_datasets("classifier-test-scores", {"test": test_scores_table(classifier)}, storage.paths.classifier_metrics)
        run.log_table(show, "classifier_metrics")
        for r in show.filter(pl.col("evaluable")).iter_rows(named=True):
            prefix = ("multilabel." if r["model"] == "multilabel" else "") + slug(r["pathology"])
            prefix += ".radiologist" if r["test_labels"] == "radiologist" else ""
            run.log_metrics({f"{prefix}.roc_auc": r["roc_auc"], f"{prefix}.f1": r["f1"]})
        run.log_artifact(save_curves(curves_of_test_split(classifier, df["slug"].to_list()), curves, "All pathologies, test split"))
    ev = show.filter(pl.col("evaluable") & (pl.col("test_labels") != "radiologist") & (pl.col("model") == "per_pathology"))
    md = {"table": table_metadata(show.with_columns(pl.col(pl.Float64).round(4))), "pathologies": df.height, "evaluable": ev.height}
    md.update(mean_roc_auc=float(ev["roc_auc"].mean()) if ev.height else float("nan"), roc_pr=dg.MetadataValue.path(str(curves)))
    return dg.Output(df, metadata=asset_metadata(run, **md))


@_asset(
    CLASSIFIER_PREDICTIONS,
    [],
    "Per-image probability for each trained pathology (all splits; report generation uses the test split).",
    {"polars", "parquet"},
    ins=ALL_CLASSIFIERS_IN,
)
def classifier_predictions(context: dg.AssetExecutionContext, classifier: ClassifierSet, mlflow: MlflowTracking) -> dg.Output:
    from cxr_pipeline.vision.fit import predictions_table

    wide, done = predictions_table(classifier)
    if wide is None:
        raise dg.Failure("no classifier partition has been materialized yet")
    context.log.info(f"predictions for {wide.height} images x {len(done)} pathologies")
    with mlflow.run(context) as run:
        run.log_metrics({"images": wide.height, "pathologies": len(done)})
    return dg.Output(wide, metadata=asset_metadata(run, pathologies=dg.MetadataValue.json(done)))


CLASSIFIER_ASSETS = [classifier, multilabel_classifier, classifier_metrics, classifier_predictions]
