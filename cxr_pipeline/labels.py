"""The 14 CheXpert observations as MIMIC-CXR names them, and their slugs."""

from __future__ import annotations

import re
from collections.abc import Mapping

# Column order of mimic-cxr-2.0.0-chexpert.csv (alphabetical, as released).
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

# The five observations the report-generation literature reports on.
COMMON5: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)

# The 13 findings; "No Finding" is derived from them (``no_finding``).
PATHOLOGIES: tuple[str, ...] = tuple(x for x in LABELS if x != "No Finding")


def no_finding(states: Mapping[str, float | None]) -> float | None:
    """CheXpert's rule: 1.0 when no finding but support devices is positive or uncertain, else blank.

    One definition serves the labeler, the replica's ground truth and its labeller view.
    """
    clear = all(states.get(p) not in (1.0, -1.0) for p in PATHOLOGIES if p != "Support Devices")
    return 1.0 if clear else None


def slug(label: str) -> str:
    """``"Pleural Effusion"`` -> ``"pleural_effusion"`` (partition keys, columns, model names)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


SLUGS: tuple[str, ...] = tuple(slug(x) for x in LABELS)
LABEL_BY_SLUG: dict[str, str] = dict(zip(SLUGS, LABELS, strict=True))
