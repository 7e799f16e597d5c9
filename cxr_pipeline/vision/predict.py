"""``cxr-pipeline predict``: the registered classifiers applied to radiograph files.

Models come from the MLflow registry by alias through MLflow's own loader
(``mlflow.pyfunc.load_model("models:/cxr-<finding>@champion")``), so what runs is exactly
what is registered; files are decoded exactly as the shard builder decodes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_pipeline.labels import LABEL_BY_SLUG, SLUGS

OVERLAY_SIDE = 256  # overlays are drawn at the model's input size, then enlarged to at least this for viewing


class PredictError(RuntimeError):
    """No model to apply (none registered under the alias, or no tracking store)."""


@dataclass
class Finding:
    slug: str
    probability: float | None  # None: no model registered for this finding under the alias
    threshold: float | None
    call: bool | None
    model: str  # "cxr-cardiomegaly v3", or why there is none


@dataclass
class ImageResult:
    path: Path
    findings: list[Finding]
    overlays: list[Path] = field(default_factory=list)

    def table(self) -> str:
        """Finding | probability | threshold | call | model, one row per CheXpert observation."""
        lines = [f"{self.path}", f"  {'finding':<28} {'probability':>11} {'threshold':>9}  {'call':<8} model"]
        for f in self.findings:
            if f.probability is None:
                lines.append(f"  {LABEL_BY_SLUG[f.slug]:<28} {'-':>11} {'-':>9}  {'-':<8} {f.model}")
            else:
                call = "POSITIVE" if f.call else "negative"
                lines.append(f"  {LABEL_BY_SLUG[f.slug]:<28} {f.probability:>11.3f} {f.threshold:>9.3f}  {call:<8} {f.model}")
        return "\n".join(lines)


def _load(client, name: str, alias: str):
    """(pyfunc model, 'name vN') or None when ``name`` has no version under ``alias``."""
    import mlflow.pyfunc

    from cxr_pipeline.tracking import registered_model_or_none

    rm = registered_model_or_none(client, name)
    if rm is None or alias not in (rm.aliases or {}):
        return None
    return mlflow.pyfunc.load_model(f"models:/{name}@{alias}"), f"{name} v{rm.aliases[alias]}"


def load_registered(client, uri: str, names: list[str], alias: str = "champion") -> dict[str, tuple[Any, str]]:
    """name -> (pyfunc model, 'name vN') for each of ``names`` with a version under ``alias`` in the store at ``uri``.
    MLflow's loader resolves models:/ URIs against the environment's store; it is set for the loads only, rather
    than with mlflow.set_tracking_uri, which would pin this store for the rest of the process."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        return {n: m for n in names if (m := _load(client, n, alias)) is not None}
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def predict_files(
    images: list[Path], alias: str = "champion", model: str = "per-pathology", cam_dir: Path | None = None
) -> list[ImageResult]:
    """Every file through every registered model; with ``cam_dir``, a Grad-CAM overlay per positive call."""
    from cxr_pipeline.tracking import get_client
    from cxr_pipeline.vision.registry import registered_name
    from cxr_pipeline.vision.serving import decode_files, grad_cam, overlay, write_rgb
    from cxr_pipeline.vision.splits import MULTILABEL

    client, uri = get_client()  # MLFLOW_TRACKING_URI if set, else the pipeline's own store
    names = [registered_name(MULTILABEL)] if model == "multilabel" else [registered_name(s) for s in SLUGS]
    loaded = load_registered(client, uri, names, alias)
    if not loaded:
        raise PredictError(f"no model registered under alias {alias!r} ({', '.join(names[:2])}, ...) at {uri}")
    decoded: dict[int, np.ndarray] = {}  # size -> (n, size, size), each file decoded once per size
    results = [ImageResult(p, []) for p in images]
    per_image: list[dict[str, Finding]] = [{} for _ in images]
    for pyfunc, label in loaded.values():
        cm = pyfunc.unwrap_python_model().model  # the LoadedClassifier behind the pyfunc
        if cm.size not in decoded:
            decoded[cm.size] = decode_files(images, cm.size)
        out = pyfunc.predict(decoded[cm.size])
        source = label if cm.calibrated else f"{label}, uncalibrated"  # a version registered before calibration says so
        for j, s in enumerate(cm.slugs):
            for i in range(len(images)):
                f = Finding(s, float(out[s].iloc[i]), cm.served_thresholds[j], bool(out[f"{s}_call"].iloc[i]), source)
                per_image[i][s] = f
                if cam_dir is not None and f.call:
                    cam = grad_cam(cm, decoded[cm.size][i : i + 1], j)[0]
                    dest = Path(cam_dir) / f"{images[i].stem}_{s}.png"
                    results[i].overlays.append(write_rgb(overlay(decoded[cm.size][i], cam), dest, min_side=OVERLAY_SIDE))
    for i, r in enumerate(results):
        r.findings = [per_image[i].get(s) or Finding(s, None, None, None, f"no {alias} model") for s in SLUGS]
    return results
