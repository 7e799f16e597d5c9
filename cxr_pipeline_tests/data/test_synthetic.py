"""The replica must look like MIMIC-CXR to a reader that knows only the real thing."""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cxr_pipeline.cli import main
from cxr_pipeline.data.phantom import Anatomy, render
from cxr_pipeline.data.replica_findings import N_TRAIN_STUDIES, PREVALENCE
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.labels import LABELS

HEADERS = {
    "cxr-record-list.csv.gz": "subject_id,study_id,dicom_id,path",
    "cxr-study-list.csv.gz": "subject_id,study_id,path",
    "mimic-cxr-2.0.0-metadata.csv.gz": "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning",
    "mimic-cxr-2.0.0-chexpert.csv.gz": "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices",
    "mimic-cxr-2.0.0-negbio.csv.gz": "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices",
    "mimic-cxr-2.0.0-split.csv.gz": "dicom_id,study_id,subject_id,split",
    # as released with MIMIC-CXR-JPG 2.1.0: no subject_id, "Airspace Opacity" (verified against public loaders)
    "mimic-cxr-2.1.0-test-set-labeled.csv": "study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,Airspace Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices",
}
DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        return list(csv.DictReader(f))


def test_csv_headers_are_verbatim(replica):
    for name, header in HEADERS.items():
        opener = gzip.open if name.endswith(".gz") else open
        with opener(replica / name, "rt") as f:
            assert f.readline().rstrip("\n") == header, name


def test_layout_and_id_formats(replica):
    records = rows(replica / "cxr-record-list.csv.gz")
    assert len(records) > 100
    for r in records:
        sub, stu, did = r["subject_id"], r["study_id"], r["dicom_id"]
        assert re.fullmatch(r"1\d{7}", sub) and re.fullmatch(r"5\d{7}", stu) and DICOM_ID.match(did)
        assert r["path"] == f"files/p{sub[:2]}/p{sub}/s{stu}/{did}.dcm"
        assert (replica / r["path"]).is_file()
    studies = rows(replica / "cxr-study-list.csv.gz")
    with zipfile.ZipFile(replica / "mimic-cxr-reports.zip") as z:
        names = set(z.namelist())
    for s in studies:
        assert s["path"] == f"files/p{s['subject_id'][:2]}/p{s['subject_id']}/s{s['study_id']}.txt"
        assert (replica / s["path"]).is_file() and s["path"] in names
    # several studies per patient, several images per study
    per_patient = {}
    for s in studies:
        per_patient.setdefault(s["subject_id"], set()).add(s["study_id"])
    assert max(len(v) for v in per_patient.values()) > 1
    assert len(records) > len(studies)


def test_reports_are_mimic_style(replica):
    texts = [p.read_text() for p in sorted((replica / "files").rglob("*.txt"))]
    assert texts
    for t in texts:
        for line in t.rstrip("\n").split("\n"):
            assert line.startswith(" ") and len(line) <= 79
    assert any("IMPRESSION:" in t for t in texts) and any("FINDINGS:" in t for t in texts)
    assert all("FINAL REPORT" in t for t in texts)
    assert any("___" in t for t in texts)


def test_split_is_patient_level(replica):
    split_of = {}
    for r in rows(replica / "mimic-cxr-2.0.0-split.csv.gz"):
        assert r["split"] in ("train", "validate", "test")
        assert split_of.setdefault(r["subject_id"], r["split"]) == r["split"]
    assert set(split_of.values()) == {"train", "validate", "test"}


def test_dicoms_are_varied_and_carry_fake_phi(replica):
    files = sorted((replica / "files").rglob("*.dcm"))
    seen_mono1 = seen_j2k = seen_plain = False
    bits = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]
        assert ds.SOPInstanceUID.startswith("2.25.")
        assert str(ds.PatientName) and ds.PatientID.startswith("MRN") and len(ds.PatientBirthDate) == 8
        seen_mono1 |= ds.PhotometricInterpretation == "MONOCHROME1"
        seen_j2k |= ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        seen_plain |= ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        bits.add(int(ds.BitsStored))
    assert seen_mono1 and seen_j2k and seen_plain
    assert len(bits) >= 3


