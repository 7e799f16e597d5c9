"""manifest -> image_shards[p10..p19] + shard_rejects[p10..p19]."""

import base64
import os
from pathlib import Path

import dagster as dg

from cxr_pipeline.data.shards import (
    PARTITIONS,
    REJECTS,
    ShardSpec,
    build_partition,
    data_version,
    gather,
    partition_column,
    read_index,
    slice_fingerprint,
    write_contact_sheet,
)
from cxr_pipeline.defs.helpers import (
    asset_metadata,
    asset_specs,
    effective_config,
    latest_metadata,
    selected_keys,
    shard_size,
    table_metadata,
    upstream_data_version,
)
from cxr_pipeline.defs.manifest import MANIFEST, read_manifest
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking

IMAGE_SHARDS = "image_shards"
SHARD_REJECTS = "shard_rejects"
SHARDS_CODE_VERSION = "1"
partitions_def = dg.StaticPartitionsDefinition(list(PARTITIONS))


class ShardConfig(dg.Config):
    """Image size of the shards (square, letterboxed), shard file size and decode processes."""

    size: int = 0  # 0: CXR_IMAGE_SIZE (224), read when the run starts
    images_per_shard: int = 1024
    workers: int = 0  # 0: one per CPU core


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
        deps=[MANIFEST],
        group="images",
        code_version=SHARDS_CODE_VERSION,
        partitions_def=partitions_def,
    ),
    partitions_def=partitions_def,
    can_subset=True,
)
def image_shards(context: dg.AssetExecutionContext, config: ShardConfig, storage: CxrStorage, mlflow: MlflowTracking):
    part, paths = context.partition_key, storage.paths
    config = effective_config(context, config, paths)
    items = read_manifest(storage).filter(partition_column() == part)
    spec = ShardSpec(size=shard_size(config.size), images_per_shard=config.images_per_shard, workers=config.workers or os.cpu_count() or 1)
    root, out = paths.shard_root(spec.size), paths.shard_partition(spec.size, part)
    context.log.info(f"{part}: {items.height} manifest images, {spec.workers} decode processes, {spec.size} px")
    with mlflow.run(context, {"dagster.data_version": upstream_data_version(context, MANIFEST, is_source=False)}) as run:
        result = build_partition(paths.raw, out, items, spec, progress=_progress(context, part))
        st, rejects = result.stats, result.rejects.select("dicom_id", "path", "reason")
        run.log_params({"size": spec.size, "images_per_shard": spec.images_per_shard, "workers": spec.workers, "partition": part})
        run.log_metrics(st)
        sheet = write_contact_sheet(root, result.index, part, spec.size)
        if sheet is not None:
            run.log_artifact(sheet)
        if rejects.height:
            run.log_table(rejects, "shard_rejects")
            context.log.warning(f"{part}: {rejects.height} images rejected (see shard_rejects)")
    unchanged = int(st["unchanged"] + st["hash_unchanged"])
    context.log.info(f"{part}: decoded {st['decoded']}, unchanged {unchanged}, rejected {st['rejected']} in {st['seconds']} s")
    if IMAGE_SHARDS in selected_keys(context):
        md = asset_metadata(
            run,
            out,
            result.index.height,
            decoded=int(st["decoded"]),
            unchanged=unchanged,
            rejected=int(st["rejected"]),
            shard_files=int(st["shard_files"]),
            shard_bytes=int(st["shard_bytes"]),
            images_per_second=float(st["decoded_per_second"]),
            size=spec.size,
            manifest_fingerprint=slice_fingerprint(items),  # what automation compares with the manifest's partition_fingerprints
        )
        if sheet is not None:
            md["contact_sheet"] = dg.MetadataValue.path(str(sheet))
            md["contact_sheet_preview"] = dg.MetadataValue.md(_png_markdown(sheet))
        yield dg.MaterializeResult(asset_key=IMAGE_SHARDS, metadata=md, data_version=dg.DataVersion(data_version(result.index, spec.size)))
    if SHARD_REJECTS in selected_keys(context):
        md = asset_metadata(run, out / REJECTS, rejects.height, rejects=table_metadata(rejects))
        yield dg.MaterializeResult(asset_key=SHARD_REJECTS, metadata=md)


def _png_markdown(path: Path) -> str:
    return f"![contact sheet](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


@dg.asset_check(
    asset=IMAGE_SHARDS,
    blocking=True,
    partitions_def=partitions_def,
    description="Every index row of the partition (at the size just built) points inside its shard file, and sampled images are not blank.",
)
def image_shards_readable(context: dg.AssetCheckExecutionContext, storage: CxrStorage) -> dg.AssetCheckResult:
    part = context.partition_key
    size = latest_metadata(context.instance, IMAGE_SHARDS, part, "size")  # the size this partition was just built at
    if size is None:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "partition not materialized"})
    root = storage.paths.shard_root(size)
    idx = read_index(root, [part])
    bad: list[str] = []
    for (shard,), grp in idx.group_by(["shard"]):
        f = root / part / shard
        n = f.stat().st_size // (size * size) if f.exists() else 0
        if grp["offset"].max() >= n:
            bad.append(f"{root.name}/{part}/{shard}")
    blank = 0
    if idx.height and not bad:
        imgs = gather(root, idx.sample(min(64, idx.height), seed=0), size)
        blank = int((imgs.reshape(len(imgs), -1).std(axis=1) < 1.0).sum())
    return dg.AssetCheckResult(
        passed=not bad and blank == 0,
        metadata={"size": size, "images": idx.height, "bad_shards": dg.MetadataValue.json(bad), "blank_in_sample": blank},
    )


SHARD_CHECKS = [image_shards_readable]
