"""Decode any chest radiograph (DICOM or MIMIC-CXR-JPG) to display brightness in [0, 1].

DICOM, the way a viewer shows it:

1. pixel data through pydicom's decoders (pylibjpeg plugins: uncompressed,
   JPEG 2000, JPEG lossless/baseline, RLE, ...); BitsStored honoured;
2. the modality LUT (rescale slope / intercept, or a Modality LUT Sequence);
3. the VOI LUT or the first window (WindowCenter / WindowWidth) when present,
   via pydicom; otherwise a robust percentile window (0.5th to 99.5th
   percentile of the body of the image), which keeps a burned-in marker or a
   black border from flattening the contrast, or, given a ``WindowPrior``, a
   window the training images' headers carry (so a format that drops the
   window does not change how its images read);
4. MONOCHROME1 inverted, so bone is always bright.

Multi-frame, colour and pixel-less objects are refused with a reason.

With ``min_size`` set (the shard builder sets it to the shard size), images
are decoded at the lowest resolution level whose long side is still at least
``min_size``, and windowed there: JPEG 2000 through Pillow's OpenJPEG binding
with ``reduce`` (pydicom's pylibjpeg-openjpeg plugin has no such option; at
full resolution JPEG 2000 costs ~0.45 s an image), JPEG through libjpeg's DCT
scaling (``Image.draft``), everything else by box-averaging the stored values
before the window, as a viewer that resamples and then windows would show it.
Without ``min_size`` the full-resolution image is returned.

Nothing here logs or returns header text: errors name the file and the reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_pipeline.data.voi import PERCENTILE_UNITS, WindowPrior, clip01, percentile_window, window, window_units

J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian


class DecodeError(ValueError):
    """The file cannot be turned into a single grey radiograph."""


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray  # float32 (rows, cols) in [0, 1], bright = dense
    rows: int  # the full-resolution size
    cols: int
    reduce: int  # resolution levels skipped (0: decoded at full size)
    window: str  # "voi_lut", "window", "percentile", "training window" or "jpg" (16-bit PNGs: "... (16-bit)")
    # with ``units=True``: the window read through in ``WindowPrior``'s units (``window_units``; the percentile
    # window's for an image without one); None for a VOI LUT, a training window, a JPG, or without ``units``
    window_units: tuple[float, float, str] | None = None


def _pillow_size_ok(n: int, level: int) -> bool:
    """Pillow sizes a reduced J2K image as round(n / 2**level), OpenJPEG as ceil(n / 2**level);
    where the two differ Pillow fails with 'broken data stream'. Skip those levels."""
    power = 1 << level
    return n % power == 0 or n % power >= power // 2


def _reduce_level(rows: int, cols: int, min_size: int | None, max_level: int = 5, pillow_sizes: bool = True) -> int:
    """The most halvings that keep the long side >= ``min_size`` (and, for JPEG 2000, that Pillow sizes right)."""
    if not min_size:
        return 0
    best = 0
    for level in range(1, max_level + 1):
        if max(rows, cols) / 2**level < min_size:
            break
        if not pillow_sizes or (_pillow_size_ok(rows, level) and _pillow_size_ok(cols, level)):
            best = level
    return best


def box_reduce(arr: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks into float32; edge blocks are partial (as Pillow's ``reduce``).

    Integer images (the stored pixels of an uncompressed radiograph) are summed exactly
    in integers, a row of blocks at a time, without a float copy of the full-resolution
    array: on a 3056 x 2544 MIMIC image about 4 ms against 18 ms for Pillow's float
    ``reduce``, which needs that copy first (Pillow cannot reduce 16-bit images). Other
    dtypes go through Pillow.
    """
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize > 2:
        from PIL import Image

        im = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32), mode="F")
        return np.asarray(im.reduce(factor), dtype=np.float32).copy()
    h, w = arr.shape
    hh, ww = -(-h // factor), -(-w // factor)
    acc = np.uint32 if arr.dtype.kind == "u" else np.int32  # 64 x 65535 fits either
    rows = np.zeros((hh, w), dtype=acc)
    for k in range(min(factor, h)):
        part = arr[k::factor]  # every factor-th row from k: whole rows, read in order
        rows[: part.shape[0]] += part
    out = np.zeros((hh, ww), dtype=acc)
    for k in range(min(factor, w)):
        part = rows[:, k::factor]
        out[:, : part.shape[1]] += part
    count_h = np.minimum(factor, h - np.arange(hh) * factor).astype(np.float32)
    count_w = np.minimum(factor, w - np.arange(ww) * factor).astype(np.float32)
    return out.astype(np.float32) / (count_h[:, None] * count_w[None, :])


def _j2k_reduced(ds, level: int) -> np.ndarray | None:
    """Decode the single JPEG 2000 frame at 1/2**level resolution, or None if Pillow can't.

    Pillow returns ``I;16`` scaled up to 16 bits; shifting by (16 - precision)
    gives back the stored values pydicom would return.
    """
    import openjpeg
    from PIL import Image
    from pydicom.encaps import generate_fragmented_frames

    try:
        frame = b"".join(next(generate_fragmented_frames(ds.PixelData, number_of_frames=1)))
        params = openjpeg.get_parameters(frame)
        if params.get("is_signed") or int(params.get("samples_per_pixel", 1)) != 1:
            return None
        levels = frame[frame.find(b"\xff\x52") + 9]  # COD: decomposition levels
        if level > levels:
            return None
        im = Image.open(io.BytesIO(frame))
        im.reduce = level
        im.load()
    except Exception:
        return None
    if not im.mode.startswith("I;16"):
        return None
    arr = np.asarray(im).astype(np.uint16)
    shift = 16 - int(params["precision"])
    return arr >> shift if shift > 0 else arr


def _voi(arr: np.ndarray, ds, prior: WindowPrior | None = None, key=None, units: bool = False) -> tuple[np.ndarray, str, tuple | None]:
    """Modality LUT then VOI LUT / window / percentile window (``prior``'s without a window, drawn by ``key``, the
    file's bytes) -> ([0, 1], how, with ``units`` the window's units)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        src = apply_modality_lut(arr, ds) if ds.get("ModalityLUTSequence") else arr
        out = apply_voi_lut(src, ds, index=0, prefer_lut=True).astype(np.float32)
        return clip01(out / np.float32(2**bits - 1)), "voi_lut", None
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    mono1 = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        scaled = window_units(values, center, width, function, mono1) if units else None  # before: in place
        out = window(values, center, width, function)
        if out is not None:
            return out, "window", scaled
    if prior is not None and key is not None:
        return prior.apply(values, key, mono1), "training window", None
    return percentile_window(values), "percentile", PERCENTILE_UNITS if units else None


def _first(v) -> float:
    return float(v[0]) if isinstance(v, list | tuple) or hasattr(v, "__getitem__") and not isinstance(v, str | bytes) else float(v)


def decode_dicom(
    source: str | Path | bytes, min_size: int | None = None, name: str = "", prior: WindowPrior | None = None, units: bool = False
) -> Decoded:
    """Decode one DICOM radiograph. ``min_size``: allow a reduced-resolution J2K decode; ``prior``: the windows a
    file without one is read through (else the percentile window); ``units``: report the window's units."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    label = name or str(source) if not isinstance(source, bytes) else name or "<bytes>"
    try:
        ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise DecodeError(f"{label}: not a readable DICOM file ({type(e).__name__})") from e
    if "PixelData" not in ds:
        raise DecodeError(f"{label}: no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DecodeError(f"{label}: multi-frame ({frames} frames), not a single radiograph")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DecodeError(f"{label}: {int(ds.SamplesPerPixel)} samples per pixel, not a grey radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(f"{label}: photometric interpretation {photometric} is not a grey radiograph")
    rows, cols = int(ds.Rows), int(ds.Columns)
    level = 0
    arr = None
    if min_size and ds.file_meta.get("TransferSyntaxUID") in J2K_SYNTAXES and int(ds.get("PixelRepresentation", 0)) == 0:
        level = _reduce_level(rows, cols, min_size)
        if level:
            arr = _j2k_reduced(ds, level)
            if arr is None:
                level = 0
    if arr is None:
        try:
            arr = ds.pixel_array
        except Exception as e:  # pydicom raises a zoo of types for truncated or odd data
            raise DecodeError(f"{label}: pixel data cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from e
        if arr.ndim == 2 and min_size and not ds.get("ModalityLUTSequence") and not ds.get("VOILUTSequence"):
            # The same resolution level as a JPEG 2000 decode would give, by box
            # averaging, before the window: as a viewer's GPU path resamples and
            # then windows. LUT tables need integer inputs, so they are excluded.
            level = _reduce_level(rows, cols, min_size, pillow_sizes=False)
            if level:
                arr = box_reduce(arr, 1 << level)
    if arr.ndim != 2:
        raise DecodeError(f"{label}: pixel array has shape {arr.shape}, expected 2-D")
    key = source if isinstance(source, bytes) else (Path(source).read_bytes() if prior is not None else None)
    img, how, scaled = _voi(arr, ds, prior, key, units)
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    return Decoded(np.ascontiguousarray(img, dtype=np.float32), rows, cols, level, how, scaled)


def decode_native_reduced(buffer, min_size: int | None, name: str = "", prior: WindowPrior | None = None) -> Decoded | None:
    """The shard builder's fast path for what the MIMIC-CXR DICOM release ships: one uncompressed
    16-bit little-endian frame. None when the file is anything else (``decode`` then handles it).

    pydicom parses the header only (the pixel data is deferred), the stored pixels are a
    zero-copy numpy view of ``buffer`` (a memory-mapped file), and they are box-reduced in
    integers to the same resolution level ``decode_dicom`` would use before windowing. So the
    12-16 MB frame is read once, where ``ds.pixel_array`` would copy it and a float conversion
    copy it twice more. Same result as ``decode_dicom`` (tested): the same reduce, the same window.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(buffer, defer_size=1024)
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        plain = (
            ds.file_meta.get("TransferSyntaxUID") in NATIVE_LITTLE_ENDIAN
            and int(ds.get("BitsAllocated", 0)) == 16
            and int(ds.get("PixelRepresentation", 1)) == 0
            and int(ds.get("SamplesPerPixel", 1)) == 1
            and int(ds.get("NumberOfFrames", 1) or 1) == 1
            and str(ds.get("PhotometricInterpretation", "")).strip() in ("MONOCHROME1", "MONOCHROME2")
            and not ds.get("ModalityLUTSequence")
            and not ds.get("VOILUTSequence")
            and raw is not None
            and getattr(raw, "value_tell", None) is not None
            and raw.length >= rows * cols * 2
        )
    except Exception:
        return None
    level = _reduce_level(rows, cols, min_size, pillow_sizes=False) if plain else 0
    if not level:
        return None
    stored = np.frombuffer(buffer, dtype="<u2", count=rows * cols, offset=raw.value_tell).reshape(rows, cols)
    bits = int(ds.get("BitsStored", 16))
    if bits < 16 and int(stored.max()) >> bits:  # bits above BitsStored set: mask them, as pydicom does
        stored = stored & np.uint16((1 << bits) - 1)
    small = box_reduce(stored, 1 << level)
    del stored  # no view of the buffer may outlive it
    img, how, scaled = _voi(small, ds, prior, buffer)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        img = 1.0 - img
    return Decoded(np.ascontiguousarray(img, dtype=np.float32), rows, cols, level, how, scaled)


def decode_jpg(
    source: str | Path | bytes, min_size: int | None = None, name: str = "", prior: WindowPrior | None = None, units: bool = False
) -> Decoded:
    """MIMIC-CXR-JPG, CheXpert's JPGs and NIH's PNGs: 8-bit grey, already windowed, read as they are. PadChest's
    PNGs are 16-bit (12 bits stored, no window in the file): Pillow's conversion to 8 bits would clip every value
    above 255 to white, so their values are windowed like a DICOM without a VOI (``prior``'s windows, else
    ``percentile_window``)."""
    from PIL import Image, UnidentifiedImageError

    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        cols, rows = im.size
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            if getattr(im, "n_frames", 1) > 1:
                raise DecodeError(f"{label}: multi-frame image")
            # reduced like a DICOM's stored values (box averages, before the window): the percentiles, and so the
            # window, are those of the image at the resolution it is read for, as for the training images
            level = _reduce_level(rows, cols, min_size, pillow_sizes=False)
            stored = np.asarray(im)
            if stored.dtype.itemsize > 2 and stored.size and 0 <= stored.min() and stored.max() <= 65535:
                stored = stored.astype(np.uint16)  # mode I: box_reduce's exact integer path
            values = box_reduce(stored, 1 << level) if level else stored.astype(np.float32)
            if prior is not None:
                key = source if isinstance(source, bytes) else Path(source).read_bytes()
                return Decoded(prior.apply(values, key), rows, cols, level, "training window (16-bit)")
            return Decoded(percentile_window(values), rows, cols, level, "percentile (16-bit)", PERCENTILE_UNITS if units else None)
        if min_size and im.format == "JPEG":
            im.draft("L", (min_size, min_size))  # DCT scaling: never below the requested size
        im = im.convert("L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DecodeError(f"{label}: not a readable image ({type(e).__name__})") from e
    if getattr(im, "n_frames", 1) > 1:
        raise DecodeError(f"{label}: multi-frame image")
    level = int(round(np.log2(cols / im.size[0]))) if im.size[0] else 0
    return Decoded(image=np.asarray(im, dtype=np.float32) / 255.0, rows=rows, cols=cols, reduce=level, window="jpg")


def decode(
    source: str | Path | bytes, min_size: int | None = None, name: str = "", prior: WindowPrior | None = None, units: bool = False
) -> Decoded:
    """DICOM or JPG/PNG, chosen by content (DICM magic at byte 128) or suffix; ``prior``: the windows a file that
    carries none is read through (``WindowPrior``; else the percentile window); ``units``: report the window read
    through in its units (``data.window_prior`` fits from them)."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError as e:
            raise DecodeError(f"{name or source}: file missing") from e
        name = name or str(source)
    if len(data) == 0:
        raise DecodeError(f"{name}: empty file")
    if data[128:132] == b"DICM" or str(name).lower().endswith(".dcm"):
        return decode_dicom(data, min_size, name, prior, units)
    return decode_jpg(data, min_size, name, prior, units)


def letterbox_geometry(rows: int, cols: int, size: int) -> tuple[int, int, int, int]:
    """Where a ``rows`` x ``cols`` image lands in its ``size`` x ``size`` letterbox: (top, left, height, width) of the
    resized image inside the square. One function for ``letterbox`` and for the way back (``to_source``)."""
    scale = size / max(rows, cols)
    nh, nw = max(1, round(rows * scale)), max(1, round(cols * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def to_source(heat: np.ndarray, rows: int, cols: int, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A map over a letterboxed model input (``size`` x ``size``, e.g. a Grad-CAM heat map) -> the same map over the
    ``rows`` x ``cols`` source image: the padding cut off, the rest resized back (bilinear, float32). What the
    localization scores are measured on and what overlays on the source image are drawn from. ``shape`` (rows, cols)
    resizes to a scaled copy of the source frame instead (a 3,000-px radiograph's map at a quarter of its size)."""
    from PIL import Image

    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2 or heat.shape[0] != heat.shape[1]:
        raise ValueError(f"to_source: a square map over the letterboxed input, not shape {heat.shape}")
    top, left, nh, nw = letterbox_geometry(rows, cols, heat.shape[0])
    inner = np.ascontiguousarray(heat[top : top + nh, left : left + nw])
    out_rows, out_cols = shape or (rows, cols)
    return np.asarray(Image.fromarray(inner, mode="F").resize((out_cols, out_rows), Image.Resampling.BILINEAR), dtype=np.float32)


def resized(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A decoded image (float32 in [0, 1]) resized, bilinear, to ``shape`` (rows, cols): the frame a map taken back by
    ``to_source`` is drawn on."""
    from PIL import Image

    return np.asarray(Image.fromarray(img, mode="F").resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased resize of the long side to ``size``, centred on black padding; uint8.

    Aspect ratio is kept (a chest radiograph is taller than wide; squashing it
    would widen the heart, the very thing a cardiomegaly model measures).
    Pillow's Lanczos filter widens its support when downscaling, so it is
    anti-aliased; ``reducing_gap`` first box-reduces by an integer factor, which
    is exact enough and much faster on 3000-pixel images.
    """
    from PIL import Image

    top, left, nh, nw = letterbox_geometry(*img.shape, size)
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    small = np.asarray(im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0))
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + nh, left : left + nw] = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
    return out


def prepare(source: str | Path | bytes, size: int, name: str = "", prior: WindowPrior | None = None) -> np.ndarray:
    """What the shard builder stores for one image: decoded, windowed, letterboxed uint8."""
    return letterbox(decode(source, min_size=size, name=name, prior=prior).image, size)


def header_geometry(source: str | Path | bytes) -> tuple[int, int, int]:
    """(bits stored, rows, columns) of an image file from its header alone, for the drift monitor's acquisition
    statistics: a DICOM's BitsStored, Rows and Columns; a PNG or JPG's 16 for a 16-bit mode (PadChest's), else 8, and
    its size. (0, 0, 0) when the header cannot be read (the statistic leaves it out)."""
    import pydicom
    from PIL import Image

    try:
        if isinstance(source, bytes):
            head, stream = source[:132], io.BytesIO(source)
        else:
            with open(source, "rb") as fh:
                head = fh.read(132)
            stream = source
        if head[128:132] == b"DICM" or str(source).lower().endswith(".dcm"):
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
            return int(ds.get("BitsStored", 0) or 0), int(ds.Rows), int(ds.Columns)
        with Image.open(stream) as im:
            return (16 if im.mode.startswith("I") else 8), im.size[1], im.size[0]
    except Exception:  # a missing or unreadable file: no figure for it, never a failed window
        return 0, 0, 0


def without_window(source: str | Path) -> bytes:
    """A DICOM as a sender that drops the window sends it: no window centre and width, no VOI LUT. What the drift
    benchmark reads MIMIC's held-out images as, and the tests send the served model and the PACS window store, to
    show that such a file is read through the training images' windows (``WindowPrior``), not the percentile
    window."""
    import pydicom

    ds = pydicom.dcmread(source)
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
