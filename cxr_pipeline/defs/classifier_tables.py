"""The classifiers' folders -> classifier_metrics and classifier_predictions: the tables every trained model
contributes to (read by ``vision.tables``), tracked in MLflow."""

import dagster as dg
import polars as pl

from cxr_pipeline.defs import needs
from cxr_pipeline.defs.keys import CLASSIFIER_METRICS, CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.metadata import asset_metadata, inline_png, table_metadata
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.defs.specs import ALL_CLASSIFIERS_IN, classifiers_asset
from cxr_pipeline.labels import slug
from cxr_pipeline.vision.calibration import reliability_diagram
from cxr_pipeline.vision.checkpoint import ClassifierSet
from cxr_pipeline.vision.evaluate import save_curves
from cxr_pipeline.vision.tables import curves_of_test_split, metrics_table, predictions_table, reliability_of_test_split, test_scores_table

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
    "calibration",
    "ece_before",
    "ece_after",
    "ece_after_lo",
    "ece_after_hi",
    "brier_before",
    "brier_after",
    "reason",
)


@classifiers_asset(
    CLASSIFIER_METRICS,
    [MULTILABEL_CLASSIFIER],  # its folder is inside the classifiers' (read through the same handle)
    "Model (per-pathology, multi-label) x pathology x accuracy / F1 / sensitivity / specificity / ROC-AUC / AP with 95% bootstrap CIs, "
    "next to the 2024 seeds' AUC.",
    {"polars", "parquet"},
    ins={"classifier": ALL_CLASSIFIERS_IN},
    **needs.TABLE.asset_args(),
)
def classifier_metrics(
    context: dg.AssetExecutionContext, classifier: ClassifierSet, mlflow: MlflowTracking, storage: CxrStorage
) -> dg.Output:

    df = metrics_table(classifier)
    if df.height == 0:
        raise needs.failure("no classifier partition has been materialized yet")
    show, curves = df.select(METRICS_SHOWN), storage.paths.classifier_curves
    with mlflow.run(context) as run:
        run.log_datasets("classifier-test-scores", {"test": test_scores_table(classifier)}, storage.paths.classifier_metrics)
        run.log_table(show, "classifier_metrics")
        for r in show.filter(pl.col("evaluable")).iter_rows(named=True):
            prefix = ("multilabel." if r["model"] == "multilabel" else "") + slug(r["pathology"])
            prefix += ".radiologist" if r["test_labels"] == "radiologist" else ""
            run.log_metrics({f"{prefix}.roc_auc": r["roc_auc"], f"{prefix}.f1": r["f1"]})
            run.log_metrics({f"{prefix}.{m}": r[m] for m in ("ece_before", "ece_after", "brier_before", "brier_after") if r[m] is not None})
        run.log_artifact(save_curves(curves_of_test_split(classifier, df["slug"].to_list()), curves, "All pathologies, test split"))
        reliability = reliability_diagram(
            reliability_of_test_split(classifier, df["slug"].unique(maintain_order=True).to_list()),
            storage.paths.classifier_reliability,
            "Per-finding models, test split: dotted before, solid after calibration",
        )
        if reliability is not None:
            run.log_artifact(reliability)
    ev = show.filter(pl.col("evaluable") & (pl.col("test_labels") != "radiologist") & (pl.col("model") == "per_pathology"))
    md = {"table": table_metadata(show.with_columns(pl.col(pl.Float64).round(4))), "pathologies": df.height, "evaluable": ev.height}
    md.update(mean_roc_auc=float(ev["roc_auc"].mean()) if ev.height else float("nan"), roc_pr=dg.MetadataValue.path(str(curves)))
    if reliability is not None:
        md["reliability"] = inline_png(reliability, "Reliability diagram, test split, before and after calibration")
    return dg.Output(df, metadata=asset_metadata(run, **md))


@classifiers_asset(
    CLASSIFIER_PREDICTIONS,
    [],
    "Per-image probability for each trained pathology (all splits; report generation uses the test split).",
    {"polars", "parquet"},
    ins={"classifier": ALL_CLASSIFIERS_IN},
    **needs.TABLE.asset_args(),
)
def classifier_predictions(context: dg.AssetExecutionContext, classifier: ClassifierSet, mlflow: MlflowTracking) -> dg.Output:

    wide, done = predictions_table(classifier)
    if wide is None:
        raise needs.failure("no classifier partition has been materialized yet")
    context.log.info(f"predictions for {wide.height} images x {len(done)} pathologies")
    with mlflow.run(context) as run:
        run.log_metrics({"images": wide.height, "pathologies": len(done)})
    return dg.Output(wide, metadata=asset_metadata(run, pathologies=dg.MetadataValue.json(done)))
