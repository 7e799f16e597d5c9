"""NIH ChestX-ray14's radiologist boxes (``BBox_List_2017.csv``), read into the project's findings.

ChestX-ray8 scored where its heat maps pointed against these boxes: 984 boxes on 880 images, 8 findings, in
the source image's pixels (1024 x 1024). The file's header, ``Image Index,Finding Label,Bbox [x,y,w,h],,,``, names
the box's four columns with one heading that holds unquoted commas itself (nine header fields over six data fields),
so a CSV reader that trusts the header misnames every coordinate: the header line is checked as text and the
columns are read by position here. Its terms are
NIH's, spelt as in its Data_Entry file except ``Infiltrate`` (``Infiltration`` there); each is harmonised with the
same table as the labels (``harmonisation.harmonise``): Effusion -> Pleural Effusion, Mass and Nodule -> Lung
Lesion, Infiltrate -> no finding (the table makes Infiltration's findings unknown, never positive), kept with a
null ``finding`` so nothing is lost. A row that is not a box (a missing or non-numeric coordinate, a width or
height not above 0, an unknown term) goes to the rejects with its line number and the reason.
"""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import polars as pl

from cxr_pipeline.data.harmonisation import NIH_VOCABULARY, harmonise
from cxr_pipeline.labels import LABELS

BOX_FILE = "BBox_List_2017.csv"
HEADER = "Image Index,Finding Label,Bbox [x,y,w,h]"  # then ",,," in NIH's file
# the box file's spelling -> the Data_Entry vocabulary's (the harmonisation table is written in the latter)
SPELLING = {"Infiltrate": "Infiltration"}
BOX_SCHEMA = {
    "record": pl.Int64,
    "image": pl.String,
    "nih_finding": pl.String,
    "finding": pl.String,
    "x": pl.Float64,
    "y": pl.Float64,
    "w": pl.Float64,
    "h": pl.Float64,
}
REJECT_SCHEMA = {"source": pl.String, "record": pl.Int64, "image": pl.String, "reason": pl.String}


def box_finding(term: str) -> str | None:
    """An NIH box term -> the one finding the harmonisation table calls positive for it (None: none does).
    Raises ValueError for a term outside NIH's vocabulary."""
    name = SPELLING.get(term, term)
    if name not in NIH_VOCABULARY:
        raise ValueError(f"unknown NIH finding {term!r}")
    positive = [label for label, value in harmonise("nih", {name}).items() if value == 1 and label != "No Finding"]
    if len(positive) > 1:
        raise ValueError(f"NIH finding {term!r} harmonises to several findings {positive}: a box belongs to one")
    return positive[0] if positive else None


def _text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8-sig")


def read_nih_boxes(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``BBox_List_2017.csv`` (or its ``.gz``) -> (boxes, rejects). Boxes: the record (line number, header = 1),
    ``image`` (Image Index), ``nih_finding`` (as written), ``finding`` (harmonised; null for Infiltrate), and
    ``x, y, w, h`` in source pixels. Raises ValueError naming the file when the header is not NIH's."""
    path = Path(path)
    text = _text(path)
    header = text.split("\n", 1)[0].rstrip("\r")
    if not header.startswith(HEADER):
        raise ValueError(f"{path}: not NIH's box list: header {header[:80]!r}, expected {HEADER + ',,,'!r}")
    reader = csv.reader(io.StringIO(text))
    next(reader)
    rows, rejects = [], []
    for record, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue
        image, term = (fields[0].strip() if fields else ""), (fields[1].strip() if len(fields) > 1 else "")
        reason, box = None, []
        try:
            finding = box_finding(term)
            box = [float(v) for v in fields[2:6]]
        except ValueError as e:
            reason = str(e) if "NIH finding" in str(e) else f"box {fields[2:6]!r} is not four numbers"
        if reason is None and len(box) != 4:
            reason = f"box has {len(box)} coordinates, not 4"
        elif reason is None and not (box[2] > 0 and box[3] > 0):
            reason = f"box width {box[2]} or height {box[3]} is not above 0"
        elif reason is None and not image:
            reason = "Image Index is blank"
        if reason:
            rejects.append({"source": path.name, "record": record, "image": image or None, "reason": reason})
            continue
        rows.append({"record": record, "image": image, "nih_finding": term, "finding": finding, **dict(zip("xywh", box, strict=True))})
    return pl.DataFrame(rows, schema=BOX_SCHEMA), pl.DataFrame(rejects, schema=REJECT_SCHEMA)


TABLE_COLUMNS = ("dicom_id", "finding", "x", "y", "w", "h")
TABLE_SCHEMA = {
    "record": pl.Int64,
    "dicom_id": pl.String,
    "finding": pl.String,
    "x": pl.Float64,
    "y": pl.Float64,
    "w": pl.Float64,
    "h": pl.Float64,
}


def read_box_table(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Boxes for the internal images: a CSV (gzipped or not) with at least ``dicom_id, finding, x, y, w, h`` (the
    replica's ``replica-planted-boxes.csv.gz``; for the real MIMIC-CXR, boxes from a grounding set such as MS-CXR
    written in this layout), in each image's source pixels, the finding under the project's label names. Returns
    (boxes, rejects); a row with an unknown finding, a missing id or a box that is not four numbers with width and
    height above 0 is rejected with its line number (the header is line 1). Raises ValueError naming the file and
    the columns it lacks."""
    path = Path(path)
    raw = pl.read_csv(io.StringIO(_text(path)), infer_schema=False)
    missing = [c for c in TABLE_COLUMNS if c not in raw.columns]
    if missing:
        raise ValueError(f"{path}: box table lacks column(s) {', '.join(missing)} (has {', '.join(raw.columns)})")
    df = (
        raw.select(TABLE_COLUMNS)
        .with_row_index("record", offset=2)
        .with_columns(pl.col("record").cast(pl.Int64), *(pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in "xywh"))
    )
    reason = (
        pl.when(pl.col("dicom_id").is_null() | (pl.col("dicom_id").str.strip_chars() == ""))
        .then(pl.lit("dicom_id is blank"))
        .when(pl.col("finding").is_null() | ~pl.col("finding").is_in(list(LABELS)))
        .then(pl.lit("finding ") + pl.col("finding").fill_null("(blank)") + pl.lit(" is not one of the project's findings"))
        .when(pl.any_horizontal(pl.col(c).is_null() for c in "xywh"))
        .then(pl.lit("box is not four numbers"))
        .when((pl.col("w") <= 0) | (pl.col("h") <= 0))
        .then(pl.lit("box width or height is not above 0"))
    )
    df = df.with_columns(reason.alias("reason"))
    rejects = df.filter(pl.col("reason").is_not_null()).select(
        pl.lit(path.name).alias("source"), "record", pl.col("dicom_id").alias("image"), "reason"
    )
    return df.filter(pl.col("reason").is_null()).select(list(TABLE_SCHEMA)).cast(TABLE_SCHEMA), rejects.cast(REJECT_SCHEMA)
