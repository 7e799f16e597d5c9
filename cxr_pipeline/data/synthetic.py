"""A faithful MIMIC-CXR replica: the real layout, CSVs, DICOMs and reports.

Real MIMIC-CXR is credentialed, so the embedded default dataset is generated:
``files/pNN/pSSSSSSSS/sTTTTTTTT/<dicom_id>.dcm`` (or ``.jpg`` for the
MIMIC-CXR-JPG variant), a report ``sTTTTTTTT.txt`` beside each study folder
and inside ``mimic-cxr-reports.zip``, and the release's CSVs (gzipped) with
their exact headers. Label prevalence follows the real training table; every
image carries its study's findings as a visible pattern (``phantom.py``), and
the reports are written from the same findings, so labels, text and pixels
agree (up to a few realistic labeller disagreements).

Same ``seed``, same bytes: gzip and zip timestamps are fixed and every random
draw comes from a per-patient generator seeded from (seed, patient index), so
the output does not depend on the number of worker processes either.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from cxr_pipeline.data.mimic import CHEXPERT, METADATA, NEGBIO, RECORD_LIST, SPLIT, STUDY_LIST, TEST_LABELED
from cxr_pipeline.data.mimic_reports import REPORTS_ZIP
from cxr_pipeline.data.phantom import Anatomy, render
from cxr_pipeline.data.replica_demographics import draw_demographics, in_group, write_mimic_iv
from cxr_pipeline.data.replica_findings import draw_states, labeller_view, planted_strengths, write_report
from cxr_pipeline.files import atomic_path, write_csv
from cxr_pipeline.labels import LABELS, PATHOLOGIES

SEX = ("M", "F")


@dataclass(frozen=True)
class SynthConfig:
    patients: int = 200
    seed: int = 0
    source_rows: int = 384  # rows of each image; columns are 83-100% of it, as in MIMIC
    fmt: str = "dicom"  # or "jpg": the MIMIC-CXR-JPG variant
    metadata_only: bool = False  # CSVs and reports, no images (scale tests)
    validate_fraction: float = 0.1  # patient-level; MIMIC's own test split is ~0.5% of patients,
    test_fraction: float = 0.1  # too few for a small replica to evaluate on
    # MIMIC-CXR-JPG 2.1.0's radiologist labels cover 687 studies, a subset of the test split
    radiologist_fraction: float = 0.3
    monochrome1_fraction: float = 0.15
    jpeg2000_fraction: float = 0.2
    workers: int = 1
    # exact totals (0: as drawn from MIMIC's per-patient rates, about 3.48 studies a patient and
    # 1.66 images a study); the full-count rehearsal asks for MIMIC's own 227,835 and 377,110
    studies: int = 0
    images: int = 0
    # MIMIC-IV's hosp/patients and hosp/admissions for these patients, under mimic-iv/ in the replica root
    mimic_iv: bool = True
    # a planted subgroup effect, "<finding>:<attribute>=<group>:<scale>" (attribute sex, race or insurance;
    # race as its group, e.g. Black): that finding is drawn at <scale> x its strength in that group's images
    # (fainter, so harder to see), so an audit has a known gap to find; "": none
    effect: str = ""

    def __post_init__(self) -> None:
        if self.effect:
            planted_effect(self.effect)  # fails on a malformed one
        if self.fmt not in ("dicom", "jpg"):
            raise ValueError(f"fmt must be 'dicom' or 'jpg', not {self.fmt!r}")
        if self.patients < 1:
            raise ValueError(f"patients must be at least 1, not {self.patients}")
        if self.source_rows < 32:
            raise ValueError(f"source_rows must be at least 32, not {self.source_rows}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.jpeg2000_fraction > 0 and self.source_rows < 40:
            # OpenJPEG's 6 wavelet resolutions need 32 px on each side; columns are 83-100% of rows
            raise ValueError(f"source_rows {self.source_rows} is too small for JPEG 2000 (40 at least); set jpeg2000_fraction=0")
        if self.studies and not self.patients <= self.studies:
            raise ValueError(f"studies ({self.studies}) must be 0 or at least the patient count ({self.patients})")
        if self.images and self.studies and not self.studies <= self.images:
            raise ValueError(f"images ({self.images}) must be 0 or at least the study count ({self.studies})")


def planted_effect(spec: str) -> tuple[str, str, str, float]:
    """``"Cardiomegaly:sex=F:0.4"`` -> (finding, attribute, group, scale)."""
    try:
        finding, cond, scale = spec.split(":")
        attribute, group = cond.split("=")
        value = float(scale)
    except ValueError:
        raise ValueError(f"effect must look like Cardiomegaly:sex=F:0.4, not {spec!r}") from None
    if finding not in PATHOLOGIES or attribute not in ("sex", "race", "insurance") or not 0 <= value:
        raise ValueError(f"effect {spec!r}: a finding of {', '.join(PATHOLOGIES)}, attribute sex, race or insurance, scale >= 0")
    return finding, attribute, group, value


# not a MIMIC-CXR file: where the replica drew each localized finding (phantom.LOCALIZED) in each frontal image, a box
# (x, y, w, h) in that image's pixels, NIH's box convention; the truth localization is scored against (#49)
PLANTED_BOXES = "replica-planted-boxes.csv.gz"
BOX_HEADER = ["dicom_id", "study_id", "subject_id", "finding", "x", "y", "w", "h"]
RADIOLOGIST_HEADER = tuple("Airspace Opacity" if lab == "Lung Opacity" else lab for lab in LABELS)


def radiologist_labels_study(study_id: int, fraction: float) -> bool:
    """Whether the replica's radiologist labelled this test study (a hash: draws nothing from the RNG)."""
    import hashlib

    u = int.from_bytes(hashlib.blake2b(f"rad{study_id}".encode(), digest_size=8).digest(), "big") / 2**64
    return u < fraction


