"""A study's results as DICOM objects, built with highdicom: what a hospital's viewers and worklists show.

For one study and the registered champions: a Comprehensive 3D SR following TID 1500 (Measurement Report) with a
measurement group (TID 1501) per finding that a model scored: the finding's coded concept, the calibrated
probability as a numeric measurement, the call as a qualitative evaluation (Present / Absent), the algorithm's
registered name and version with its decision threshold as TID 4019 parameters, and a reference to the source
image. For each positive call a Grayscale Softcopy Presentation State outlining the Grad-CAM region on the source
image, and a Secondary Capture of the same overlay for viewers without GSPS.

Every UID the objects get is derived from the study's UID, the sorted ``name:version`` pairs of the models and the
object's role (``generate_uid(entropy_srcs=...)``): storing the same results twice stores the same instances
again (a PACS keeps one), and whether a study was already scored by these models is a question of whether that
SR's series exists (:func:`result_uids`). Modality is a series attribute, so SR, GSPS and SC each go in a series
of their own within the source study.

Nothing here logs: the objects carry the patient and study modules as DICOM requires (copied from the source
image by highdicom), and go only to the output folder or the PACS.
"""

from __future__ import annotations

import copy
import logging
import re
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from contourpy import contour_generator
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from cxr_pipeline.data.dicom import to_source
from cxr_pipeline.labels import LABEL_BY_SLUG
from cxr_pipeline.vision.predict import Finding, ImageResult

MANUFACTURER = "cxr_pipeline"
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/cxr_pipeline/dicom-results")  # fixed: UIDs must not change
CONTOUR_LEVEL = 0.5  # the GSPS outlines where the Grad-CAM map is at least half its maximum (the map is scaled to max 1)
CONTOUR_GRID = 256  # the map is taken to the source image at this long side before contouring, then scaled to its pixels
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD"})  # MIMIC's frontal ViewPositions
# a chest body part as equipment writes it: CHEST, CHEST PA, PORT CHEST, THORAX AP, TORAX, LUNG ... (PS3.16 Annex L
# defines CHEST; the rest are what real headers carry)
CHEST_PART = re.compile(r"(^|[^A-Z])(CHEST|THORAX|TORAX|THORAC\w*|LUNGS?)([^A-Z]|$)")
UNIT_PROBABILITY = Code("1", "UCUM", "no units")  # CID 7181: a probability is dimensionless
PROCEDURE = Code("399208008", "SCT", "Plain X-ray of chest")  # SNOMED CT procedure; as public value sets code it

# The 14 CheXpert findings as coded concepts: SNOMED CT where one concept exists, DICOM's own (DCM) where DICOM
# defines it; where no single concept was found, a SNOMED CT concept with a finding site (postcoordinated, as
# TID 1501's Finding Site allows). RadLex was not needed. Each code's source, as checked (2026-12-06): "PS3.16" =
# DICOM PS3.16 as pydicom 3.0.2's code dictionary holds it (pydicom.sr.codedict); the others are public pages or
# value sets found by search, not a licensed SNOMED CT browser (docs/dicom.md lists them and how sure each is).


@dataclass(frozen=True)
class FindingCode:
    concept: Code
    site: Code | tuple[Code, ...] | None  # finding site(s) where the concept alone does not say where

    @property
    def sites(self) -> list[Code]:
        if self.site is None:
            return []
        return [self.site] if isinstance(self.site, Code) else list(self.site)

    source: str


