"""raw_mimic_cxr -> manifest + manifest_rejects, and the manifest's checks."""

import dagster as dg
import polars as pl

from cxr_pipeline.data.csvs import DatasetError
from cxr_pipeline.data.mimic import RADIOLOGIST_COLUMNS, ManifestPolicy, ManifestResult, build_manifest
from cxr_pipeline.data.shards import partition_fingerprints
from cxr_pipeline.defs import needs
from cxr_pipeline.defs.history import upstream_data_version
from cxr_pipeline.defs.io import write_table
from cxr_pipeline.defs.keys import MANIFEST, MANIFEST_REJECTS, RAW
from cxr_pipeline.defs.metadata import asset_metadata, materialized, resolved_metadata, table_metadata
from cxr_pipeline.defs.needs import failure
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import asset_specs
from cxr_pipeline.fields import params
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.tracking import TrackedRun

MANIFEST_CODE_VERSION = "1"
# how the manifest's consumers read it: the table the manifest step wrote (defs.io.TableIOManager)


ManifestConfig = dagster_config(MANIFEST, "ManifestConfig")


@dg.multi_asset(
    specs=asset_specs(
        {
            MANIFEST: (
                "One row per kept image: ids, path, view, study datetime, official split, the 14 labels (1/0/-1/null) "
                "and the report's FINDINGS / IMPRESSION.",
                {"polars", "parquet"},
            ),
            MANIFEST_REJECTS: ("Every input row the manifest could not use, with its file, line and reason.", {"polars", "parquet"}),
        },
        deps=[RAW],
        group="manifest",
        code_version=MANIFEST_CODE_VERSION,
    ),
    # Either key may be selected (a catalog page's Materialize button, ``--select manifest``): one build
    # makes both tables and both are written and recorded, so a manifest never stands beside stale rejects.
    can_subset=True,
    op_tags=needs.MANIFEST.tags(),
)
def manifest(context: dg.AssetExecutionContext, config: ManifestConfig, storage: CxrStorage, mlflow: MlflowTracking):
    policy: ManifestPolicy = run_settings(context, storage.paths)
    data_version = upstream_data_version(context, RAW, is_source=True)
    with mlflow.run(context, {"dagster.data_version": data_version}) as run:
        try:
            result = build_manifest(storage.paths.raw, policy)
        except DatasetError as e:
            raise failure(str(e)) from e
        _log_manifest(run, policy, result)
    if result.rejects.height:
        context.log.warning(f"{result.rejects.height} input rows rejected (manifest_rejects)")
    for key, (table, md) in _tables(run, policy, result, data_version).items():
        written = write_table(storage.paths, key, table)
        yield from materialized(context, key, {**written.metadata, **md}, written.data_version)


def _tables(run: TrackedRun, policy: ManifestPolicy, result: ManifestResult, raw_version: str) -> dict[str, tuple[pl.DataFrame, dict]]:
    """Both tables with what each one's materialization records."""
    md = asset_metadata(run, rows_by_split=dg.MetadataValue.json(result.rows_by_split()), stats=dg.MetadataValue.json(result.stats))
    md.update(label_prevalence=table_metadata(result.prevalence), raw_data_version=raw_version, seconds=result.seconds)
    # per shard partition: which rows it is built from (automation re-builds only changed ones)
    md.update(partition_fingerprints=dg.MetadataValue.json(partition_fingerprints(result.manifest)), **resolved_metadata(policy))
    rejects_md = asset_metadata(run, reasons=table_metadata(result.reject_reasons()))
    return {MANIFEST: (result.manifest, md), MANIFEST_REJECTS: (result.rejects, rejects_md)}


def _log_manifest(run: TrackedRun, policy: ManifestPolicy, result: ManifestResult) -> None:
    run.log_params(params(policy))
    run.log_metrics({**result.stats, "seconds": result.seconds, **result.prevalence_metrics()})
    run.log_table(result.prevalence, "label_prevalence")
    reasons = result.reject_reasons()
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
