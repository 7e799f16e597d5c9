"""Where the classifiers look, scored against boxes as ChestX-ray8 scores it (Wang et al., CVPR 2017, section 5.2).

For a finding with boxes and an image where it is boxed, the model's Grad-CAM map for that finding (computed on the
letterboxed model input, mapped back onto the source image by ``data.dicom.to_source``) is turned into boxes the
paper's way: the pixels at or above a level (a share of the map's maximum; the paper kept 60 or 180 of 255) are
kept and a box is drawn around each connected region. A ground-truth box is found at T when some detected box's
intersection with it over the detected box's own area (IoBB) exceeds T; the accuracy at T is the share of boxes
found (the paper's "Acc." at T(IoBB) = 0.1, 0.25, 0.5, 0.75, 0.9). The level is chosen on the validate split, per
model and finding (the mean accuracy over the five T), never on test. The pointing game (Zhang et al., ECCV 2016)
asks only whether the map's maximum lies inside a box of the finding; a maximum reached over a plateau (the
baselines' flat maps) counts the share of the plateau inside, as a tie counts one half in an AUC.

Two baselines never see the image: the finding's mean box over the training split (in shares of the image's
width and height, so any image size takes it), and a uniform map over the region where the training split's
boxes of every finding lie (the stand-in for a lung mask: the project segments no lungs). A model beats them only
by reading the image. Intervals are the patient bootstrap used everywhere (``vision.resampling.draw``); the
model's pointing rate minus the mean box's is paired: the same resamples of the same images.

Maps and boxes are compared in the source image's frame, scaled down whole to at most ``FRAME`` px a side
(comparing 3,000-px maps costs time and changes no share by more than a pixel's width).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from cxr_pipeline.data.dicom import letterbox_geometry, to_source
from cxr_pipeline.labels import LABEL_BY_SLUG, slug
from cxr_pipeline.vision.resampling import draw, percentile_interval

IOBB_T = (0.1, 0.25, 0.5, 0.75, 0.9)
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the map thresholds chosen among on validate
FRAME = 256  # the long side (px) of the frame maps and boxes are compared in
GRAD_CAM, MEAN_BOX, UNIFORM_LUNGS, BOX_PRIOR = "grad_cam", "mean_box", "uniform_lungs", "box_prior"
BASELINES = (MEAN_BOX, BOX_PRIOR, UNIFORM_LUNGS)
DEFAULT_LEVEL = 0.5  # used when the validate split has no boxed image of a finding (recorded as the level's source)


def iobb_column(t: float) -> str:
    """'iobb_25' for T = 0.25: the accuracy column at T."""
    return f"iobb_{round(t * 100):02d}"


def frame_shape(rows: int, cols: int) -> tuple[int, int, float]:
    """(rows, cols, scale) of the comparison frame of a ``rows`` x ``cols`` source image."""
    s = min(1.0, FRAME / max(rows, cols))
    return max(1, round(rows * s)), max(1, round(cols * s)), s


def heat_boxes(heat: np.ndarray, level: float) -> np.ndarray:
    """ChestX-ray8's boxes of a map: one (x, y, w, h) around each 8-connected region at or above ``level`` x the
    map's maximum (scipy's labelling); none for a map with no positive value."""
    from scipy import ndimage

    peak = float(heat.max()) if heat.size else 0.0
    if peak <= 0:
        return np.zeros((0, 4))
    labels, _ = ndimage.label(heat >= level * peak, structure=np.ones((3, 3)))
    return np.array(
        [(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start) for s in ndimage.find_objects(labels)], dtype=float
    ).reshape(-1, 4)


def iobb(detected: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(k, m) intersection of each detected box with each true box over the detected box's area (x, y, w, h rows)."""
    d, t = np.asarray(detected, float).reshape(-1, 4), np.asarray(truth, float).reshape(-1, 4)
    x0 = np.maximum(d[:, None, 0], t[None, :, 0])
    y0 = np.maximum(d[:, None, 1], t[None, :, 1])
    x1 = np.minimum(d[:, None, 0] + d[:, None, 2], t[None, :, 0] + t[None, :, 2])
    y1 = np.minimum(d[:, None, 1] + d[:, None, 3], t[None, :, 1] + t[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (d[:, 2] * d[:, 3])[:, None]


def found(detected: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(m, len(IOBB_T)) whether each true box is found at each T: some detected box's IoBB with it exceeds T."""
    best = iobb(detected, truth).max(axis=0) if len(detected) else np.zeros(len(truth))
    return best[:, None] > np.asarray(IOBB_T)[None, :]


def inside(truth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels (by their centres) inside any of the boxes, as a mask of ``shape``."""
    rows, cols = shape
    yc, xc = np.arange(rows) + 0.5, np.arange(cols) + 0.5
    mask = np.zeros(shape, dtype=bool)
    for x, y, w, h in np.asarray(truth, float).reshape(-1, 4):
        mask |= ((yc >= y) & (yc < y + h))[:, None] & ((xc >= x) & (xc < x + w))[None, :]
    return mask


def pointing(heat: np.ndarray, truth: np.ndarray) -> float:
    """The pointing game: 1 when the map's maximum lies in a true box; over a plateau, the share of it inside (a
    map with no positive value is one plateau: it points nowhere in particular)."""
    at = heat >= heat.max()
    return float((at & inside(truth, heat.shape)).sum() / at.sum())


def box_map(share: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """A flat map: 1 inside the box given in shares of the frame ``(x0, y0, x1, y1)``, 0 outside."""
    rows, cols = shape
    x0, y0, x1, y1 = share
    return inside(np.array([[x0 * cols, y0 * rows, (x1 - x0) * cols, (y1 - y0) * rows]]), shape).astype(np.float32)


@dataclass(frozen=True)
class Case:
    """One image with boxes of one finding, in its comparison frame."""

    dicom_id: str
    patient: str
    shape: tuple[int, int]  # the frame's rows, cols
    truth: np.ndarray  # (m, 4) x, y, w, h in frame pixels


def cases_of(rows: pl.DataFrame, boxes: pl.DataFrame, finding: str) -> list[Case]:
    """The images of ``rows`` (dicom_id, subject_id, rows, cols; in this order) with boxes of ``finding``."""
    mine = boxes.filter(pl.col("finding") == finding)
    by_id = {k[0]: g.select("x", "y", "w", "h").to_numpy() for k, g in mine.group_by("dicom_id")}
    out = []
    for r in rows.iter_rows(named=True):
        if r["dicom_id"] in by_id:
            fr, fc, s = frame_shape(r["rows"], r["cols"])
            out.append(Case(r["dicom_id"], str(r["subject_id"]), (fr, fc), by_id[r["dicom_id"]] * s))
    return out


def shares(boxes: pl.DataFrame) -> pl.DataFrame:
    """Boxes joined to their image's size (``rows``, ``cols``) -> their corners as shares: x0, y0, x1, y1."""
    return boxes.select(
        "finding",
        (pl.col("x") / pl.col("cols")).alias("x0"),
        (pl.col("y") / pl.col("rows")).alias("y0"),
        ((pl.col("x") + pl.col("w")) / pl.col("cols")).alias("x1"),
        ((pl.col("y") + pl.col("h")) / pl.col("rows")).alias("y1"),
    )


PRIOR_GRID = 64  # cells a side of the box-frequency prior, in shares of the image


@dataclass(frozen=True)
class Baselines:
    """What the training split's boxes say without an image: each finding's mean box, where its boxes lie most often
    (a frequency map: on one side for a finding drawn on one side more often; the mean box of a finding on either
    side straddles the midline), the region of every finding's boxes, and how many boxes each was averaged over."""

    mean_box: dict[str, tuple[float, float, float, float]]
    lungs: tuple[float, float, float, float]
    counts: dict[str, int] = field(default_factory=dict)
    prior: dict[str, np.ndarray] = field(default_factory=dict)  # finding -> (PRIOR_GRID, PRIOR_GRID) box frequency

    @classmethod
    def of(cls, training_boxes: pl.DataFrame) -> Baselines:
        """From the training split's boxes joined to their images' sizes (``rows``, ``cols``). The region spans the
        2.5th to 97.5th percentile of every box's edges (a few stray boxes do not stretch it to the corners)."""
        s = shares(training_boxes)
        means = s.group_by("finding").agg(pl.len().alias("n"), *(pl.col(c).mean() for c in ("x0", "y0", "x1", "y1")))
        mean_box = {r["finding"]: (r["x0"], r["y0"], r["x1"], r["y1"]) for r in means.iter_rows(named=True)}
        lo, hi = (lambda c: float(s[c].quantile(0.025))), (lambda c: float(s[c].quantile(0.975)))
        lungs = (lo("x0"), lo("y0"), hi("x1"), hi("y1")) if s.height else (0.0, 0.0, 1.0, 1.0)
        prior = {}
        for (finding,), g in s.group_by("finding"):
            prior[finding] = sum(
                (box_map(b, (PRIOR_GRID, PRIOR_GRID)) for b in g.select("x0", "y0", "x1", "y1").rows()), np.zeros((PRIOR_GRID,) * 2)
            )
        return cls(mean_box, lungs, dict(zip(means["finding"], means["n"], strict=True)), prior)

    def maps(self, method: str, finding: str, cases: list[Case]) -> list[np.ndarray]:
        if method == BOX_PRIOR:
            from PIL import Image

            grid = Image.fromarray(self.prior[finding].astype(np.float32), mode="F")
            return [np.asarray(grid.resize((c.shape[1], c.shape[0]), Image.Resampling.NEAREST)) for c in cases]
        share = self.mean_box[finding] if method == MEAN_BOX else self.lungs
        return [box_map(share, c.shape) for c in cases]


def scores(maps: list[np.ndarray], cases: list[Case], level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: boxes found at each T (n, len(IOBB_T)), true boxes (n,), pointing (n,), detected boxes (n,)."""
    hits, n_true, point, n_det = [], [], [], []
    for heat, case in zip(maps, cases, strict=True):
        det = heat_boxes(heat, level)
        hits.append(found(det, case.truth).sum(axis=0))
        n_true.append(len(case.truth))
        point.append(pointing(heat, case.truth))
        n_det.append(len(det))
    return np.array(hits, float).reshape(-1, len(IOBB_T)), np.array(n_true, float), np.array(point), np.array(n_det, float)


def choose_level(maps: list[np.ndarray], cases: list[Case]) -> tuple[float, str]:
    """The level with the best mean IoBB accuracy over the five T on these (validate) images; among equals, the one
    nearest the default. When no level finds a single box, none was chosen: the default, said so."""
    if not cases:
        return DEFAULT_LEVEL, "default (no boxed validate image)"
    acc = {lv: (lambda h, n: float((h.sum(axis=0) / n.sum()).mean()))(*scores(maps, cases, lv)[:2]) for lv in LEVELS}
    if max(acc.values()) == 0:
        return DEFAULT_LEVEL, f"default (no level found a box on validate, {len(cases)} images)"
    best = max(LEVELS, key=lambda lv: (acc[lv], -abs(lv - DEFAULT_LEVEL)))
    return best, f"validate ({len(cases)} images)"


def _rate(weights: np.ndarray, num: np.ndarray, den: np.ndarray) -> tuple[float, float | None, float | None]:
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (weights @ num) / (weights @ den)
    return float(num.sum() / den.sum()), *percentile_interval(boot)


def measure(maps: list[np.ndarray], cases: list[Case], level: float, weights: np.ndarray) -> tuple[dict, np.ndarray]:
    """The table's measures of ``maps`` on ``cases`` at ``level`` with intervals from ``weights`` (resamples x
    images); also each image's pointing score, for the paired differences."""
    hits, n_true, point, n_det = scores(maps, cases, level)
    row: dict = {"n_boxes": int(n_true.sum()), "detected_per_image": float(n_det.mean())}
    row["pointing"], row["pointing_lo"], row["pointing_hi"] = _rate(weights, point, np.ones(len(point)))
    for k, t in enumerate(IOBB_T):
        c = iobb_column(t)
        row[c], row[f"{c}_lo"], row[f"{c}_hi"] = _rate(weights, hits[:, k], n_true)
    return row, point


def grad_cam_maps(
    model, images: np.ndarray, output: int, cases: list[Case], sizes: Sequence[tuple[int, int]], batch: int = 64
) -> list[np.ndarray]:
    """Grad-CAM of ``output`` on the letterboxed ``images`` (aligned with ``cases``), mapped onto each source frame
    (``sizes``: each source image's full rows, cols, whose letterbox the map is cut from)."""
    from cxr_pipeline.vision.serving import grad_cam

    cams = np.concatenate([grad_cam(model, images[i : i + batch], output) for i in range(0, len(images), batch)]) if len(images) else []
    return [to_source(cam, r, c, case.shape) for cam, case, (r, c) in zip(cams, cases, sizes, strict=True)]


@dataclass
class Split:
    """The boxed images of one split and finding: the cases, their letterboxed images at each model size and their
    source sizes (``images``: size -> (n, size, size) uint8 aligned with ``cases``)."""

    cases: list[Case]
    images: Callable[[int], np.ndarray]
    sizes: list[tuple[int, int]]


def registered(champ) -> str:
    """'cxr-edema v3': how the table names a champion."""
    return f"{champ.name} v{champ.version}"


def choose_levels(champions: list, val: dict[str, Split]) -> dict[tuple[str, str], tuple[float, str]]:
    """(registered, slug) -> (level, where from): each champion's level for each finding it outputs, chosen on the
    validate split's boxed images (``val``: finding -> its boxed images); the default where it has none."""
    out = {}
    for champ in champions:
        m = champ.model
        for j, s in enumerate(m.slugs):
            v = val.get(LABEL_BY_SLUG[s])
            cases = v.cases if v is not None else []
            maps = grad_cam_maps(m, v.images(m.size), j, cases, v.sizes) if cases else []
            out[(registered(champ), s)] = choose_level(maps, cases)
    return out


def grid_ceiling(grid: int, size: int, cases: list[Case], sizes: Sequence[tuple[int, int]]) -> float:
    """An upper bound on the pointing game of any map upsampled (bilinear) from a ``grid`` x ``grid`` map over the
    ``size``-px letterbox: the share of ``cases`` where a true box holds a cell centre or reaches the band of half a
    cell along the image's edge. Inside, the upsampled map's maximum sits on a cell centre; next to the edge it can
    be a plateau reaching the border (a border cell's value is held to the edge), or lie on the edge where the
    letterbox's padding was cut off. Why a coarse map misses small boxes, as a number."""
    if not cases:
        return float("nan")
    centres = (np.arange(grid) + 0.5) * size / grid
    hits = 0
    for case, (rows, cols) in zip(cases, sizes, strict=True):
        top, left, nh, nw = letterbox_geometry(rows, cols, size)
        fy, fx = case.shape[0] / nh, case.shape[1] / nw  # frame pixels per letterbox pixel
        reach = np.zeros(case.shape, dtype=bool)
        band_y, band_x = int(np.ceil(0.5 * size / grid * fy)), int(np.ceil(0.5 * size / grid * fx))
        reach[:band_y], reach[-band_y:], reach[:, :band_x], reach[:, -band_x:] = True, True, True, True
        ys = ((centres[(centres >= top) & (centres < top + nh)] - top) * fy).astype(int)
        xs = ((centres[(centres >= left) & (centres < left + nw)] - left) * fx).astype(int)
        reach[np.ix_(np.clip(ys, 0, case.shape[0] - 1), np.clip(xs, 0, case.shape[1] - 1))] = True
        hits += bool((reach & inside(case.truth, case.shape)).any())
    return hits / len(cases)


def model_row(champ, j: int, test: Split, level: tuple[float, str], weights, baseline_points: dict[str, np.ndarray]) -> dict:
    """One Grad-CAM row: ``champ`` (``vision.external.Champion``) output ``j`` on the test cases at ``level``, with its
    pointing rate's paired differences from the mean box's and the box prior's (``baseline_points``: each
    baseline's per-image pointing scores)."""
    from cxr_pipeline.vision.serving import cam_grid

    m = champ.model
    maps = grad_cam_maps(m, test.images(m.size), j, test.cases, test.sizes)
    row, point = measure(maps, test.cases, level[0], weights)
    row["cam_grid"] = cam_grid(m.arch, m.size)
    row["pointing_ceiling"] = grid_ceiling(row["cam_grid"], m.size, test.cases, test.sizes)
    out = {"model": champ.kind, "registered": registered(champ), "method": GRAD_CAM, "level": level[0], "level_from": level[1], **row}
    for name, method in (("mean_box", MEAN_BOX), ("box_prior", BOX_PRIOR)):
        diff = _rate(weights, point - baseline_points[method], np.ones(len(point)))
        out.update({f"pointing_vs_{name}": diff[0], f"pointing_vs_{name}_lo": diff[1], f"pointing_vs_{name}_hi": diff[2]})
    return out


def localization_table(
    dataset: str,
    champions: list,
    test: dict[str, Split],
    baselines: Baselines,
    levels: dict[tuple[str, str], tuple[float, str]],
    n_boot: int,
    seed: int,
) -> pl.DataFrame:
    """Every champion x finding with boxed test images (``test``: finding -> its boxed images), at the levels chosen
    on validate (``choose_levels``; an external set takes the internal choice), beside the two baselines (a row each
    per finding)."""
    out = []
    for finding, t in test.items():
        if not t.cases or finding not in baselines.mean_box:
            continue
        weights = draw(len(t.cases), [c.patient for c in t.cases], n_boot, np.random.default_rng(seed)).weights
        common = {"dataset": dataset, "slug": slug(finding), "pathology": finding, "n_images": len(t.cases)}
        common["n_patients"] = len({c.patient for c in t.cases})
        points = {}
        for method in BASELINES:
            row, points[method] = measure(baselines.maps(method, finding, t.cases), t.cases, DEFAULT_LEVEL, weights)
            level_from = "one box, whatever the level" if method != BOX_PRIOR else f"level {DEFAULT_LEVEL} of the frequency map"
            base = {"model": "baseline", "registered": "", "method": method, "level": None, "level_from": level_from}
            out.append({**common, **base, **row, "training_boxes": baselines.counts.get(finding)})
        for champ in (c for c in champions if slug(finding) in c.model.slugs):
            level = levels.get((registered(champ), slug(finding)), (DEFAULT_LEVEL, "default (no level chosen)"))
            out.append({**common, **model_row(champ, champ.model.slugs.index(slug(finding)), t, level, weights, points)})
    return pl.DataFrame(out, infer_schema_length=None) if out else pl.DataFrame()


MIN_PATIENTS = 10  # a finding counts as above a baseline only on at least this many patients' boxed images


def summary(table: pl.DataFrame) -> dict[str, dict]:
    """Per model kind: the median pointing rate over findings with boxes, its median change from the mean box, and
    how many findings are above the mean box and above the box prior (paired lower end > 0, on at least
    MIN_PATIENTS patients: with fewer the bootstrap has too little to resample)."""
    out = {}
    if not table.height or "method" not in table.columns:
        return out
    for kind, g in table.filter(pl.col("method") == GRAD_CAM).group_by("model", maintain_order=True):
        enough = g.filter(pl.col("n_patients") >= MIN_PATIENTS)
        out[kind[0]] = {
            "findings": g.height,
            "pointing": float(g["pointing"].median()),
            "vs_mean_box": float(g["pointing_vs_mean_box"].median()),
            "above": int((enough["pointing_vs_mean_box_lo"] > 0).sum()),
            "above_prior": int((enough["pointing_vs_box_prior_lo"] > 0).sum()),
            "too_few": g.height - enough.height,
        }
    return out
