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
from cxr_pipeline.data.dicom import decode, letterbox
from cxr_pipeline.data.dicom_writer import write_plain_dicom
from cxr_pipeline.data.shard_reader import Shards, gather, read_index
from cxr_pipeline.data.shards import ShardSpec, build_partition
from cxr_pipeline.data.voi import PERCENTILE_UNITS, WindowPrior
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


def units_of(path: Path, size: int | None) -> tuple:
    dec = decode(path, min_size=size, units=True)
    assert dec.window == "window" and dec.window_units is not None
    return dec.window_units


@pytest.mark.parametrize("size", [None, 64])
@pytest.mark.parametrize(
    "window",
    [
        {"WindowCenter": 2300, "WindowWidth": 2900},
        {"WindowCenter": 2800, "WindowWidth": 1600, "VOILUTFunction": "LINEAR_EXACT"},
        {"WindowCenter": 2100, "WindowWidth": 1400, "VOILUTFunction": "SIGMOID"},
    ],
)
def test_a_window_fitted_on_one_image_reads_a_windowless_copy_as_its_original(tmp_path, size, window):
    """Units fitted on one file transfer to another at any size, function and photometric: a windowless copy (of
    the same picture stored MONOCHROME2, while the window came from a MONOCHROME1 file) reads as the original, on
    the shard builder's fast path as through pydicom."""
    arr = radiograph(1)
    mono1 = write_plain_dicom(
        tmp_path / "m1.dcm", 4095 - arr, photometric="MONOCHROME1", bits=12, **{**window, "WindowCenter": 4095 - window["WindowCenter"]}
    )
    original = decode(dicom(tmp_path / "w.dcm", arr, **window), min_size=size)
    np.testing.assert_allclose(decode(mono1, min_size=size).image, original.image, atol=2e-3)  # the same picture
    prior = WindowPrior((units_of(mono1, size),))
    bare = dicom(tmp_path / "bare.dcm", arr)
    plain = decode(bare, min_size=size)
    assert plain.window == "percentile" and np.abs(plain.image - original.image).mean() > 0.02
    copy = decode(bare, min_size=size, prior=prior)
    assert copy.window == "training window"
    np.testing.assert_allclose(copy.image, original.image, atol=2e-3)
    inverted = decode(write_plain_dicom(tmp_path / "bare1.dcm", 4095 - arr, photometric="MONOCHROME1", bits=12), min_size=size, prior=prior)
    np.testing.assert_allclose(inverted.image, original.image, atol=2e-3)  # a MONOCHROME1 target mirrors it back
    if size:
        fast, *_ = decode_for_shards("bare.dcm", memoryview(bare.read_bytes()), [size], prior)
        want = letterbox(original.image, size)
        assert np.abs(np.frombuffer(fast[size], np.uint8).astype(int) - want.ravel().astype(int)).max() <= 1


def test_padchest_16_bit_pngs_are_reduced_before_the_window_as_a_dicom_is(tmp_path):
    """At a shard size a 16-bit PNG is box-reduced before its window, as a DICOM's stored values are: read through
    the window its DICOM twin carries (fitted at that size) it reads as the twin does."""
    arr = radiograph(2)
    png = tmp_path / "p.png"
    Image.fromarray(arr).save(png)
    twin = dicom(tmp_path / "d.dcm", arr, WindowCenter=2300, WindowWidth=2900)
    for size in (None, 64):
        want = decode(twin, min_size=size)
        got = decode(png, min_size=size, prior=WindowPrior((units_of(twin, size),)))
        assert got.window == "training window (16-bit)" and got.reduce == want.reduce
        np.testing.assert_allclose(got.image, want.image, atol=2e-3)
    plain = decode(png, min_size=64)
    assert plain.window == "percentile (16-bit)" and plain.reduce == 2
    np.testing.assert_allclose(plain.image, decode(dicom(tmp_path / "bare.dcm", arr), min_size=64).image, atol=1e-5)


