"""manifest -> image_shards[p10..p19] + shard_rejects[p10..p19]."""

from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.config import params
from cxr_pipeline.data.shards import (
    PARTITIONS,
    REJECTS,
    ShardSettings,
    build_sizes,
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
    dagster_config,
    inline_png,
    latest_metadata,
    resolved_metadata,
    run_settings,
    selected_keys,
    table_metadata,
    upstream_data_version,
)
from cxr_pipeline.defs.manifest import MANIFEST
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking

IMAGE_SHARDS = "image_shards"
SHARD_REJECTS = "shard_rejects"
SHARDS_CODE_VERSION = "1"
partitions_def = dg.StaticPartitionsDefinition(list(PARTITIONS))


ShardConfig = dagster_config(IMAGE_SHARDS, "ShardConfig")


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
    ins={"manifest": dg.AssetIn(MANIFEST)},
    can_subset=True,
)
def image_shards(
    context: dg.AssetExecutionContext, manifest: pl.DataFrame, config: ShardConfig, storage: CxrStorage, mlflow: MlflowTracking
):
    part, paths = context.partition_key, storage.paths
    settings: ShardSettings = run_settings(context, paths)  # sizes: what the consumers' resolved settings read
    items = manifest.filter(partition_column() == part)
    sizes = settings.sizes
    out = paths.shard_partition(sizes[0], part)  # where the index and rejects of the first size live
    context.log.info(f"{part}: {items.height} manifest images, {settings.workers} decode processes, sizes {sizes} px")
    with mlflow.run(context, {"dagster.data_version": upstream_data_version(context, MANIFEST, is_source=False)}) as run:
        run.log_params({**params(settings), "partition": part})
        built = _build(context, run, paths, part, items, settings)
        result, sheet = built[sizes[0]][0], built[sizes[-1]][1]
        rejects = result.rejects.select("dicom_id", "path", "reason")  # a file that cannot be decoded fails at every size
        if rejects.height:
            run.log_table(rejects, "shard_rejects")
            context.log.warning(f"{part}: {rejects.height} images rejected (see shard_rejects)")
    stats = [b[0].stats for b in built.values()]
    total = {k: sum(float(st[k]) for st in stats) for k in ("decoded", "unchanged", "hash_unchanged", "shard_files", "shard_bytes")}
    decode_pass = result.stats  # one decode pass served every size: its files and seconds are shared
    if IMAGE_SHARDS in selected_keys(context):
        md = asset_metadata(
            run,
            out,
            result.index.height,
            decoded=int(total["decoded"]),
            unchanged=int(total["unchanged"] + total["hash_unchanged"]),
            rejected=int(result.stats["rejected"]),
            shard_files=int(total["shard_files"]),
            shard_bytes=int(total["shard_bytes"]),
            files_decoded=int(decode_pass["files_decoded"]),
            images_per_second=round(decode_pass["files_decoded"] / max(decode_pass["seconds"], 1e-9), 1),
            sizes=dg.MetadataValue.json(sizes),
            manifest_fingerprint=slice_fingerprint(items),  # what automation compares with the manifest's partition_fingerprints
            **resolved_metadata(settings),
        )
        if sheet is not None:
            md["contact_sheet"] = dg.MetadataValue.path(str(sheet))
            md["contact_sheet_preview"] = inline_png(sheet, "contact sheet")
        version = "+".join(data_version(b[0].index, size) for size, b in built.items())
        yield dg.MaterializeResult(asset_key=IMAGE_SHARDS, metadata=md, data_version=dg.DataVersion(version))
    if SHARD_REJECTS in selected_keys(context):
        md = asset_metadata(run, out / REJECTS, rejects.height, rejects=table_metadata(rejects))
        yield dg.MaterializeResult(asset_key=SHARD_REJECTS, metadata=md)


def _build(context: dg.AssetExecutionContext, run, paths, part: str, items, settings: ShardSettings) -> dict[int, tuple]:
    """Every size of the partition in one decode pass: size -> (BuildResult, contact sheet or None)."""
    outs = {size: paths.shard_partition(size, part) for size in settings.sizes}
    results = build_sizes(paths.raw, outs, items, settings.spec(settings.sizes[0]), progress=_progress(context, part))
    built = {}
    for size, result in results.items():
        st = result.stats
        run.log_metrics({f"s{size}_{k}": v for k, v in st.items()})
        sheet = write_contact_sheet(paths.shard_root(size), result.index, part, size)
        if sheet is not None:
            run.log_artifact(sheet)
        unchanged = int(st["unchanged"] + st["hash_unchanged"])
        context.log.info(f"{part} at {size} px: new {st['decoded']}, unchanged {unchanged}, rejected {st['rejected']}")
        built[size] = (result, sheet)
    first = results[settings.sizes[0]].stats
    context.log.info(f"{part}: {first['files_decoded']} files decoded once for sizes {settings.sizes} in {first['seconds']} s")
    return built


@dg.asset_check(
    asset=IMAGE_SHARDS,
    blocking=True,
    partitions_def=partitions_def,
    description="Every index row of the partition (at the size just built) points inside its shard file, and sampled images are not blank.",
)
def image_shards_readable(context: dg.AssetCheckExecutionContext, storage: CxrStorage) -> dg.AssetCheckResult:
    part = context.partition_key
    sizes = latest_metadata(context.instance, IMAGE_SHARDS, part, "sizes")  # the sizes this partition was just built at
    if not sizes:
        return dg.AssetCheckResult(passed=False, metadata={"reason": "partition not materialized"})
    results = [_readable(storage.paths.shard_root(size), part, size) for size in sizes]
    return dg.AssetCheckResult(
        passed=all(r["bad_shards"] == [] and r["blank_in_sample"] == 0 for r in results),
        metadata={"sizes": dg.MetadataValue.json(results)},
    )


def _readable(root: Path, part: str, size: int) -> dict:
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
    return {"size": size, "images": idx.height, "bad_shards": bad, "blank_in_sample": blank}


SHARD_CHECKS = [image_shards_readable]
