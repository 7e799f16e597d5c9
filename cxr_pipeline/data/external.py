"""Other hospitals' chest X-ray sets for external validation: CheXpert, NIH ChestX-ray14 and PadChest.

Each reader takes the dataset's own label file as released and returns the manifest's shape (``EXTERNAL_COLUMNS``:
image id, patient, study, path, view and the 14 CheXpert findings as 1 / 0 / -1 / null, as MIMIC's label files
hold them) and a rejects table (``EXTERNAL_REJECT_SCHEMA``: the file, the **record** number, the data row counted
from 1, not the physical line, since PadChest's reports hold quoted line breaks, and the reason). Every record is
kept or rejected, none lost (``records == kept + rejected``); every view is kept (the view policy applies later,
as for MIMIC).

The harmonisation to the 14 CheXpert findings is one table, ``HARMONISATION`` (a ``Rule`` per dataset and finding),
listed with its reasons in the generated reference. A finding a dataset cannot provide is not scored there
(``NOT_SCORED``: null, no row in its table), never 0. In NIH and PadChest, whose labels are lists of the terms
present, an absent term is a negative and a null means the record cannot be scored for that finding: a borderline
term (``Rule.unknown``) or No Finding for labels outside the 14; scoring drops such records (``NULL_IS_UNSCORABLE``).

- CheXpert: the same 14 columns (1.0 / 0.0 / -1.0 / blank), read under the project's uncertain and blank
  policies later, exactly as MIMIC's; the patient and study from the path (``patientNNNNN/studyN``).
- NIH ChestX-ray14: ``Finding Labels`` is a ``|``-separated list of its 14 findings or ``No Finding``. A label
  absent from the list is a negative for the findings it maps to (NIH's labels are exhaustive over its own 14).
  ``Effusion`` is Pleural Effusion; ``Mass`` and ``Nodule`` are both Lung Lesion; ``Infiltration`` makes
  Consolidation, Edema and Pneumonia null; ``Infiltration``, ``Emphysema``, ``Fibrosis``, ``Pleural_Thickening``
  and ``Hernia`` map to no positive, and an image with only those (13,100 in the release) has No Finding null:
  neither a finding of the 14 nor a normal film is said.
- PadChest: ``Labels`` is a Python list written as text of UMLS-based terms in a hierarchy (``PADCHEST_TREE``,
  transcribed from the release's tree file); a finding is positive when any term of its subtree is present
  ('laminar atelectasis' is an atelectasis). A record whose labels cannot be read as a list (103 say ``nan``),
  name no finding (777 empty lists; 5,422 with only 'unchanged', 'exclude' or 'suboptimal study') or carry
  'exclude' among findings (28: PadChest's mark of a study to leave out) is rejected with the reason: a negative
  for everything would be a guess.

No Dagster here.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cxr_pipeline.data.csvs import DatasetError
from cxr_pipeline.data.harmonisation import (  # noqa: F401  (re-exported: the readers' callers import them from here)
    FORMAT_NAMES,
    FORMATS,
    HARMONISATION,
    NIH_VOCABULARY,
    NOT_MAPPED,
    NOT_SCORED,
    NULL_IS_UNSCORABLE,
    PADCHEST_EXCLUDE,
    PADCHEST_NO_FINDING_NAMED,
    PADCHEST_TREE,
    PADCHEST_UNMAPPED,
    harmonisation_table,
    harmonise,
    scored_findings,
)
from cxr_pipeline.fields import setting
from cxr_pipeline.labels import LABELS, slug

EXTERNAL_COLUMNS = ("dicom_id", "subject_id", "study_id", "path", "view_position", "split", "label_source", *(slug(x) for x in LABELS))
EXTERNAL_REJECT_SCHEMA = {"source": pl.String, "record": pl.Int64, "dicom_id": pl.String, "subject_id": pl.String, "reason": pl.String}
_CHEXPERT_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1}
_CHEXPERT_PATH = re.compile(r"(?:.*/)?(patient\d+)/(study\d+)/view\d+_[a-z]+\.(?:jpg|jpeg|png)", re.IGNORECASE)

DEFAULT_LABEL_FILES = {
    "chexpert": "CheXpert-v1.0-small/valid.csv",
    "nih": "Data_Entry_2017_v2020.csv",
    "padchest": "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
}


@dataclass
class ExternalLabels:
    """One external label file read: the kept records in the manifest's shape, the rejected ones, and counts."""

    fmt: str
    source: Path
    manifest: pl.DataFrame  # EXTERNAL_COLUMNS
    rejects: pl.DataFrame  # EXTERNAL_REJECT_SCHEMA
    records: int  # data rows in the file: len(manifest) + len(rejects)
    stats: dict = field(default_factory=dict)

    def positives(self) -> dict[str, int]:
        """Definite positives (1) per finding the dataset scores."""
        return {lab: int((self.manifest[slug(lab)] == 1).sum()) for lab in scored_findings(self.fmt)}

    def nulls(self) -> dict[str, int]:
        """Kept records null per finding the dataset scores: for NIH and PadChest, the records that cannot be scored
        for it (``NULL_IS_UNSCORABLE``); for CheXpert, its blanks (read under the model's blank policy)."""
        return {lab: int(self.manifest[slug(lab)].is_null().sum()) for lab in scored_findings(self.fmt)}

    def summary_line(self) -> str:
        """``external-labels: <format>: <N> images, <P> patients, <R> rejected; positives: <Finding>=<n>, ...``"""
        pos = ", ".join(f"{k}={v}" for k, v in self.positives().items())
        patients = self.manifest["subject_id"].n_unique()
        return f"external-labels: {self.fmt}: {self.manifest.height} images, {patients} patients, {self.rejects.height} rejected; positives: {pos}"


