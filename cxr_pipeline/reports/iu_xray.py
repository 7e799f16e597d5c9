"""Real radiology reports to test the labeler on: the Indiana University chest X-ray collection (Open-i).

The 3,955 IU reports, with the MeSH headings NLM's indexers gave each, ship inside the
``torchxrayvision`` wheel on PyPI (``torchxrayvision/data/NLMCXR_reports.tgz``). They are
fetched with ``pip download --no-deps`` into a cache outside the repository: their licence
(CC BY-NC-ND 4.0) allows neither copying them into this project nor derivatives.

Only the reports whose numeric id is **even** are ever read (the development half); the
odd ids are held out for evaluation, and this module skips their files by name before
opening them.

MeSH "major" headings -> CheXpert observations (``MESH_TO_CHEXPERT``): a heading is
``Root/qualifier/...``; a rule names the root and, where the root alone is ambiguous, the
qualifiers that count. Ten observations map; the mapping leaves out:
- Enlarged Cardiomediastinum: MeSH has only ``Mediastinum/prominent`` (11 even reports)
  and ``Cardiac Shadow/enlarged``, which indexers use for cardiomegaly.
- Pleural Other: ``Thickening/pleura`` exists but indexers also file pleural scarring
  under ``Cicatrix`` with lung qualifiers, so absence is not reliable.
- Support Devices: ``Catheters, Indwelling``, ``Implanted Medical Device``, ``Surgical
  Instruments`` (also used for sternotomy wires and clips), ``Stents``, ``Tube, Inserted``
  and ``Medical Device`` mix support devices with surgical clips and sutures.
- No Finding: ``normal`` is assigned to reports that still mention granulomas or
  degenerative spine change, which CheXpert's "No Finding" allows and MeSH indexes apart.
``Opacity``/``Density`` qualified ``round`` (a nodular opacity) also maps to
Lung Lesion. ``Cicatrix/lung`` (parenchymal scarring) maps to Lung Opacity, as CheXpert's definition of
that observation includes scarring. Not mapped to any observation: granulomas (``Calcified
Granuloma``, ``Granulomatous Disease``), other ``Cicatrix``, emphysema, ``Lung/hypoinflation`` and ``Lung/hyperdistention``,
spine, aorta and bone findings other than fractures, ``Markings``.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cxr_pipeline.wheel_data import IU_REPORTS, wheel_file

# MeSH root -> (CheXpert observation, the first qualifier must be one of these, or None for any).
MESH_TO_CHEXPERT: dict[str, list[tuple[str, frozenset[str] | None]]] = {
    "Cardiomegaly": [("Cardiomegaly", None)],
    "Cardiac Shadow": [("Cardiomegaly", frozenset({"enlarged"}))],
    "Pulmonary Atelectasis": [("Atelectasis", None)],
    "Consolidation": [("Consolidation", None)],
    "Pulmonary Edema": [("Edema", None)],
    "Pulmonary Congestion": [("Edema", None)],
    "Heart Failure": [("Edema", None)],
    "Fractures, Bone": [("Fracture", None)],
    "Nodule": [("Lung Lesion", None)],
    "Mass": [("Lung Lesion", None)],
    "Cavitation": [("Lung Lesion", None)],
    "Opacity": [
        (
            "Lung Opacity",
            frozenset(
                {
                    "lung",
                    "retrocardiac",
                    "costophrenic angle",
                    "pulmonary alveoli",
                    "left",
                    "right",
                    "multiple",
                    "scattered",
                    "round",
                    "thorax",
                    "pleura",
                    "pleural sinus",
                    "",
                }
            ),
        )
    ],
    "Infiltrate": [("Lung Opacity", None)],
    "Airspace Disease": [("Lung Opacity", None)],
    "Density": [("Lung Opacity", frozenset({"lung", "retrocardiac"}))],
    # CheXpert counts parenchymal scarring as Lung Opacity; MeSH files it under Cicatrix
    "Cicatrix": [("Lung Opacity", frozenset({"lung"}))],
    "Pleural Effusion": [("Pleural Effusion", None)],
    "Hydropneumothorax": [("Pleural Effusion", None), ("Pneumothorax", None)],
    "Pneumonia": [("Pneumonia", None)],
    "Pneumothorax": [("Pneumothorax", None)],
}
# Indexers file a nodular opacity or density ("1.5 cm nodular opacity") as Opacity or Density
# qualified "round"; CheXpert calls it a Lung Lesion.
ROUND_LESION_ROOTS = frozenset({"Opacity", "Density"})
FINDINGS10: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)


@dataclass(frozen=True)
class IUReport:
    id: int
    findings: str
    impression: str
    mesh_major: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(p for p in (self.findings, self.impression) if p)

    def observations(self) -> set[str]:
        """The CheXpert observations its MeSH major headings name (``MESH_TO_CHEXPERT``)."""
        out = set()
        for heading in self.mesh_major:
            root, *quals = [q.strip() for q in heading.split("/")]
            for label, need in MESH_TO_CHEXPERT.get(root, []):
                if need is None or (quals[0] if quals else "") in need:
                    out.add(label)
            if root in ROUND_LESION_ROOTS and "round" in quals:
                out.add("Lung Lesion")
        return out


def archive(cache: Path | None = None) -> Path:
    """The reports archive, downloaded (once) with pip from PyPI's torchxrayvision wheel (``wheel_data``)."""

    return wheel_file(IU_REPORTS, cache)


_NAME = re.compile(r"(?:.*/)?(\d+)\.xml")


def development_reports(path: Path | None = None) -> Iterator[IUReport]:
    """The even-id reports with FINDINGS or IMPRESSION text, in id order. Odd ids are never opened."""
    import xml.etree.ElementTree as ET

    path = Path(path) if path else archive()
    with tarfile.open(path) as tar:
        members = []
        for m in tar.getmembers():
            match = _NAME.fullmatch(m.name)
            if match and int(match.group(1)) % 2 == 0:
                members.append((int(match.group(1)), m))
        for rid, m in sorted(members, key=lambda x: x[0]):
            root = ET.parse(io.BytesIO(tar.extractfile(m).read())).getroot()
            sec = {a.get("Label"): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
            findings, impression = sec.get("FINDINGS", ""), sec.get("IMPRESSION", "")
            if findings or impression:
                yield IUReport(rid, findings, impression, tuple((mj.text or "").strip() for mj in root.iter("major")))
