"""Replicas of the external validation sets: CheXpert, NIH ChestX-ray14 and PadChest as released, made here.

The same phantom and planted findings as the MIMIC-CXR replica (``data.phantom``, ``data.replica_findings``),
another hospital's equipment as a **shift** in exposure (a gain on the exported image's brightness: ``exported``),
noise (added to the detector's values) and resolution (the rows the image is rendered at). CheXpert's and NIH's
8-bit files are display images, windowed as the MIMIC replica's DICOM header windows its pixels (before
2026-12-06 they held the unwindowed values, darker and flatter than any MIMIC image: a difference of format
alone that the drift monitor rightly flagged; the external figures published before then were measured on those). Each is written in its dataset's real
layout and format: CheXpert's ``CheXpert-v1.0-small/valid.csv`` (its header, 1.0 / 0.0 / -1.0 / blank) and 8-bit
JPGs under ``valid/patientNNNNN/studyN/``; NIH's ``Data_Entry_2017_v2020.csv`` (its header with the unquoted
commas, ``|``-separated labels) and 8-bit PNGs split into ``images_001/images/`` ... as the release is; PadChest's
36-column label file (labels as a Python list written as text, a few quoted multi-line reports and ``nan``
labels, the variant terms of its hierarchy and its borderline terms, lists naming no finding (empty, 'unchanged'
only) or carrying 'exclude', and films labelled only with terms outside the 14, as in the real file) and 16-bit
PNGs with 12 bits stored under numbered folders. A ``REPLICA.json`` says it is a replica. The readers
(``data.external``) cannot tell these from the real files but by their content.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cxr_pipeline.data.boxes import BOX_FILE
from cxr_pipeline.data.dicom_writer import replica_window
from cxr_pipeline.data.external import DEFAULT_LABEL_FILES, FORMATS
from cxr_pipeline.data.phantom import Anatomy, render
from cxr_pipeline.data.replica_findings import draw_states, labeller_view, planted_strengths
from cxr_pipeline.data.voi import window
from cxr_pipeline.files import atomic_path

CHEXPERT_ORDER = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
PADCHEST_HEADER = (
    ",ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,ViewPosition_DICOM,Projection,"
    "MethodProjection,Pediatric,Modality_DICOM,Manufacturer_DICOM,PhotometricInterpretation_DICOM,PixelRepresentation_DICOM,"
    "PixelAspectRatio_DICOM,SpatialResolution_DICOM,BitsStored_DICOM,WindowCenter_DICOM,WindowWidth_DICOM,Rows_DICOM,"
    "Columns_DICOM,XRayTubeCurrent_DICOM,Exposure_DICOM,ExposureInuAs_DICOM,ExposureTime,RelativeXRayExposure_DICOM,ReportID,"
    "Report,MethodLabel,Labels,Localizations,LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS"
).split(",")
# CheXpert finding -> the dataset's own words for it (the first is the one the harmonisation maps back)
NIH_WORDS = {
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Edema",),
    "Lung Lesion": ("Nodule", "Mass"),
    "Lung Opacity": ("Infiltration",),
    "Pleural Effusion": ("Effusion",),
    "Pleural Other": ("Pleural_Thickening",),
    "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",),
}
# PadChest's terms for each finding, a variant of its hierarchy first (a reader matching exact strings, or a rule
# whose subtree is cut to one term, scores 'laminar atelectasis' or 'air bronchogram' as negatives: the replica must
# catch that). The k-th record positive for a finding is written with its k-th word, in turn, so every variant occurs.
PADCHEST_WORDS = {
    "Atelectasis": ("laminar atelectasis", "atelectasis", "lobar atelectasis", "segmental atelectasis", "atelectasis basal"),
    "Cardiomegaly": ("cardiomegaly",),
    "Consolidation": ("air bronchogram", "consolidation"),
    "Edema": ("pulmonary edema",),
    "Enlarged Cardiomediastinum": ("mediastinal enlargement", "superior mediastinal enlargement"),
    "Lung Lesion": ("multiple nodules", "nodule", "pulmonary mass", "lung metastasis", "lepidic adenocarcinoma"),
    "Lung Opacity": ("interstitial pattern", "increased density", "ground glass pattern", "infiltrates"),
    "Pleural Effusion": ("loculated pleural effusion", "pleural effusion", "loculated fissural effusion", "empyema"),
    "Pleural Other": ("apical pleural thickening", "pleural thickening", "calcified pleural plaques"),
    "Pneumonia": ("atypical pneumonia", "pneumonia"),
    "Pneumothorax": ("hydropneumothorax", "pneumothorax"),
    "Fracture": ("callus rib fracture", "rib fracture", "clavicle fracture", "vertebral fracture"),
    "Support Devices": ("pacemaker", "NSG tube", "central venous catheter via jugular vein", "endotracheal tube", "dual chamber device"),
}
# Where the labeller is uncertain (-1), PadChest's borderline terms for the finding, in turn: each makes a finding
# null (data.harmonisation), so the replica's nulls are worth counting.
PADCHEST_BORDERLINE_WORDS = {
    "Atelectasis": ("volume loss",),
    "Consolidation": ("alveolar pattern", "infiltrates"),
    "Edema": ("heart insufficiency", "hilar congestion", "kerley lines"),
    "Fracture": ("vertebral anterior compression", "vertebral compression"),
    "Lung Lesion": ("mass", "mediastinal mass", "cavitation"),
    "Lung Opacity": ("fibrotic band", "pulmonary fibrosis"),
    "Pleural Effusion": ("costophrenic angle blunting",),
    "Pleural Other": ("minor fissure thickening", "post radiotherapy changes"),
    "Pneumonia": ("tuberculosis", "abscess"),
    "Support Devices": ("sternotomy", "suture material", "metal"),
}
# Records (by number, modulo 50) whose labels name no finding, as 6,199 of the real file's do: rejected by the reader;
# and one whose findings carry 'exclude' (28 real ones), rejected too.
PADCHEST_NO_FINDING_LISTS = {7: [], 19: ["unchanged"], 31: ["exclude"], 43: ["suboptimal study", "unchanged"]}
PADCHEST_EXCLUDED = 37
# Findings too rare to be drawn in a small replica (Pleural Other, Fracture: 1-2% of MIMIC's studies): records
# numbered 11 (modulo 25) carry one of these terms too, in turn, so their variants and borderline terms are read.
PADCHEST_RARE = (
    "apical pleural thickening",
    "vertebral anterior compression",
    "calcified pleural plaques",
    "clavicle fracture",
    "callus rib fracture",
)
# A film with none of the 14 is labelled 'normal', or (records numbered 3 and 6, modulo 10) only with terms outside
# the 14, as the real file's often are: No Finding is null for those, not 1.
PADCHEST_OUTSIDE = {3: ["COPD signs"], 6: ["aortic elongation", "scoliosis"]}
NIH_OUTSIDE = {5: "Emphysema", 9: "Hernia"}  # likewise NIH's labels outside the 14 (13,100 real images)


@dataclass(frozen=True)
class ExternalReplica:
    """One external replica: its format, size and the equipment shift from the MIMIC-CXR replica."""

    fmt: str
    patients: int = 150
    seed: int = 11
    source_rows: int = 256  # before the resolution shift
    exposure: float = 1.0  # gain on brightness (MIMIC's replica: 1.0)
    noise: float = 0.0  # extra Gaussian noise (sd, on [0, 1])
    resolution: float = 1.0  # rows rendered = source_rows * resolution (at least 16)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {self.fmt!r}")
        if self.patients < 1 or self.exposure <= 0 or self.noise < 0 or self.resolution <= 0:
            raise ValueError(f"{self}: patients >= 1, exposure > 0, noise >= 0 and resolution > 0")


# The demo's three hospitals: darker and noisier, brighter and sharper, larger and noisier.
DEMO_SHIFTS = {
    "chexpert": {"exposure": 0.85, "noise": 0.02, "resolution": 0.8, "seed": 11},
    "nih": {"exposure": 1.15, "noise": 0.01, "resolution": 1.0, "seed": 12},
    "padchest": {"exposure": 1.0, "noise": 0.03, "resolution": 1.25, "seed": 13},
}


def _image(
    rng: np.random.Generator, cfg: ExternalReplica, anatomy: Anatomy, view: str, states: dict, regions: dict | None = None
) -> np.ndarray:
    rows = max(16, int(round(cfg.source_rows * cfg.resolution)))  # below a 64-px model's input: a resolution it loses
    cols = int(round(rows * rng.uniform(0.83, 1.0)))
    pixels = render(rng, rows, cols, view, planted_strengths(rng, states), anatomy, regions)
    pixels = pixels + (rng.normal(0, cfg.noise, pixels.shape) if cfg.noise else 0.0)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32)


EXPORT_VERSION = 2  # 2: CheXpert's and NIH's 8-bit files windowed as display images (2026-12-06); 1: unwindowed


def exported(pixels: np.ndarray, kind: str, exposure: float, rng: np.random.Generator) -> np.ndarray:
    """The values a file of ``kind`` holds, on [0, 1]. CheXpert's JPGs and NIH's PNGs are display images, exported
    through a window (the reader takes them as they are): the replica windows the detector's 12-bit values as the
    MIMIC replica's DICOM header windows its own (``dicom_writer.replica_window``, drawn with ``rng``), then
    ``exposure`` brightens (clipping the bright end) or darkens the export. PadChest's 16-bit PNGs carry the
    detector's values and no window: ``exposure`` is a gain on them, which the reader's percentile window undoes
    but for its clipping."""
    if kind == "u16":
        return np.clip(pixels * exposure, 0.0, 1.0)
    value = np.round(np.clip(pixels, 0.0, 1.0) * 4095).astype(np.float32)
    shown = window(value, *replica_window(value, rng))
    return np.clip(shown * exposure, 0.0, 1.0)


def _save(path: Path, pixels: np.ndarray, kind: str, exposure: float, rng: np.random.Generator) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = exported(pixels, kind, exposure, rng)
    if kind == "u16":  # 12 bits stored in a 16-bit PNG, as PadChest's
        img = Image.fromarray(np.round(pixels * 4095).astype(np.uint16))
    else:
        img = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG" if kind == "jpg" else "PNG", **({"quality": 95} if kind == "jpg" else {}))


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _present(labels: dict) -> list[str]:
    return [lab for lab in CHEXPERT_ORDER if lab != "No Finding" and labels.get(lab) == 1.0]


def generate_external(cfg: ExternalReplica, out: Path) -> dict[str, int]:
    """Write the replica of ``cfg.fmt`` into ``out`` (its label file at ``DEFAULT_LABEL_FILES[fmt]``); returns counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 7])
    records: list = []
    images = 0
    for i in range(cfg.patients):
        prng = np.random.default_rng([cfg.seed, i])
        anatomy = Anatomy.draw(prng)
        age, sex = int(prng.integers(20, 90)), str(prng.choice(["M", "F"]))
        for s in range(int(min(prng.geometric(0.6), 3))):  # 1-3 studies a patient
            states = draw_states(prng)
            labels = labeller_view(prng, states, flip=0.02)
            views = _views(prng, cfg.fmt)
            for k, view in enumerate(views):
                regions: dict = {}
                pixels = _image(np.random.default_rng([cfg.seed, i, s, k]), cfg, anatomy, view, states, regions)
                records.append({**_write_one(cfg, out, prng, i, s, k, view, pixels, labels, age, sex), "regions": regions})
                images += 1
    _write_labels(cfg, out, records, rng)
    if cfg.fmt == "nih":
        _write_boxes(out / BOX_FILE, records)
    with atomic_path(out / "REPLICA.json") as tmp:
        tmp.write_text(json.dumps({"generator": "cxr_pipeline.data.replica_external", **asdict(cfg)}, sort_keys=True))
    return {"patients": cfg.patients, "images": images, "records": len(records)}


