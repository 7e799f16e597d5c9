"""manifest -> image_shards[p10..p19] + shard_rejects[p10..p19]."""

import dagster as dg
import polars as pl

from cxr_pipeline.config import load
from cxr_pipeline.data.shard_reader import PARTITIONS, Shards, gather, read_index
from cxr_pipeline.data.shards import REJECTS, PartitionBuild, ShardSettings, build_partition_sizes, partition_column
from cxr_pipeline.defs import needs
from cxr_pipeline.defs.history import latest_metadata, upstream_data_version
from cxr_pipeline.defs.keys import IMAGE_SHARDS, MANIFEST, SHARD_REJECTS
from cxr_pipeline.defs.metadata import asset_metadata, inline_png, resolved_metadata, table_metadata
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import MANIFEST_IN, asset_specs, selected_keys
from cxr_pipeline.fields import ConfigError, params
from cxr_pipeline.settings import Paths, paths
from cxr_pipeline.tracking import TrackedRun

SHARDS_CODE_VERSION = "1"
partitions_def = dg.StaticPartitionsDefinition(list(PARTITIONS))


ShardConfig = dagster_config(IMAGE_SHARDS, "ShardConfig")
DEFAULT_SHARD_CPUS = 4  # what a shard step asks a cluster for when pipeline.yaml leaves image_shards.workers null


def requested_workers() -> int:
    """The decode processes a shard step runs, as a cluster pod is sized for them: ``image_shards.workers`` when
    ``pipeline.yaml`` sets it, else ``DEFAULT_SHARD_CPUS`` (the step's auto then finds that many: its CPU
    limit equals its request, ``settings.usable_cpus``)."""

    try:
        return load(paths(), IMAGE_SHARDS).workers or DEFAULT_SHARD_CPUS
    except (ConfigError, OSError, ValueError):  # a broken file fails the run itself, naming it
        return DEFAULT_SHARD_CPUS