# ---------------------------------------------------------------- the dataset

_PROCEDURES = {
    "pa_lat": ("CHEST (PA AND LAT)", "Chest PA and lateral"),
    "portable": ("CHEST (PORTABLE AP)", "Portable AP chest radiograph"),
    "other": ("CHEST (SINGLE VIEW)", "Single view of the chest"),
}
_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral", "": ""}
_OTHER_VIEWS = ("", "", "", "", "LPO", "AP AXIAL", "XTABLE LATERAL", "AP LLD", "PA LLD", "RAO", "SWIMMERS")


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5, dtype=np.uint64))


def _fmt_label(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _fmt_time(secs: float) -> str:
    hh, rem = divmod(secs, 3600)
    mm, ss = divmod(rem, 60)
    return str(round(int(hh) * 10000 + int(mm) * 100 + ss, 3))


@dataclass
class _Patient:
    subject_id: int
    split: str
    studies: list[dict]
    demo: dict  # what MIMIC-IV says about the patient (``replica_demographics.draw_demographics``)


def _plan_patient(cfg: SynthConfig, index: int, subject_id: int, study_ids: list[int]) -> _Patient:
    rng = np.random.default_rng([cfg.seed, index, 1])
    u = rng.uniform()
    split = "test" if u < cfg.test_fraction else "validate" if u < cfg.test_fraction + cfg.validate_fraction else "train"
    sex = str(rng.choice(SEX))
    age = int(rng.integers(20, 90))
    day = date(2110, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 80)))
    studies = []
    for study_id in study_ids:
        day += timedelta(days=int(rng.integers(0, 400)))
        states = draw_states(rng)
        devices = states["Support Devices"] == 1.0
        u = rng.uniform()
        kind = "portable" if u < (0.85 if devices else 0.38) else "pa_lat" if u < 0.96 else "other"
        if kind == "pa_lat":
            views = ["PA", "LATERAL" if rng.uniform() < 0.7 else "LL"]
            if rng.uniform() < 0.08:
                views.append("PA")
        elif kind == "portable":
            views = ["AP"] + (["AP"] if rng.uniform() < 0.3 else [])
        else:
            views = [str(rng.choice(_OTHER_VIEWS))]
        secs = float(rng.integers(0, 86400)) + round(float(rng.uniform(0, 1)), 3)
        images = []
        for v in views:
            rows = cfg.source_rows
            cols = int(round(rows * rng.uniform(0.83, 1.0)))
            images.append({"dicom_id": _dicom_id(rng), "view": v, "rows": rows, "cols": cols, "image_seed": int(rng.integers(0, 2**63))})
        chex = labeller_view(rng, states, flip=0.02)
        negbio = labeller_view(rng, chex, flip=0.03)
        report = write_report(rng, states, sex, *_PROCEDURES[kind])
        studies.append(
            {
                "study_id": study_id,
                "date": day.strftime("%Y%m%d"),
                "time": _fmt_time(secs),
                "kind": kind,
                "states": states,
                "chexpert": chex,
                "negbio": negbio,
                "images": images,
                "report": report,
                "sex": sex,
                "age": age,
                "anatomy_seed": int(rng.integers(0, 2**63)),
            }
        )
    return _Patient(subject_id=subject_id, split=split, studies=studies, demo=draw_demographics(cfg.seed, index, sex, age, studies))


def _exact_studies(rng: np.random.Generator, n_studies: np.ndarray, target: int) -> np.ndarray:
    """Per-patient study counts moved one study at a time until they sum to ``target``."""
    n = n_studies.copy()
    while (diff := target - int(n.sum())) != 0:
        pool = np.arange(n.size) if diff > 0 else np.flatnonzero(n > 1)
        pick = rng.choice(pool, size=min(abs(diff), pool.size), replace=False)
        n[pick] += 1 if diff > 0 else -1
    return n