def test_a_patients_images_carry_one_patient_and_a_studys_images_one_study(replica):
    """A PACS files images by PatientID and StudyInstanceUID: every image of a study under the same patient and study
    identifiers, every study of a subject under the same patient, different subjects under different ones."""
    patients: dict[str, set] = {}
    studies: dict[str, set] = {}
    for f in sorted((replica / "files").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        subject, study = f.parent.parent.name, f.parent.name
        patients.setdefault(subject, set()).add((str(ds.PatientName), ds.PatientID, ds.PatientBirthDate))
        studies.setdefault(study, set()).add((ds.PatientID, ds.StudyInstanceUID, ds.AccessionNumber, ds.StudyDate))
    assert all(len(v) == 1 for v in patients.values()) and all(len(v) == 1 for v in studies.values())
    assert len({next(iter(v))[1] for v in patients.values()}) == len(patients)
    assert any(len(list((replica / "files").rglob(f"{s}/*.dcm"))) > 1 for s in studies)  # some studies hold several images


def test_labels_agree_with_reports_mostly(replica):
    chex = {r["study_id"]: r for r in rows(replica / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    rad = {r["study_id"]: r for r in rows(replica / "mimic-cxr-2.1.0-test-set-labeled.csv")}
    agree = total = 0
    assert rad  # a subset of the test studies, as released
    for sid, r in rad.items():
        for lab in LABELS:
            total += 1
            agree += r["Airspace Opacity" if lab == "Lung Opacity" else lab] == chex[sid][lab]
    assert 0.9 < agree / total <= 1.0


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(SynthConfig(patients=5, seed=3, source_rows=48, workers=1), a)
    generate(SynthConfig(patients=5, seed=3, source_rows=48, workers=2), b)
    generate(SynthConfig(patients=5, seed=4, source_rows=48, workers=1), c)
    da, db = _tree_digest(a), _tree_digest(b)
    assert da == db
    assert da != _tree_digest(c)


def test_metadata_only_prevalence_and_views_are_realistic(tmp_path):
    out = tmp_path / "meta"
    counts = generate(SynthConfig(patients=1500, seed=1, metadata_only=True), out)
    assert counts["image_bytes"] == 0 and not list((out / "files").rglob("*.dcm"))
    studies = rows(out / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert 3.0 < len(studies) / 1500 < 4.0  # MIMIC: 3.48 studies per patient
    meta = rows(out / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert 1.4 < len(meta) / len(studies) < 1.9  # MIMIC: 1.66 images per study
    views = {}
    for r in meta:
        views[r["ViewPosition"]] = views.get(r["ViewPosition"], 0) + 1
    share = {k: v / len(meta) for k, v in views.items()}
    assert 0.3 < share["AP"] < 0.5 and 0.18 < share["PA"] < 0.35 and 0.15 < share["LATERAL"] < 0.3
    assert share.get("LL", 0) > 0.03 and share.get("", 0) > 0.005
    for lab, (pos, _neg, _unc) in PREVALENCE.items():
        got = sum(r[lab] == "1.0" for r in studies) / len(studies)
        want = pos / N_TRAIN_STUDIES
        assert abs(got - want) < max(0.035, 0.35 * want), lab
    nf = sum(r["No Finding"] == "1.0" for r in studies) / len(studies)
    assert 0.25 < nf < 0.42  # MIMIC: 33%
    assert all(r["No Finding"] in ("1.0", "") for r in studies)
    # StudyTime loses its leading zero, as MIMIC's does
    assert any(len(r["StudyTime"].split(".")[0]) < 6 for r in meta)


def _zone_mean(img, r0, r1, c0, c1):
    h, w = img.shape
    return float(img[int(r0 * h) : int(r1 * h), int(c0 * w) : int(c1 * w)].mean())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_findings_are_visible(seed):
    """Each strong finding changes the image where a radiologist would look.

    Exposure differs per image, so every measure is relative to the image's own
    upper lung zones.
    """
    an = Anatomy.draw(np.random.default_rng(seed))

    def img(f):
        return render(np.random.default_rng(seed), 160, 160, "PA", f, an)

    def upper_lungs(im):
        return (_zone_mean(im, 0.25, 0.4, 0.15, 0.4) + _zone_mean(im, 0.25, 0.4, 0.6, 0.85)) / 2

    def rel(im, *zone):
        return _zone_mean(im, *zone) - upper_lungs(im)

    normal = img({})
    # cardiomegaly: a wider bright heart band above the diaphragm
    heart_band = (0.55, 0.66, 0.2, 0.8)
    assert rel(img({"Cardiomegaly": 1.0}), *heart_band) > rel(normal, *heart_band) + 0.02
    # effusion: a brighter lower zone on at least one side
    eff = img({"Pleural Effusion": 1.0})
    lower = [(0.6, 0.72, 0.12, 0.4), (0.6, 0.72, 0.6, 0.88)]
    assert max(rel(eff, *z) - rel(normal, *z) for z in lower) > 0.03
    # support devices: metal far brighter than anything else
    dev = img({"Support Devices": 1.0})
    assert dev.max() - np.median(dev) > normal.max() - np.median(normal) + 0.05
    # pneumothorax: one lung darker than the other
    ptx = img({"Pneumothorax": 1.0})

    def asym(im):
        return abs(_zone_mean(im, 0.15, 0.45, 0.1, 0.4) - _zone_mean(im, 0.15, 0.45, 0.6, 0.9))

    assert asym(ptx) > asym(normal) + 0.01


def test_jpg_variant_has_no_record_list(tmp_path):
    out = tmp_path / "jpg"
    generate(SynthConfig(patients=3, seed=2, source_rows=64, fmt="jpg"), out)
    assert not (out / "cxr-record-list.csv.gz").exists()
    jpgs = list((out / "files").rglob("*.jpg"))
    assert jpgs and not list((out / "files").rglob("*.dcm"))
    assert len((out / "IMAGE_FILENAMES").read_text().split()) == len(jpgs)


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x"), "--patients", "2", "--source-rows", "48", "--seed", "9"]) == 0
    assert '"patients": 2' in capsys.readouterr().out
    assert (tmp_path / "x" / "mimic-cxr-2.0.0-metadata.csv.gz").exists()


@pytest.mark.parametrize(
    ("flag", "value", "field"), [("--patients", "-5", "patients"), ("--source-rows", "8", "source_rows"), ("--workers", "0", "workers")]
)
def test_cli_synth_bad_arguments_are_one_line(tmp_path, capsys, flag, value, field):
    assert main(["synth", str(tmp_path / "x"), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("synth: ") and field in err and value in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_exact_counts_as_the_full_count_rehearsal_asks(tmp_path):
    """benchmarks/rehearsal.py asks for MIMIC's own totals; the CSVs must hold exactly those."""
    counts = generate(SynthConfig(patients=40, studies=150, images=260, metadata_only=True), tmp_path)
    assert (counts["patients"], counts["studies"], counts["images"]) == (40, 150, 260)
    with gzip.open(tmp_path / "cxr-record-list.csv.gz", "rt") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 260 and len({r["dicom_id"] for r in records}) == 260
    assert len({r["study_id"] for r in records}) == 150 and len({r["subject_id"] for r in records}) == 40
    with pytest.raises(ValueError, match="studies"):
        SynthConfig(patients=40, studies=39)
    with pytest.raises(ValueError, match="JPEG 2000"):
        SynthConfig(source_rows=32)


def test_the_replica_records_where_it_planted_each_localized_finding(replica):
    """replica-planted-boxes.csv.gz (#49): a box per localized finding drawn in a frontal image (any non-lateral view), inside that image,
    in NIH's convention; drawn only where the study's planted state is positive or uncertain (the CheXpert file
    flips 2% as a labeller errs, so its labels agree for nearly every box, not all)."""
    from cxr_pipeline.data.phantom import LOCALIZED
    from cxr_pipeline.data.synthetic import BOX_HEADER, PLANTED_BOXES

    with gzip.open(replica / PLANTED_BOXES, "rt") as f:
        assert f.readline().rstrip("\n") == ",".join(BOX_HEADER)
    boxes = rows(replica / PLANTED_BOXES)
    meta = {r["dicom_id"]: r for r in rows(replica / "mimic-cxr-2.0.0-metadata.csv.gz")}
    labels = {r["study_id"]: r for r in rows(replica / "mimic-cxr-2.0.0-chexpert.csv.gz")}
    assert len(boxes) > 20 and {b["finding"] for b in boxes} <= set(LOCALIZED)
    agree = 0
    for b in boxes:
        m = meta[b["dicom_id"]]
        # the phantom draws every view but the lateral ones frontal (a blank or SWIMMERS view too)
        assert m["ViewPosition"] not in ("LATERAL", "LL", "XTABLE LATERAL") and m["study_id"] == b["study_id"]
        x, y, w, h = (float(b[k]) for k in "xywh")
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= int(m["Columns"]) + 1e-6 and y + h <= int(m["Rows"]) + 1e-6
        agree += labels[b["study_id"]][b["finding"]] in ("1.0", "-1.0")
    assert agree >= 0.9 * len(boxes)