def _progress(context: dg.AssetExecutionContext, part: str):
    last = [0]

    def progress(done: int, total: int) -> None:
        if done == total or done - last[0] >= max(100, total // 10):
            last[0] = done
            context.log.info(f"{part}: {done}/{total} images read")

    return progress


@dg.multi_asset(
    specs=asset_specs(
        {
            IMAGE_SHARDS: (
                "The manifest's images of one pNN group, decoded, windowed and letterboxed to uint8 shards (+ index).",
                {"numpy", "parquet"},
            ),
            SHARD_REJECTS: ("Images of the partition that could not be decoded or found: dicom_id, path, reason.", {"parquet"}),
        },
        deps=[MANIFEST],  # read as the ``manifest`` input below
        group="images",
        code_version=SHARDS_CODE_VERSION,
        partitions_def=partitions_def,
    ),
    partitions_def=partitions_def,
    ins={"manifest": MANIFEST_IN},
    can_subset=True,
    op_tags=needs.shards(requested_workers()).tags(),
)
def image_shards(
    context: dg.AssetExecutionContext, manifest: pl.DataFrame, config: ShardConfig, storage: CxrStorage, mlflow: MlflowTracking
):
    part, paths = context.partition_key, storage.paths
    settings: ShardSettings = run_settings(context, paths)  # sizes: every size a consumer's resolved settings read
    items = manifest.filter(partition_column() == part)
    context.log.info(f"{part}: {items.height} manifest images, {settings.workers} decode processes, sizes {settings.sizes} px")
    with mlflow.run(context, {"dagster.data_version": upstream_data_version(context, MANIFEST, is_source=False)}) as run:
        run.log_params({**params(settings), "partition": part})
        built = build_partition_sizes(paths, part, items, settings, progress=_progress(context, part))
        _log_build(context, run, built)
    if IMAGE_SHARDS in selected_keys(context):
        md = {
            **asset_metadata(run, built.folders[min(built.folders)], built.first.index.height, **built.totals()),
            **_shard_metadata(built),
        }
        yield dg.MaterializeResult(
            asset_key=IMAGE_SHARDS, metadata={**md, **resolved_metadata(settings)}, data_version=dg.DataVersion(built.data_version)
        )
    if SHARD_REJECTS in selected_keys(context):
        rejects = built.rejects
        md = asset_metadata(run, built.folders[min(built.folders)] / REJECTS, rejects.height, rejects=table_metadata(rejects))
        yield dg.MaterializeResult(asset_key=SHARD_REJECTS, metadata=md)


def _shard_metadata(built: PartitionBuild) -> dict:
    """The sizes built, what automation compares with the manifest's partition_fingerprints, the contact sheet."""
    md = {"sizes": dg.MetadataValue.json(sorted(built.results)), "manifest_fingerprint": built.fingerprint}
    if built.sheet is not None:
        md["contact_sheet"] = dg.MetadataValue.path(str(built.sheet))
        md["contact_sheet_preview"] = inline_png(built.sheet, "contact sheet")
    return md


def _log_build(context: dg.AssetExecutionContext, run: TrackedRun, built: PartitionBuild) -> None:
    """Each size's counts in MLflow and the log, the contact sheets, the rejects."""
    for size, result in built.results.items():
        st = result.stats
        run.log_metrics({f"s{size}_{k}": v for k, v in st.items()})
        if built.sheets[size] is not None:
            run.log_artifact(built.sheets[size])
        unchanged = int(st["unchanged"] + st["hash_unchanged"])
        context.log.info(f"{built.partition} at {size} px: new {st['decoded']}, unchanged {unchanged}, rejected {st['rejected']}")
    first, sizes = built.first.stats, sorted(built.results)
    context.log.info(f"{built.partition}: {first['files_decoded']} files decoded once for sizes {sizes} in {first['seconds']} s")
    if built.rejects.height:
        run.log_table(built.rejects, "shard_rejects")
        context.log.warning(f"{built.partition}: {built.rejects.height} images rejected (see shard_rejects)")


@dg.asset_check(
    asset=IMAGE_SHARDS,
    blocking=True,
    partitions_def=partitions_def,
    description="Every index row of the partition (at every size built) points inside its shard file, and sampled images are not blank.",
)
def image_shards_readable(context: dg.AssetCheckExecutionContext, storage: CxrStorage) -> dg.AssetCheckResult:
    part, paths = context.partition_key, storage.paths
    # the sizes this partition was just built at: a broken build at another size must not block this one
    sizes = latest_metadata(context.instance, IMAGE_SHARDS, part, "sizes")
    if not sizes:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "partition not materialized"})
    results = [_readable(paths, part, size) for size in sizes]
    return dg.AssetCheckResult(
        passed=all(r["bad_shards"] == [] and r["blank_in_sample"] == 0 for r in results),
        metadata={"sizes": dg.MetadataValue.json(results)},
    )


def _readable(paths: Paths, part: str, size: int) -> dict:
    root = paths.shard_root(size)
    try:
        shards = Shards.open(root, size, [part])
    except (FileNotFoundError, ValueError) as e:  # not built at this size, or built at another: unreadable as this size
        return {"size": size, "images": 0, "bad_shards": [f"{root.name}/{part}: {e}"], "blank_in_sample": 0}
    idx = read_index(shards)
    bad: list[str] = []
    for (shard,), grp in idx.group_by(["shard"]):
        f = shards.folder(part) / shard
        n = f.stat().st_size // (size * size) if f.exists() else 0
        if grp["offset"].max() >= n:
            bad.append(f"{root.name}/{part}/{shard}")
    blank = 0
    if idx.height and not bad:
        imgs = gather(shards, idx.sample(min(64, idx.height), seed=0))
        blank = int((imgs.reshape(len(imgs), -1).std(axis=1) < 1.0).sum())
    return {"size": size, "images": idx.height, "bad_shards": bad, "blank_in_sample": blank}


SHARD_CHECKS = [image_shards_readable]