def _exact_images(rng: np.random.Generator, patients: list[_Patient], target: int) -> None:
    """Add or drop repeat images (a second exposure of a study's first view) until the replica has
    ``target`` images; studies keep at least one image."""
    studies = [st for p in patients for st in p.studies]
    diff = target - sum(len(st["images"]) for st in studies)
    if diff < 0:
        pool = [st for st in studies if len(st["images"]) > 1]
        for i in rng.choice(len(pool), size=min(-diff, len(pool)), replace=False):
            pool[i]["images"].pop()
    for i in rng.choice(len(studies), size=max(diff, 0), replace=True):
        first = studies[i]["images"][0]
        extra = {"dicom_id": _dicom_id(rng), "view": first["view"], "rows": first["rows"], "cols": first["cols"]}
        studies[i]["images"].append({**extra, "image_seed": int(rng.integers(0, 2**63))})
    if (got := sum(len(st["images"]) for st in studies)) != target:
        raise ValueError(f"cannot reach {target} images from {len(studies)} studies (got {got})")


def patient_relpath(subject_id: int) -> str:
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}"


def _write_images(cfg: SynthConfig, out: Path, patient: _Patient) -> tuple[int, list[list[str]]]:
    """Render and write one patient's images; returns bytes written and the rows of ``PLANTED_BOXES`` (one per
    localized finding drawn in a frontal image)."""
    from cxr_pipeline.data.dicom_writer import write_dicom, write_jpg

    total, boxes = 0, []
    anatomy = None
    effect = planted_effect(cfg.effect) if cfg.effect else None
    fainter = effect is not None and in_group(patient.demo, effect[1], effect[2])
    for st in patient.studies:
        if anatomy is None:
            anatomy = Anatomy.draw(np.random.default_rng(st["anatomy_seed"]))
        folder = out / patient_relpath(patient.subject_id) / f"s{st['study_id']}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, im in enumerate(st["images"]):
            rng = np.random.default_rng(im["image_seed"])
            strengths = planted_strengths(rng, st["states"])
            if fainter and effect[0] in strengths:
                strengths[effect[0]] *= effect[3]
            regions: dict = {}
            pixels = render(rng, im["rows"], im["cols"], im["view"] or "PA", strengths, anatomy, regions)
            ids = [im["dicom_id"], str(st["study_id"]), str(patient.subject_id)]
            boxes += [[*ids, name, *(f"{v:.3f}" for v in box)] for name, drawn in sorted(regions.items()) for box in drawn]
            if cfg.fmt == "jpg":
                path = folder / f"{im['dicom_id']}.jpg"
                write_jpg(path, pixels)
            else:
                path = folder / f"{im['dicom_id']}.dcm"
                write_dicom(path, pixels, rng, cfg, st, {**im, "index": k, "subject_id": patient.subject_id})
            total += path.stat().st_size
    return total, boxes


def _images_job(args: tuple[SynthConfig, str, list[_Patient]]) -> tuple[int, list[list[str]]]:
    cfg, out, patients = args
    done = [_write_images(cfg, Path(out), p) for p in patients]
    return sum(n for n, _ in done), [row for _, rows in done for row in rows]


