"""External sets (an observable source, partitioned by dataset) + the champions -> external_validation.

The work is in ``data.external`` (reading the label files) and ``vision.external`` (shards, scoring); this module
observes the sets, reads config, calls them, logs to MLflow and returns metadata. A dataset whose folder or label
file is absent is skipped with the reason (its partition materializes an empty table that says why), so the
graph runs where none is present.
"""

import hashlib
import os

import dagster as dg
import polars as pl

from cxr_pipeline.config import resolve
from cxr_pipeline.data.external import FORMAT_NAMES, FORMATS, ExternalSettings
from cxr_pipeline.defs import needs
from cxr_pipeline.defs.io import external_shard_settings, table_schema
from cxr_pipeline.defs.keys import CLASSIFIER, EXTERNAL_DATASETS, EXTERNAL_VALIDATION, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.metadata import asset_metadata, resolved_metadata, table_metadata
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import classifiers_asset, every_partition_of
from cxr_pipeline.fields import params
from cxr_pipeline.files import file_digest, write_parquet
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.vision.checkpoint import MULTILABEL
from cxr_pipeline.vision.external import external_validation as validate
from cxr_pipeline.vision.external import load_champions
from cxr_pipeline.vision.registry import registered_name

EXTERNAL_PARTITIONS = dg.StaticPartitionsDefinition(list(FORMATS))
ExternalValidationConfig = dagster_config(EXTERNAL_VALIDATION, "ExternalValidationConfig")
SHOWN = (
    "model",
    "pathology",
    "n_test",
    "n_pos",
    "roc_auc",
    "roc_auc_lo",
    "roc_auc_hi",
    "roc_auc_change",
    "sensitivity",
    "specificity",
    "ece_after",
)


def dataset_version(cfg: ExternalSettings, fmt: str, home) -> str:
    """A set's data version: its label file's bytes and the listing (path, size) of every file under its folder.
    Images are listed, not hashed (the shard builder's content hash catches a file changed in place)."""
    if cfg.absent_reason(fmt, home):
        return "absent"
    folder, labels = cfg.dataset(fmt, home)
    h = hashlib.sha256(file_digest(labels, 32).encode())
    for top, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            p = os.path.join(top, name)
            h.update(f"{os.path.relpath(p, folder)}:{os.path.getsize(p)}\n".encode())
    return h.hexdigest()[:32]


@dg.observable_source_asset(
    name=EXTERNAL_DATASETS,
    group_name="raw",
    partitions_def=EXTERNAL_PARTITIONS,
    description="The external validation sets (CheXpert, NIH ChestX-ray14, PadChest) where pipeline.yaml's external_validation "
    "section puts them (default $CXR_HOME/external/<dataset>); optional. A partition's data version is its label file's content "
    "and its file listing, so a changed set re-runs its own external validation only.",
)
def external_datasets(context: dg.AssetExecutionContext, storage: CxrStorage) -> dg.DataVersionsByPartition:

    cfg: ExternalSettings = resolve(storage.paths, EXTERNAL_VALIDATION, {})
    versions = {fmt: dataset_version(cfg, fmt, storage.paths.home) for fmt in FORMATS}
    context.log.info("observed external sets: " + ", ".join(f"{k} {v[:12]}" for k, v in versions.items()))
    return dg.DataVersionsByPartition(versions)


@classifiers_asset(
    EXTERNAL_VALIDATION,
    [
        EXTERNAL_DATASETS,
        every_partition_of(CLASSIFIER),
        MULTILABEL_CLASSIFIER,
    ],
    "Every champion classifier (per-finding and multi-label) on another hospital's images, one partition per dataset: AUC with "
    "patient-bootstrap intervals, sensitivity and specificity at the internal validation threshold, calibration error, and the "
    "change of each from the internal test split. Findings a dataset cannot provide are not scored there (data.external).",
    {"polars", "parquet"},
    partitions_def=EXTERNAL_PARTITIONS,
    **needs.CNN.asset_args(),
)
def external_validation(
    context: dg.AssetExecutionContext, config: ExternalValidationConfig, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.MaterializeResult:

    fmt, paths = context.partition_key, storage.paths
    cfg: ExternalSettings = run_settings(context, paths)
    with mlflow.run(context, {"dataset": fmt}) as run:
        run.log_params(params(cfg))
        names = [registered_name(s) for s in SLUGS] + [registered_name(MULTILABEL)]
        champions = load_champions(run.client, mlflow.tracking_uri, names) if not cfg.absent_reason(fmt, paths.home) else []
        shards = external_shard_settings(paths) if champions else None  # an absent set builds nothing: needs none
        result = validate(paths, fmt, cfg, champions, shards=shards, log=context.log.info)
        path = write_parquet(result.table, paths.external_validation / f"{fmt}.parquet")
        if result.skipped:
            run.set_tags({"skipped": result.skipped})
        else:
            run.log_table(result.table, "external_validation")
            run.log_metrics({k: float(v) for k, v in result.counts.items()})
            if result.label_rejects is not None and result.label_rejects.height:
                run.log_table(result.label_rejects.select("source", "record", "reason"), "label_rejects")
    if result.skipped:
        context.log.warning(f"{FORMAT_NAMES[fmt]} skipped: {result.skipped}")
        md = {"reason": result.skipped}
    else:
        shown = result.table.select([c for c in SHOWN if c in result.table.columns]).with_columns(pl.col(pl.Float64).round(3))
        md = {
            "external_validation": table_metadata(shown),
            "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(EXTERNAL_VALIDATION, result.table)),
            **result.counts,
        }
        context.log.info(f"{FORMAT_NAMES[fmt]}: {result.table.height} rows, {result.counts}")
    return dg.MaterializeResult(
        metadata=asset_metadata(run, path, result.table.height, **md, **resolved_metadata(cfg)),
        data_version=dg.DataVersion(file_digest(path)),
    )
