"""MIMIC-IV demographics (an observable source) + the classifiers -> subgroup_metrics (who the models fail).

The work is in ``data.demographics`` (reading and joining) and ``vision.subgroups`` (the audit, its statistics and
charts); this module observes the source, reads config, calls the audit, logs to MLflow and returns metadata.
"""

import hashlib

import dagster as dg
import polars as pl

from cxr_pipeline.data.demographics import files, missing_reason
from cxr_pipeline.defs import needs
from cxr_pipeline.defs.keys import CLASSIFIER_METRICS, MIMIC_IV, MULTILABEL_CLASSIFIER, REPORT_HINTS, SUBGROUP_METRICS
from cxr_pipeline.defs.metadata import asset_metadata, inline_png, resolved_metadata, table_metadata
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import ALL_CLASSIFIERS_IN, MANIFEST_IN, classifiers_asset
from cxr_pipeline.fields import params
from cxr_pipeline.tracking import TrackedRun
from cxr_pipeline.vision.checkpoint import MULTILABEL, ClassifierSet, read_model_card, write_model_card
from cxr_pipeline.vision.model_card import with_subgroups
from cxr_pipeline.vision.subgroups import largest_gaps, publishable, subgroup_audit

TEST_NOTE = (
    "MIMIC-CXR's test split has 293 patients, so most test-split gaps have intervals that include 0; the out-of-fold "
    "view (the five fold models of the multi-label recipe over the training patients, each at its own threshold, AUC "
    "pooled) has many more patients. Groups under min_patients (unknown included: 'not recorded') are pooled, decided "
    "once per view so that no difference of published numbers isolates a smaller group (checked by a linear attacker: "
    "recoverable_small_groups); counts are each group's in the view and label source; q: Benjamini-Hochberg within each "
    "panel (view, label source, model), p against random groups with as many patients with the finding."
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


@classifiers_asset(
    SUBGROUP_METRICS,
    [MIMIC_IV, MULTILABEL_CLASSIFIER],
    "Per model, finding and subgroup (sex, age band, race group, insurance; MIMIC-IV): n, prevalence, AUC, TPR and FPR at the "
    "validation-chosen threshold with patient-bootstrap intervals, and the paired gap to the other patients; No Finding's FPR "
    "is underdiagnosis. Test split (both label sources) and out-of-fold training predictions. " + TEST_NOTE,
    {"polars", "parquet"},
    ins={
        "classifier": ALL_CLASSIFIERS_IN,
        "manifest": MANIFEST_IN,
        "classifier_metrics": dg.AssetIn(CLASSIFIER_METRICS),
        "report_hints": dg.AssetIn(REPORT_HINTS),
    },
    **needs.TABLE.asset_args(),
)
def subgroup_metrics(
    context: dg.AssetExecutionContext,
    classifier: ClassifierSet,
    manifest: pl.DataFrame,
    classifier_metrics: pl.DataFrame,
    report_hints: pl.DataFrame,
    config: SubgroupConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
) -> dg.Output:

    paths = storage.paths
    cfg = run_settings(context, paths)
    result = subgroup_audit(classifier, classifier_metrics, manifest, report_hints, paths.mimic_iv, cfg, paths.subgroups)
    if result.recovered is not None and result.recovered.height:  # nothing leaves the machine: a disclosure bug
        raise RuntimeError(
            f"subgroup_metrics: {result.recovered.height} groups under {cfg.min_patients} patients are recoverable from the "
            f"publishable table, e.g. {result.recovered.row(0, named=True)['group']}; nothing was published"
        )
    with mlflow.run(context) as run:
        run.log_params(params(cfg))
        _log_audit(run, result)
        cards = _add_to_model_cards(run, classifier, classifier_metrics, result)
    context.log.info(f"subgroup gaps added to {len(cards)} model cards: {', '.join(cards) or '-'}")
    if result.skipped:  # demographics are optional: the audit says why it is empty, the pipeline runs on
        context.log.warning(f"subgroup audit skipped: {result.skipped}")
        return dg.Output(result.table, metadata=asset_metadata(run, reason=result.skipped, **resolved_metadata(cfg)))
    context.log.info(f"subgroup audit: {result.table.height} cells, {result.counts}")
    return dg.Output(result.table, metadata=asset_metadata(run, **_audit_metadata(result), **resolved_metadata(cfg)))


def _log_audit(run: TrackedRun, result) -> None:
    """What leaves the machine for MLflow: the publishable table (small groups pooled), counts, charts."""

    if result.skipped:
        run.set_tags({"skipped": result.skipped})
        return
    run.log_table(publishable(result.table), "subgroup_metrics")
    if result.rejects.height:
        run.log_table(result.rejects.select("source", "line", "reason"), "demographics_rejects")
    run.log_metrics({**result.counts, "demographics_rejects": result.rejects.height, "cells": result.table.height})
    if result.table.height:
        run.log_metrics({"small_cells": result.small_cells, "pooled_rows": int(result.table["pooled"].sum())})
    for png in result.charts.values():
        run.log_artifact(png)


def _add_to_model_cards(run: TrackedRun, classifiers: ClassifierSet, metrics: pl.DataFrame, result) -> list[str]:
    """Each trained model's card (``vision.model_card.with_subgroups``) gains its publishable gaps on the test split
    (or the reason the audit was skipped), re-published as its registered version's artifacts and description
    (``vision.checkpoint.write_model_card``). Returns the versions updated (``name vN``)."""

    table = publishable(result.table) if result.table.height else result.table
    done = []
    for model, folder in [(MULTILABEL, MULTILABEL), *(("per_pathology", s) for s in metrics["slug"].unique().sort().to_list())]:
        files = classifiers.classifier(folder)
        kept = read_model_card(files)
        if kept is None:
            continue
        mine = table.filter((pl.col("view") == "test") & (pl.col("model") == model)) if table.height else table
        if model != MULTILABEL and mine.height:
            mine = mine.filter(pl.col("slug") == folder)
        md, card = with_subgroups(kept["card"], mine, run.run_id, result.skipped)
        write_model_card(run.client, kept["name"], kept["version"], kept["run_id"], md, card, files)
        done.append(f"{kept['name']} v{kept['version']}")
    return done


def _audit_metadata(result) -> dict:

    gaps = publishable(largest_gaps(result.table, 8))
    shown = gaps.select("view", "labels", "model", "slug", "attribute", "group", "tpr_gap", "tpr_gap_lo", "tpr_gap_hi", "tpr_gap_q")
    md = {"note": TEST_NOTE, "largest_gaps": table_metadata(shown.with_columns(pl.col(pl.Float64).round(3)))}
    md.update(demographics_rejects=result.rejects.height, **result.counts)
    md["recoverable_small_groups"] = 0 if result.recovered is None else result.recovered.height
    return {**md, **{f"chart_{k}": inline_png(v, f"subgroup chart {k}") for k, v in result.charts.items()}}