def _read(path: Path, required: tuple[str, ...]) -> pl.DataFrame:
    """Every column as text, unstripped, with ``_record`` (the data row, from 1). Quoted line breaks are part of
    their field (polars' CSV reader), so a record is not a line."""
    try:
        df = pl.read_csv(path, infer_schema=False, quote_char='"')
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DatasetError(f"{path}: cannot be read as CSV: {e}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    return df.with_row_index("_record", offset=1).with_columns(pl.col("_record").cast(pl.Int64))


def _finish(fmt: str, path: Path, rows: list[dict], rejects: list[dict], records: int) -> ExternalLabels:
    schema = {"_record": pl.Int64} | {c: pl.String for c in EXTERNAL_COLUMNS[:7]} | {slug(x): pl.Int8 for x in LABELS}
    manifest = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    # the same image listed twice: the first kept, the others rejected, never silently merged
    again = manifest.filter(pl.col("dicom_id").is_duplicated() & (pl.col("_record") > pl.col("_record").min().over("dicom_id")))
    extra = again.select(
        pl.lit(path.name).alias("source"),
        pl.col("_record").alias("record"),
        "dicom_id",
        "subject_id",
        pl.lit("image listed twice").alias("reason"),
    )
    manifest = manifest.filter(~pl.col("_record").is_in(again["_record"].implode()))
    rej = pl.DataFrame(rejects, schema=EXTERNAL_REJECT_SCHEMA) if rejects else pl.DataFrame(schema=EXTERNAL_REJECT_SCHEMA)
    rej = pl.concat([rej, extra.cast(EXTERNAL_REJECT_SCHEMA)]).sort("record")
    if manifest.height + rej.height != records:  # none lost: a reader bug, not bad data
        raise AssertionError(f"{path}: {records} records, but {manifest.height} kept and {rej.height} rejected")
    return ExternalLabels(fmt, path, manifest.select(EXTERNAL_COLUMNS), rej, records)


def _row(fmt: str, record: int, image: str, patient: str, study: str, rel: str, view: str, labels: dict[str, int | None]) -> dict:
    return {
        "_record": record,
        "dicom_id": image,
        "subject_id": patient,
        "study_id": study,
        "path": rel,
        "view_position": view,
        "split": "test",
        "label_source": fmt,
        **{slug(lab): labels.get(lab) for lab in LABELS},
    }


def read_chexpert(path: Path) -> ExternalLabels:
    """CheXpert's ``train.csv`` / ``valid.csv``: the image path is the id (relative to the folder above
    ``CheXpert-v1.0-small/``), the patient and study from it; ``Frontal/Lateral`` and ``AP/PA`` make the view."""
    path = Path(path)
    df = _read(path, ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS))
    rows, rejects = [], []
    for r in df.iter_rows(named=True):
        rec, p = r["_record"], (r["Path"] or "").strip()
        m = _CHEXPERT_PATH.fullmatch(p)
        fl = (r["Frontal/Lateral"] or "").strip()
        reason, labels = None, {}
        if not m:
            reason = f"Path {p!r} does not name patientNNNNN/studyN/viewN_*.jpg"
        elif fl not in ("Frontal", "Lateral"):
            reason = f"Frontal/Lateral {fl!r} is neither Frontal nor Lateral"
        else:
            for lab in LABELS:
                v = (r[lab] or "").strip()
                if v and v not in _CHEXPERT_VALUES:
                    reason = f"unknown label value {v!r} in column {lab!r}"
                    break
                labels[lab] = _CHEXPERT_VALUES[v] if v else None
        if reason:
            rejects.append(
                {"source": path.name, "record": rec, "dicom_id": p or None, "subject_id": m.group(1) if m else None, "reason": reason}
            )
            continue
        view = "LATERAL" if fl == "Lateral" else ((r["AP/PA"] or "").strip() or "UNKNOWN")
        rows.append(_row("chexpert", rec, p, m.group(1), f"{m.group(1)}/{m.group(2)}", p, view, labels))
    return _finish("chexpert", path, rows, rejects, df.height)