def _views(rng: np.random.Generator, fmt: str) -> list[str]:
    if fmt == "nih":
        return ["PA" if rng.uniform() < 0.6 else "AP"]
    if fmt == "chexpert":
        return ["AP"] if rng.uniform() < 0.7 else ["PA", "LATERAL"]
    return ["PA", "LATERAL"] if rng.uniform() < 0.6 else ["AP"]


def _write_one(cfg, out, rng, i, s, k, view, pixels, labels, age, sex) -> dict:
    rows, cols = pixels.shape
    if cfg.fmt == "chexpert":
        kind = "frontal" if view != "LATERAL" else "lateral"
        rel = f"CheXpert-v1.0-small/valid/patient{64541 + i:05d}/study{s + 1}/view{k + 1}_{kind}.jpg"
        _save(out / rel, pixels, "jpg", cfg.exposure, np.random.default_rng([cfg.seed, i, s, k, 3]))
        return {"path": rel, "view": view, "labels": labels, "age": age, "sex": sex}
    if cfg.fmt == "nih":
        name = f"{i + 1:08d}_{s:03d}.png"
        _save(out / f"images_{1 + i % 2:03d}" / "images" / name, pixels, "u8", cfg.exposure, np.random.default_rng([cfg.seed, i, s, k, 3]))
        return {"name": name, "patient": i + 1, "followup": s, "view": view, "labels": labels, "age": age, "sex": sex, "size": (cols, rows)}
    image_id = f"{rng.integers(10**17, 10**18)}{rng.integers(10**17, 10**18)}_{rng.integers(10**5, 10**6)}.png"
    folder = str(int(rng.integers(0, 4)))
    _save(out / folder / image_id, pixels, "u16", cfg.exposure, np.random.default_rng([cfg.seed, i, s, k, 3]))
    return {
        "name": image_id,
        "dir": folder,
        "patient": f"p{cfg.seed}{i:07d}",
        "study": f"s{cfg.seed}{i:05d}{s}",
        "view": view,
        "labels": labels,
    }