_LUNG, _PLEURA = Code("39607008", "SCT", "Lung"), Code("3120008", "SCT", "Pleura")
_MEDIASTINUM = (Code("72410000", "SCT", "Mediastinum"), Code("80891009", "SCT", "Heart"))  # the cardiomediastinal silhouette
FINDING_CODES: dict[str, FindingCode] = {
    "no_finding": FindingCode(Code("111286", "DCM", "No abnormality"), None, "PS3.16 (DCM)"),
    "enlarged_cardiomediastinum": FindingCode(
        Code("260376009", "SCT", "Enlarged"), _MEDIASTINUM, "PS3.16; sites Mediastinum, Heart: PS3.16"
    ),
    "cardiomegaly": FindingCode(
        Code("8186001", "SCT", "Cardiomegaly"), None, "SNOMED CT 8186001 Cardiomegaly (disorder); HPO HP:0001640 cross-reference"
    ),
    "lung_opacity": FindingCode(Code("112001", "DCM", "Opacity"), None, "PS3.16 (CID 6102 Chest Finding, 6104 Abnormal Opacity)"),
    "lung_lesion": FindingCode(Code("52988006", "SCT", "Lesion"), _LUNG, "PS3.16; site Lung: PS3.16"),
    "edema": FindingCode(Code("19242006", "SCT", "Pulmonary edema"), None, "PS3.16"),
    "consolidation": FindingCode(Code("95436008", "SCT", "Lung consolidation"), None, "SNOMED CT 95436008 (OHDSI vocabulary)"),
    "pneumonia": FindingCode(Code("233604007", "SCT", "Pneumonia"), None, "SNOMED CT editorial guide (Pneumonia vs. Pneumonitis)"),
    "atelectasis": FindingCode(Code("46621007", "SCT", "Atelectasis"), None, "SNOMED CT 46621007 (public value sets)"),
    "pneumothorax": FindingCode(Code("36118008", "SCT", "Pneumothorax"), None, "PS3.16 (CID 6102 Chest Finding, 6105 Abnormal Lucency)"),
    "pleural_effusion": FindingCode(Code("60046008", "SCT", "Pleural effusion"), None, "PS3.16"),
    "pleural_other": FindingCode(Code("263654008", "SCT", "Abnormal"), _PLEURA, "PS3.16; site Pleura: PS3.16"),
    "fracture": FindingCode(
        Code("125605004", "SCT", "Fracture of bone"), None, "SNOMED CT template Fracture of [bone structure] (disorder)"
    ),
    "support_devices": FindingCode(Code("49062001", "SCT", "Device"), None, "SNOMED CT 49062001 Device (physical object)"),
}


def codes_table() -> str:
    """The Markdown table of :data:`FINDING_CODES` (docs/dicom.md carries it; a test keeps the two equal)."""
    rows = ["| finding | concept | finding site | source |", "|---|---|---|---|"]
    for slug_, c in FINDING_CODES.items():
        site = ", ".join(f"{x.scheme_designator} {x.value} {x.meaning}" for x in c.sites)
        rows.append(
            f"| {LABEL_BY_SLUG[slug_]} | {c.concept.scheme_designator} {c.concept.value} {c.concept.meaning} | {site} | {c.source} |"
        )
    return "\n".join(rows)


def unusable_reason(ds: Dataset) -> str | None:
    """Why this image cannot be scored as a chest radiograph, or None. Checked: a CR or DX image whose body part is
    the chest (missing counts as not),
    no usable pixel spacing (MIMIC's DX images all carry ImagerPixelSpacing; without one the field of view is
    unknown), a view other than frontal. Reasons name attributes, never their text (no PHI)."""
    if str(ds.get("Modality", "") or "").upper() not in ("CR", "DX"):
        return "not a radiograph (Modality is not CR or DX)"
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if not part:  # an abdomen with an empty BodyPartExamined must not get a chest SR
        return "no body part examined (BodyPartExamined missing)"
    if not CHEST_PART.search(part):
        return "body part examined is not the chest"
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    try:
        ok = spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        return "no usable pixel spacing (ImagerPixelSpacing / PixelSpacing missing or zero)"
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view not in FRONTAL_VIEWS:
        return "not a frontal view (ViewPosition)" if view else "no view position (ViewPosition)"
    return None


def pick_frontal(headers: Sequence[Dataset]) -> tuple[int | None, list[str | None]]:
    """The image a study is scored on (PA before AP, then the lowest InstanceNumber) and each image's reason to be
    left out (None for usable). One image per study: the calibrated probability is an image's, not a study's."""
    reasons = [unusable_reason(ds) for ds in headers]
    usable = [i for i, r in enumerate(reasons) if r is None]
    if not usable:
        return None, reasons

    def rank(i: int) -> tuple[int, int]:
        return (0 if str(headers[i].ViewPosition).upper().startswith("PA") else 1, int(headers[i].get("InstanceNumber") or 0))

    return min(usable, key=rank), reasons


def result_key(study_uid: str, versions: Sequence[str]) -> list[str]:
    """The exactly-once key: the study and the sorted name:version pairs of the models that scored it."""
    return [study_uid, *sorted(versions)]


