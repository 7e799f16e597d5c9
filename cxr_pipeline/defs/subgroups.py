"""MIMIC-IV demographics (an observable source) + the classifiers -> subgroup_metrics (who the models fail).

The work is in ``data.demographics`` (reading and joining) and ``vision.subgroups`` (the statistics and
charts); this module observes the source, reads config, logs to MLflow and returns metadata.
"""

import hashlib

import dagster as dg
import polars as pl

from cxr_pipeline.config import params
from cxr_pipeline.data.demographics import ATTRIBUTES, files, missing_reason, per_image, read_demographics
from cxr_pipeline.data.io import write_parquet
from cxr_pipeline.defs.classifier import ALL_CLASSIFIERS_IN, CLASSIFIER_CODE_VERSION, CLASSIFIER_METRICS, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.helpers import (
    asset_factory,
    asset_metadata,
    dagster_config,
    inline_png,
    resolved_metadata,
    run_settings,
    table_metadata,
)
from cxr_pipeline.defs.manifest import MANIFEST
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.settings import ClassifierSet

MIMIC_IV = "mimic_iv_demographics"
SUBGROUP_METRICS = "subgroup_metrics"
TEST_NOTE = (
    "MIMIC-CXR's test split has 293 patients, so most test-split gaps have intervals that include 0; the out-of-fold "
    "view (the multi-label model over the training patients) has many more patients. Cells under min_patients are marked "
    "and show no value."
)


@dg.observable_source_asset(
    name=MIMIC_IV,
    group_name="raw",
    description="MIMIC-IV's hosp/patients.csv.gz and hosp/admissions.csv.gz under CXR_MIMIC_IV_DIR (sex, age, race, insurance); "
    "optional. Its data version is the two files' content, so a change re-runs the subgroup audit only.",
)
def mimic_iv_demographics(context: dg.AssetExecutionContext, storage: CxrStorage) -> dg.ObserveResult:
    root = storage.paths.mimic_iv
    reason = missing_reason(root)
    h = hashlib.sha256()
    for f in files(root) if reason is None else []:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    version = "absent" if reason else h.hexdigest()[:32]
    context.log.info(f"observed {root}: {reason or 'data version ' + version}")
    return dg.ObserveResult(
        data_version=dg.DataVersion(version), metadata={"root": dg.MetadataValue.path(str(root)), "missing": reason or ""}
    )


SubgroupConfig = dagster_config(SUBGROUP_METRICS, "SubgroupConfig")
_asset = asset_factory("classifiers", CLASSIFIER_CODE_VERSION)


def _charts(table: pl.DataFrame, storage: CxrStorage) -> dict:
    from cxr_pipeline.vision.subgroups import gap_chart, underdiagnosis_chart

    folder = storage.paths.subgroups
    out = {a: gap_chart(table, a, folder / f"tpr_gap_{a}.png") for a in ATTRIBUTES}
    out["underdiagnosis"] = underdiagnosis_chart(table, folder / "underdiagnosis.png")
    return out


@_asset(
    SUBGROUP_METRICS,
    [MIMIC_IV, MULTILABEL_CLASSIFIER],
    "Per model, finding and subgroup (sex, age band, race group, insurance; MIMIC-IV): n, prevalence, AUC, TPR and FPR at the "
    "validation-chosen threshold with patient-bootstrap intervals, and the paired gap to the other patients; No Finding's FPR "
    "is underdiagnosis. Test split (both label sources) and out-of-fold training predictions. " + TEST_NOTE,
    {"polars", "parquet"},
    ins={**ALL_CLASSIFIERS_IN, "manifest": dg.AssetIn(MANIFEST), "classifier_metrics": dg.AssetIn(CLASSIFIER_METRICS)},
)
def subgroup_metrics(
    context: dg.AssetExecutionContext,
    classifier: ClassifierSet,
    manifest: pl.DataFrame,
    classifier_metrics: pl.DataFrame,
    config: SubgroupConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
) -> dg.Output:
    from cxr_pipeline.vision.subgroups import COLUMNS, audit, audit_scores, largest_gaps, publishable

    paths = storage.paths
    cfg = run_settings(context, paths)
    reason = missing_reason(paths.mimic_iv)
    with mlflow.run(context) as run:
        run.log_params(params(cfg))
        if reason:  # demographics are optional: the audit says why it is empty, the pipeline runs on
            context.log.warning(f"subgroup audit skipped: {reason}")
            run.set_tags({"skipped": reason})
            empty = pl.DataFrame(schema=COLUMNS)
            return dg.Output(empty, metadata=asset_metadata(run, reason=reason, **resolved_metadata(cfg)))
        demo = read_demographics(paths.mimic_iv)
        people, counts = per_image(manifest, demo.patients)
        write_parquet(demo.rejects, paths.subgroups / "demographics_rejects.parquet")
        table = audit(audit_scores(classifier, classifier_metrics, manifest, people), cfg)
        charts = _charts(table, storage)
        shown = publishable(table)
        run.log_table(shown, "subgroup_metrics")
        if demo.rejects.height:
            run.log_table(demo.rejects.select("source", "line", "reason"), "demographics_rejects")
        run.log_metrics({**counts, "demographics_rejects": demo.rejects.height, "cells": table.height})
        run.log_metrics({"small_cells": int(table["small_cell"].sum())} if table.height else {})
        for png in charts.values():
            run.log_artifact(png)
    gaps = publishable(largest_gaps(table, 8))
    context.log.info(f"subgroup audit: {table.height} cells, {counts}")
    md = {
        "note": TEST_NOTE,
        "largest_gaps": table_metadata(
            gaps.select("view", "labels", "model", "slug", "attribute", "group", "tpr_gap", "tpr_gap_lo", "tpr_gap_hi").with_columns(
                pl.col(pl.Float64).round(3)
            )
        ),
        "demographics_rejects": demo.rejects.height,
        **counts,
        **{f"chart_{k}": inline_png(v, f"subgroup chart {k}") for k, v in charts.items()},
        **resolved_metadata(cfg),
    }
    return dg.Output(table, metadata=asset_metadata(run, **md))
