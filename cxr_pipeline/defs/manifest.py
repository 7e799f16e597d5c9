"""raw_mimic_cxr -> manifest + manifest_rejects, and the manifest's checks."""

import time
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.data.io import file_digest, write_parquet
from cxr_pipeline.data.mimic import LABEL_COLUMNS, DatasetError, ManifestPolicy, build_manifest, label_prevalence
from cxr_pipeline.data.shards import partition_fingerprints
from cxr_pipeline.defs.raw import RAW
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking, mlflow_metadata, table_metadata, upstream_data_version
from cxr_pipeline.labels import LABELS

MANIFEST = "manifest"
MANIFEST_REJECTS = "manifest_rejects"
MANIFEST_CODE_VERSION = "1"


def manifest_path(storage: CxrStorage) -> Path:
    return storage.asset_dir("manifest") / "manifest.parquet"


def rejects_path(storage: CxrStorage) -> Path:
    return storage.asset_dir("manifest") / "manifest_rejects.parquet"


class ManifestConfig(dg.Config):
    """Which images the manifest keeps (defaults: the 2024 seeds' policy)."""

    views: list[str] = ["PA"]
    label_source: str = "chexpert"
    one_image_per_subject: bool = True
    radiologist_test_labels: bool = True
    check_files: bool = True

    def policy(self) -> ManifestPolicy:
        return ManifestPolicy(
            views=tuple(self.views),
            label_source=self.label_source,
            one_image_per_subject=self.one_image_per_subject,
            radiologist_test_labels=self.radiologist_test_labels,
            check_files=self.check_files,
        )


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            MANIFEST,
            deps=[RAW],
            group_name="manifest",
            code_version=MANIFEST_CODE_VERSION,
            description="One row per kept image: ids, path, view, study datetime, official split, the 14 labels (1/0/-1/null) and the report's FINDINGS / IMPRESSION.",
            kinds={"polars", "parquet"},
        ),
        dg.AssetSpec(
            MANIFEST_REJECTS,
            deps=[RAW],
            group_name="manifest",
            code_version=MANIFEST_CODE_VERSION,
            description="Every input row the manifest could not use, with its file, line and reason.",
            kinds={"polars", "parquet"},
        ),
    ],
    # Selecting either key alone is allowed: both files are always written (one
    # computation makes both), and only the selected keys are reported.
    can_subset=True,
)
def manifest(context: dg.AssetExecutionContext, config: ManifestConfig, storage: CxrStorage, mlflow: MlflowTracking):
    root = storage.paths.raw
    data_version = upstream_data_version(context, RAW, is_source=True)
    policy = config.policy()
    t0 = time.perf_counter()
    with mlflow.run(context, {"dagster.data_version": data_version}) as run:
        try:
            result = build_manifest(root, policy)
        except DatasetError as e:
            raise dg.Failure(str(e)) from e
        seconds = time.perf_counter() - t0
        mpath = write_parquet(result.manifest, manifest_path(storage))
        rpath = write_parquet(result.rejects, rejects_path(storage))
        prevalence = label_prevalence(result.manifest)
        reasons = (
            result.rejects.group_by("reason").len().sort("len", descending=True)
            if result.rejects.height
            else pl.DataFrame({"reason": [], "len": []})
        )

        run.log_params(
            {
                "views": ",".join(policy.views) or "all",
                "label_source": policy.label_source,
                "one_image_per_subject": policy.one_image_per_subject,
                "radiologist_test_labels": policy.radiologist_test_labels,
                "check_files": policy.check_files,
            }
        )
        run.log_metrics({**{k: v for k, v in result.stats.items()}, "seconds": seconds})
        run.log_metrics(
            {f"prevalence.{lab}": (result.manifest[col] == 1).mean() or 0.0 for lab, col in zip(LABELS, LABEL_COLUMNS, strict=True)}
            if result.manifest.height
            else {}
        )
        run.log_table(prevalence, "label_prevalence")
        if reasons.height:
            run.log_table(reasons, "reject_reasons")
        links = mlflow_metadata(run)

    for k, v in result.stats.items():
        context.log.info(f"{k}: {v}")
    if result.rejects.height:
        context.log.warning(f"{result.rejects.height} input rows rejected; see {rpath}")
    selected = {k.to_user_string() for k in context.selected_asset_keys}
    if MANIFEST in selected:
        yield dg.MaterializeResult(
            asset_key=MANIFEST,
            data_version=dg.DataVersion(file_digest(mpath)),
            metadata={
                "path": dg.MetadataValue.path(str(mpath)),
                "dagster/row_count": result.manifest.height,
                "rows_by_split": dg.MetadataValue.json({s: result.stats.get(f"rows_{s}", 0) for s in ("train", "validate", "test")}),
                "stats": dg.MetadataValue.json(result.stats),
                "label_prevalence": table_metadata(prevalence),
                "policy": dg.MetadataValue.json(config.model_dump()),
                "raw_data_version": data_version,
                # per shard partition: which rows it is built from (automation re-builds only changed ones)
                "partition_fingerprints": dg.MetadataValue.json(partition_fingerprints(result.manifest)),
                "seconds": round(seconds, 3),
                **links,
            },
        )
    if MANIFEST_REJECTS in selected:
        yield dg.MaterializeResult(
            asset_key=MANIFEST_REJECTS,
            data_version=dg.DataVersion(file_digest(rpath)),
            metadata={
                "path": dg.MetadataValue.path(str(rpath)),
                "dagster/row_count": result.rejects.height,
                "reasons": table_metadata(reasons),
                **links,
            },
        )


def read_manifest(storage: CxrStorage) -> pl.DataFrame:
    p = manifest_path(storage)
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
    bad = {c: int((~m[c].is_in([1, 0, -1]) & m[c].is_not_null()).sum()) for c in LABEL_COLUMNS}
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