def read_nih(path: Path) -> ExternalLabels:
    """NIH ChestX-ray14's ``Data_Entry_2017_v2020.csv``: one image a record, its follow-up its own study; the
    image's path is ``images/<Image Index>`` (the release's ``images_0NN/images/`` folders are found too, when
    the shards are built)."""
    path = Path(path)
    df = _read(path, ("Image Index", "Finding Labels", "Patient ID", "View Position"))
    rows, rejects = [], []
    known = set(NIH_VOCABULARY)
    for r in df.iter_rows(named=True):
        rec, image = r["_record"], (r["Image Index"] or "").strip()
        patient = (r["Patient ID"] or "").strip()
        found = [t.strip() for t in (r["Finding Labels"] or "").split("|")]
        reason = None
        if not image:
            reason = "Image Index is blank"
        elif not patient.isdigit():
            reason = f"Patient ID {patient!r} is not a number"
        elif unknown := [t for t in found if t not in known]:
            reason = f"unknown finding {unknown[0]!r} in Finding Labels"
        elif "No Finding" in found and len(found) > 1:
            reason = "Finding Labels lists No Finding with findings"
        if reason:
            rejects.append({"source": path.name, "record": rec, "dicom_id": image or None, "subject_id": patient or None, "reason": reason})
            continue
        labels = harmonise("nih", set(found))
        view = (r["View Position"] or "").strip() or "UNKNOWN"
        rows.append(_row("nih", rec, image, patient, image.rsplit(".", 1)[0], f"images/{image}", view, labels))
    return _finish("nih", path, rows, rejects, df.height)


_PADCHEST_VIEWS = {"PA": "PA", "AP": "AP", "AP_horizontal": "AP", "L": "LATERAL"}