def test_each_file_draws_one_window_at_every_size_and_the_draws_follow_the_mix(tmp_path):
    narrow, wide = (0.5, 0.8, "LINEAR_EXACT"), (0.5, 1.3, "LINEAR_EXACT")
    prior = WindowPrior((narrow, wide, wide, wide))  # one in four narrow

    def drew_narrow(path: Path, size: int | None) -> bool:
        got = decode(path, min_size=size, prior=prior).image
        return bool(np.allclose(got, decode(path, min_size=size, prior=WindowPrior((narrow,))).image))

    picks = []
    for seed in range(120):
        path = dicom(tmp_path / f"{seed}.dcm", radiograph(seed, 128, 128))
        first = drew_narrow(path, None)
        assert drew_narrow(path, 32) == drew_narrow(path, 64) == first  # the file's bytes choose, not its size
        picks.append(first)
    # 30 of 120 expected; the files' UIDs are random, so the count is too (sd 4.7): 12 to 48 fails about once in
    # 9,000 runs (0.15 to 0.35 failed a CI run with 44), while a draw that ignores the mix (0, 60 or 120) still fails
    assert 0.1 <= np.mean(picks) <= 0.4
    with pytest.raises(ValueError, match="at least one window"):
        WindowPrior(())


def _replica(tmp_path: Path) -> Paths:
    """A manifest whose frontal training images carry one window, its lateral training images another and its
    validate/test images a third."""
    layout = Paths(home=tmp_path / "home", raw=tmp_path / "raw")
    rows = []
    for i in range(14):
        split, view = [("train", "PA"), ("train", "AP"), ("validate", "PA"), ("test", "AP")][i % 4] if i < 12 else ("train", "LATERAL")
        window = {"WindowCenter": 2300, "WindowWidth": 2900} if split == "train" else {"WindowCenter": 1800, "WindowWidth": 600}
        window = {"WindowCenter": 2000, "WindowWidth": 5000} if view == "LATERAL" else window
        rel = f"files/{i}.dcm"
        (layout.raw / "files").mkdir(parents=True, exist_ok=True)
        dicom(layout.raw / rel, radiograph(100 + i, 64, 64), **window)
        rows.append({"dicom_id": f"d{i}", "path": rel, "split": split, "view_position": view})
    layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows).write_parquet(layout.manifest)
    return layout


def test_the_prior_is_fitted_on_training_images_only_and_refitted_when_they_change(tmp_path, monkeypatch):
    layout = _replica(tmp_path)
    prior = wp.training_window_prior(layout, 64)
    assert prior is not None and len(prior.windows) == 6  # the six frontal training images: no lateral, validate or test
    train, held, lateral = (units_of(layout.raw / f"files/{i}.dcm", 64) for i in (0, 2, 12))
    assert min(abs(w[1] - train[1]) for w in prior.windows) < 0.2 < min(abs(w[1] - held[1]) for w in prior.windows)
    assert min(abs(w[1] - lateral[1]) for w in prior.windows) > 0.2

    fits = []
    real_fit = wp.fit_window_prior
    monkeypatch.setattr(wp, "fit_window_prior", lambda *a: fits.append(a) or real_fit(*a))
    assert wp.training_window_prior(layout, 64) == prior and fits == []  # kept, not fitted again
    dicom(layout.raw / "files/0.dcm", radiograph(100, 64, 64), WindowCenter=2000, WindowWidth=1200)
    os.utime(layout.raw / "files/0.dcm", ns=(1, 1))
    refit = wp.training_window_prior(layout, 64)
    assert len(fits) == 1 and refit != prior
    assert wp.training_window_prior(layout, 32) is not None and len(fits) == 2  # another size, its own units


