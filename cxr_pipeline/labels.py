"""The 14 CheXpert observations as MIMIC-CXR names them, and their slugs."""

from __future__ import annotations

import re

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

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
LABEL_VALUES = frozenset({POSITIVE, NEGATIVE, UNCERTAIN})


def slug(label: str) -> str:
    """``"Pleural Effusion"`` -> ``"pleural_effusion"`` (partition keys, columns, model names)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


SLUGS: tuple[str, ...] = tuple(slug(x) for x in LABELS)
LABEL_BY_SLUG: dict[str, str] = dict(zip(SLUGS, LABELS, strict=True))
