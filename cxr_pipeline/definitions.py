"""The one Definitions object: assets, checks, resources, jobs.

Loaded by ``workspace.yaml``, ``make ui`` and
``dagster asset materialize -m cxr_pipeline.definitions --select ...``.
Resources read ``CXR_HOME`` / ``CXR_RAW_DIR`` / ``MLFLOW_TRACKING_URI`` when
the definitions are built; ``build_defs()`` builds them again (tests do, after
pointing those variables at a temporary directory).
"""

from __future__ import annotations

import dagster as dg

from cxr_pipeline import settings  # noqa: F401  (sets the no-telemetry / offline defaults first)
from cxr_pipeline.defs.automation import schedules_and_sensors, with_automation
from cxr_pipeline.defs.classifier import classifier
from cxr_pipeline.defs.classifier_tables import classifier_metrics, classifier_predictions
from cxr_pipeline.defs.drift import DRIFT_WINDOWS, drift_windows, image_drift, image_drift_alarm
from cxr_pipeline.defs.external import EXTERNAL_PARTITIONS, external_datasets, external_validation
from cxr_pipeline.defs.io import HandleLoader, TableIOManager
from cxr_pipeline.defs.keys import (
    CLASSIFIER,
    CLASSIFIER_METRICS,
    CLASSIFIER_PREDICTIONS,
    EXTERNAL_DATASETS,
    EXTERNAL_VALIDATION,
    GENERATED_REPORTS,
    IMAGE_DRIFT,
    IMAGE_SHARDS,
    LOCALIZATION_METRICS,
    MANIFEST,
    MANIFEST_REJECTS,
    MIMIC_IV,
    MULTILABEL_CLASSIFIER,
    RAW,
    REPORT_ADAPTER,
    REPORT_HINTS,
    REPORT_METRICS,
    REPORT_PAIRS,
    SHARD_REJECTS,
    SUBGROUP_METRICS,
)
from cxr_pipeline.defs.localization import localization_metrics
from cxr_pipeline.defs.manifest import MANIFEST_CHECKS, manifest
from cxr_pipeline.defs.multilabel import multilabel_classifier, report_hints
from cxr_pipeline.defs.pacs import pacs_intake_sensor, pacs_results
from cxr_pipeline.defs.raw import raw_mimic_cxr
from cxr_pipeline.defs.reports import REPORT_ASSETS
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import with_config_versions
from cxr_pipeline.defs.shards import SHARD_CHECKS, image_shards
from cxr_pipeline.defs.slots import dead_run_sensor, release_on_load
from cxr_pipeline.defs.subgroups import mimic_iv_demographics, subgroup_metrics
from cxr_pipeline.settings import ENVIRONMENT, env, paths

# name: (assets, partitions, description)
JOBS = {
    "observe_raw": ([RAW, MIMIC_IV], None, "Observe the raw dataset's and the MIMIC-IV demographics' data versions."),
    "manifest_job": ([MANIFEST, MANIFEST_REJECTS], None, "raw -> manifest (+ rejects) and its checks."),
    "shards_job": (
        [IMAGE_SHARDS, SHARD_REJECTS],
        image_shards.partitions_def,
        "One pNN partition of the image shards (run it per partition or as a backfill).",
    ),
    "classifier_job": (
        [CLASSIFIER],
        classifier.partitions_def,
        "Train and evaluate one pathology's classifier (one partition per CheXpert label).",
    ),
    "classifier_summary_job": (
        [MULTILABEL_CLASSIFIER, REPORT_HINTS, CLASSIFIER_METRICS, CLASSIFIER_PREDICTIONS, SUBGROUP_METRICS],
        None,
        "The multi-label model and its report hints, then the metrics table (per-pathology and multi-label), the predictions "
        "table and the subgroup audit.",
    ),
    "observe_external": (
        [EXTERNAL_DATASETS],
        EXTERNAL_PARTITIONS,
        "Observe the external validation sets' data versions (one partition per dataset; absent ones are versioned 'absent').",
    ),
    "external_job": (
        [EXTERNAL_VALIDATION],
        EXTERNAL_PARTITIONS,
        "Score every champion classifier on one external set (one partition per dataset: chexpert, nih, padchest).",
    ),
    "drift_job": ([IMAGE_DRIFT], DRIFT_WINDOWS, "One window of new images against the training images (a partition per window)."),
    "localization_job": (
        [LOCALIZATION_METRICS],
        None,
        "Score where every champion's Grad-CAM points against the boxes (internal test split; the NIH-format set's boxes "
        "when external_validation has scored it).",
    ),
    "report_job": (
        [REPORT_PAIRS, REPORT_ADAPTER, GENERATED_REPORTS, REPORT_METRICS],
        None,
        "The report branch: pairs, QLoRA adapter, generated reports with baselines, report metrics.",
    ),
}
jobs = {
    name: dg.define_asset_job(name, selection=dg.AssetSelection.assets(*keys), partitions_def=parts, description=description)
    for name, (keys, parts, description) in JOBS.items()
}


def _executor():
    """CXR_EXECUTOR: ``k8s`` runs every step in its own Kubernetes pod (dagster-k8s); ``ray`` submits every step as
    a Ray job to the cluster at ``RAY_ADDRESS`` (dagster-ray), which places it on a node with what the asset
    asks for (``defs.needs``); ``in_process`` runs a run's steps in the run's own process (small machines: no
    process start per step); unset: Dagster's multiprocess executor."""
    kind = env("CXR_EXECUTOR")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if kind == "ray":
        from dagster_ray import ray_executor

        # a step runs in a Ray job on any node: it gets the deployment's variables (those set where the run starts)
        passed = [*ENVIRONMENT, "DAGSTER_HOME", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"]
        return ray_executor.configured({"ray": {"address": {"env": "RAY_ADDRESS"}, "env_vars": passed}})
    if kind == "in_process":
        return dg.in_process_executor
    return None


ASSETS = [manifest, image_shards, classifier, multilabel_classifier, report_hints, classifier_metrics, classifier_predictions]


def build_defs() -> dg.Definitions:
    schedules, sensors = schedules_and_sensors(jobs["observe_raw"], jobs["manifest_job"], jobs["observe_external"])
    storage = CxrStorage.from_env()
    return dg.Definitions(
        executor=_executor(),
        # code versions carry each asset's pipeline.yaml section digest: the UI shows whose configuration changed
        assets=[
            raw_mimic_cxr,
            mimic_iv_demographics,
            external_datasets,
            pacs_results,
            *with_config_versions(
                with_automation([*ASSETS, subgroup_metrics, external_validation, localization_metrics, image_drift, *REPORT_ASSETS]),
                paths(),
            ),
        ],
        schedules=schedules,
        sensors=[*sensors, dead_run_sensor, pacs_intake_sensor(), drift_windows],
        asset_checks=[*MANIFEST_CHECKS, *SHARD_CHECKS, image_drift_alarm],
        jobs=list(jobs.values()),
        resources={
            "storage": storage,
            "mlflow": MlflowTracking.from_env(),
            "compute": Compute(),
            "io_manager": TableIOManager(storage=storage),  # tables between assets (defs.io)
            "handles": HandleLoader(storage=storage),  # handles to the files of the file assets
        },
    )


defs = build_defs()
release_on_load()  # a run killed mid-step must not hold its GPU slot for good (defs.slots)
