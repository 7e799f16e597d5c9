"""How the classifiers are named in the MLflow registry, and what their validation scores are computed on
(the registry compares champions only between versions validated on the same rows)."""

from __future__ import annotations

import hashlib


def registered_name(label_slug: str) -> str:
    """The MLflow registry name of a classifier: ``cxr-<finding>``, or ``cxr-multilabel`` for the multi-label model."""
    return "cxr-" + label_slug.replace("_", "-")


def validation_digest(data) -> str:
    """What a validation score is computed on: a digest of the validation rows' ids, image content and targets.
    The registry compares champions only between versions with the same digest (``vision.checkpoint.register``)."""
    rows = data.splits["validate"].rows
    cols = [c for c in rows.columns if c in ("dicom_id", "content_hash", "target") or c.startswith("t_")]
    return hashlib.sha256(rows.select(sorted(cols)).sort("dicom_id").write_csv().encode()).hexdigest()[:16]
