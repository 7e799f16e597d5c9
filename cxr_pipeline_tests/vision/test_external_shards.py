"""External sets' shards: built with pipeline.yaml's ``image_shards`` settings, read through the checked handle."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from cxr_pipeline.data import shards as builder
from cxr_pipeline.data.dicom import decode, letterbox
from cxr_pipeline.data.external import DEFAULT_LABEL_FILES, read_labels, resolve_images, select_images
from cxr_pipeline.data.replica_external import ExternalReplica, generate_external
from cxr_pipeline.data.shard_reader import Shards, load_images
from cxr_pipeline.data.shards import ShardSettings
from cxr_pipeline.data.window_prior import training_window_prior
from cxr_pipeline.settings import Paths
from cxr_pipeline.vision.external import EXTERNAL_PARTITION, build_external_shards


def test_external_shards_use_the_image_shards_settings(replica, tmp_path, monkeypatch):
    """Images per shard and decode processes come from ``image_shards`` (they were a fixed 1,024 and one worker)."""
    files = sorted(replica.glob("files/p1*/*/*/*.dcm"))[:10]
    rows = pl.DataFrame({"dicom_id": [f.stem for f in files], "path": [str(f.relative_to(replica)) for f in files]})
    pools = []
    pool = builder.decoder_pool
    monkeypatch.setattr(builder, "decoder_pool", lambda workers: pools.append(workers) or pool(workers))
    paths = Paths(home=tmp_path, raw=replica)
    built = build_external_shards(paths, "nih", replica, rows, [32, 48], ShardSettings(sizes=[32, 48], images_per_shard=4, workers=2))
    assert pools == [2]  # one decode pass for both sizes, in the configured number of processes
    for size in (32, 48):
        folder = paths.external_shard_root("nih", size) / EXTERNAL_PARTITION
        assert built[size].index.height == 10 and len(list(folder.glob("shard-*.u8"))) == 3  # 4 + 4 + 2
        images, kept = load_images(Shards.open(paths.external_shard_root("nih", size), size, [EXTERNAL_PARTITION]), rows)
        assert kept["dicom_id"].to_list() == rows["dicom_id"].to_list() and tuple(images.shape) == (10, size, size)


def test_settings_whose_sizes_are_unresolved_are_refused(replica, tmp_path):
    """The level an external set is decoded at is MIMIC's (the largest resolved ``image_shards`` size); with sizes
    still null there is none to take, and guessing it from the champions' sizes decoded one set at two levels."""
    files = sorted(replica.glob("files/p1*/*/*/*.dcm"))[:2]
    rows = pl.DataFrame({"dicom_id": [f.stem for f in files], "path": [str(f.relative_to(replica)) for f in files]})
    paths = Paths(home=tmp_path, raw=replica)
    with pytest.raises(ValueError, match=r"image_shards\.sizes is null"):
        build_external_shards(paths, "nih", replica, rows, [32], ShardSettings(workers=1))
    assert not paths.external_shard_root("nih", 32).exists()  # refused before anything is written


def test_padchest_pngs_are_read_through_the_training_windows_at_mimic_s_decode_level(replica, tmp_path):
    """External validation and the drift monitor build PadChest's shards through the window prior fitted on the
    manifest's frontal training images, at the level MIMIC's shards are decoded at (the largest ``image_shards``
    size), and say so in spec.json; a format of display images (NIH's 8-bit PNGs) gets no prior."""
    files = sorted(replica.glob("files/p1*/*/*/*.dcm"))[:12]
    paths = Paths(home=tmp_path / "home", raw=replica)
    paths.manifest.parent.mkdir(parents=True)
    rel = [str(f.relative_to(replica)) for f in files]
    pl.DataFrame({"dicom_id": [f.stem for f in files], "path": rel, "split": ["train"] * 12, "view_position": ["PA"] * 12}).write_parquet(
        paths.manifest
    )
    for fmt in ("padchest", "nih"):
        folder = tmp_path / fmt
        generate_external(ExternalReplica(fmt, patients=4, seed=5, source_rows=96), folder)
        found = read_labels(fmt, folder / DEFAULT_LABEL_FILES[fmt])
        rows = resolve_images(folder, select_images(found.manifest, ("PA", "AP"), None, 0))
        build_external_shards(paths, fmt, folder, rows, [32], ShardSettings(sizes=[32, 48], workers=1))
        spec = json.loads((paths.external_shard_root(fmt, 32) / EXTERNAL_PARTITION / "spec.json").read_text())
        assert spec["decoded_at"] == 48
        stored, kept = load_images(Shards.open(paths.external_shard_root(fmt, 32), 32, [EXTERNAL_PARTITION]), rows)
        prior = training_window_prior(paths, 48) if fmt == "padchest" else None
        assert (prior is not None) == (fmt == "padchest")
        assert spec.get("window_prior") == (prior.digest() if prior else None)
        want = np.stack([letterbox(decode(folder / p, min_size=48, prior=prior).image, 32) for p in kept["path"]])
        np.testing.assert_array_equal(np.asarray(stored), want)
