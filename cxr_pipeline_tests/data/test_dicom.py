"""Decoding real and synthetic radiographs the way a viewer shows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_pipeline.cli import main
from cxr_pipeline.data.dicom import DecodeError, decode, letterbox, prepare
from cxr_pipeline.data.dicom_writer import write_plain_dicom

DATA = Path(pydicom.__file__).resolve().parent.parent / "data_store" / "data"
needs_data = pytest.mark.skipif(not (DATA / "RG1_UNCR.dcm").exists(), reason="pydicom-data not installed")


def make_dicom(path: Path, arr: np.ndarray, *, photometric="MONOCHROME2", bits=12, frames=1, **extra) -> Path:
    return write_plain_dicom(path, arr, photometric=photometric, bits=bits, PatientName="SECRET^NAME", PatientID="MRN-SECRET-1", **extra)


@pytest.fixture
def gradient():
    y, x = np.mgrid[0:64, 0:48]
    return ((x * 37 + y * 61) % 4096).astype(np.uint16)


@needs_data
@pytest.mark.parametrize("name", ["RG1", "RG3"])
@pytest.mark.parametrize("kind", ["R", "I"])
def test_real_radiographs_compressed_equals_uncompressed(name, kind):
    unc = decode(DATA / f"{name}_UNC{kind}.dcm")
    j2k = decode(DATA / f"{name}_J2K{kind}.dcm")
    assert unc.image.shape == j2k.image.shape == (unc.rows, unc.cols)
    np.testing.assert_array_equal(unc.image, j2k.image)
    assert unc.window == "window" and 0 <= unc.image.min() and unc.image.max() <= 1


@needs_data
@pytest.mark.parametrize("name", ["RG1", "RG3"])
def test_reduced_resolution_jpeg2000_matches_full_decode(name):
    reduced = decode(DATA / f"{name}_J2KR.dcm", min_size=224)
    assert reduced.reduce >= 1 and max(reduced.image.shape) >= 224
    full = letterbox(decode(DATA / f"{name}_UNCR.dcm").image, 224).astype(int)
    fast = prepare(DATA / f"{name}_J2KR.dcm", 224).astype(int)
    assert np.abs(full - fast).mean() < 2.0  # grey levels out of 255


@needs_data
def test_monochrome1_real_radiograph_is_inverted():
    """RG1 is MONOCHROME1: after decoding, the mediastinum/spine column is brighter than the lungs."""
    img = decode(DATA / "RG1_UNCR.dcm").image
    h, w = img.shape
    centre = img[h // 3 : 2 * h // 3, int(w * 0.47) : int(w * 0.53)].mean()
    lungs = (
        img[h // 3 : 2 * h // 3, int(w * 0.2) : int(w * 0.3)].mean() + img[h // 3 : 2 * h // 3, int(w * 0.7) : int(w * 0.8)].mean()
    ) / 2
    assert centre > lungs + 0.05


def test_monochrome1_equals_inverted_monochrome2(tmp_path, gradient):
    m2 = decode(make_dicom(tmp_path / "m2.dcm", gradient))
    m1 = decode(make_dicom(tmp_path / "m1.dcm", 4095 - gradient, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1.image, m2.image, atol=1e-6)


def test_rescale_and_window_applied_like_a_viewer(tmp_path, gradient):
    windowed = decode(make_dicom(tmp_path / "w.dcm", gradient, WindowCenter=2048, WindowWidth=1024))
    assert windowed.window == "window"
    v = gradient.astype(float)
    expect = np.clip(((v - 2048) / 1023 + 0.5), 0, 1)  # DICOM linear window, width-1
    np.testing.assert_allclose(windowed.image, expect, atol=2e-3)
    # the same modality values stored with an intercept give the same picture
    shifted = decode(
        make_dicom(
            tmp_path / "r.dcm", gradient + 1024, bits=14, RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=2048, WindowWidth=1024
        )
    )
    np.testing.assert_allclose(shifted.image, windowed.image, atol=2e-3)


def test_percentile_window_without_window_attributes(tmp_path, gradient):
    a = decode(make_dicom(tmp_path / "a.dcm", gradient, bits=12))
    b = decode(make_dicom(tmp_path / "b.dcm", gradient * 16, bits=16))  # same image in 16 bits
    assert a.window == b.window == "percentile"
    np.testing.assert_allclose(a.image, b.image, atol=1e-5)
    assert a.image.min() == 0 and a.image.max() == 1


def test_refusals_name_the_file_and_reason_without_header_text(tmp_path, gradient):
    multi = make_dicom(tmp_path / "multi.dcm", np.stack([gradient, gradient]), frames=2)
    with pytest.raises(DecodeError, match=r"multi\.dcm: multi-frame \(2 frames\)"):
        decode(multi)
    good = make_dicom(tmp_path / "good.dcm", gradient).read_bytes()
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(good[: len(good) - 3000])
    with pytest.raises(DecodeError, match="trunc.dcm") as err:
        decode(trunc)
    assert "SECRET" not in str(err.value)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 50 + b"not a dicom" * 20)
    with pytest.raises(DecodeError, match="junk.dcm"):
        decode(junk)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty file"):
        decode(empty)
    with pytest.raises(DecodeError, match="file missing"):
        decode(tmp_path / "nope.dcm")


def test_jpg_reader_and_dct_scaling(tmp_path):
    from PIL import Image

    arr = (np.add.outer(np.arange(800), np.arange(600)) % 256).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.jpg", quality=95)
    full = decode(tmp_path / "x.jpg")
    assert full.image.shape == (800, 600) and full.window == "jpg"
    small = decode(tmp_path / "x.jpg", min_size=224)
    assert min(small.image.shape) >= 224 // 2 and max(small.image.shape) >= 224 and small.reduce >= 1


def test_letterbox_keeps_aspect_and_antialiases():
    tall = np.ones((200, 100), dtype=np.float32)
    out = letterbox(tall, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert out[:, :15].max() == 0 and out[:, -15:].max() == 0 and out[:, 20:44].min() == 255
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    small = letterbox(checker, 64).astype(float)
    assert abs(small[8:56, 8:56].mean() - 127.5) < 3 and small[8:56, 8:56].std() < 3  # no aliasing pattern


def test_replica_dicoms_all_decode(replica):
    files = sorted((replica / "files").rglob("*.dcm"))[:40]
    for f in files:
        img = prepare(f, 64)
        assert img.shape == (64, 64) and img.std() > 5


def test_cli_preview_writes_what_the_shards_store(tmp_path, replica):
    from PIL import Image

    src = sorted((replica / "files").rglob("*.dcm"))[0]
    out = tmp_path / "p.png"
    assert main(["preview", str(src), str(out), "--size", "96"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), prepare(src, 96))
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"garbage")
    assert main(["preview", str(bad), str(tmp_path / "q.png")]) == 2


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_fast_window_matches_pydicom(tmp_path, gradient, function):
    from pydicom.pixels import apply_voi_lut

    from cxr_pipeline.data.voi import window

    path = make_dicom(tmp_path / "w.dcm", gradient, WindowCenter=1800, WindowWidth=1500, VOILUTFunction=function)
    ds = pydicom.dcmread(path)
    ref = apply_voi_lut(ds.pixel_array.astype(float), ds, index=0, prefer_lut=False)
    ref = (ref - 0) / (2**12 - 1)
    ours = window(ds.pixel_array.astype(np.float32), 1800, 1500, function)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    assert decode(path).window == "window"


def test_reduced_uncompressed_decode_matches_full(tmp_path):
    from cxr_pipeline.data.phantom import Anatomy, render

    rng = np.random.default_rng(0)
    arr = np.round(render(rng, 1024, 900, "PA", {"Cardiomegaly": 1.0}, Anatomy.draw(rng)) * 4095).astype(np.uint16)
    path = make_dicom(tmp_path / "big.dcm", arr, WindowCenter=2000, WindowWidth=3000)
    small = decode(path, min_size=224)
    assert small.reduce == 2 and small.image.shape == (256, 225)
    full = letterbox(decode(path).image, 224).astype(int)
    assert np.abs(prepare(path, 224).astype(int) - full).mean() < 1.0


REAL_CRS = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")


def _native_files(replica) -> list[Path]:
    """The real uncompressed CRs (pydicom-data, a dev dependency: the test fails without them rather than
    passing on the replica alone) and 40 of the replica's files."""
    missing = [n for n in REAL_CRS if not (DATA / n).exists()]
    assert not missing, f"{missing} not in {DATA}: install the dev dependencies (pydicom-data)"
    return [DATA / n for n in REAL_CRS] + sorted((replica / "files").rglob("*.dcm"))[:40]


