"""A file that carries no window reads through the windows the training images' headers carry (``WindowPrior``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from cxr_pipeline.data import window_prior as wp
from cxr_pipeline.data.decode_worker import decode_for_shards
from cxr_pipeline.data.dicom import WindowPrior, decode
from cxr_pipeline.data.dicom_writer import write_plain_dicom
from cxr_pipeline.data.shard_reader import Shards, gather, read_index
from cxr_pipeline.data.shards import ShardSpec, build_partition
from cxr_pipeline.settings import Paths


def radiograph(seed: int, rows: int = 256, cols: int = 224) -> np.ndarray:
    """12-bit values with a body, a dark border and noise: percentiles that differ from image to image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    body = 1500 + 1800 * np.exp(-(((x - cols / 2) / (cols / 3)) ** 2 + ((y - rows / 2) / (rows / 2.5)) ** 2))
    img = body + rng.normal(0, 120, (rows, cols)) + rng.uniform(-300, 300)
    img[:, : cols // 12] = 200
    return np.clip(img, 0, 4095).astype(np.uint16)


def dicom(path: Path, arr: np.ndarray, **window) -> Path:
    return write_plain_dicom(path, arr, bits=12, **window)


@pytest.mark.parametrize("size", [None, 64])
def test_a_windowless_copy_reads_as_its_original_through_the_original_s_window(tmp_path, size):
    """The units a header window is recorded in are the ones a windowless file is read through: at full size and
    reduced (the shard builder's fast path and pydicom's), the copy reads as the original did."""
    arr = radiograph(1)
    original = decode(dicom(tmp_path / "w.dcm", arr, WindowCenter=2300, WindowWidth=2900), min_size=size)
    assert original.window == "window" and original.window_units is not None
    bare = dicom(tmp_path / "bare.dcm", arr)
    plain = decode(bare, min_size=size)
    assert plain.window == "percentile" and plain.window_units is None
    assert np.abs(plain.image - original.image).mean() > 0.02  # the percentile window is another picture
    prior = WindowPrior((original.window_units,))
    copy = decode(bare, min_size=size, prior=prior)
    assert copy.window == "training window"
    np.testing.assert_allclose(copy.image, original.image, atol=1e-4)
    if size:
        fast, *_ = decode_for_shards("bare.dcm", memoryview(bare.read_bytes()), [size], prior)
        want, *_ = decode_for_shards("w.dcm", memoryview((tmp_path / "w.dcm").read_bytes()), [size])
        assert np.frombuffer(fast[size], np.uint8).astype(int).tolist() == np.frombuffer(want[size], np.uint8).astype(int).tolist()


def test_padchest_16_bit_pngs_read_through_the_prior_as_a_windowless_dicom_does(tmp_path):
    arr = radiograph(2)
    png = tmp_path / "p.png"
    Image.fromarray(arr).save(png)
    prior = WindowPrior(((0.45, 1.2, "LINEAR"),))
    from_png = decode(png, prior=prior)
    assert from_png.window == "training window (16-bit)"
    np.testing.assert_allclose(from_png.image, decode(dicom(tmp_path / "d.dcm", arr), prior=prior).image, atol=1e-6)
    assert decode(png).window == "percentile (16-bit)"


def test_each_image_draws_one_window_the_same_every_time_and_the_draws_follow_the_mix():
    narrow, wide = (0.5, 0.8, "LINEAR_EXACT"), (0.5, 1.3, "LINEAR_EXACT")
    prior = WindowPrior((narrow, wide, wide, wide))  # one in four narrow
    picks = []
    for seed in range(200):
        values = radiograph(seed, 64, 64).astype(np.float32)
        a, b = prior.apply(values.copy()), prior.apply(values.copy())
        np.testing.assert_array_equal(a, b)
        picks.append(float((a >= 1).mean()) > float((WindowPrior((wide,)).apply(values.copy()) >= 1).mean()))
    assert 0.15 <= np.mean(picks) <= 0.35  # the narrow window clips more: 50 of 200 expected
    with pytest.raises(ValueError, match="at least one window"):
        WindowPrior(())


def _replica(tmp_path: Path) -> Paths:
    """A manifest whose training images carry one window and whose validate/test images another."""
    layout = Paths(home=tmp_path / "home", raw=tmp_path / "raw")
    rows = []
    for i in range(12):
        split = ("train", "train", "validate", "test")[i % 4]
        window = {"WindowCenter": 2300, "WindowWidth": 2900} if split == "train" else {"WindowCenter": 1800, "WindowWidth": 600}
        rel = f"files/{i}.dcm"
        (layout.raw / "files").mkdir(parents=True, exist_ok=True)
        dicom(layout.raw / rel, radiograph(100 + i, 64, 64), **window)
        rows.append({"dicom_id": f"d{i}", "path": rel, "split": split})
    layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(layout.manifest)
    return layout


def test_the_prior_is_fitted_on_training_images_only_and_refitted_when_they_change(tmp_path, monkeypatch):
    layout = _replica(tmp_path)
    prior = wp.training_window_prior(layout, 64)
    assert prior is not None and len(prior.windows) == 6  # the six training images, none of validate or test
    train = decode(layout.raw / "files/0.dcm", min_size=64).window_units
    held = decode(layout.raw / "files/2.dcm", min_size=64).window_units
    assert min(abs(w[1] - train[1]) for w in prior.windows) < 0.2 < min(abs(w[1] - held[1]) for w in prior.windows)

    fits = []
    real_fit = wp.fit_window_prior
    monkeypatch.setattr(wp, "fit_window_prior", lambda *a: fits.append(a) or real_fit(*a))
    assert wp.training_window_prior(layout, 64) == prior and fits == []  # kept, not fitted again
    dicom(layout.raw / "files/0.dcm", radiograph(100, 64, 64), WindowCenter=2000, WindowWidth=1200)
    os.utime(layout.raw / "files/0.dcm", ns=(1, 1))
    refit = wp.training_window_prior(layout, 64)
    assert len(fits) == 1 and refit != prior
    assert wp.training_window_prior(layout, 32) is not None and len(fits) == 2  # another size, its own units


def test_no_manifest_or_no_windowed_training_image_leaves_the_percentile_window(tmp_path):
    layout = Paths(home=tmp_path / "home", raw=tmp_path / "raw")
    assert wp.training_window_prior(layout, 64) is None
    dicom(tmp_path / "raw" / "a.dcm", radiograph(3, 64, 64))
    layout.manifest.parent.mkdir(parents=True)
    pl.DataFrame({"dicom_id": ["a"], "path": ["a.dcm"], "split": ["train"]}).write_parquet(layout.manifest)
    assert wp.training_window_prior(layout, 64) is None


def test_shards_built_through_another_prior_are_read_again_and_the_same_prior_reads_nothing(tmp_path):
    root, out = tmp_path / "raw", tmp_path / "shards" / "all"
    root.mkdir()
    items = []
    for i in range(3):
        dicom(root / f"{i}.dcm", radiograph(20 + i, 96, 80))
        items.append({"dicom_id": f"d{i}", "path": f"{i}.dcm"})
    items = pl.DataFrame(items)
    first = build_partition(root, out, items, ShardSpec(32, 2))
    assert first.stats["decoded"] == 3
    prior = WindowPrior(((0.3, 0.6, "LINEAR"),))
    second = build_partition(root, out, items, ShardSpec(32, 2, prior=prior))
    assert second.stats["decoded"] == 3 and second.index.height == 3
    again = build_partition(root, out, items, ShardSpec(32, 2, prior=prior))
    assert again.stats["decoded"] == 0 and again.stats["unchanged"] == 3
    stored = Shards.open(out.parent, 32, ["all"])
    got = gather(stored, read_index(stored).sort("dicom_id"))
    want = np.stack([decode_for_shards(f"{i}.dcm", memoryview((root / f"{i}.dcm").read_bytes()), [32], prior)[0][32] for i in range(3)])
    np.testing.assert_array_equal(got.reshape(3, -1), np.frombuffer(want.tobytes(), np.uint8).reshape(3, -1))
