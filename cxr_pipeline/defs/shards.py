"""manifest -> image_shards[p10..p19] + shard_rejects[p10..p19]."""

import hashlib
import os
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.data.io import write_parquet
from cxr_pipeline.data.shards import (
    PARTITIONS,
    ShardSpec,
    build_partition,
    contact_sheet,
    gather,
    partition_column,
    read_index,
    slice_fingerprint,
    write_png,
)
from cxr_pipeline.defs.manifest import MANIFEST, read_manifest
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking, mlflow_metadata, table_metadata, upstream_data_version
from cxr_pipeline.settings import image_size

IMAGE_SHARDS = "image_shards"
SHARD_REJECTS = "shard_rejects"
SHARDS_CODE_VERSION = "1"
partitions_def = dg.StaticPartitionsDefinition(list(PARTITIONS))


def shard_root(storage: CxrStorage, size: int) -> Path:
    return storage.asset_dir("shards", f"s{size}")


class ShardConfig(dg.Config):
    """Image size of the shards (square, letterboxed), shard file size and decode processes."""

    size: int = image_size()  # CXR_IMAGE_SIZE, 224 by default
    images_per_shard: int = 1024
    workers: int = 0  # 0: one per CPU core


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            IMAGE_SHARDS,
            deps=[MANIFEST],
            group_name="images",
            code_version=SHARDS_CODE_VERSION,
            partitions_def=partitions_def,
            description="The manifest's images of one pNN group, decoded, windowed and letterboxed to uint8 shards (+ index).",
            kinds={"numpy", "parquet"},
        ),
        dg.AssetSpec(
            SHARD_REJECTS,
            deps=[MANIFEST],
            group_name="images",
            code_version=SHARDS_CODE_VERSION,
            partitions_def=partitions_def,
            description="Images of the partition that could not be decoded or found: dicom_id, path, reason.",
            kinds={"parquet"},
        ),
    ],
    partitions_def=partitions_def,
    can_subset=True,
)
def image_shards(context: dg.AssetExecutionContext, config: ShardConfig, storage: CxrStorage, mlflow: MlflowTracking):
    part = context.partition_key
    manifest = read_manifest(storage)
    items = manifest.filter(partition_column() == part)
    workers = config.workers or os.cpu_count() or 1
    spec = ShardSpec(size=config.size, images_per_shard=config.images_per_shard, workers=workers)
    root = shard_root(storage, config.size)
    out = root / part
    context.log.info(f"{part}: {items.height} manifest images, {workers} decode processes, {config.size} px")
    last = [0]

    def progress(done: int, total: int) -> None:
        if done == total or done - last[0] >= max(100, total // 10):
            last[0] = done
            context.log.info(f"{part}: {done}/{total} images read")

    with mlflow.run(context, {"dagster.data_version": upstream_data_version(context, MANIFEST, is_source=False)}) as run:
        result = build_partition(storage.paths.raw, out, items, spec, progress=progress)
        st = result.stats
        run.log_params({"size": spec.size, "images_per_shard": spec.images_per_shard, "workers": workers, "partition": part})
        run.log_metrics(st)
        sheet_path = None
        if result.index.height:
            sample = (
                result.index.sample(min(16, result.index.height), seed=0).sort("dicom_id").with_columns(pl.lit(part).alias("partition"))
            )
            sheet = contact_sheet(gather(root, sample, spec.size), ncols=8)
            sheet_path = write_png(sheet, out / "contact_sheet.png")
            run.log_artifact(sheet_path)
        if result.rejects.height:
            run.log_table(result.rejects.select("dicom_id", "path", "reason"), "shard_rejects")
        write_parquet(result.rejects.select("dicom_id", "path", "reason"), out / "shard_rejects.parquet")
        links = mlflow_metadata(run)

    if result.rejects.height:
        context.log.warning(f"{part}: {result.rejects.height} images rejected (see shard_rejects)")
    context.log.info(
        f"{part}: decoded {st['decoded']}, unchanged {st['unchanged'] + st['hash_unchanged']}, rejected {st['rejected']} in {st['seconds']} s"
    )
    selected = {k.to_user_string() for k in context.selected_asset_keys}
    if IMAGE_SHARDS in selected:
        md = {
            "path": dg.MetadataValue.path(str(out)),
            "dagster/row_count": result.index.height,
            "decoded": int(st["decoded"]),
            "unchanged": int(st["unchanged"] + st["hash_unchanged"]),
            "rejected": int(st["rejected"]),
            "shard_files": int(st["shard_files"]),
            "shard_bytes": int(st["shard_bytes"]),
            "images_per_second": float(st["decoded_per_second"]),
            "size": spec.size,
            # what automation compares with the manifest's partition_fingerprints
            "manifest_fingerprint": slice_fingerprint(items),
            **links,
        }
        if sheet_path is not None:
            md["contact_sheet"] = dg.MetadataValue.path(str(sheet_path))
            md["contact_sheet_preview"] = dg.MetadataValue.md(_png_markdown(sheet_path))
        # the data version: what is in the shards, not when they were written
        digest = hashlib.sha256("".join(f"{d}:{h}\n" for d, h in result.index.select("dicom_id", "content_hash").iter_rows()).encode())
        version = dg.DataVersion(f"s{spec.size}-{digest.hexdigest()[:24]}")
        yield dg.MaterializeResult(asset_key=IMAGE_SHARDS, metadata=md, data_version=version)
    if SHARD_REJECTS in selected:
        yield dg.MaterializeResult(
            asset_key=SHARD_REJECTS,
            metadata={
                "path": dg.MetadataValue.path(str(out / "shard_rejects.parquet")),
                "dagster/row_count": result.rejects.height,
                "rejects": table_metadata(result.rejects.select("dicom_id", "path", "reason")),
                **links,
            },
        )


def _png_markdown(path: Path) -> str:
    import base64

    return f"![contact sheet](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"


@dg.asset_check(
    asset=IMAGE_SHARDS,
    blocking=True,
    partitions_def=partitions_def,
    description="Every index row of the partition points inside its shard file, and sampled images are not blank.",
)
def image_shards_readable(context: dg.AssetCheckExecutionContext, storage: CxrStorage) -> dg.AssetCheckResult:
    part = context.partition_key
    bad: list[str] = []
    blank = n_images = 0
    for size_dir in sorted(storage.paths.assets.joinpath("shards").glob("s*")):
        size = int(size_dir.name[1:])
        idx = read_index(size_dir, [part])
        n_images += idx.height
        for (shard,), grp in idx.group_by(["shard"]):
            f = size_dir / part / shard
            n = f.stat().st_size // (size * size) if f.exists() else 0
            if grp["offset"].max() >= n:
                bad.append(f"{size_dir.name}/{part}/{shard}")
        if idx.height and not bad:
            imgs = gather(size_dir, idx.sample(min(64, idx.height), seed=0), size)
            blank += int((imgs.reshape(len(imgs), -1).std(axis=1) < 1.0).sum())
    return dg.AssetCheckResult(
        passed=not bad and blank == 0, metadata={"images": n_images, "bad_shards": dg.MetadataValue.json(bad), "blank_in_sample": blank}
    )


SHARD_CHECKS = [image_shards_readable]
