"""External sets' shards: built with pipeline.yaml's ``image_shards`` settings, read through the checked handle."""

from __future__ import annotations

import polars as pl

from cxr_pipeline.data import shards as builder
from cxr_pipeline.data.shard_reader import Shards, load_images
from cxr_pipeline.data.shards import ShardSettings
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
    built = build_external_shards(paths, "nih", replica, rows, [32, 48], ShardSettings(images_per_shard=4, workers=2))
    assert pools == [2]  # one decode pass for both sizes, in the configured number of processes
    for size in (32, 48):
        folder = paths.external_shard_root("nih", size) / EXTERNAL_PARTITION
        assert built[size].index.height == 10 and len(list(folder.glob("shard-*.u8"))) == 3  # 4 + 4 + 2
        images, kept = load_images(Shards.open(paths.external_shard_root("nih", size), size, [EXTERNAL_PARTITION]), rows)
        assert kept["dicom_id"].to_list() == rows["dicom_id"].to_list() and tuple(images.shape) == (10, size, size)
