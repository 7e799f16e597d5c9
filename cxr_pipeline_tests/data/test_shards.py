"""Shard format round trip, incremental re-runs, kill-and-resume, rejects, the reader."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cxr_pipeline.data.dicom import prepare
from cxr_pipeline.data.mimic import ManifestPolicy, build_manifest
from cxr_pipeline.data.shard_reader import INDEX, Shards, ShardsNotBuilt, gather, load_images, read_index
from cxr_pipeline.data.shards import ShardSpec, build_partition, partition_column, partition_of

SIZE = 48


@pytest.fixture
def items(replica_copy):
    m = build_manifest(replica_copy, ManifestPolicy(views=(), one_image_per_subject=False)).manifest
    part = m.with_columns(pl.col("path").map_elements(partition_of, return_dtype=pl.String).alias("part"))
    biggest = part.group_by("part").len().sort("len", descending=True)["part"][0]
    return part.filter(pl.col("part") == biggest).head(30)


def own_copy(f: Path) -> Path:
    """Replace the symlinked study folder holding ``f`` by a real copy, so ``f`` can be changed."""
    if f.parent.is_symlink():
        real = f.parent.resolve()
        f.parent.unlink()
        shutil.copytree(real, f.parent)
    return f


def build(root, out, items, **kw):
    return build_partition(root, out, items, ShardSpec(size=SIZE, **{"images_per_shard": 8, **kw}))


def test_round_trip_equals_prepare(replica_copy, items, tmp_path):
    out = tmp_path / "s" / "pX"
    res = build(replica_copy, out, items)
    assert res.stats["decoded"] == items.height and res.rejects.height == 0
    assert res.stats["shard_files"] == -(-items.height // 8)
    shards = Shards.open(tmp_path / "s", SIZE, ["pX"])
    idx = read_index(shards)
    rows = items.join(idx, on="dicom_id", maintain_order="left")
    imgs = gather(shards, rows)
    for k, rel in enumerate(rows["path"].to_list()):
        np.testing.assert_array_equal(imgs[k], prepare(replica_copy / rel, SIZE))
    # raw uint8 files: n * size * size bytes, nothing else
    for shard, n in idx.group_by("shard").len().iter_rows():
        assert (out / shard).stat().st_size >= n * SIZE * SIZE
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_rerun_decodes_nothing_and_changes_decode_only_what_changed(replica_copy, items, tmp_path):
    out = tmp_path / "pX"
    build(replica_copy, out, items)
    again = build(replica_copy, out, items)
    assert again.stats["decoded"] == 0 and again.stats["to_read"] == 0 and again.stats["unchanged"] == items.height
    # touched but identical: read and hashed, not decoded
    first = own_copy(replica_copy / items["path"][0])
    os.utime(first, ns=(time.time_ns(), time.time_ns()))
    touched = build(replica_copy, out, items)
    assert touched.stats["decoded"] == 0 and touched.stats["hash_unchanged"] >= 1
    # a changed image is decoded again, into a new shard
    other = replica_copy / items["path"][1]
    shutil.copy(other, first)
    changed = build(replica_copy, out, items)
    assert changed.stats["decoded"] == 1
    idx = changed.index
    moved = idx.filter(pl.col("dicom_id") == items["dicom_id"][0])
    shards = Shards.open(out.parent, SIZE, ["pX"])
    np.testing.assert_array_equal(gather(shards, moved.with_columns(pl.lit("pX").alias("partition")))[0], prepare(other, SIZE))
    # a removed manifest row leaves the index
    fewer = build(replica_copy, out, items.slice(2))
    assert fewer.index.height == items.height - 2 and fewer.stats["decoded"] == 0


def test_parallel_build_is_identical(replica_copy, items, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build(replica_copy, a, items, workers=1)
    build(replica_copy, b, items, workers=2)
    for f in sorted(a.glob("shard-*.u8")):
        assert f.read_bytes() == (b / f.name).read_bytes()
    assert pl.read_parquet(a / INDEX).drop("mtime_ns").equals(pl.read_parquet(b / INDEX).drop("mtime_ns"))


def test_bad_images_are_rejected_not_fatal_and_not_redecoded(replica_copy, items, tmp_path):
    paths = items["path"].to_list()
    victims = {}
    for k, kind in enumerate(["truncated", "garbage", "missing"]):
        f = own_copy(replica_copy / paths[k])
        data = f.read_bytes()
        if kind == "truncated":
            f.write_bytes(data[: len(data) // 2])
        elif kind == "garbage":
            f.write_bytes(os.urandom(4000))
        else:
            f.unlink()
        victims[items["dicom_id"][k]] = kind
    out = tmp_path / "pX"
    res = build(replica_copy, out, items)
    assert res.index.height == items.height - 3
    rej = {r["dicom_id"]: r["reason"] for r in res.rejects.iter_rows(named=True)}
    assert set(rej) == set(victims)
    missing = next(d for d, k in victims.items() if k == "missing")
    assert rej[missing] == "file missing"
    assert all(r and "cannot be decoded" in r or "not a readable" in r or r == "file missing" for r in rej.values())
    again = build(replica_copy, out, items)
    assert again.stats["decoded"] == 0 and again.stats["to_read"] == 0 and again.rejects.height == 3


KILL_SCRIPT = """
import sys, time, polars as pl
from pathlib import Path
from cxr_pipeline.data import shards
from cxr_pipeline.data.shards import ShardSpec, build_partition
orig = shards.work
def slow(*a):
    time.sleep(0.25)
    return orig(*a)
