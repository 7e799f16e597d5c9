"""``cxr-pipeline predict``: the registered classifiers applied to radiograph files.

Models come from the MLflow registry by alias through MLflow's own loader
(``vision.checkpoint.load_registered``: ``models:/cxr-<finding>@<alias>``), so what runs is exactly
what is registered; files are decoded exactly as the shard builder decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_pipeline.data.dicom import decode, resized, to_source
from cxr_pipeline.labels import LABEL_BY_SLUG, SLUGS
from cxr_pipeline.tracking import get_client
from cxr_pipeline.vision.checkpoint import CHAMPION, MULTILABEL, load_registered
from cxr_pipeline.vision.registry import registered_name
from cxr_pipeline.vision.serving import decode_files, grad_cam, overlay, write_rgb

OVERLAY_SIDE = 512  # overlays are drawn on the source image, its long side scaled to this


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


def source_overlay(path: Path, cam: np.ndarray, side: int = OVERLAY_SIDE) -> np.ndarray:
    """Grad-CAM (computed on the letterboxed model input) drawn on the source radiograph: the map taken back through
    the letterbox (``data.dicom.to_source``, the padding cut, the aspect restored), the image decoded as the shards
    decode it, its long side scaled to ``side``. RGB uint8."""
    d = decode(path, min_size=side)
    scale = side / max(d.rows, d.cols)
    shape = (max(1, round(d.rows * scale)), max(1, round(d.cols * scale)))
    image = np.clip(np.rint(resized(d.image, shape) * 255.0), 0, 255).astype(np.uint8)
    return overlay(image, np.clip(to_source(cam, d.rows, d.cols, shape), 0.0, 1.0))


def predict_files(
    images: list[Path], alias: str = CHAMPION, model: str = "per-pathology", cam_dir: Path | None = None
) -> list[ImageResult]:
    """Every file through every registered model; with ``cam_dir``, a Grad-CAM overlay per positive call."""
    client, uri = get_client()  # MLFLOW_TRACKING_URI if set, else the pipeline's own store
    names = [registered_name(MULTILABEL)] if model == "multilabel" else [registered_name(s) for s in SLUGS]
    loaded = load_registered(client, uri, names, alias)
    if not loaded:
        raise PredictError(f"no model registered under alias {alias!r} ({', '.join(names[:2])}, ...) at {uri}")
    decoded: dict[int, np.ndarray] = {}  # size -> (n, size, size), each file decoded once per size
    results = [ImageResult(p, []) for p in images]
    per_image: list[dict[str, Finding]] = [{} for _ in images]
    for reg in loaded:
        cm = reg.model  # the LoadedClassifier behind the pyfunc
        if cm.size not in decoded:
            decoded[cm.size] = decode_files(images, cm.size)
        out = reg.pyfunc.predict(decoded[cm.size])
        source = reg.label if cm.calibrated else f"{reg.label}, uncalibrated"  # a version registered before calibration says so
        for j, s in enumerate(cm.slugs):
            for i in range(len(images)):
                f = Finding(s, float(out[s].iloc[i]), cm.served_thresholds[j], bool(out[f"{s}_call"].iloc[i]), source)
                per_image[i][s] = f
                if cam_dir is not None and f.call:
                    cam = grad_cam(cm, decoded[cm.size][i : i + 1], j)[0]
                    dest = Path(cam_dir) / f"{images[i].stem}_{s}.png"
                    results[i].overlays.append(write_rgb(source_overlay(images[i], cam), dest))
    for i, r in enumerate(results):
        r.findings = [per_image[i].get(s) or Finding(s, None, None, None, f"no {alias} model") for s in SLUGS]
    return results