def generate(cfg: SynthConfig, out: Path, progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Write a replica to ``out``; returns counts (patients, studies, images, bytes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _m: None)
    rng = np.random.default_rng([cfg.seed, 0])
    subjects = np.sort(rng.choice(10_000_000, size=cfg.patients, replace=False) + 10_000_000)
    n_studies = np.minimum(rng.geometric(1 / 3.48, size=cfg.patients), 40)
    if cfg.studies:
        n_studies = _exact_studies(np.random.default_rng([cfg.seed, 2]), n_studies, cfg.studies)
    study_pool = rng.choice(10_000_000, size=int(n_studies.sum()), replace=False) + 50_000_000
    offsets = np.concatenate([[0], np.cumsum(n_studies)])

    say(f"planning {cfg.patients} patients")
    patients = [
        _plan_patient(cfg, i, int(subjects[i]), [int(s) for s in study_pool[offsets[i] : offsets[i + 1]]]) for i in range(cfg.patients)
    ]
    if cfg.images:
        _exact_images(np.random.default_rng([cfg.seed, 3]), patients, cfg.images)

    records, metadata, study_list, split_rows, chex_rows, negbio_rows, test_rows = [], [], [], [], [], [], []
    reports: list[tuple[str, str]] = []
    ext = "jpg" if cfg.fmt == "jpg" else "dcm"
    for p in patients:
        pdir = patient_relpath(p.subject_id)
        for st in p.studies:
            sid = st["study_id"]
            rel_report = f"{pdir}/s{sid}.txt"
            study_list.append([str(p.subject_id), str(sid), rel_report])
            reports.append((rel_report, st["report"]))
            proc = _PROCEDURES[st["kind"]][0]
            for im in st["images"]:
                rel = f"{pdir}/s{sid}/{im['dicom_id']}.dcm"
                records.append([str(p.subject_id), str(sid), im["dicom_id"], rel])
                orient = {"AP": "Recumbent" if rng.uniform() < 0.5 else "", "": ""}.get(im["view"], "Erect")
                metadata.append(
                    [
                        im["dicom_id"],
                        str(p.subject_id),
                        str(sid),
                        proc,
                        im["view"],
                        str(im["rows"]),
                        str(im["cols"]),
                        st["date"],
                        st["time"],
                        proc,
                        _VIEW_CODE.get(im["view"], im["view"].lower()),
                        orient,
                    ]
                )
                split_rows.append([im["dicom_id"], str(sid), str(p.subject_id), p.split])
            chex_rows.append([str(p.subject_id), str(sid), *[_fmt_label(st["chexpert"][lab]) for lab in LABELS]])
            negbio_rows.append([str(p.subject_id), str(sid), *[_fmt_label(st["negbio"][lab]) for lab in LABELS]])
            if p.split == "test" and radiologist_labels_study(sid, cfg.radiologist_fraction):
                test_rows.append([str(sid), *[_fmt_label(st["states"][lab]) for lab in LABELS]])

    say("writing CSVs")
    label_header = ["subject_id", "study_id", *LABELS]
    if cfg.fmt == "dicom":  # MIMIC-CXR-JPG ships no record or study list, but IMAGE_FILENAMES
        write_csv(out / f"{RECORD_LIST}.csv.gz", ["subject_id", "study_id", "dicom_id", "path"], records)
        write_csv(out / f"{STUDY_LIST}.csv.gz", ["subject_id", "study_id", "path"], study_list)
    else:
        (out / "IMAGE_FILENAMES").write_text("".join(r[3][:-3] + ext + "\n" for r in records))
    write_csv(
        out / f"{METADATA}.csv.gz",
        [
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
            "StudyDate",
            "StudyTime",
            "ProcedureCodeSequence_CodeMeaning",
            "ViewCodeSequence_CodeMeaning",
            "PatientOrientationCodeSequence_CodeMeaning",
        ],
        metadata,
    )
    write_csv(out / f"{CHEXPERT}.csv.gz", label_header, chex_rows)
    write_csv(out / f"{NEGBIO}.csv.gz", label_header, negbio_rows)
    write_csv(out / f"{SPLIT}.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    # as released: study_id only, and "Airspace Opacity" where the other label files say "Lung Opacity"
    write_csv(out / f"{TEST_LABELED}.csv", ["study_id", *RADIOLOGIST_HEADER], test_rows)

    say(f"writing {len(reports)} reports")
    with atomic_path(out / REPORTS_ZIP) as tmpzip, zipfile.ZipFile(tmpzip, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for rel, text in reports:
            info = zipfile.ZipInfo(rel, date_time=(2019, 9, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text)
    made_dirs: set[str] = set()
    for rel, text in reports:
        d = rel.rsplit("/", 1)[0]
        if d not in made_dirs:
            (out / d).mkdir(parents=True, exist_ok=True)
            made_dirs.add(d)
        (out / rel).write_text(text)

    if cfg.mimic_iv:
        say("writing MIMIC-IV demographics")
        write_mimic_iv(out / "mimic-iv", patients)

    n_bytes = 0
    if not cfg.metadata_only:
        say(f"rendering {len(records)} images")
        chunks = [patients[i :: max(1, cfg.workers * 4)] for i in range(max(1, cfg.workers * 4))]
        jobs = [(cfg, str(out), c) for c in chunks if c]
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as ex:
                done = list(ex.map(_images_job, jobs))
        else:
            done = list(map(_images_job, jobs))
        n_bytes = sum(n for n, _ in done)
        box_rows = sorted((row for _, rows in done for row in rows), key=lambda r: (r[0], r[3]))
        write_csv(out / PLANTED_BOXES, BOX_HEADER, box_rows)
    # the replica says it is one (a model card trained on it says so); MIMIC-CXR's release has no such file
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}
    with atomic_path(out / "REPLICA.json") as tmp:
        tmp.write_text(json.dumps({"generator": "cxr_pipeline.data.synthetic", **settings}, sort_keys=True))
    return {"patients": len(patients), "studies": len(study_list), "images": len(records), "image_bytes": n_bytes}