# the replica's planted findings -> the term NIH's radiologists boxed them under (Consolidation and Lung Opacity as
# Infiltrate, which the harmonisation makes no finding; a lesion a Nodule when under NODULE_SHARE of the image's
# width, else a Mass); the rest of phantom.LOCALIZED by its own name
NIH_BOX_TERMS = {"Pleural Effusion": "Effusion", "Consolidation": "Infiltrate", "Lung Opacity": "Infiltrate"}
NODULE_SHARE = 0.1


def _write_boxes(target: Path, records: list[dict]) -> None:
    """NIH's ``BBox_List_2017.csv`` for the replica: every localized finding the phantom drew, boxed where it drew it
    (NIH boxed 984 of its 112,120 images; the replica boxes every one), in the release's layout: its header's box
    heading spans four columns with unquoted commas, so it is written by hand, as the label file's."""
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as f:
        f.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        for r in records:
            cols = r["size"][0]
            for name, (x, y, w, h) in ((n, box) for n, drawn in sorted(r["regions"].items()) for box in drawn):
                term = "Nodule" if name == "Lung Lesion" and w < NODULE_SHARE * cols else NIH_BOX_TERMS.get(name, name)
                term = "Mass" if name == "Lung Lesion" and term != "Nodule" else term
                f.write(f"{r['name']},{term},{x!r},{y!r},{w!r},{h!r}\n")