def padchest_labels(text: str | None) -> list[str]:
    """PadChest's ``Labels`` field (a Python list written as text) -> its labels, stripped. Raises ValueError
    with the reason when it is not a list of strings (``'nan'``, a blank, a broken list)."""
    raw = (text or "").strip()
    try:
        value = ast.literal_eval(raw) if raw else None  # a literal only: no code is run
    except (ValueError, SyntaxError):
        value = None
        if raw in ("nan", "None"):
            raise ValueError(f"Labels is {raw!r}: the report was not labelled") from None
        raise ValueError(f"Labels {raw[:40]!r} cannot be read as a list of labels") from None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"Labels {raw[:40]!r} is not a list of labels" if raw else "Labels is blank")
    return [t.strip() for t in value if t.strip()]


def read_padchest(path: Path) -> ExternalLabels:
    """PadChest's ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``: the image at ``<ImageDir>/<ImageID>``;
    every projection kept (PA, AP, AP_horizontal as AP, L as LATERAL, the others as written); the findings by whole
    subtrees of its term hierarchy (``harmonise``). A record naming no finding, or carrying 'exclude', is rejected,
    not made a negative."""
    path = Path(path)
    df = _read(path, ("ImageID", "ImageDir", "StudyID", "PatientID", "Projection", "Labels"))
    rows, rejects = [], []
    no_finding_named = frozenset(PADCHEST_NO_FINDING_NAMED)
    for r in df.iter_rows(named=True):
        rec, image, patient = r["_record"], (r["ImageID"] or "").strip(), (r["PatientID"] or "").strip()
        reason, found = None, []
        if not image or not patient:
            reason = "ImageID is blank" if not image else "PatientID is blank"
        else:
            try:
                found = padchest_labels(r["Labels"])
            except ValueError as e:
                reason = str(e)
            else:
                if not found:
                    reason = "Labels is an empty list: the report names no finding"
                elif no_finding_named.issuperset(found):
                    reason = f"Labels name no finding, only {sorted(set(found))}"
                elif PADCHEST_EXCLUDE in found:
                    reason = f"Labels carry {PADCHEST_EXCLUDE!r}: PadChest marks the study to leave out"
        if reason:
            rejects.append({"source": path.name, "record": rec, "dicom_id": image or None, "subject_id": patient or None, "reason": reason})
            continue
        labels = harmonise("padchest", set(found))
        proj = (r["Projection"] or "").strip()
        view = _PADCHEST_VIEWS.get(proj, proj or "UNKNOWN")
        folder = (r["ImageDir"] or "").strip()
        rel = f"{folder}/{image}" if folder else image
        rows.append(_row("padchest", rec, image, patient, (r["StudyID"] or "").strip() or image, rel, view, labels))
    return _finish("padchest", path, rows, rejects, df.height)


READERS = {"chexpert": read_chexpert, "nih": read_nih, "padchest": read_padchest}


def read_labels(fmt: str, path: Path) -> ExternalLabels:
    """The reader of ``fmt`` (one of ``FORMATS``) applied to ``path``."""
    if fmt not in READERS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return READERS[fmt](Path(path))


