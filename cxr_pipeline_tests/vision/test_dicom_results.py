"""A study's results as DICOM objects (``vision.dicom_results``): the TID 1500 SR, the GSPS and the Secondary
Capture made for a replica study and for a real CR by registered (untrained) champions, each validated by
dicom3tools' ``dciodvfy``, the SR read back as DICOM says and rendered by dcmtk's ``dsr2html``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

from cxr_pipeline.data.dicom import letterbox_geometry
from cxr_pipeline.labels import LABEL_BY_SLUG
from cxr_pipeline.vision.dicom_results import FINDING_CODES, codes_table, contours, pick_frontal, study_objects, unusable_reason
from cxr_pipeline.vision.predict import Scorer, source_overlay

DATA = Path(pydicom.__file__).resolve().parent.parent / "data_store" / "data"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "dicom.md"
TOOLS = shutil.which("dciodvfy") and shutil.which("dsr2html")
needs_tools = pytest.mark.skipif(not TOOLS and not os.environ.get("CI"), reason="apt-get install dicom3tools dcmtk (CI installs them)")


def dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def frontal_study(replica: Path) -> list[Path]:
    """A replica study holding a frontal and a lateral image."""
    for study in sorted(replica.glob("files/p*/p*/s*")):
        files = sorted(study.glob("*.dcm"))
        views = {str(pydicom.dcmread(f, stop_before_pixels=True).ViewPosition) for f in files}
        if "LATERAL" in views and views & {"PA", "AP"}:
            return files
    raise AssertionError("no study with a frontal and a lateral image in the replica")


def objects_for(files: list[Path], scorer: Scorer):
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    chosen, reasons = pick_frontal(headers)
    assert chosen is not None, reasons
    result = scorer.score([files[chosen]], cams=True)[0]
    overlays = {s: source_overlay(files[chosen], cam) for s, cam in result.cams.items()}
    return headers[chosen], result, study_objects(headers[chosen], result, scorer.versions, overlays)


@needs_tools
def test_results_for_a_replica_study_and_a_real_cr_pass_dciodvfy_and_say_what_was_found(replica, registry, tmp_path):
    scorer = Scorer()  # cxr-cardiomegaly (threshold 0: always positive) and cxr-edema (threshold 0.99)
    assert scorer.versions == ["cxr-cardiomegaly:1", "cxr-edema:1"]
    real = pydicom.dcmread(DATA / "RG1_UNCR.dcm")  # a real CR chest PA, MONOCHROME1; its PixelSpacing is 0\0
    assert unusable_reason(real) is not None
    real.ImagerPixelSpacing = [0.15, 0.15]  # the spacing supplied: its real pixels and header go through the builders
    del real.PixelSpacing
    real.save_as(tmp_path / "rg1.dcm")
    for name, files in (("replica", frontal_study(replica)), ("real", [tmp_path / "rg1.dcm"])):
        source, result, objects = objects_for(files, scorer)
        assert len(objects.presentation_states) == len(objects.secondary_captures) == 1, name  # cardiomegaly only
        for k, ds in enumerate(objects.all()):
            out = tmp_path / f"{name}-{k}.dcm"
            ds.save_as(out, enforce_file_format=True)
            assert dciodvfy_errors(out) == [], (name, ds.Modality)
            back = pydicom.dcmread(out)
            assert back.StudyInstanceUID == source.StudyInstanceUID and back.SeriesInstanceUID != source.SeriesInstanceUID
        assert objects.all()[-1] is objects.sr  # stored last: an SR in the PACS means its GSPS and SC are there
        sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / f"{name}-{len(objects.all()) - 1}.dcm"))
        mgroups = sr.content.get_image_measurement_groups()  # highdicom reads the TID 1500 tree back
        assert len(mgroups) == 2  # the two registered findings, none invented for the twelve without a model
        by_name = {g.finding_type.value: g for g in mgroups}
        card = by_name[FINDING_CODES["cardiomegaly"].concept.value]
        found = {f.slug: f for f in result.findings}
        assert card.get_measurements(name=codes.DCM.Probability)[0].value == pytest.approx(found["cardiomegaly"].probability, abs=1e-6)
        assert card.get_qualitative_evaluations()[0].value == codes.SCT.Present
        edema = by_name[FINDING_CODES["edema"].concept.value]
        assert edema.get_qualitative_evaluations()[0].value == codes.SCT.Absent
        group = card[0]  # TID 4019 in the group (and again on the probability)
        assert {i.TextValue for i in find_content_items(group, name=codes.DCM.AlgorithmName, recursive=True)} == {"cxr-cardiomegaly"}
        assert {i.TextValue for i in find_content_items(group, name=codes.DCM.AlgorithmVersion, recursive=True)} == {"1"}
        params = {i.TextValue for i in find_content_items(group, name=codes.DCM.AlgorithmParameters, recursive=True)}
        assert "decision threshold 0.0000" in params
        assert card.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        gsps = objects.presentation_states[0]
        ann = gsps.GraphicAnnotationSequence[0]
        assert [g.GraphicType for g in ann.GraphicObjectSequence] and all(g.GraphicType == "POLYLINE" for g in ann.GraphicObjectSequence)
        # a presentation state overrides the image's photometric interpretation: MONOCHROME1 needs INVERSE
        inverse = source.PhotometricInterpretation == "MONOCHROME1"
        assert gsps.PresentationLUTShape == ("INVERSE" if inverse else "IDENTITY"), name
        sc = objects.secondary_captures[0].pixel_array
        plain = source_overlay(
            files[0]
            if name == "real"
            else [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == source.SOPInstanceUID][0],
            result.cams["cardiomegaly"],
        )
        drawn = np.any(sc != plain, axis=2)
        assert drawn.sum() > 50 and (sc[drawn] == [255, 255, 255]).all(axis=1).mean() > 0.5  # the outline burned in, white
        assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "Cardiomegaly" in ann.TextObjectSequence[0].UnformattedTextValue
    html = subprocess.run(["dsr2html", str(tmp_path / "replica-2.dcm")], capture_output=True, text=True, timeout=60)
    assert html.returncode == 0 and "Cardiomegaly" in html.stdout and "Imaging Measurement Report" in html.stdout


def test_the_same_study_and_models_give_the_same_uids_and_new_versions_new_ones(replica, registry):
    scorer = Scorer()
    files = frontal_study(replica)
    _, _, a = objects_for(files, scorer)
    _, _, b = objects_for(files, scorer)
    assert [d.SOPInstanceUID for d in a.all()] == [d.SOPInstanceUID for d in b.all()]  # a replay stores the same instances
    assert len({d.SeriesInstanceUID for d in a.all()}) == 3  # SR, GSPS, SC: a series each (Modality is per series)
    scorer.loaded[0].version = "2"  # as if cxr-cardiomegaly v2 were the champion now
    _, _, c = objects_for(files, scorer)
    assert not {d.SOPInstanceUID for d in c.all()} & {d.SOPInstanceUID for d in a.all()}


def test_unusable_images_get_a_reason_without_header_text():
    rg3 = pydicom.dcmread(DATA / "RG3_UNCR.dcm", stop_before_pixels=True)  # a real CR of an extremity
    rg1 = pydicom.dcmread(DATA / "RG1_UNCR.dcm", stop_before_pixels=True)  # a real CR chest with PixelSpacing 0\0
    assert unusable_reason(rg3) == "body part examined is not the chest"
    assert unusable_reason(rg1) == "no usable pixel spacing (ImagerPixelSpacing / PixelSpacing missing or zero)"
    lateral = pydicom.Dataset()
    lateral.update(
        {"Modality": "DX", "BodyPartExamined": "CHEST", "ImagerPixelSpacing": [0.1, 0.1], "ViewPosition": "LL", "PatientName": "DOE^JANE"}
    )
    assert unusable_reason(lateral) == "not a frontal view (ViewPosition)"
    chosen, reasons = pick_frontal([lateral, rg3])
    assert chosen is None and all("DOE" not in r and "EXTREMITY" not in r for r in reasons)


@pytest.mark.parametrize("rows,cols", [(400, 300), (300, 400), (256, 256), (2000, 1700)])
def test_the_outline_surrounds_the_hot_region_in_source_pixels(rows, cols):
    """A map hot in a block off the diagonal of the letterboxed input (a quarter down, three quarters across): the
    outline's centre and box lie where that block falls in the source image, within a few source pixels (swapping
    x and y, or forgetting the letterbox's offset, misses by a quarter of the image)."""
    size = 64
    top, left, h, w = letterbox_geometry(rows, cols, size)
    cam = np.zeros((size, size), np.float32)
    y0, x0 = top + h // 4 - 3, left + (3 * w) // 4 - 3
    cam[y0 : y0 + 6, x0 : x0 + 6] = 1.0
    lines = contours(cam, rows, cols)
    assert len(lines) == 1
    xy = lines[0]
    assert np.array_equal(xy[0], xy[-1])  # closed
    sx, sy = cols / w, rows / h  # source pixels per model pixel
    expect = np.array([(x0 + 3 - left) * sx, (y0 + 3 - top) * sy])
    tol = 1.5 * max(sx, sy) + 2 * max(rows, cols) / 256  # the map's bilinear edge, and the 256-px contouring grid
    assert np.abs(xy[:-1].mean(axis=0) - expect).max() < tol, (xy[:-1].mean(axis=0), expect)
    lo, hi = xy.min(axis=0), xy.max(axis=0)  # half-maximum of a 6-cell block: about 6 cells wide
    assert np.all(np.abs((hi - lo) - 6 * np.array([sx, sy])) < 2 * tol), (hi - lo, 6 * np.array([sx, sy]))


