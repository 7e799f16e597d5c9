"""The images and boxes ``vision.localization`` scores, gathered from the internal split or an external set, and the
contact sheet that shows what the numbers mean (image, true box, heat map, the boxes cut from it, its maximum).

Internal: the boxes come from a table (``data.boxes.read_box_table``; the replica writes one for every finding it
planted, ``replica-planted-boxes.csv.gz``), joined to the manifest's split and to the shard index's source size.
External: NIH's ``BBox_List_2017.csv`` beside its label file (``data.boxes.read_nih_boxes``); the set is all test,
so each model keeps the level chosen on the internal validate split, and the baselines are the internal training
split's (an external box never informs a baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.data.boxes import BOX_FILE, read_box_table, read_nih_boxes
from cxr_pipeline.data.dicom import decode, resized
from cxr_pipeline.data.shard_reader import Shards, open_images, read_index
from cxr_pipeline.data.synthetic import PLANTED_BOXES
from cxr_pipeline.fields import setting
from cxr_pipeline.files import png_figure
from cxr_pipeline.labels import slug
from cxr_pipeline.vision.localization import (
    GRAD_CAM,
    Baselines,
    Case,
    Split,
    cases_of,
    choose_levels,
    grad_cam_maps,
    heat_boxes,
    localization_table,
)

SHEET_STUDIES = 12


@dataclass(frozen=True)
class LocalizationSettings:
    """Weakly-supervised localization against boxes (``pipeline.yaml``'s ``localization_metrics`` section)."""

    boxes: str = setting(
        "", f"the internal images' box table (dicom_id, finding, x, y, w, h); empty: the replica's {PLANTED_BOXES} in CXR_RAW_DIR"
    )
    bootstrap: int = setting(1000, "patient-bootstrap resamples for the intervals (paired for the change from the mean box)")
    seed: int = setting(0, "the bootstrap's seed")

    def box_file(self, raw: Path) -> Path:
        return Path(self.boxes) if self.boxes else Path(raw) / PLANTED_BOXES


@dataclass
class BoxedSet:
    """One dataset's boxed images: the validate and test splits per finding, and each image's source file."""

    val: dict[str, Split]
    test: dict[str, Split]
    files: dict[str, Path]  # dicom_id -> its source file (the contact sheet draws the source image)
    rejects: pl.DataFrame


def _images(open_shards: Callable[[int], Shards], rows: pl.DataFrame) -> Callable[[int], np.ndarray]:
    """size -> the letterboxed images of ``rows`` (in order) at that size."""

    def at(size: int) -> np.ndarray:
        lazy, kept = open_images(open_shards(size), rows.select("dicom_id"))
        if kept["dicom_id"].to_list() != rows["dicom_id"].to_list():
            raise RuntimeError(f"localization: {rows.height - kept.height} boxed images are missing from the {size}-px shards")
        return lazy.take(np.arange(len(lazy)))

    return at


def _split(rows: pl.DataFrame, boxes: pl.DataFrame, open_shards) -> dict[str, Split]:
    out = {}
    for finding in sorted(boxes["finding"].drop_nulls().unique().to_list()):
        cases = cases_of(rows, boxes, finding)
        kept = pl.DataFrame({"dicom_id": [c.dicom_id for c in cases]}, schema={"dicom_id": pl.String})
        sizes = rows.join(kept, on="dicom_id", how="semi").select("rows", "cols").rows()
        out[finding] = Split(cases, _images(open_shards, kept), sizes)
    return out


def sized_rows(manifest: pl.DataFrame, shards: Shards) -> pl.DataFrame:
    """The manifest's images in the shards with their source size (the shard index records it), by dicom_id."""
    idx = read_index(shards).select("dicom_id", "rows", "cols").unique("dicom_id")
    return manifest.select("dicom_id", "subject_id", "split", "path").join(idx, on="dicom_id").sort("dicom_id")


def internal_set(manifest: pl.DataFrame, open_shards, size: int, box_file: Path, raw: Path) -> tuple[BoxedSet, Baselines]:
    """The internal validate / test boxed images and the baselines from the training split's boxes."""
    boxes, rejects = read_box_table(box_file)
    rows = sized_rows(manifest, open_shards(size))
    sized = boxes.join(rows, on="dicom_id")
    baselines = Baselines.of(sized.filter(pl.col("split") == "train"))
    val, test = (rows.filter(pl.col("split") == s) for s in ("validate", "test"))
    files = {r["dicom_id"]: Path(raw) / r["path"] for r in rows.filter(pl.col("split") == "test").iter_rows(named=True)}
    return BoxedSet(_split(val, boxes, open_shards), _split(test, boxes, open_shards), files, rejects), baselines


def external_set(rows: pl.DataFrame, folder: Path, open_shards, size: int) -> BoxedSet | None:
    """An external set's boxed images (all test), from its ``BBox_List_2017.csv``; None when it has none. ``rows``:
    the scored images (dicom_id = NIH's Image Index, subject_id, path)."""
    if not (Path(folder) / BOX_FILE).is_file():
        return None
    boxes, rejects = read_nih_boxes(Path(folder) / BOX_FILE)
    boxes = boxes.rename({"image": "dicom_id"}).filter(pl.col("finding").is_not_null())
    sized = sized_rows(rows.with_columns(pl.lit("test").alias("split")), open_shards(size))
    files = {r["dicom_id"]: Path(folder) / r["path"] for r in sized.iter_rows(named=True)}
    return BoxedSet({}, _split(sized, boxes, open_shards), files, rejects)


def sheet_picks(test: dict[str, Split], n: int = SHEET_STUDIES) -> list[tuple[str, int]]:
    """(finding, case index) for ``n`` different test images, taken in turn from each finding with boxes (so every
    finding shows), each finding's cases in dicom_id order; an image already shown for another finding is passed over."""
    queues = {f: list(range(len(s.cases))) for f, s in test.items() if s.cases}
    out: list[tuple[str, int]] = []
    shown: set[str] = set()
    while len(out) < n and any(queues.values()):
        for f in sorted(queues):
            while queues[f] and test[f].cases[queues[f][0]].dicom_id in shown:
                queues[f].pop(0)
            if queues[f] and len(out) < n:
                i = queues[f].pop(0)
                out.append((f, i))
                shown.add(test[f].cases[i].dicom_id)
    return out


def contact_sheet(boxed: BoxedSet, champions: list, table: pl.DataFrame, out: Path, title: str) -> Path | None:
    """Up to 12 test images, each with its true box (green), the finding's champion's Grad-CAM on the source image
    (the per-finding model's; the multi-label model's where no per-finding one is registered), the boxes cut from it
    at the level chosen on validate (white) and its maximum (a cross)."""
    from matplotlib.patches import Rectangle

    by_slug = {s: c for c in sorted(champions, key=lambda c: -len(c.model.slugs)) for s in c.model.slugs}  # per-finding first
    scored = set(table.filter(pl.col("method") == GRAD_CAM)["slug"]) if table.height else set()  # rows of the table only
    picks = sheet_picks({f: split for f, split in boxed.test.items() if slug(f) in by_slug and slug(f) in scored})
    if not picks:
        return None
    ncols = min(6, len(picks))
    with png_figure(out, -(-len(picks) // ncols), ncols, figsize=(2.4 * ncols, 2.8 * -(-len(picks) // ncols)), squeeze=False) as (
        fig,
        axes,
    ):
        for ax in axes.flat:
            ax.axis("off")
        for ax, (finding, i) in zip(axes.flat, picks, strict=False):
            split, champ = boxed.test[finding], by_slug[slug(finding)]
            case: Case = split.cases[i]
            row = table.filter((pl.col("method") == GRAD_CAM) & (pl.col("slug") == slug(finding)) & (pl.col("model") == champ.kind))
            level = float(row["level"][0])
            j = champ.model.slugs.index(slug(finding))
            heat = grad_cam_maps(champ.model, split.images(champ.model.size)[i : i + 1], j, [case], [split.sizes[i]])[0]
            ax.imshow(resized(decode(boxed.files[case.dicom_id]).image, case.shape), cmap="gray")
            ax.imshow(heat, cmap="jet", alpha=0.35)
            for x, y, w, h in case.truth:
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="lime", linewidth=1.5))
            for x, y, w, h in heat_boxes(heat, level):
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", linewidth=1, linestyle="--"))
            py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
            ax.plot([px], [py], marker="x", color="white", markersize=7)
            ax.set_title(f"{finding} ({'multi-label' if len(champ.model.slugs) > 1 else 'per-finding'})\nlevel {level:.1f}", fontsize=8)
        fig.suptitle(title, fontsize=9)
    return out


