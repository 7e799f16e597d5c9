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

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
PERCENTILE_WINDOW = (0.5, 99.5)


class DecodeError(ValueError):
    """The file cannot be turned into a single grey radiograph."""


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray  # float32 (rows, cols) in [0, 1], bright = dense
    rows: int  # the full-resolution size
    cols: int
    reduce: int  # resolution levels skipped (0: decoded at full size)
    window: str  # "voi_lut", "window", "percentile", "training window" or "jpg" (16-bit PNGs: "... (16-bit)")
    # the header's window in units of the image's percentile window (``window_units``); None when not read through one
    window_units: tuple[float, float, str] | None = None


@dataclass(frozen=True)
class WindowPrior:
    """The windows the training split's headers carry, each as (center, width, VOI LUT function) in units of its own
    image's percentile window: 0 at the 0.5th percentile of the values the reader windows, 1 at the 99.5th
    (``window_units``; ``data.window_prior`` fits it). A file that carries no window (PadChest's 16-bit PNGs, a DICOM
    without one) is read through one of them instead of the percentile window.

    Why: the models were trained on images read through their headers' windows, which differ from the percentile
    window (wider, narrower, another function). Every windowless image read through the one percentile rule made a
    set whose files drop the window look unlike the training images as a whole (the drift monitor flagged every
    PadChest-format window with no image shift, #51) though no image differed. One window is drawn per image, by
    a hash of its values, so a windowless set reads through the training windows' own mix, and an image reads the
    same every time. What is lost: a window fitted to that image by its modality; the draw ignores content."""

    windows: tuple[tuple[float, float, str], ...]

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("a WindowPrior needs at least one window")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``values`` (float32, in place) through the window drawn for them, onto [0, 1]."""
        lo, hi = percentile_bounds(values)
        sub = np.ascontiguousarray(_subsample(values))
        pick = int.from_bytes(hashlib.blake2b(sub.tobytes(), digest_size=8).digest(), "little") % len(self.windows)
        center, width, function = self.windows[pick]
        out = window(values, lo + center * (hi - lo), width * (hi - lo), function)
        return percentile_window(values) if out is None else out

    def digest(self) -> str:
        """What the windows are (a shard folder built through another prior is rebuilt)."""
        return hashlib.sha256(json.dumps([list(w) for w in self.windows]).encode()).hexdigest()[:16]


def window_units(values: np.ndarray, center: float, width: float, function: str) -> tuple[float, float, str]:
    """A window over ``values`` in units of their percentile window (``WindowPrior``); call before windowing."""
    lo, hi = percentile_bounds(values)
    return float(center - lo) / float(hi - lo), float(width) / float(hi - lo), function


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


def _voi(arr: np.ndarray, ds, prior: WindowPrior | None = None) -> tuple[np.ndarray, str, tuple | None]:
    """Modality LUT then VOI LUT / window / percentile window (``prior``'s without a window) -> ([0, 1], how, the
    header window's units)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        src = apply_modality_lut(arr, ds) if ds.get("ModalityLUTSequence") else arr
        out = apply_voi_lut(src, ds, index=0, prefer_lut=True).astype(np.float32)
        return _clip01(out / np.float32(2**bits - 1)), "voi_lut", None
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        units = window_units(values, center, width, function)  # before the window: it works in place
        out = window(values, center, width, function)
        if out is not None:
            return out, "window", units
    if prior is not None:
        return prior.apply(values), "training window", None
    return percentile_window(values), "percentile", None


def _first(v) -> float:
    return float(v[0]) if isinstance(v, list | tuple) or hasattr(v, "__getitem__") and not isinstance(v, str | bytes) else float(v)


def _clip01(x: np.ndarray) -> np.ndarray:
    # np.clip takes a slow generic path on large float arrays; min/max in place do not
    np.maximum(x, 0, out=x)
    np.minimum(x, 1, out=x)
    return x


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray | None:
    """The DICOM VOI window (PS3.3 C.11.2.1.2), normalised to [0, 1]; in place on float32.

    pydicom's ``apply_windowing`` computes the same in float64 with boolean
    masks, about 5x slower on a 3000-pixel radiograph; tests compare the two.
    Returns None for a width the standard does not allow.
    """
    if function == "LINEAR":
        if width < 1:
            return None
        c, w = center - 0.5, width - 1.0
        if w == 0:
            return (values > c).astype(np.float32)
    elif function == "LINEAR_EXACT":
        if width <= 0:
            return None
        c, w = center, width
    elif function == "SIGMOID":
        if width <= 0:
            return None
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    else:
        return None
    values -= np.float32(c - w / 2)
    values *= np.float32(1.0 / w)
    return _clip01(values)


def percentile_bounds(values: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentile of a subsample of ``values`` (at most about 256 x 256), ``hi`` above ``lo``:
    the window an image without one is read through (``percentile_window``), and the one the replica's writer puts
    in such an image so that it reads the same (``dicom_writer``)."""
    lo, hi = np.percentile(_subsample(values), PERCENTILE_WINDOW)
    return lo, (hi if hi > lo else lo + 1)


def _subsample(values: np.ndarray) -> np.ndarray:
    return values[:: max(1, values.shape[0] // 256), :: max(1, values.shape[1] // 256)]


def percentile_window(values: np.ndarray) -> np.ndarray:
    """Window the 0.5th to 99.5th percentile (of a subsample) onto [0, 1]; in place."""
    lo, hi = percentile_bounds(values)
    values -= np.float32(lo)
    values *= np.float32(1.0 / (hi - lo))
    return _clip01(values)


def decode_dicom(source: str | Path | bytes, min_size: int | None = None, name: str = "", prior: WindowPrior | None = None) -> Decoded:
    """Decode one DICOM radiograph. ``min_size``: allow a reduced-resolution J2K decode; ``prior``: the windows a
    file without one is read through (else the percentile window)."""
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
    img, how, units = _voi(arr, ds, prior)
    if photometric == "MONOCHROME1":
        img = 1.0 - img
    return Decoded(np.ascontiguousarray(img, dtype=np.float32), rows, cols, level, how, units)


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
    img, how, units = _voi(small, ds, prior)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        img = 1.0 - img
    return Decoded(np.ascontiguousarray(img, dtype=np.float32), rows, cols, level, how, units)


def decode_jpg(source: str | Path | bytes, min_size: int | None = None, name: str = "", prior: WindowPrior | None = None) -> Decoded:
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
            values = np.asarray(im).astype(np.float32)
            if prior is not None:
                return Decoded(prior.apply(values), rows, cols, 0, "training window (16-bit)")
            return Decoded(percentile_window(values), rows, cols, 0, "percentile (16-bit)")
        if min_size and im.format == "JPEG":
            im.draft("L", (min_size, min_size))  # DCT scaling: never below the requested size
        im = im.convert("L")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DecodeError(f"{label}: not a readable image ({type(e).__name__})") from e
    if getattr(im, "n_frames", 1) > 1:
        raise DecodeError(f"{label}: multi-frame image")
    level = int(round(np.log2(cols / im.size[0]))) if im.size[0] else 0
    return Decoded(image=np.asarray(im, dtype=np.float32) / 255.0, rows=rows, cols=cols, reduce=level, window="jpg")


def decode(source: str | Path | bytes, min_size: int | None = None, name: str = "", prior: WindowPrior | None = None) -> Decoded:
    """DICOM or JPG/PNG, chosen by content (DICM magic at byte 128) or suffix; ``prior``: the windows a file that
    carries none is read through (``WindowPrior``; else the percentile window)."""
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
        return decode_dicom(data, min_size, name, prior)
    return decode_jpg(data, min_size, name, prior)


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