shards.work = slow
items = pl.read_parquet(sys.argv[3])
build_partition(Path(sys.argv[1]), Path(sys.argv[2]), items, ShardSpec(size=48, images_per_shard=4, chunk=1))
"""


def test_killed_build_leaves_no_torn_shard_and_resumes(replica_copy, items, tmp_path):
    out = tmp_path / "pX"
    items.write_parquet(tmp_path / "items.parquet")
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(replica_copy), str(out), str(tmp_path / "items.parquet")])
    deadline = time.time() + 60
    while time.time() < deadline:
        if (out / INDEX).exists() and pl.read_parquet(out / INDEX).height >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    idx = pl.read_parquet(out / INDEX)
    assert 8 <= idx.height < items.height
    for shard, n in idx.group_by("shard").agg(pl.col("offset").max() + 1).iter_rows():
        assert (out / shard).stat().st_size >= n * SIZE * SIZE
    resumed = build(replica_copy, out, items, images_per_shard=4)
    assert resumed.stats["unchanged"] == idx.height
    assert resumed.stats["decoded"] == items.height - idx.height
    assert not list(out.glob(".*.tmp"))
    clean = build(replica_copy, tmp_path / "clean", items, images_per_shard=4)
    shards = Shards.open(tmp_path, SIZE, ["pX", "clean"])
    a = gather(shards, resumed.index.with_columns(pl.lit("pX").alias("partition")))
    b = gather(shards, clean.index.with_columns(pl.lit("clean").alias("partition")))
    np.testing.assert_array_equal(a, b)


def test_orphans_and_temp_files_from_a_kill_are_cleaned(replica_copy, items, tmp_path):
    out = tmp_path / "pX"
    build(replica_copy, out, items)
    (out / "shard-00099.u8").write_bytes(b"\0" * SIZE * SIZE)  # renamed, but index never written
    (out / ".shard-00100.u8.123.tmp").write_bytes(b"\0" * 10)  # killed mid-write
    res = build(replica_copy, out, items)
    assert res.stats["orphan_shards_removed"] == 1
    assert not (out / "shard-00099.u8").exists() and not list(out.glob(".*.tmp"))


def test_size_mismatch_is_refused(replica_copy, items, tmp_path):
    out = tmp_path / "pX"
    build(replica_copy, out, items)
    with pytest.raises(ValueError, match="built at 48 px"):
        build_partition(replica_copy, out, items, ShardSpec(size=64))


def test_load_images_aligns_with_manifest_rows(replica_copy, items, tmp_path):
    root = tmp_path / "shards"
    build(replica_copy, root / items["part"][0], items)
    sel = items.sample(12, seed=1)
    imgs, rows = load_images(Shards.open(root, SIZE), sel)
    assert imgs.shape == (12, SIZE, SIZE) and str(imgs.dtype) == "torch.uint8"
    assert rows["dicom_id"].to_list() == sel["dicom_id"].to_list()
    assert rows["cardiomegaly"].to_list() == sel["cardiomegaly"].to_list()
    for k, rel in enumerate(rows["path"].to_list()):
        np.testing.assert_array_equal(imgs[k].numpy(), prepare(replica_copy / rel, SIZE))


def test_open_images_read_what_load_images_loads(replica_copy, items, tmp_path):
    from cxr_pipeline.data.shard_reader import open_images

    root = tmp_path / "shards"
    build(replica_copy, root / items["part"][0], items, images_per_shard=4)  # several shard files
    sel = items.sample(10, seed=2)
    shards = Shards.open(root, SIZE)
    eager, rows = load_images(shards, sel)
    lazy, lazy_rows = open_images(shards, sel)
    assert lazy_rows.equals(rows) and len(lazy) == 10 and not lazy._maps  # nothing read yet
    for k in range(10):
        np.testing.assert_array_equal(lazy[k], eager[k].numpy())
    shuffled = np.array([7, 2, 9, 2, 0])  # across shard files, out of order, one repeated
    np.testing.assert_array_equal(lazy.take(shuffled), eager.numpy()[shuffled])
    np.testing.assert_array_equal(lazy.subset(shuffled[:3]).take(np.array([2, 0])), eager.numpy()[[9, 7]])


def test_opening_a_size_never_built_is_an_error_naming_the_size_and_how_to_build_it(replica_copy, items, tmp_path):
    root = tmp_path / "shards"
    build(replica_copy, root / items["part"][0], items)
    with pytest.raises(ShardsNotBuilt, match=r"no image shards at 64 px .*materialize image_shards with 64 among its sizes") as e:
        Shards.open(tmp_path / "s64", 64)  # a size whose folder does not exist: not an empty index
    assert "image_shards.sizes in pipeline.yaml" in str(e.value)
    with pytest.raises(ShardsNotBuilt, match="no image shards at 48 px"):
        Shards.open(root, SIZE, ["p19"])  # partitions none of which was built
    assert read_index(Shards.open(root, SIZE)).height == items.height  # a partition not built yet is left out, as before


def test_a_spec_json_of_another_size_is_refused_by_the_reader(replica_copy, items, tmp_path):
    root = tmp_path / "shards"
    build(replica_copy, root / items["part"][0], items)
    with pytest.raises(ValueError, match=rf"opened at 64 px, .*{items['part'][0]} at 48 px"):
        Shards.open(root, 64)  # a folder renamed or copied under another size's root: never read at the wrong size
    other = root / "p19"
    other.mkdir()
    (other / "spec.json").write_text('{"size": 96}')
    with pytest.raises(ValueError, match=r"p19 at 96 px"):
        Shards.open(root, SIZE)  # every built partition is checked, not only the first


def test_partition_of():
    assert partition_of("files/p10/p10000032/s50414267/x.dcm") == "p10"
    assert partition_of("weird.dcm") == "p??"
    paths = ["files/p10/p10000032/s50414267/x.dcm", "weird.dcm", "files/x.dcm", "other/p11/a/b.dcm"]
    assert pl.DataFrame({"path": paths}).select(partition_column())["path"].to_list() == [partition_of(x) for x in paths]