@pytest.mark.parametrize("size", [32, 224])
def test_uncompressed_fast_path_equals_the_general_decoder(replica, tmp_path, size):
    """The shard builder's memory-mapped path gives what decode_dicom gives, on the real CRs
    (15- and 10-bit, MONOCHROME1) and the replica's files (rescale, windows, 10-16 bits)."""
    import mmap

    from cxr_pipeline.data.dicom import decode_dicom, decode_native_reduced

    # stored values with bits above BitsStored set: masked, as pydicom masks them
    y, x = np.mgrid[0:300, 0:256]
    noisy = (((x * 37 + y * 61) % 4096) | 0xF000).astype(np.uint16)
    files = [*_native_files(replica), make_dicom(tmp_path / "high-bits.dcm", noisy)]
    fast, slow, fast_names = 0, 0, set()
    for f in files:
        data = f.read_bytes()
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
            got = decode_native_reduced(mm, size, f.name)
        ref = decode_dicom(data, size, f.name)
        if got is None:  # JPEG 2000 and anything small enough to need no reduction: the general decoder
            slow += 1
            continue
        fast += 1
        fast_names.add(f.name)
        assert (got.rows, got.cols, got.reduce, got.window) == (ref.rows, ref.cols, ref.reduce, ref.window), f.name
        np.testing.assert_allclose(got.image, ref.image, atol=2e-6, err_msg=f.name)
    assert set(REAL_CRS) <= fast_names, fast_names  # the real radiographs (about 2,000 px) are reduced at any size
    assert fast >= (20 if size == 32 else 2) and slow >= 1


