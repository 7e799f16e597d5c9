"""Synthetic chest radiographs with planted findings.

A parametric phantom, not a photograph: lungs, mediastinum, heart, spine,
diaphragm, ribs, clavicles and vessel markings, with exposure, noise and
positioning varying per image. Each of the 14 CheXpert observations has a
visible pattern that a classifier can learn (enlarged heart silhouette, basal
meniscus for effusion, apical lucency with a pleural line for pneumothorax,
tubes and a pacemaker for support devices, ...). ``render`` returns brightness
in [0, 1] as a MONOCHROME2 display shows it (bone and fluid bright, air dark).

Images are drawn on a grid of at most ``WORK`` pixels and resized to the
requested size with fine noise added at full resolution: the anatomy is smooth,
so this keeps large (2048-pixel) images cheap to make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

WORK = 320


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body habitus, stable across the patient's studies."""

    width: float  # thorax half-width scale
    heart: float  # heart size factor (1 = normal)
    dome: float  # diaphragm height offset
    rib_phase: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Anatomy:
        return cls(
            width=float(rng.uniform(0.9, 1.05)),
            heart=float(rng.uniform(0.92, 1.06)),
            dome=float(rng.uniform(-0.04, 0.04)),
            rib_phase=float(rng.uniform(-0.03, 0.03)),
        )


def _ramp(d: np.ndarray, soft: float) -> np.ndarray:
    """1 inside (d < 1), 0 outside, linear edge of width ``soft``."""
    return np.clip((1.0 - d) / soft + 0.5, 0.0, 1.0)


def _ellipse(x, y, cx, cy, rx, ry, soft=0.04):
    return _ramp(np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2), soft / min(rx, ry))


def _segment(x, y, x0, y0, x1, y1, width):
    """Soft line segment mask of the given half-width (on the renderer's grid: see ``_segment_box``)."""
    rows, cols, values = _segment_box(x, y, x0, y0, x1, y1, width)
    m = np.zeros(x.shape, dtype=values.dtype)
    m[rows, cols] = values
    return m


def _segment_box(x, y, x0, y0, x1, y1, width):
    """``(rows, cols, values)``: the segment's mask on the one block of the grid where it can be non-zero.

    Why not the whole grid: a vessel or a rib line covers a few percent of the image, and the distance computed on
    every pixel for each of the ~40 segments of a frontal view was the replica's largest cost. The values are the
    same expressions on the block's pixels, so each is the bit the whole-grid computation gives (a test compares the
    bytes of whole replicas); outside the block the mask is exactly 0 (every pixel there is farther than the
    half-width plus two pixels from the segment). The grid is the renderer's: ``y`` constant along each row and
    increasing down the rows, ``x`` increasing along each row and changing linearly from row to row (the sheared
    frontal grid included), so the block is found by binary search on the first and last rows.
    """
    step = max(abs(float(y[1, 0] - y[0, 0])), abs(float(x[0, 1] - x[0, 0]))) if min(x.shape) > 1 else 0.0
    pad = width + 2 * step
    r0 = int(np.searchsorted(y[:, 0], min(y0, y1) - pad, side="left"))
    r1 = max(r0, int(np.searchsorted(y[:, 0], max(y0, y1) + pad, side="right")))
    c0 = c1 = 0
    if r1 > r0:
        first, last = x[r0], x[r1 - 1]
        c0 = int(np.searchsorted(np.maximum(first, last), min(x0, x1) - pad, side="left"))
        c1 = max(c0, int(np.searchsorted(np.minimum(first, last), max(x0, x1) + pad, side="right")))
    rows, cols = slice(r0, r1), slice(c0, c1)
    xb, yb = x[rows, cols], y[rows, cols]
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((xb - x0) * dx + (yb - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    d = np.hypot(xb - (x0 + t * dx), yb - (y0 + t * dy))
    return rows, cols, np.clip(1.0 - d / width, 0.0, 1.0)


def _polyline(x, y, pts, width):
    m = np.zeros_like(x)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        rows, cols, values = _segment_box(x, y, x0, y0, x1, y1, width)
        np.maximum(m[rows, cols], values, out=m[rows, cols])
    return m


def _blobs(rng, x, y, centers, radius, lumpy=True):
    m = np.zeros_like(x)
    for cx, cy in centers:
        r = radius * rng.uniform(0.6, 1.2)
        g = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)))
        if lumpy:
            for _ in range(3):
                ox, oy = rng.normal(0, r, 2)
                g = np.maximum(g, 0.8 * np.exp(-(((x - cx - ox) ** 2 + (y - cy - oy) ** 2) / (2 * (0.6 * r) ** 2))))
        np.maximum(m, g, out=m)
    return m