@dataclass(frozen=True)
class ExternalSettings:
    """The external validation sets (``pipeline.yaml``'s ``external_validation`` section). A dataset whose folder or
    label file is absent is skipped with the reason."""

    chexpert_dir: str = setting("", "CheXpert's folder (the one holding CheXpert-v1.0-small/); empty: $CXR_HOME/external/chexpert")
    chexpert_labels: str = setting(DEFAULT_LABEL_FILES["chexpert"], "CheXpert's label file, relative to its folder")
    nih_dir: str = setting("", "NIH ChestX-ray14's folder (Data_Entry_2017_v2020.csv, images/); empty: $CXR_HOME/external/nih")
    nih_labels: str = setting(DEFAULT_LABEL_FILES["nih"], "NIH ChestX-ray14's label file, relative to its folder")
    padchest_dir: str = setting("", "PadChest's folder (the label CSV, the numbered image folders); empty: $CXR_HOME/external/padchest")
    padchest_labels: str = setting(DEFAULT_LABEL_FILES["padchest"], "PadChest's label file, relative to its folder")
    views: tuple[str, ...] = setting(
        ("PA", "AP"),
        "views scored (the internal models are frontal); [] scores every view; the drift monitor's window takes its frontal ones",
    )
    max_images: int | None = setting(None, "score at most this many images per dataset (whole patients, a seeded draw)", null="every image")
    bootstrap: int = setting(1000, "patient-bootstrap resamples for the intervals")
    seed: int = setting(0, "the bootstrap's (and max_images' draw's) seed")

    def dataset(self, fmt: str, home: Path) -> tuple[Path, Path]:
        """(folder, label file) of ``fmt``."""
        folder = Path(getattr(self, f"{fmt}_dir") or Path(home) / "external" / fmt)
        return folder, folder / getattr(self, f"{fmt}_labels")

    def absent_reason(self, fmt: str, home: Path) -> str:
        """Why ``fmt`` cannot be scored here ('' when it can)."""
        folder, labels = self.dataset(fmt, home)
        if not folder.is_dir():
            return f"{FORMAT_NAMES[fmt]}: folder {folder} does not exist"
        if not labels.is_file():
            return f"{FORMAT_NAMES[fmt]}: label file {labels} does not exist"
        return ""


def resolve_images(folder: Path, manifest: pl.DataFrame) -> pl.DataFrame:
    """``manifest`` with each ``path`` pointing at a file under ``folder`` where one exists. NIH's release splits
    ``images/`` into ``images_001/images/`` ... ``images_012/images/``: a path not found as written is looked up
    by its file name under those folders (one listing, only when needed). Missing files stay as written: the
    shard builder rejects them by name."""
    folder = Path(folder)
    missing = [p for p in manifest["path"].to_list() if not (folder / p).is_file()]
    if not missing:
        return manifest
    by_name = {}
    for sub in sorted(folder.glob("images_*")):
        for f in (sub / "images").glob("*"):
            by_name.setdefault(f.name, str(f.relative_to(folder)))
    if not by_name:
        return manifest
    return manifest.with_columns(
        pl.col("path").map_elements(lambda p: p if (folder / p).is_file() else by_name.get(p.rsplit("/", 1)[-1], p), return_dtype=pl.String)
    )


def select_images(manifest: pl.DataFrame, views: tuple[str, ...], max_images: int | None, seed: int) -> pl.DataFrame:
    """The rows scored: the views asked for, then at most ``max_images`` images of whole patients drawn in a seeded
    order (a patient's images stay together: the bootstrap resamples patients)."""
    import numpy as np

    rows = manifest.filter(pl.col("view_position").is_in(list(views))) if views else manifest
    if max_images is None or rows.height <= max_images:
        return rows
    patients = rows["subject_id"].unique().sort().to_numpy()
    order = patients[np.random.default_rng(seed).permutation(len(patients))]
    counts = rows.group_by("subject_id").len()
    n_of = dict(zip(counts["subject_id"], counts["len"], strict=True))
    keep, total = [], 0
    for p in order:
        if total + n_of[p] > max_images:
            continue
        keep.append(p)
        total += n_of[p]
    return rows.filter(pl.col("subject_id").is_in(keep))


def scored_images(cfg: ExternalSettings, fmt: str, home: Path) -> tuple[Path, ExternalLabels, pl.DataFrame]:
    """(folder, its label file read, the rows scored: ``cfg``'s views and draw, files resolved). External validation,
    the drift monitor and the localization table all take an external set's rows from here: they share the set's
    shard folder, whose index keeps only the rows its last build asked for, so a reader selecting other rows
    dropped the others' from it and they were decoded again on the next run."""
    folder, label_file = cfg.dataset(fmt, home)
    found = read_labels(fmt, label_file)
    return folder, found, resolve_images(folder, select_images(found.manifest, cfg.views, cfg.max_images, cfg.seed))