ODD_BUILD = """
import sys, numpy as np, pydicom
from pathlib import Path
from cxr_pipeline.vision.dicom_results import study_objects
from cxr_pipeline.vision.predict import Finding, ImageResult
src = pydicom.dcmread(sys.argv[1], stop_before_pixels=True)
f = Finding("cardiomegaly", 0.9, 0.5, True, "m", "cxr-cardiomegaly", "1")
r = ImageResult(Path(sys.argv[1]), [f], cams={"cardiomegaly": np.pad(np.ones((8, 8), np.float32), 12)})
objs = study_objects(src, r, ["cxr-cardiomegaly:1"], {"cardiomegaly": np.zeros((64, 60, 3), np.uint8)})
for k, ds in enumerate(objs.all()):
    ds.save_as(f"{sys.argv[2]}-{k}.dcm", enforce_file_format=True)
"""


def test_no_header_text_reaches_warnings_or_the_log_and_odd_headers_still_give_objects(replica, tmp_path):
    """highdicom and pydicom warn quoting a value they find odd (a name without a caret, a date that does not parse):
    header text. Built as a code server or the CLI builds them (a process of its own, Python's default warning
    filters: pytest's own capture would show every warning whatever the module sets), nothing quoting the header
    reaches stderr. And a header with a sex of U, no StudyID and such a date still gives valid objects (the values
    emptied in the objects' copy, as Type 2 allows), rather than failing the study."""
    files = frontal_study(replica)
    headers = [pydicom.dcmread(f) for f in files]
    chosen, _ = pick_frontal(headers)
    odd = headers[chosen]
    odd.PatientName, odd.PatientSex, odd.StudyDate, odd.ReferringPhysicianName = "JOHNSMITHERSON", "U", "2180-01-01", "ward"
    del odd.StudyID, odd.PatientOrientation  # CR images often lack it (highdicom's SC would refuse the study)
    odd.SpecificCharacterSet = "ISO_IR 6"  # old equipment's name for the default character set (highdicom refuses it)
    odd.save_as(tmp_path / "odd.dcm")
    done = subprocess.run(
        [sys.executable, "-c", ODD_BUILD, str(tmp_path / "odd.dcm"), str(tmp_path / "odd")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "JOHNSMITHERSON" not in done.stderr + done.stdout and "2180-01-01" not in done.stderr and '"ward"' not in done.stderr
    made = sorted(tmp_path.glob("odd-*.dcm"))
    assert len(made) == 3  # a GSPS, an SC, the SR
    for path in made:
        assert dciodvfy_errors(path) == []
        ds = pydicom.dcmread(path)
        assert not ds.PatientSex and not ds.StudyDate and not ds.StudyID  # present, empty
        assert ds.get("SpecificCharacterSet") in (None, "")


def test_the_docs_carry_the_code_table():
    assert codes_table() in DOCS.read_text()
    assert set(FINDING_CODES) == set(LABEL_BY_SLUG)
