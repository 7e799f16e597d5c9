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
from cxr_pipeline.vision.checkpoint import CHAMPION, MULTILABEL, load_registered, registered_versions
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
    name: str = ""  # the registered model's name and version ("" when none): TID 4019's algorithm identification
    version: str = ""
    calibrated: bool = True


@dataclass
class ImageResult:
    path: Path
    findings: list[Finding]
    overlays: list[Path] = field(default_factory=list)
    cams: dict[str, np.ndarray] = field(default_factory=dict)  # slug -> Grad-CAM on the letterboxed model input

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


def source_overlay(path: Path | bytes, cam: np.ndarray, side: int = OVERLAY_SIDE, name: str = "") -> np.ndarray:
    """Grad-CAM (computed on the letterboxed model input) drawn on the source radiograph: the map taken back through
    the letterbox (``data.dicom.to_source``, the padding cut, the aspect restored), the image decoded as the shards
    decode it, its long side scaled to ``side``. RGB uint8."""
    d = decode(path, min_size=side, name=name)
    scale = side / max(d.rows, d.cols)
    shape = (max(1, round(d.rows * scale)), max(1, round(d.cols * scale)))
    image = np.clip(np.rint(resized(d.image, shape) * 255.0), 0, 255).astype(np.uint8)
    return overlay(image, np.clip(to_source(cam, d.rows, d.cols, shape), 0.0, 1.0))


def model_names(model: str = "per-pathology") -> list[str]:
    """The registered names a kind of model is served under."""
    return [registered_name(MULTILABEL)] if model == "multilabel" else [registered_name(s) for s in SLUGS]


class Scorer:
    """The registered models under one alias, loaded once and kept (warm) for many calls: ``predict`` loads them per
    command, the PACS intake once per process, so a study arriving costs its scoring, not MLflow's loading."""

    def __init__(self, alias: str = CHAMPION, model: str = "per-pathology") -> None:
        client, uri = get_client()  # MLFLOW_TRACKING_URI if set, else the pipeline's own store
        self.alias, self.model = alias, model
        self.loaded = load_registered(client, uri, model_names(model), alias)
        if not self.loaded:
            raise PredictError(f"no model registered under alias {alias!r} ({', '.join(model_names(model)[:2])}, ...) at {uri}")

    def current(self) -> bool:
        """Whether the registry still has exactly these versions under the alias (nothing promoted since loading)."""
        return registered_versions(get_client()[0], model_names(self.model), self.alias) == self.versions

    @property
    def versions(self) -> list[str]:
        """Sorted ``name:version`` pairs: what scored a study (the PACS intake's exactly-once key)."""
        return sorted(f"{r.name}:{r.version}" for r in self.loaded)

    def score(self, sources: list[Path | bytes], names: list[str] | None = None, cams: bool = False) -> list[ImageResult]:
        """Every source (a file, or a file's bytes named by ``names``) through every model; with ``cams``, the
        Grad-CAM map of each positive call on the model's letterboxed input (``ImageResult.cams``)."""
        names = names or [str(s) for s in sources]
        decoded: dict[tuple, np.ndarray] = {}  # (size, prior) -> (n, size, size), each file decoded once per reading
        results = [ImageResult(Path(n), []) for n in names]
        per_image: list[dict[str, Finding]] = [{} for _ in sources]
        for reg in self.loaded:
            cm = reg.model  # the LoadedClassifier behind the pyfunc
            key = (cm.size, cm.prior.digest() if cm.prior else None)  # a windowless file reads through the model's prior
            if key not in decoded:
                decoded[key] = decode_files(sources, cm.size, names, cm.prior)
            out = reg.pyfunc.predict(decoded[key])
            source = reg.label if cm.calibrated else f"{reg.label}, uncalibrated"  # a version registered before calibration says so
            for j, s in enumerate(cm.slugs):
                for i in range(len(sources)):
                    call = bool(out[f"{s}_call"].iloc[i])
                    f = Finding(s, float(out[s].iloc[i]), cm.served_thresholds[j], call, source, reg.name, reg.version, cm.calibrated)
                    per_image[i][s] = f
                    if cams and call:
                        results[i].cams[s] = grad_cam(cm, decoded[key][i : i + 1], j)[0]
        for i, r in enumerate(results):
            r.findings = [per_image[i].get(s) or Finding(s, None, None, None, f"no {self.alias} model") for s in SLUGS]
        return results


def predict_files(
    images: list[Path], alias: str = CHAMPION, model: str = "per-pathology", cam_dir: Path | None = None
) -> list[ImageResult]:
    """Every file through every registered model; with ``cam_dir``, a Grad-CAM overlay per positive call."""
    results = Scorer(alias, model).score(list(images), cams=cam_dir is not None)
    for path, r in zip(images, results, strict=True):
        for s, cam in r.cams.items():
            r.overlays.append(write_rgb(source_overlay(path, cam), Path(cam_dir) / f"{path.stem}_{s}.png"))
    return results