def render(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    view: str,
    findings: dict[str, float],
    anatomy: Anatomy,
    regions: dict[str, list[tuple[float, float, float, float]]] | None = None,
) -> np.ndarray:
    """A radiograph of ``rows`` x ``cols``, brightness in [0, 1] (float32).

    ``findings`` maps CheXpert labels to a strength in [0, 1.2] (0 or absent:
    not present). ``view`` is the ViewPosition; lateral views use a side
    profile, everything else a frontal one (AP: magnified heart, more noise).
    ``regions``, when given, receives for each localized finding planted in a frontal view (``LOCALIZED``) where it
    was drawn: a box ``(x, y, w, h)`` for each separate region it drew (two lesions, two boxes), in this image's
    pixels, NIH's box convention (the top-left corner, then width and height). Collecting them draws no random
    number: the pixels are the same with or without.
    """
    n = min(WORK, max(rows, cols))
    wr, wc = (n, max(8, round(n * cols / rows))) if rows >= cols else (max(8, round(n * rows / cols)), n)
    y, x = np.mgrid[-1 : 1 : wr * 1j, -1 : 1 : wc * 1j].astype(np.float32)
    # shift the aspect so anatomy keeps its shape in non-square images
    x *= wc / wr if wr >= wc else 1.0
    y *= wr / wc if wc > wr else 1.0
    lateral = view in ("LATERAL", "LL", "XTABLE LATERAL")
    masks: dict[str, np.ndarray] = {}
    if lateral:
        b = _lateral(rng, x, y, findings, anatomy)
    else:
        b = _frontal(rng, x, y, findings, anatomy, ap=view.startswith("AP"), masks=masks)
    if regions is not None:
        regions.update({name: _boxes(mask, rows, cols) for name, mask in masks.items() if mask.any()})
    b += rng.normal(0, 0.012, b.shape).astype(np.float32)
    img = Image.fromarray(b.astype(np.float32), mode="F").resize((cols, rows), Image.BILINEAR)
    out = np.asarray(img, dtype=np.float32).copy()
    if max(rows, cols) > n:
        out += rng.normal(0, 0.008, out.shape).astype(np.float32)
    # exposure: gain, offset and gamma vary per image
    # the phantom's brightest anatomy sits near 1.0 and metal near 1.5: scale so
    # that nothing but the odd device clips
    gain, offset, gamma = 0.62 * rng.uniform(0.9, 1.12), rng.uniform(-0.03, 0.03), rng.uniform(0.8, 1.25)
    out = np.clip(out * gain + offset, 0.0, 1.0) ** gamma
    return out.astype(np.float32)


# the findings whose drawn region is recorded (``render``'s ``regions``): those drawn in one place, as NIH's
# radiologists boxed theirs; Edema (both lungs), Enlarged Cardiomediastinum, Fracture, Pleural Other and Support
# Devices are not localized here
LOCALIZED = ("Atelectasis", "Cardiomegaly", "Consolidation", "Lung Lesion", "Lung Opacity", "Pleural Effusion", "Pneumonia", "Pneumothorax")
REGION_LEVEL = 0.25  # a grid cell belongs to a finding's region where its drawn weight reaches this share of its peak


def _box(mask: np.ndarray, rows: int, cols: int) -> tuple[float, float, float, float]:
    """A region on the drawing grid -> its box (x, y, w, h) in the pixels of a rows x cols image (the grid is
    resized to the image whole, so a grid cell spans cols / grid-width pixels across)."""
    gr, gc = mask.shape
    ys, xs = np.nonzero(mask)
    sx, sy = cols / gc, rows / gr
    return (float(xs.min() * sx), float(ys.min() * sy), float((xs.max() - xs.min() + 1) * sx), float((ys.max() - ys.min() + 1) * sy))


FRAGMENT = 0.1  # a region under this share of the finding's largest is a sliver the lung's edge cut off: not boxed