def test_no_manifest_means_no_prior_and_windowless_training_images_read_a_windowless_file_as_the_percentile_window(tmp_path):
    layout = Paths(home=tmp_path / "home", raw=tmp_path / "raw")
    assert wp.training_window_prior(layout, 64) is None
    dicom(tmp_path / "raw" / "a.dcm", radiograph(3, 64, 64))
    layout.manifest.parent.mkdir(parents=True)
    pl.DataFrame({"dicom_id": ["a"], "path": ["a.dcm"], "split": ["train"]}).write_parquet(layout.manifest)
    prior = wp.training_window_prior(layout, 64)
    assert prior == WindowPrior((PERCENTILE_UNITS,))
    other = dicom(tmp_path / "b.dcm", radiograph(4, 96, 96))
    np.testing.assert_allclose(decode(other, 64, prior=prior).image, decode(other, 64).image, atol=1e-5)


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
    deeper = build_partition(root, out, items, ShardSpec(32, 2, prior=prior, decode_at=96))  # decoded at another level
    assert deeper.stats["decoded"] == 3
    other = WindowPrior(((0.5, 2.0, "LINEAR_EXACT"),))

    def killed(done: int, total: int) -> None:
        raise KeyboardInterrupt  # a run through a new prior, killed after its first image

    with pytest.raises(KeyboardInterrupt):
        build_partition(root, out, items, ShardSpec(32, 2, prior=other), progress=killed)
    resumed = build_partition(root, out, items, ShardSpec(32, 2, prior=other))  # the re-run: nothing kept from before
    assert resumed.stats["decoded"] == 3 and resumed.stats["unchanged"] == 0
    stored = Shards.open(out.parent, 32, ["all"])
    got = gather(stored, read_index(stored).sort("dicom_id"))
    want = np.stack([decode_for_shards(f"{i}.dcm", memoryview((root / f"{i}.dcm").read_bytes()), [32], other)[0][32] for i in range(3)])
    np.testing.assert_array_equal(got.reshape(3, -1), np.frombuffer(want.tobytes(), np.uint8).reshape(3, -1))


def test_a_raw_root_where_no_training_image_can_be_read_is_an_error_not_the_percentile_window(tmp_path):
    layout = _replica(tmp_path)
    moved = Paths(home=layout.home, raw=tmp_path / "elsewhere")
    with pytest.raises(
        ValueError, match=r"none of 6 training images under .*elsewhere could be read \(first: files/0\.dcm: file missing\)"
    ):
        wp.training_window_prior(moved, 64)
    assert not (layout.assets / "window_prior" / "s64.json").exists()


def test_without_the_raw_root_training_and_the_pacs_store_read_the_prior_last_fitted(tmp_path):
    """Training needs only the shards, and a PACS intake tick must neither fit a prior nor need the raw root: where
    the training files cannot be read they take the prior last fitted (training says so in its log)."""
    from cxr_pipeline.defs.io import ShardSet

    layout = _replica(tmp_path)
    prior = wp.training_window_prior(layout, 64)
    moved = Paths(home=layout.home, raw=tmp_path / "elsewhere")
    assert wp.kept_window_prior(moved, 64) == prior and wp.kept_window_prior(moved, 32) is None  # never fitted at 32
    said: list[str] = []
    assert ShardSet(moved).window_prior(64, said.append) == prior and "window prior not fitted" in said[0]
    assert ShardSet(moved).window_prior(32, said.append) is None and "none (the percentile window)" in said[1]


def test_a_damaged_prior_file_is_fitted_again_and_a_damaged_checkpoint_prior_is_an_error(tmp_path):
    """A damaged kept file is a miss (fitted again from the raw files, never a silent "no prior"); a checkpoint's
    damaged ``window_prior`` is an error naming it, never a silent misreading of every windowless file."""
    from cxr_pipeline.data.voi import stored_windows

    layout = _replica(tmp_path)
    prior = wp.training_window_prior(layout, 64)
    (layout.assets / "window_prior" / "s64.json").write_text("{not json")
    assert wp.kept_window_prior(layout, 64) is None and wp.training_window_prior(layout, 64) == prior
    assert stored_windows([[0.5, 1.0, "LINEAR_EXACT"]], "f") == ((0.5, 1.0, "LINEAR_EXACT"),)
    for bad in ([[0.5, 0.0, "LINEAR_EXACT"]], [[0.5, 1.0, "GAMMA"]], [[0.5, 1.0]], "", 0, {"a": 1}):
        with pytest.raises(ValueError, match="ck/config.json: field 'window_prior'"):
            stored_windows(bad, "ck/config.json: field 'window_prior'")