def result_uids(study_uid: str, versions: Sequence[str], role: str) -> str:
    """A UID derived from the key and the object's role ("sr-series", "sr", "gsps-series", "gsps/<slug>", ...):
    a name-based UUID (version 5) as a 2.25 UID (PS3.5 B.2). pydicom's ``generate_uid(prefix=None)`` ignores
    its entropy sources and draws a random one, which would make every replay a new instance."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join([*result_key(study_uid, versions), role])).int}"


def _algorithm(f: Finding) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=f.name,
        version=f.version,
        parameters=[f"decision threshold {f.threshold:.4f}", "calibrated probability" if f.calibrated else "uncalibrated score"],
    )


def measurement_report(source: Dataset, result: ImageResult, versions: Sequence[str]) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 SR for the scored image ``source`` (its header; pixels are not needed)."""
    study = source.StudyInstanceUID
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uids(study, versions, "device"),
        name=MANUFACTURER,
        manufacturer_name=MANUFACTURER,
        model_name=f"{len(versions)} registered classifiers",
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=device)
    )
    groups = []
    for f in result.findings:
        if f.probability is None:
            continue
        code = FINDING_CODES[f.slug]
        concept = code.concept
        algorithm = _algorithm(f)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=result_uids(study, versions, f"track/{f.slug}"), identifier=LABEL_BY_SLUG[f.slug]
                ),
                finding_type=concept,
                finding_sites=[hd.sr.FindingSite(x) for x in code.sites] or None,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.DCM.Probability, value=round(f.probability, 6), unit=UNIT_PROBABILITY, algorithm_id=algorithm
                    )
                ],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(concept, codes.SCT.Present if f.call else codes.SCT.Absent)],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
            )
        )
    if not groups:
        raise ValueError("no finding was scored: nothing to report")
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PROCEDURE, imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=result_uids(study, versions, "sr-series"),
        series_number=9001,
        sop_instance_uid=result_uids(study, versions, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="AI findings (cxr_pipeline)",
    )


def contours(cam: np.ndarray, rows: int, cols: int, level: float = CONTOUR_LEVEL) -> list[np.ndarray]:
    """Closed outlines of the region where the Grad-CAM map (on the letterboxed model input) is at least ``level``
    of its maximum, in the source image's pixel coordinates (column, row; the centre of the top left pixel is
    0.5, 0.5 as DICOM's PIXEL annotation units count). The map goes back to the source through
    ``data.dicom.to_source``, the same mapping the localization scores use."""
    scale = CONTOUR_GRID / max(rows, cols)
    shape = (max(2, round(rows * scale)), max(2, round(cols * scale)))
    heat = np.pad(to_source(cam, rows, cols, shape), 1)  # a zero border closes every outline at the image's edge
    out = []
    for line in contour_generator(z=heat).lines(level * float(heat.max())):
        if len(line) < 4:
            continue
        xy = (np.asarray(line, dtype=np.float64) - 1.0 + 0.5) * [cols / shape[1], rows / shape[0]]
        xy = np.clip(xy, 0.0, [cols, rows])
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        out.append(xy)
    return out


@dataclass
class StudyObjects:
    sr: Dataset
    presentation_states: list[Dataset]
    secondary_captures: list[Dataset]

    def all(self) -> list[Dataset]:
        """The SR last: stored in this order, an SR in the PACS means its GSPS and SC went before it (the intake's
        check for "already scored" looks for the SR)."""
        return [*self.presentation_states, *self.secondary_captures, self.sr]


def label(f: Finding) -> str:
    """The text a GSPS and an SC carry beside the outline."""
    return f"{LABEL_BY_SLUG[f.slug]}: p={f.probability:.2f} (threshold {f.threshold:.2f}), {f.name} v{f.version}"[:64]


def presentation_state(
    source: Dataset, f: Finding, lines: list[np.ndarray], versions: Sequence[str], number: int
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS outlining ``f``'s Grad-CAM region (``lines``: :func:`contours`) on ``source`` with its label. A
    presentation state overrides the image's photometric interpretation (PS3.4 N.2.1.4), so a MONOCHROME1 image
    gets an INVERSE presentation LUT, or a viewer would show it inverted; its window is the image's (highdicom)."""
    study = source.StudyInstanceUID
    layer = hd.pr.GraphicLayer(layer_name="AI_GRADCAM", order=1, description=f"Grad-CAM >= {CONTOUR_LEVEL:.0%} of its maximum")
    outlines = [hd.pr.GraphicObject("POLYLINE", xy.astype(np.float32), "PIXEL") for xy in lines]
    inverse = str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    text = hd.pr.TextObject(
        label(f),
        units="PIXEL",
        anchor_point=(float(source.Columns) * 0.02, float(source.Rows) * 0.03),
        anchor_point_visible=False,
    )
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=result_uids(study, versions, "gsps-series"),
        series_number=9002,
        sop_instance_uid=result_uids(study, versions, f"gsps/{f.slug}"),
        instance_number=number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="cxr_pipeline Grad-CAM",
        software_versions=f"{f.name} v{f.version}"[:64],
        device_serial_number="0",
        content_label=f"AI_{f.slug.upper()}"[:16],
        content_description=f"{LABEL_BY_SLUG[f.slug]} Grad-CAM region"[:64],
        graphic_layers=[layer],
        graphic_annotations=[
            hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer, graphic_objects=outlines or None, text_objects=[text])
        ],
        presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape="INVERSE") if inverse else None,
        series_description="AI findings: outlines (cxr_pipeline)",
    )
    gsps.Laterality = ""  # Type 2C in the General Series module (dciodvfy asks for it); unknown: empty
    return gsps