def _boxes(mask: np.ndarray, rows: int, cols: int) -> list[tuple[float, float, float, float]]:
    """One box per 8-connected region of ``mask`` (scipy's labelling), left to right: a box around two lesions far
    apart would hold mostly lung. Slivers (under FRAGMENT of the largest region's cells, where the lung mask clipped
    a drawing) are left out, as a radiologist would not box them; two lesions differ by at most 3.5x in area."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    keep = [k + 1 for k in range(n) if sizes[k] >= FRAGMENT * sizes.max()]
    return sorted(_box(labels == k, rows, cols) for k in keep)


def _region(masks: dict | None, name: str, weight: np.ndarray) -> None:
    """Record where ``weight`` (what a finding added, before its strength) reaches REGION_LEVEL of its peak."""
    if masks is None:
        return
    peak = float(weight.max()) if weight.size else 0.0
    if peak > 0:
        region = weight >= REGION_LEVEL * peak
        masks[name] = masks[name] | region if name in masks else region


def _frontal(rng, x, y, f, an: Anatomy, ap: bool, masks: dict | None = None) -> np.ndarray:
    w = an.width
    rot = rng.uniform(-0.04, 0.04) + (rng.uniform(-0.05, 0.05) if ap else 0.0)
    x = x + rot * y  # slight rotation / shear of positioning
    b = np.full_like(x, 0.04)
    body = _ellipse(x, y, 0, 0.2, 0.9 * w, 1.25, 0.08)
    b += 0.48 * body
    # shoulders and neck
    b += 0.1 * _ellipse(x, y, 0, -1.05, 0.95 * w, 0.25, 0.1)

    heart_scale = an.heart * (1.12 if ap else 1.0) * (1 + 0.45 * f.get("Cardiomegaly", 0.0))
    hx, hy = 0.08 * w, 0.24 + an.dome
    heart = _ellipse(x, y, hx, hy, 0.245 * w * heart_scale, 0.19 * min(heart_scale, 1.25), 0.04)
    if f.get("Cardiomegaly", 0.0) > 0:
        _region(masks, "Cardiomegaly", heart)
    med_w = 0.09 * w * (1 + 0.9 * f.get("Enlarged Cardiomediastinum", 0.0))
    mediast = _ramp(np.abs(x + 0.01) / med_w, 0.3) * (y < 0.35)
    spine = _ramp(np.abs(x) / (0.055 * w), 0.3)

    lungs = np.zeros_like(x)
    domes = {}
    for side in (-1, 1):
        cx = side * 0.33 * w
        base = 0.44 + an.dome + (0.0 if side == -1 else 0.04)
        if f.get("Atelectasis", 0) > 0 and side == -1:
            base -= 0.06 * f["Atelectasis"]
        dome = base - 0.14 * (1 - ((x - cx) / (0.27 * w)) ** 2).clip(0, 1)
        domes[side] = (cx, base, dome)
        lung = _ellipse(x, y, cx, -0.05, 0.26 * w, 0.66, 0.05) * _ramp((y - dome + 0.02) / 0.02 + 1, 1.0)
        np.maximum(lungs, lung, out=lungs)
    lungs *= 1 - np.maximum(heart, mediast)

    # vessel markings radiate from the hila
    vessels = np.zeros_like(x)
    for side in (-1, 1):
        hx0, hy0 = side * 0.12 * w, 0.02
        for _ in range(9):
            ang = rng.uniform(-1.2, 1.3)
            length = rng.uniform(0.3, 0.55)
            x1 = hx0 + side * length * np.cos(ang) * w
            y1 = hy0 - length * np.sin(ang)
            xm = (hx0 + x1) / 2 + rng.normal(0, 0.03)
            ym = (hy0 + y1) / 2 + rng.normal(0, 0.03)
            np.maximum(vessels, 0.7 * _polyline(x, y, [(hx0, hy0), (xm, ym), (x1, y1)], 0.012), out=vessels)

    # pneumothorax: a lucent rim without markings, bounded by a visceral pleural line
    ptx = np.zeros_like(x)
    pleural_line = np.zeros_like(x)
    s_ptx = f.get("Pneumothorax", 0.0)
    if s_ptx > 0:
        side = rng.choice([-1, 1])
        cx = side * 0.33 * w
        shrink = 0.55 + 0.1 * rng.uniform() - 0.1 * s_ptx
        collapsed = _ellipse(x, y, cx - side * 0.06 * w, 0.02, 0.26 * w * shrink, 0.66 * (shrink + 0.15), 0.03)
        ptx = lungs * (1 - collapsed) * (np.sign(x) == side) * s_ptx
        edge = np.abs(np.sqrt(((x - cx + side * 0.06 * w) / (0.26 * w * shrink)) ** 2 + ((y - 0.02) / (0.66 * (shrink + 0.15))) ** 2) - 1)
        pleural_line = np.clip(1 - edge / 0.03, 0, 1) * lungs * (np.sign(x) == side) * s_ptx
        _region(masks, "Pneumothorax", ptx)
        vessels *= 1 - np.clip(ptx * 2, 0, 1)

    b -= 0.33 * lungs
    b -= 0.12 * ptx
    b += 0.12 * pleural_line
    b += 0.07 * vessels * lungs
    b += 0.14 * heart + 0.14 * mediast * body + 0.16 * spine * body

    # ribs (posterior arcs) and clavicles
    ribs = np.zeros_like(x)
    frac = f.get("Fracture", 0.0)
    frac_rib = rng.integers(2, 7) if frac > 0 else -1
    for side in (-1, 1):
        for k in range(9):
            y0 = -0.62 + k * 0.13 + an.rib_phase
            xs = x - side * 0.05 * w
            curve = y0 + 0.35 * (xs / w) ** 2 * side * np.sign(xs) - 0.12 * np.abs(xs / w)
            if k == frac_rib and side == 1:
                curve = curve + 0.035 * frac * (np.abs(xs) > 0.42 * w)
            band = np.clip(1 - np.abs(y - curve) / 0.022, 0, 1) * (np.abs(xs) < 0.6 * w) * (np.abs(xs) > 0.04 * w)
            np.maximum(ribs, band, out=ribs)
    b += 0.08 * ribs * body
    for side in (-1, 1):
        b += 0.12 * _segment(x, y, side * 0.06 * w, -0.72, side * 0.55 * w, -0.82, 0.03)

    # findings in the lung fields
    def lung_point(side=None, ylo=-0.45, yhi=0.3):
        side = side if side is not None else rng.choice([-1, 1])
        return side * rng.uniform(0.2, 0.42) * w, rng.uniform(ylo, yhi)

    s = f.get("Pleural Effusion", 0.0)
    if s > 0:
        sides = [-1, 1] if rng.uniform() < 0.35 else [rng.choice([-1, 1])]
        for side in sides:
            cx, base, dome = domes[side]
            height = (0.16 + 0.22 * rng.uniform()) * s
            lateral = np.abs(x - side * 0.1 * w) / (0.5 * w)
            level = base - height - 0.12 * np.clip(lateral, 0, 1)  # meniscus: higher laterally
            cage = _ellipse(x, y, cx, -0.05, 0.27 * w, 0.68, 0.05) * (1 - heart)
            fluid = _ramp((level - y) / 0.03 + 1, 1.0) * cage * (y < base + 0.05) * (np.sign(x) == side)
            _region(masks, "Pleural Effusion", fluid)
            b += 0.26 * fluid
    s = f.get("Consolidation", 0.0)
    if s > 0:
        blobs = _blobs(rng, x, y, [lung_point(yhi=0.25)], 0.1)
        _region(masks, "Consolidation", blobs * lungs)
        b += 0.26 * s * blobs * lungs
    s = f.get("Pneumonia", 0.0)
    if s > 0:
        side = rng.choice([-1, 1])
        blobs = _blobs(rng, x, y, [lung_point(side, -0.1, 0.3) for _ in range(4)], 0.05)
        _region(masks, "Pneumonia", blobs * lungs)
        b += 0.17 * s * blobs * lungs
    s = f.get("Lung Opacity", 0.0)
    if s > 0:
        blobs = _blobs(rng, x, y, [lung_point() for _ in range(2)], 0.09)
        _region(masks, "Lung Opacity", blobs * lungs)
        b += 0.13 * s * blobs * lungs
    s = f.get("Edema", 0.0)
    if s > 0:
        haze = np.exp(-((np.abs(x) - 0.2 * w) ** 2 / 0.03 + (y - 0.05) ** 2 / 0.12))
        b += 0.17 * s * haze * lungs
        for side in (-1, 1):  # Kerley B lines at the lateral bases
            for k in range(5):
                yy = 0.15 + 0.04 * k
                b += 0.07 * s * _segment(x, y, side * 0.55 * w, yy, side * 0.47 * w, yy, 0.006) * lungs
    s = f.get("Lung Lesion", 0.0)
    if s > 0:
        for _ in range(rng.integers(1, 3)):
            cx, cy = lung_point()
            r = rng.uniform(0.035, 0.065)
            lesion = _ellipse(x, y, cx, cy, r, r, 0.01)
            _region(masks, "Lung Lesion", lesion * lungs)
            b += 0.24 * s * lesion * lungs
    s = f.get("Atelectasis", 0.0)
    if s > 0:
        side = rng.choice([-1, 1])
        cy = rng.uniform(0.12, 0.3)
        band = _segment(x, y, side * 0.16 * w, cy, side * 0.45 * w, cy - 0.05, 0.025)
        _region(masks, "Atelectasis", band * lungs)
        b += 0.2 * s * band * lungs
    s = f.get("Pleural Other", 0.0)
    if s > 0:
        side = rng.choice([-1, 1])
        cap = _ellipse(x, y, side * 0.33 * w, -0.05, 0.26 * w, 0.66, 0.03) - _ellipse(x, y, side * 0.33 * w, -0.0, 0.23 * w, 0.62, 0.03)
        b += 0.16 * s * np.clip(cap, 0, 1) * (y < 0.1)
    s = f.get("Support Devices", 0.0)
    if s > 0:
        devices = np.zeros_like(x)
        kinds = [k for k in ("ett", "ng", "line", "pacer") if rng.uniform() < 0.55] or ["ett"]
        if "ett" in kinds:
            np.maximum(devices, _segment(x, y, 0.0, -1.0, 0.01, -0.3, 0.011), out=devices)
        if "ng" in kinds:
            np.maximum(devices, _polyline(x, y, [(-0.02, -1.0), (0.0, 0.2), (0.18 * w, 0.62), (0.3 * w, 0.7)], 0.009), out=devices)
        if "line" in kinds:
            np.maximum(
                devices, _polyline(x, y, [(-0.5 * w, -0.7), (-0.15 * w, -0.6), (-0.04 * w, -0.2), (-0.02 * w, 0.0)], 0.008), out=devices
            )
        if "pacer" in kinds:
            px, py = rng.uniform(0.3, 0.5) * w * rng.choice([-1, 1]), -0.62
            np.maximum(devices, _ellipse(x, y, px, py, 0.09, 0.06, 0.01), out=devices)
            np.maximum(devices, _polyline(x, y, [(px, py), (px * 0.4, -0.3), (0.1 * w, 0.25)], 0.007), out=devices)
        b += 0.5 * s * devices
    return b


def _lateral(rng, x, y, f, an: Anatomy) -> np.ndarray:
    """Side profile: anterior to the image left, spine to the right."""
    w = an.width
    b = np.full_like(x, 0.04)
    body = _ellipse(x, y, 0.0, 0.15, 0.8 * w, 1.25, 0.08)
    b += 0.5 * body
    dome = 0.42 + an.dome - 0.12 * (1 - (x / (0.6 * w)) ** 2).clip(0, 1)
    lung = _ellipse(x, y, 0.02, -0.05, 0.52 * w, 0.7, 0.06) * _ramp((y - dome + 0.02) / 0.02 + 1, 1.0)
    heart_scale = an.heart * (1 + 0.4 * f.get("Cardiomegaly", 0.0))
    heart = _ellipse(x, y, -0.25 * w, 0.25 + an.dome, 0.25 * w * heart_scale, 0.24 * min(heart_scale, 1.25), 0.05)
    lung *= 1 - heart
    spine = _ramp(np.abs(x - 0.6 * w) / (0.09 * w), 0.3)
    b -= 0.3 * lung
    b += 0.12 * heart + 0.2 * spine * body
    for k in range(8):
        yy = -0.6 + 0.14 * k + an.rib_phase
        b += 0.05 * _segment(x, y, 0.55 * w, yy, -0.2 * w, yy + 0.2, 0.018) * body
    s = f.get("Pleural Effusion", 0.0)
    if s > 0:  # posterior costophrenic sulcus fills first
        level = 0.42 + an.dome - (0.12 + 0.2 * rng.uniform()) * s - 0.15 * np.clip(x / (0.5 * w), 0, 1)
        b += 0.22 * _ramp((level - y) / 0.03 + 1, 1.0) * (x > 0) * lung
    for name, amp, r in (("Consolidation", 0.22, 0.12), ("Pneumonia", 0.15, 0.08), ("Lung Opacity", 0.12, 0.1)):
        s = f.get(name, 0.0)
        if s > 0:
            b += amp * s * _blobs(rng, x, y, [(rng.uniform(-0.2, 0.4) * w, rng.uniform(-0.3, 0.3))], r) * lung
    s = f.get("Edema", 0.0)
    if s > 0:
        b += 0.14 * s * np.exp(-((x - 0.05) ** 2 / 0.1 + (y - 0.05) ** 2 / 0.1)) * lung
    s = f.get("Support Devices", 0.0)
    if s > 0:
        b += 0.45 * s * _polyline(x, y, [(-0.3 * w, -1.0), (-0.2 * w, -0.4), (-0.1 * w, 0.1)], 0.01)
    return b
