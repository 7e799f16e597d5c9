"""The VOI step of reading a radiograph: the DICOM window (PS3.3 C.11.2.1.2), the percentile window an image without
one is read through, and the ``WindowPrior`` that reads such an image through the windows the training images were
read through instead. Apart from ``data.dicom`` so that the replica's writer and its external exports window
values exactly as the reader does, and ``data.window_prior`` can fit a prior, without the decoders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

PERCENTILE_WINDOW = (0.5, 99.5)


@dataclass(frozen=True)
class WindowPrior:
    """The windows the training split's images were read through, each as (center, width, VOI LUT function) in
    units of its own image's percentile window, 0 at the 0.5th percentile of the values the reader windows and 1 at
    the 99.5th, in display orientation (bright = dense), LINEAR windows as their exact equivalent
    (``window_units``; ``data.window_prior`` fits it). A file that carries no window (PadChest's 16-bit PNGs, a
    DICOM without one) is read through one of them instead of the percentile window.

    Why: the models were trained on images read through their headers' windows, which differ from the percentile
    window (wider, narrower, another function). Every windowless image read through the one percentile rule made a
    set whose files drop the window look unlike the training images as a whole (the drift monitor flagged every
    PadChest-format window with no image shift, #51) though no image differed. One window is drawn per file, by a
    hash of its bytes, so a windowless set reads through the training windows' own mix, and a file reads the same
    every time, at every size. What is lost: a window fitted to that image by its modality; the draw ignores
    content."""

    windows: tuple[tuple[float, float, str], ...]

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("a WindowPrior needs at least one window")

    def apply(self, values: np.ndarray, key, monochrome1: bool = False) -> np.ndarray:
        """``values`` (float32, in place) through the window drawn for the file whose bytes are ``key``, onto [0, 1]
        (before a MONOCHROME1 image's inversion, which the caller does)."""
        lo, hi = percentile_bounds(values)
        pick = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % len(self.windows)
        center, width, function = self.windows[pick]
        center = 1.0 - center if monochrome1 else center  # mirrored: the caller inverts the windowed values
        out = window(values, lo + center * (hi - lo), width * (hi - lo), function)
        return percentile_window(values) if out is None else out

    def digest(self) -> str:
        """What the windows are (a shard folder built through another prior is rebuilt)."""
        return hashlib.sha256(json.dumps([list(w) for w in self.windows]).encode()).hexdigest()[:16]


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # what ``window`` reads (PS3.3 C.11.2.1.3)
PERCENTILE_UNITS = (0.5, 1.0, "LINEAR_EXACT")  # the percentile window itself, in its own units


def window_units(values: np.ndarray, center: float, width: float, function: str, monochrome1: bool = False) -> tuple | None:
    """A header window over ``values`` in ``WindowPrior``'s units (call before windowing: it works in place); a
    LINEAR window as its exact equivalent (PS3.3 C.11.2.1.2: center - 0.5, width - 1), so that it scales; None for
    one that cannot be scaled (a LINEAR width of 1, a threshold)."""
    if function == "LINEAR":
        if width <= 1:
            return None
        center, width, function = center - 0.5, width - 1.0, "LINEAR_EXACT"
    lo, hi = percentile_bounds(values)
    u = float(center - lo) / float(hi - lo)
    return (1.0 - u if monochrome1 else u), float(width) / float(hi - lo), function


def clip01(x: np.ndarray) -> np.ndarray:
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
    return clip01(values)


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
    return clip01(values)


def usable_window(w: tuple) -> bool:
    """A (center, width, function) the reader can apply: finite, width above 0, a function ``window`` reads."""
    try:
        c, width, function = w
        return bool(np.isfinite(float(c)) and np.isfinite(float(width)) and float(width) > 0 and function in VOI_FUNCTIONS)
    except (TypeError, ValueError):
        return False


def stored_windows(raw, where: str) -> tuple[tuple[float, float, str], ...]:
    """A prior's windows as stored (a checkpoint's ``window_prior``): (center, width, function) triples, finite,
    width above 0, a function ``window`` reads; anything else is an error naming ``where`` (a damaged prior would
    read every windowless file wrongly, in silence)."""
    try:
        if not isinstance(raw, list | tuple):
            raise TypeError(raw)
        out = tuple((float(c), float(w), str(f)) for c, w, f in raw)
    except (TypeError, ValueError):
        raise ValueError(f"{where} is not a list of [center, width, function]") from None
    bad = [w for w in out if not usable_window(w)]
    if bad:
        raise ValueError(f"{where} holds {len(bad)} unusable window(s), the first {list(bad[0])}")
    return out
