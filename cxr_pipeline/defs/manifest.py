"""raw_mimic_cxr -> manifest + manifest_rejects, and the manifest's checks."""

import time

import dagster as dg
import polars as pl

from cxr_pipeline.config import params
from cxr_pipeline.data.io import file_digest, write_parquet
from cxr_pipeline.data.mimic import RADIOLOGIST_COLUMNS, DatasetError, ManifestPolicy, build_manifest, label_prevalence
from cxr_pipeline.data.shards import partition_fingerprints
from cxr_pipeline.defs.helpers import (
    asset_metadata,
    asset_specs,
    dagster_config,
    resolved_metadata,
    run_settings,
    selected_keys,
    table_metadata,
    upstream_data_version,
)
from cxr_pipeline.defs.raw import RAW
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.labels import SLUGS

MANIFEST = "manifest"
MANIFEST_REJECTS = "manifest_rejects"
MANIFEST_CODE_VERSION = "1"


ManifestConfig = dagster_config(MANIFEST, "ManifestConfig")


@dg.multi_asset(
    specs=asset_specs(
        {
            MANIFEST: (
                "One row per kept image: ids, path, view, study datetime, official split, the 14 labels (1/0/-1/null) and the report's FINDINGS / IMPRESSION.",
                {"polars", "parquet"},
            ),
            MANIFEST_REJECTS: ("Every input row the manifest could not use, with its file, line and reason.", {"polars", "parquet"}),
        },
        deps=[RAW],
        group="manifest",
        code_version=MANIFEST_CODE_VERSION,
    ),
    # Selecting either key alone is allowed: both files are always written (one
    # computation makes both), and only the selected keys are reported.
    can_subset=True,
)
def manifest(context: dg.AssetExecutionContext, config: ManifestConfig, storage: CxrStorage, mlflow: MlflowTracking):
    paths = storage.paths
    policy: ManifestPolicy = run_settings(context, paths)
    data_version = upstream_data_version(context, RAW, is_source=True)
    t0 = time.perf_counter()
    with mlflow.run(context, {"dagster.data_version": data_version}) as run:
        try:
            result = build_manifest(paths.raw, policy)
        except DatasetError as e:
            raise dg.Failure(str(e)) from e
        seconds = round(time.perf_counter() - t0, 3)
        mpath = write_parquet(result.manifest, paths.manifest)
        rpath = write_parquet(result.rejects, paths.manifest_rejects)
        prevalence, reasons = label_prevalence(result.manifest), result.reject_reasons()
        run.log_params(params(policy))
        run.log_metrics({**result.stats, "seconds": seconds, **result.prevalence_metrics()})
        run.log_table(prevalence, "label_prevalence")
        if reasons.height:
            run.log_table(reasons, "reject_reasons")
    for k, v in result.stats.items():
        context.log.info(f"{k}: {v}")
    if result.rejects.height:
        context.log.warning(f"{result.rejects.height} input rows rejected; see {rpath}")
    selected = selected_keys(context)
    if MANIFEST in selected:
        md = asset_metadata(
            run,
            mpath,
            result.manifest.height,
            rows_by_split=dg.MetadataValue.json(result.rows_by_split()),
            stats=dg.MetadataValue.json(result.stats),
            label_prevalence=table_metadata(prevalence),
            **resolved_metadata(policy),
            raw_data_version=data_version,
            # per shard partition: which rows it is built from (automation re-builds only changed ones)
            partition_fingerprints=dg.MetadataValue.json(partition_fingerprints(result.manifest)),
            seconds=seconds,
        )
        yield dg.MaterializeResult(asset_key=MANIFEST, data_version=dg.DataVersion(file_digest(mpath)), metadata=md)
    if MANIFEST_REJECTS in selected:
        md = asset_metadata(run, rpath, result.rejects.height, reasons=table_metadata(reasons))
        yield dg.MaterializeResult(asset_key=MANIFEST_REJECTS, data_version=dg.DataVersion(file_digest(rpath)), metadata=md)


def read_manifest(storage: CxrStorage) -> pl.DataFrame:
    p = storage.paths.manifest
    if not p.exists():
        raise dg.Failure(f"{p}: manifest not materialized yet")
    return pl.read_parquet(p)


@dg.asset_check(asset=MANIFEST, blocking=True, description="Every dicom_id appears once.")
def manifest_unique_dicom_id(storage: CxrStorage) -> dg.AssetCheckResult:
    m = read_manifest(storage)
    dups = m.filter(pl.col("dicom_id").is_duplicated())["dicom_id"].unique().to_list()
    return dg.AssetCheckResult(passed=not dups, metadata={"duplicated": len(dups), "examples": dg.MetadataValue.json(dups[:5])})


@dg.asset_check(asset=MANIFEST, blocking=True, description="No patient appears in two splits (no leakage).")
def manifest_splits_patient_disjoint(storage: CxrStorage) -> dg.AssetCheckResult:
    m = read_manifest(storage)
    multi = m.group_by("subject_id").agg(pl.col("split").n_unique().alias("n")).filter(pl.col("n") > 1)
    return dg.AssetCheckResult(passed=multi.height == 0, metadata={"patients_in_several_splits": multi.height})


@dg.asset_check(asset=MANIFEST, blocking=True, description="Labels are 1, 0, -1 or blank; splits are train/validate/test.")
def manifest_label_domain(storage: CxrStorage) -> dg.AssetCheckResult:
    m = read_manifest(storage)
    bad = {c: int((~m[c].is_in([1, 0, -1]) & m[c].is_not_null()).sum()) for c in (*SLUGS, *RADIOLOGIST_COLUMNS)}
    bad_split = int((~m["split"].is_in(["train", "validate", "test"])).sum())
    n_bad = sum(bad.values()) + bad_split
    return dg.AssetCheckResult(
        passed=n_bad == 0,
        metadata={"bad_label_values": dg.MetadataValue.json({k: v for k, v in bad.items() if v}), "bad_splits": bad_split},
    )


@dg.asset_check(asset=MANIFEST, blocking=True, description="Every referenced image file exists under the dataset root.")
def manifest_files_exist(storage: CxrStorage) -> dg.AssetCheckResult:
    m = read_manifest(storage)
    root = storage.paths.raw
    missing = [p for p in m["path"].to_list() if not (root / p).is_file()]
    return dg.AssetCheckResult(passed=not missing, metadata={"missing": len(missing), "examples": dg.MetadataValue.json(missing[:5])})


MANIFEST_CHECKS = [manifest_unique_dicom_id, manifest_splits_patient_disjoint, manifest_label_domain, manifest_files_exist]