def burn(rgb: np.ndarray, lines: list[np.ndarray], rows: int, cols: int, text: str) -> np.ndarray:
    """The GSPS's outline and label drawn into the RGB overlay (a copy): the SC shows what the GSPS shows, over the
    heat map. ``lines`` are in the source's pixels; the overlay is the source scaled."""
    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    draw = ImageDraw.Draw(im)
    sx, sy = rgb.shape[1] / cols, rgb.shape[0] / rows
    for xy in lines:
        draw.line([(float(x) * sx, float(y) * sy) for x, y in xy], fill=(255, 255, 255), width=2)
    draw.text((6, 6), text, fill=(255, 255, 0))
    return np.asarray(im)


def secondary_capture(source: Dataset, f: Finding, rgb: np.ndarray, versions: Sequence[str], number: int) -> hd.sc.SCImage:
    """The overlay (heat map, with the GSPS's outline and label burned in) as an RGB picture, for viewers without
    GSPS (BurnedInAnnotation YES)."""
    study = source.StudyInstanceUID
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uids(study, versions, "sc-series"),
        series_number=9003,
        sop_instance_uid=result_uids(study, versions, f"sc/{f.slug}"),
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # a placeholder highdicom accepts; the source's own value (any, or empty) below
        series_description="AI findings: overlays (cxr_pipeline)",
    )
    sc.PatientOrientation = source.get("PatientOrientation") or ""  # Type 2: an oblique or missing one is kept as it is
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = ""  # Type 2C (dciodvfy asks for it beside an image without FrameLaterality); unknown: empty
    return sc


TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def usable_header(source: Dataset) -> Dataset:
    """A copy of the source header that highdicom accepts: the patient and study attributes it copies are Type 2
    (present, may be empty), so a missing one is added empty, and a value DICOM would not accept (a sex other than
    M/F/O, a date or time that does not parse) is emptied rather than failing the study. UIDs are untouched."""
    ds = copy.deepcopy(source)
    for key in TYPE2_COPIED:
        if key not in ds or ds[key].value is None:
            setattr(ds, key, "")
    charset = ds.get("SpecificCharacterSet")
    if charset is not None:  # what highdicom refuses: ISO_IR 6 (old equipment's name for the default), an empty first value
        values = [str(v) for v in (charset if isinstance(charset, MultiValue) else [charset])]
        values = ["ISO 2022 IR 6" if (k == 0 and not v and len(values) > 1) else v for k, v in enumerate(values)]
        values = [v for v in values if v != "ISO_IR 6"]
        if values:
            ds.SpecificCharacterSet = values if len(values) > 1 else values[0]
        else:
            del ds.SpecificCharacterSet
    sex = str(ds.PatientSex).strip().upper()
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    for key, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        try:
            kind(str(ds[key].value))
        except (TypeError, ValueError):
            setattr(ds, key, "")
    return ds


# highdicom and pydicom warn quoting the value they find odd (a name without a caret, a referring physician, a
# malformed UID): header text. Building results is this module's only use of highdicom, and pydicom's value warnings
# are never wanted in the logs: both are silenced for the process, once (toggling the filters around each build is
# not thread-safe in a code server, whose threads share the warning filters).
warnings.filterwarnings("ignore", module=r"(highdicom|pydicom)(\.|$)")
for _name in ("highdicom", "pydicom"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def study_objects(source: Dataset, result: ImageResult, versions: Sequence[str], overlays: dict[str, np.ndarray]) -> StudyObjects:
    """The SR, and a GSPS and an SC per positive call with a map (``result.cams``; ``overlays``: slug -> RGB)."""
    header = usable_header(source)
    sr = measurement_report(header, result, versions)
    gsps, sc = [], []
    positives = [f for f in result.findings if f.call and f.slug in result.cams]
    for n, f in enumerate(positives, start=1):
        lines = contours(result.cams[f.slug], int(header.Rows), int(header.Columns))
        gsps.append(presentation_state(header, f, lines, versions, n))
        rgb = burn(overlays[f.slug], lines, int(header.Rows), int(header.Columns), label(f))
        sc.append(secondary_capture(header, f, rgb, versions, n))
    return StudyObjects(sr, gsps, sc)