def test_box_reduce_of_integers_equals_pillow_reduce():
    from PIL import Image

    from cxr_pipeline.data.dicom import box_reduce

    rng = np.random.default_rng(0)
    for shape, factor in (((3056, 2544), 8), ((301, 257), 4), ((7, 5), 4), ((3, 9), 8)):
        for dtype, lo, hi in ((np.uint16, 0, 65535), (np.int16, -2000, 2000), (np.uint8, 0, 255)):
            a = rng.integers(lo, hi, shape).astype(dtype)
            ref = np.asarray(Image.fromarray(a.astype(np.float32), mode="F").reduce(factor))
            np.testing.assert_allclose(box_reduce(a, factor), ref, rtol=1e-6, atol=1e-3)


def test_a_16_bit_png_is_windowed_not_clipped_white(tmp_path):
    """PadChest's PNGs hold 12 bits in 16: read as 8-bit they would be white wherever a value passes 255."""
    import numpy as np
    from PIL import Image

    from cxr_pipeline.data.dicom import decode, prepare

    ramp = np.tile(np.linspace(0, 4095, 300), (240, 1)).astype(np.uint16)  # dark left, bright right
    path = tmp_path / "padchest.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    dec = decode(path)
    assert dec.window.startswith("percentile") and (dec.rows, dec.cols) == (240, 300)
    row = dec.image[120]
    assert row[5] < 0.05 and row[-5] > 0.95 and 0.4 < row[150] < 0.6  # the ramp survives, windowed onto [0, 1]
    small = prepare(path, 64)
    assert small.dtype == np.uint8 and small[32, 1] < 15 and small[32, 62] > 240


@pytest.mark.parametrize(("rows", "cols"), [(300, 240), (240, 300), (256, 256), (600, 150)])
def test_a_map_over_the_letterboxed_input_maps_back_onto_the_source_region(rows, cols):
    """#49: a region planted in a source image, letterboxed as the shards are, read as a heat map over the model's
    input and mapped back (``to_source``) lands on the planted region (the round trip a Grad-CAM map takes)."""
    from cxr_pipeline.data.dicom import to_source

    source = np.zeros((rows, cols), np.float32)
    y0, x0 = rows // 3, cols // 4
    source[y0 : y0 + rows // 4, x0 : x0 + max(1, cols // 3)] = 1.0
    heat = letterbox(source, 64).astype(np.float32) / 255.0
    back = to_source(heat, rows, cols)
    assert back.shape == (rows, cols)
    planted, found = source > 0.5, back > 0.5
    iou = (planted & found).sum() / (planted | found).sum()
    assert iou > 0.8, iou
    with pytest.raises(ValueError, match="square map"):
        to_source(np.zeros((64, 32)), rows, cols)