def _write_labels(cfg: ExternalReplica, out: Path, records: list[dict], rng: np.random.Generator) -> None:
    target = out / DEFAULT_LABEL_FILES[cfg.fmt]
    target.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if target.name.endswith(".gz") else open
    with atomic_path(target) as tmp, opener(tmp, "wt", newline="") as f:
        if cfg.fmt == "chexpert":
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_ORDER])
            for r in records:
                lateral = r["view"] == "LATERAL"
                sex = "Male" if r["sex"] == "M" else "Female"
                w.writerow(
                    [
                        r["path"],
                        sex,
                        r["age"],
                        "Lateral" if lateral else "Frontal",
                        "" if lateral else r["view"],
                        *(_fmt(r["labels"][lab]) for lab in CHEXPERT_ORDER),
                    ]
                )
        elif cfg.fmt == "nih":
            f.write(NIH_HEADER + "\n")  # written by hand: its header's unquoted commas are the release's
            for n, r in enumerate(records):
                words = [str(rng.choice(NIH_WORDS[lab])) for lab in _present(r["labels"]) if lab in NIH_WORDS]
                found = "|".join(dict.fromkeys(words)) or NIH_OUTSIDE.get(n % 10, "No Finding")
                f.write(
                    f"{r['name']},{found},{r['followup']},{r['patient']},{r['age']},{r['sex']},{r['view']},{r['size'][0]},{r['size'][1]},0.143,0.143\n"
                )
        else:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(PADCHEST_HEADER)
            projections = {"PA": "PA", "LATERAL": "L", "AP": "AP_horizontal"}
            turn = dict.fromkeys(PADCHEST_WORDS, 0)
            unsure = dict.fromkeys(PADCHEST_BORDERLINE_WORDS, 0)
            for n, r in enumerate(records):
                words = []
                for lab in (x for x in _present(r["labels"]) if x in PADCHEST_WORDS):
                    words.append(PADCHEST_WORDS[lab][turn[lab] % len(PADCHEST_WORDS[lab])])
                    turn[lab] += 1
                for lab in (x for x in CHEXPERT_ORDER if x in unsure and r["labels"].get(x) == -1.0):
                    words.append(PADCHEST_BORDERLINE_WORDS[lab][unsure[lab] % len(PADCHEST_BORDERLINE_WORDS[lab])])
                    unsure[lab] += 1
                if n % 25 == 11:
                    words.append(PADCHEST_RARE[n // 25 % len(PADCHEST_RARE)])
                terms = list(dict.fromkeys(words)) or PADCHEST_OUTSIDE.get(n % 10, ["normal"])
                if n % 50 == PADCHEST_EXCLUDED:
                    terms = [*terms, "exclude"]
                terms = PADCHEST_NO_FINDING_LISTS.get(n % 50, terms)
                terms = [t if k == 0 or n % 2 == 0 else f" {t}" for k, t in enumerate(terms)]  # the real file's spaces
                labels = "nan" if rng.uniform() < 0.01 else repr(terms)
                report = (
                    " sin hallazg patolog ." if not words else " hallazg .\n" + " ".join(words) + " ."
                )  # some span lines, as real ones do
                row = {c: "None" for c in PADCHEST_HEADER}
                row.update(
                    {
                        "": str(n),
                        "ImageID": r["name"],
                        "ImageDir": r["dir"],
                        "StudyID": r["study"],
                        "PatientID": r["patient"],
                        "Projection": projections[r["view"]],
                        "Modality_DICOM": "CR",
                        "PhotometricInterpretation_DICOM": "MONOCHROME2",
                        "BitsStored_DICOM": "12",
                        "Report": report,
                        "MethodLabel": "Physician",
                        "Labels": labels,
                    }
                )
                w.writerow([row[c] for c in PADCHEST_HEADER])
