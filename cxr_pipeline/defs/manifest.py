"""raw_mimic_cxr -> manifest + manifest_rejects, and the manifest's checks."""

import time

import dagster as dg
import polars as pl

from cxr_pipeline.config import params
from cxr_pipeline.data.mimic import RADIOLOGIST_COLUMNS, DatasetError, ManifestPolicy, build_manifest, label_prevalence
from cxr_pipeline.data.shards import partition_fingerprints
from cxr_pipeline.defs.helpers import (
    asset_metadata,
    dagster_config,
    resolved_metadata,
    run_settings,
    selected_keys,
    table_metadata,
    upstream_data_version,
)
from cxr_pipeline.defs.io import table_digest
from cxr_pipeline.defs.raw import RAW
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.labels import SLUGS

MANIFEST = "manifest"
MANIFEST_REJECTS = "manifest_rejects"
MANIFEST_CODE_VERSION = "1"


ManifestConfig = dagster_config(MANIFEST, "ManifestConfig")


@dg.multi_asset(
    outs={
        MANIFEST: dg.AssetOut(
            description="One row per kept image: ids, path, view, study datetime, official split, the 14 labels (1/0/-1/null) "
            "and the report's FINDINGS / IMPRESSION.",
            kinds={"polars", "parquet"},
            code_version=MANIFEST_CODE_VERSION,
            group_name="manifest",
            is_required=False,  # subsettable: either table may be materialized alone
        ),
        MANIFEST_REJECTS: dg.AssetOut(
            description="Every input row the manifest could not use, with its file, line and reason.",
            kinds={"polars", "parquet"},
            code_version=MANIFEST_CODE_VERSION,
            group_name="manifest",
            is_required=False,  # subsettable: either table may be materialized alone
        ),
    },
    deps=[RAW],
    # Either key may be selected alone: one computation makes both tables, the selected ones are stored.
    can_subset=True,
)
def manifest(context: dg.AssetExecutionContext, config: ManifestConfig, storage: CxrStorage, mlflow: MlflowTracking):
    policy: ManifestPolicy = run_settings(context, storage.paths)
    data_version = upstream_data_version(context, RAW, is_source=True)
    with mlflow.run(context, {"dagster.data_version": data_version}) as run:
        t0 = time.perf_counter()
        try:
            result = build_manifest(storage.paths.raw, policy)
        except DatasetError as e:
            raise dg.Failure(str(e)) from e
        seconds = round(time.perf_counter() - t0, 3)
        prevalence, reasons = label_prevalence(result.manifest), result.reject_reasons()
        _log_manifest(run, policy, result, prevalence, reasons, seconds)
    if result.rejects.height:
        context.log.warning(f"{result.rejects.height} input rows rejected (manifest_rejects)")
    selected = selected_keys(context)
    if MANIFEST in selected:
        md = asset_metadata(run, rows_by_split=dg.MetadataValue.json(result.rows_by_split()), stats=dg.MetadataValue.json(result.stats))
        md.update(label_prevalence=table_metadata(prevalence), raw_data_version=data_version, seconds=seconds, **resolved_metadata(policy))
        # per shard partition: which rows it is built from (automation re-builds only changed ones)
        md["partition_fingerprints"] = dg.MetadataValue.json(partition_fingerprints(result.manifest))
        yield dg.Output(result.manifest, MANIFEST, data_version=dg.DataVersion(table_digest(result.manifest)), metadata=md)
    if MANIFEST_REJECTS in selected:
        md = asset_metadata(run, reasons=table_metadata(reasons))
        yield dg.Output(result.rejects, MANIFEST_REJECTS, data_version=dg.DataVersion(table_digest(result.rejects)), metadata=md)


def _log_manifest(run, policy: ManifestPolicy, result, prevalence: pl.DataFrame, reasons: pl.DataFrame, seconds: float) -> None:
    run.log_params(params(policy))
    run.log_metrics({**result.stats, "seconds": seconds, **result.prevalence_metrics()})
    run.log_table(prevalence, "label_prevalence")
    if reasons.height:
        run.log_table(reasons, "reject_reasons")


@dg.asset_check(asset=MANIFEST, blocking=True, description="Every dicom_id appears once.")
def manifest_unique_dicom_id(manifest: pl.DataFrame) -> dg.AssetCheckResult:
    m = manifest
    dups = m.filter(pl.col("dicom_id").is_duplicated())["dicom_id"].unique().to_list()
    return dg.AssetCheckResult(passed=not dups, metadata={"duplicated": len(dups), "examples": dg.MetadataValue.json(dups[:5])})


@dg.asset_check(asset=MANIFEST, blocking=True, description="No patient appears in two splits (no leakage).")
def manifest_splits_patient_disjoint(manifest: pl.DataFrame) -> dg.AssetCheckResult:
    m = manifest
    multi = m.group_by("subject_id").agg(pl.col("split").n_unique().alias("n")).filter(pl.col("n") > 1)
    return dg.AssetCheckResult(passed=multi.height == 0, metadata={"patients_in_several_splits": multi.height})


@dg.asset_check(asset=MANIFEST, blocking=True, description="Labels are 1, 0, -1 or blank; splits are train/validate/test.")
def manifest_label_domain(manifest: pl.DataFrame) -> dg.AssetCheckResult:
    m = manifest
    bad = {c: int((~m[c].is_in([1, 0, -1]) & m[c].is_not_null()).sum()) for c in (*SLUGS, *RADIOLOGIST_COLUMNS)}
    bad_split = int((~m["split"].is_in(["train", "validate", "test"])).sum())
    n_bad = sum(bad.values()) + bad_split
    return dg.AssetCheckResult(
        passed=n_bad == 0,
        metadata={"bad_label_values": dg.MetadataValue.json({k: v for k, v in bad.items() if v}), "bad_splits": bad_split},
    )


@dg.asset_check(asset=MANIFEST, blocking=True, description="Every referenced image file exists under the dataset root.")
def manifest_files_exist(manifest: pl.DataFrame, storage: CxrStorage) -> dg.AssetCheckResult:
    m = manifest
    root = storage.paths.raw
    missing = [p for p in m["path"].to_list() if not (root / p).is_file()]
    return dg.AssetCheckResult(passed=not missing, metadata={"missing": len(missing), "examples": dg.MetadataValue.json(missing[:5])})


MANIFEST_CHECKS = [manifest_unique_dicom_id, manifest_splits_patient_disjoint, manifest_label_domain, manifest_files_exist]
