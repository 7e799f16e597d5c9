"""Write the replica's images as MIMIC-CXR writes them (DICOM) or MIMIC-CXR-JPG does (JPEG).

DICOMs are Digital X-Ray For Presentation objects with the variety a reader
must survive: MONOCHROME1 and MONOCHROME2, BitsStored 10 to 16, window
attributes, uncompressed or JPEG 2000, and fake PHI in the name / id /
birth-date tags so tests can prove none of it leaks. They are valid DX objects
(dicom3tools' ``dciodvfy`` reports no error; a PACS may refuse an invalid one):
every Type 1 and Type 2 attribute of the DX IOD is written, and the DX Image
module's enumerated values are kept (Rescale Intercept 0 and Slope 1, the
Presentation LUT Shape that goes with the photometric interpretation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEG2000Lossless

from cxr_pipeline.data.voi import percentile_bounds
from cxr_pipeline.files import atomic_path

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
FIRST = ("JOHN", "ROBERT", "MICHAEL", "MARY", "PATRICIA", "LINDA", "SUSAN", "DAVID")
LAST = ("SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS")


def _uid(rng: np.random.Generator) -> str:
    a, b = (int(v) for v in rng.integers(0, 2**62, 2))
    return f"2.25.{(a << 62) | b}"


def fake_phi(rng: np.random.Generator) -> dict[str, str]:
    """Realistic-looking identifiers for the header tags MIMIC de-identified."""
    return {
        "PatientName": f"{rng.choice(LAST)}^{rng.choice(FIRST)}",
        "PatientID": f"MRN{int(rng.integers(10**7, 10**8))}",
        "PatientBirthDate": f"{int(rng.integers(2030, 2100))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        "AccessionNumber": f"ACC{int(rng.integers(10**8, 10**9))}",
        "InstitutionName": "SYNTHETIC GENERAL HOSPITAL",
        "ReferringPhysicianName": f"DR^{rng.choice(LAST)}",
    }


def _atomic_save(path: Path, save) -> None:
    with atomic_path(path) as tmp:
        save(tmp)


CHEST = ("816094009", "SCT", "Chest")  # AnatomicRegionSequence's code for the chest: PS3.16 CID 4031 (pydicom's codes.cid4031.Chest)


def write_dicom(path: Path, pixels: np.ndarray, rng: np.random.Generator, cfg, study: dict, image: dict) -> None:
    """One replica image as a DX For Presentation object. The random draws are the ones the replica has always
    made, in the same order (the images after this one depend on them); the draw that once gave some images a
    rescale intercept of -1024 (which the DX IOD forbids: its enumerated value is 0) now only narrows their value
    range by as much, so the values a reader gets after the modality LUT are the ones it always got."""
    bits = int(rng.choice([10, 12, 12, 12, 14, 15, 16]))
    narrow = 1024 if bits >= 12 and rng.uniform() < 0.15 else 0
    maxv = 2**bits - 1 - narrow
    mono1 = rng.uniform() < cfg.monochrome1_fraction
    value = np.round(np.clip(pixels, 0, 1) * maxv)
    if mono1:
        value = maxv - value
    stored = value.astype(np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_PRESENTATION
    sop_uid = _uid(rng)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(np.random.default_rng(study["study_id"]))
    ds.SeriesInstanceUID = _uid(rng)
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.StudyDate = study["date"]
    ds.StudyTime = study["time"].split(".")[0].zfill(6)
    ds.PatientSex = study["sex"]
    ds.PatientAge = f"{study['age']:03d}Y"
    fake_phi(rng)  # drawn as always (the images after this one depend on the draws), but no longer used: a PACS files
    # images by PatientID and StudyInstanceUID, and with identifiers drawn per image every image was a patient of its own
    patient = fake_phi(np.random.default_rng([int(image["subject_id"]), 1]))
    for tag, value_ in fake_phi(np.random.default_rng([int(study["study_id"]), 2])).items():  # per study: accession, referrer
        setattr(ds, tag, patient[tag] if tag in ("PatientName", "PatientID", "PatientBirthDate") else value_)
    ds.ViewPosition = image["view"]
    ds.BodyPartExamined = "CHEST"
    # the row and column directions as a PA or AP radiograph is displayed (patient's left to the viewer's right, feet down)
    ds.PatientOrientation = ["L", "F"] if image["view"] in ("PA", "AP") else ["P", "F"]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.139, 0.139]
    if not narrow:
        rng.uniform()  # once chose whether to write the rescale attributes: drawn still, so later draws keep their order
    _dx_modules(ds, mono1, study, image)
    ds.WindowCenter, ds.WindowWidth, function = replica_window(value, rng)
    if function != "LINEAR":  # LINEAR is the default: left out, as the replica always has
        ds.VOILUTFunction = function
    ds.PixelData = stored.tobytes()
    if rng.uniform() < cfg.jpeg2000_fraction:
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    _atomic_save(path, lambda p: ds.save_as(p, enforce_file_format=True))


def replica_window(value: np.ndarray, rng: np.random.Generator) -> tuple[float, float, str]:
    """(center, width, VOI LUT function) of the window the replica reads an image through, over its stored values:
    six in ten a LINEAR window over the 1st to 99th percentile widened by a tenth, else the window a reader without
    one would work out (``_percentile_window``). The DICOM writer puts it in the header; the external replicas'
    8-bit display images are exported through it (``replica_external.exported``), so a format alone does not
    change how an image reads."""
    if rng.uniform() < 0.6:
        lo, hi = np.percentile(value, [1, 99])
        return round(float(lo + hi) / 2, 1), round(float(hi - lo) * 1.1 + 1, 1), "LINEAR"
    return _percentile_window(value)


def _percentile_window(value: np.ndarray) -> tuple[float, float, str]:
    """A LINEAR_EXACT window over the 0.5th to 99.5th percentile of ``value`` (``data.dicom.percentile_window``, what
    the shard builder applies to an image that has none): the image reads as it did before it carried one."""
    lo, hi = (float(v) for v in percentile_bounds(value.astype(np.float32)))
    return float(f"{(lo + hi) / 2:.10g}"), float(f"{hi - lo:.10g}"), "LINEAR_EXACT"


def _dx_modules(ds: Dataset, mono1: bool, study: dict, image: dict) -> None:
    """What the DX IOD asks for beyond the image itself (PS3.3 A.26): the DX Image module's Type 1 attributes at
    their enumerated values, the detector's imager spacing (the replica's pixel spacing: no magnification), and the
    Type 2 identifiers and equipment attributes, empty where the replica has nothing to say."""
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if mono1 else -1  # MONOCHROME2: higher values where less X-ray got through
    ds.LossyImageCompression = "00"  # uncompressed or JPEG 2000 lossless
    ds.BurnedInAnnotation = "NO"
    ds.ImagerPixelSpacing = list(ds.PixelSpacing)
    ds.ImageLaterality = "U"  # the chest is an unpaired body part
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = CHEST
    ds.AnatomicRegionSequence = [code]
    ds.StudyID = str(study["study_id"])[-8:]
    ds.SeriesNumber = int(image.get("index", 0)) + 1  # each image is a series of its own, numbered within its study
    ds.InstanceNumber = 1
    ds.Manufacturer = "cxr_pipeline replica"
    ds.DetectorType = ""
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []


def write_jpg(path: Path, pixels: np.ndarray) -> None:
    """MIMIC-CXR-JPG style: 8-bit grey, histogram-equalised, MONOCHROME2."""
    img = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L")
    img = ImageOps.equalize(img)
    _atomic_save(path, lambda p: img.save(p, format="JPEG", quality=95))


def write_plain_dicom(
    path: Path, arr: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12, jpeg2000: bool = False, **attributes
) -> Path:
    """A minimal Digital X-Ray DICOM of ``arr`` (uint16, 2-D or frames x 2-D) with any extra attributes.

    For tests and benchmarks that need one exact file rather than a replica.
    """
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX_PRESENTATION, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    for k, v in attributes.items():
        setattr(ds, k, v)
    data = np.ascontiguousarray(arr, dtype=np.uint16)
    ds.PixelData = data.tobytes()
    if jpeg2000:
        ds.compress(JPEG2000Lossless, data, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    _atomic_save(Path(path), lambda p: ds.save_as(p, enforce_file_format=True))
    return Path(path)