@dataclass
class LocalizationResult:
    """The table (internal rows, then the NIH-format set's where it has boxes), the contact sheets, what was read."""

    table: pl.DataFrame
    sheets: dict[str, Path]
    counts: dict
    skipped: str = ""
    notes: list[str] | None = None


def localize(paths, manifest: pl.DataFrame, open_shards, champions: list, cfg: LocalizationSettings, external=None) -> LocalizationResult:
    """The internal table and sheet, then (``external``: ``(scored rows, folder, open_shards)`` of the NIH-format set,
    or None) the same on the external set with the internal levels and baselines."""
    box_file = cfg.box_file(paths.raw)
    if not box_file.is_file():
        return LocalizationResult(pl.DataFrame(), {}, {}, f"no box table at {box_file} (localization_metrics.boxes)")
    if not champions:
        return LocalizationResult(pl.DataFrame(), {}, {}, "no champion classifier is registered yet")
    size = champions[0].model.size
    if any(c.model.size != size for c in champions):
        raise ValueError(f"localization: champions at several image sizes {sorted({c.model.size for c in champions})}; one is scored")
    boxed, baselines = internal_set(manifest, open_shards, size, box_file, paths.raw)
    levels = choose_levels(champions, boxed.val)  # on validate, once: the internal and the external table use them
    table = localization_table("mimic", champions, boxed.test, baselines, levels, cfg.bootstrap, cfg.seed)
    out_dir = paths.localization
    sheets = {
        "mimic": contact_sheet(
            boxed,
            champions,
            table,
            out_dir / "localization-mimic.png",
            "Test images: true box (green), Grad-CAM, its boxes (white), its maximum (x)",
        )
    }
    counts = {"box_rejects": boxed.rejects.height, "boxed_test_images": len({c.dicom_id for s in boxed.test.values() for c in s.cases})}
    notes = []
    if external is not None:
        rows, folder, ext_shards = external
        ext = external_set(rows, folder, ext_shards, size)
        if ext is None:
            notes.append(f"NIH-format set: no {BOX_FILE} in {folder}")
        else:
            internal = {k: (level, f"internal {how}") for k, (level, how) in levels.items()}
            nih = localization_table("nih", champions, ext.test, baselines, internal, cfg.bootstrap, cfg.seed)
            table = pl.concat([table, nih], how="diagonal_relaxed") if nih.height and table.height else (table if table.height else nih)
            sheets["nih"] = contact_sheet(
                ext, champions, nih, out_dir / "localization-nih.png", "NIH-format set: true box (green), Grad-CAM, its boxes (white)"
            )
            counts.update(
                nih_box_rejects=ext.rejects.height, nih_boxed_images=len({c.dicom_id for s in ext.test.values() for c in s.cases})
            )
    return LocalizationResult(table, {k: v for k, v in sheets.items() if v is not None}, counts, "", notes)
