"""Trained classifiers as MLflow models: load, predict, serve, and look inside (Grad-CAM).

Each registered version (``cxr-<label>`` and ``cxr-multilabel``) is an MLflow *pyfunc* model,
so ``mlflow.pyfunc.load_model("models:/cxr-cardiomegaly@champion")``, ``mlflow models serve``
and the registry's model page all work. It is logged as a model *from code*
(``pyfunc_entry.py`` is the model's code file): MLflow stores no pickle of ours, and the
weights inside it are the unchanged checkpoint folder (``vision.checkpoint``: the format, and the loader this
model's ``load_context`` calls).

``predict`` takes what a user has:

- a batch of grey uint8 images at the model's size, ``(n, size, size)`` (what the shards hold;
  the signature and what ``mlflow models serve`` validates), or
- file paths (DICOM, JPG, PNG) in ``params={"paths": [...]}``, decoded exactly as the shard
  builder decodes them (``data.dicom.prepare``: VOI LUT / windowing, MONOCHROME1 inverted,
  letterboxed; a file without a window through the windows the model's training images were read
  through, which its checkpoint carries); the image batch may then be empty.

``params={"device": "cuda:1"}`` picks the device (default ``auto``: the first GPU when there is one, else
the CPU; ``mlflow models serve`` on a GPU host so predicts on the GPU). It returns one row per image:
``<slug>`` (the calibrated probability: the network's score through the map fitted on validate,
``vision.calibration``) and ``<slug>_call`` (the network's score at or above the validation-chosen threshold) for
every label the model has. Read the call, not the probability against a threshold: the map clips scores within
1e-6 of 0 or 1, so there a score below the threshold and the threshold itself give one probability. The model's
metadata says so (``calls``) and names its thresholds by scale (``thresholds_uncalibrated``: the network's, where
the calls are read; ``thresholds_calibrated``: carried through the map, for display), with no bare ``thresholds``
a reader could compare the probabilities with. A checkpoint written before calibration returns the network's scores
and its metadata says so.

Saliency is Grad-CAM from captum (``LayerGradCam`` on the last convolutional block) rather than
hand-written hooks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_pipeline.data.dicom import prepare
from cxr_pipeline.data.shard_reader import write_png
from cxr_pipeline.data.voi import WindowPrior
from cxr_pipeline.files import png_figure
from cxr_pipeline.labels import LABEL_BY_SLUG
from cxr_pipeline.vision.calibration import describe as describe_calibration
from cxr_pipeline.vision.checkpoint import MODEL_ARTIFACT, LoadedClassifier, load_checkpoint
from cxr_pipeline.vision.train import to_input

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
# the MLflow model's artifact key for the checkpoint folder: every version already registered loads by it (the
# fixture test of a model registered at af43cf9 keeps it), so it is never renamed
PYFUNC_CHECKPOINT = "checkpoint"


def serving_device(device: str = "auto") -> str:
    """The device a served model predicts on: ``auto`` is the first GPU when there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def decode_files(
    paths: Sequence[str | Path | bytes], size: int, names: Sequence[str] | None = None, prior: WindowPrior | None = None
) -> np.ndarray:
    """Files (or their bytes, named by ``names``) -> uint8 (n, size, size), exactly as the shard builder stores them
    (errors name the file); a file that carries no window read through ``prior``'s (the model's:
    ``LoadedClassifier.prior``): the rule external validation reads such files by, with the windows fitted at the
    model's own size, where this decodes (external validation decodes at the shards' level: the readings differ as
    a windowed file's do)."""

    if not paths:
        return np.zeros((0, size, size), dtype=np.uint8)
    names = names or [str(p) for p in paths]
    return np.stack([prepare(p if isinstance(p, bytes) else str(p), size, name=n, prior=prior) for p, n in zip(paths, names, strict=True)])


def as_image_batch(model_input: Any, size: int) -> np.ndarray:
    """What pyfunc hands ``predict`` (ndarray, or a DataFrame from a served request) -> uint8 (n, s, s)."""
    arr = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
    if arr.size == 0:
        return np.zeros((0, size, size), dtype=np.uint8)
    if arr.ndim == 2 and arr.shape == (size, size):
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (size, size):
        raise ValueError(f"expected grey uint8 images of shape (n, {size}, {size}), got {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ValueError("image values must be 0..255 (grey uint8, as the shards store them)")
        arr = arr.astype(np.uint8)
    return arr


def prediction_frame(model: LoadedClassifier, scores: np.ndarray):
    """One row per image: ``<slug>`` calibrated probability and ``<slug>_call`` for each label. The call is read
    on the network's own score at the validation threshold: the calibrated probability against the carried
    threshold would tie at the map's clip (scores within 1e-6 of 0 or 1) and could flip it."""
    import pandas as pd

    scores = np.asarray(scores).reshape(-1, len(model.slugs))
    probs = model.calibrate(scores)
    cols: dict[str, Any] = {}
    for j, s in enumerate(model.slugs):
        cols[s] = probs[:, j].astype(np.float64)
        cols[f"{s}_call"] = scores[:, j] >= model.thresholds[j]
    return pd.DataFrame(cols)


CALL_RULE = (
    "<slug>_call is the network's score >= thresholds_uncalibrated[<slug>]; read it rather than comparing <slug> "
    "(calibrated) with thresholds_calibrated[<slug>]: the map clips scores within 1e-6 of 0 or 1, so there a score "
    "below the threshold gets the threshold's probability"
)


def threshold_metadata(model: LoadedClassifier) -> dict[str, Any]:
    """The registered model's thresholds, each named by its scale, and the rule its calls follow. There is no bare
    ``thresholds``: an earlier version gave the calibrated ones under that name, inviting a reader to compare the
    served probabilities with them, which flips calls at the clip; a reader of the old key now fails loudly
    rather than reading the network's thresholds against calibrated probabilities."""
    return {
        "calls": CALL_RULE,
        "thresholds_uncalibrated": dict(zip(model.slugs, model.thresholds, strict=True)),  # where the calls are read
        "thresholds_calibrated": dict(zip(model.slugs, model.served_thresholds, strict=True)),  # for display
    }


from mlflow.pyfunc import PythonModel  # noqa: E402  (after the helpers, which need no MLflow)

# MLflow warns, when a PythonModel subclass is defined, that ``predict`` has no type hints; its own
# decorator forces the warning filter to "once", so a filter cannot hide it. The explicit signature
# (uint8 tensor + ``paths`` param) is what validates here, and no single type hint says "images, or
# nothing plus paths"; so the class is defined with warnings shown nowhere.
_showwarning, warnings.showwarning = warnings.showwarning, lambda *a, **k: None
try:

    class CxrClassifier(PythonModel):
        """The pyfunc: loads ``artifacts["checkpoint"]``; predicts on images or on file paths (see module doc)."""

        def load_context(self, context) -> None:
            self.model = load_checkpoint(Path(context.artifacts[PYFUNC_CHECKPOINT]))

        def predict(self, context, model_input, params: dict[str, Any] | None = None):
            m = self.model
            images = as_image_batch(model_input, m.size)
            paths = [p for p in (params or {}).get("paths") or [] if p]
            if paths:
                images = np.concatenate([images, decode_files(paths, m.size, prior=m.prior)])
            return prediction_frame(m, m.probabilities(images, serving_device((params or {}).get("device") or "auto")))
finally:
    warnings.showwarning = _showwarning


def _requirements() -> list[str]:
    """Pinned to what is installed (MLflow's own inference imports the model in a subprocess: slow)."""
    from importlib.metadata import version

    pkgs = ["torch", "torchvision", "safetensors", "numpy", "pandas", "pillow", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg"]
    pkgs += ["pylibjpeg-libjpeg", "polars", "mlflow"]
    return [f"{p}=={version(p)}" for p in pkgs]


def save_pyfunc(checkpoint: Path, out: Path) -> Path:
    """Write the MLflow model for ``checkpoint`` into ``out`` (a new folder): signature, input example
    (one black image at the model's size), pinned requirements. The model also needs ``cxr_pipeline``
    itself importable (installed, as with ``make install``)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

    m = load_checkpoint(checkpoint)
    outputs = [c for s in m.slugs for c in (ColSpec(DataType.double, s), ColSpec(DataType.boolean, f"{s}_call"))]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, m.size, m.size))]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("paths", DataType.string, [""], (-1,)), ParamSpec("device", DataType.string, "auto")]),
    )
    labels = [LABEL_BY_SLUG[s] for s in m.slugs]
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(ENTRY),
        artifacts={PYFUNC_CHECKPOINT: str(checkpoint)},
        signature=signature,
        input_example=np.zeros((1, m.size, m.size), dtype=np.uint8),
        pip_requirements=_requirements(),
        metadata={
            "labels": labels,
            **threshold_metadata(m),
            "calibration": {s: describe_calibration(m.calibration(j)) for j, s in enumerate(m.slugs)},
            "calibration_parameters": {s: m.calibration(j) for j, s in enumerate(m.slugs)},
            "arch": m.arch,
            "size": m.size,
        },
    )
    return out


# --- saliency ------------------------------------------------------------------------------------


def target_layer(net, arch: str, size: int):
    """The convolutional block whose feature maps Grad-CAM weighs: the last one, unless the image is so
    small that its maps are under 4 px a side (a 64-px image gives ResNet's last block 2 x 2 maps, a
    map with nothing to say), then the one before it (stride 16)."""
    coarse = size // 32 < 4
    if arch.startswith("resnet"):
        return net.layer3 if coarse else net.layer4
    if arch == "densenet121":
        return net.features.denseblock3 if coarse else net.features.norm5
    return net.features[28]  # vgg16: the last 3x3 convolution, stride 16 already


def cam_grid(arch: str, size: int) -> int:
    """Cells a side of the map Grad-CAM weighs at ``size`` (``target_layer``'s output): stride 16 where the image is
    coarse or the network is VGG-16 (its last 3x3 convolution), stride 32 otherwise. Bilinear upsampling puts the
    map's maximum on one of these cells' centres, so a box between them can never hold it."""
    coarse = size // 32 < 4
    return size // 16 if coarse or arch == "vgg16" else size // 32


def grad_cam(model: LoadedClassifier, images: np.ndarray, output: int = 0) -> np.ndarray:
    """Grad-CAM maps (n, size, size) in [0, 1] for output ``output`` (a label index) of uint8 images."""
    import torch
    from captum.attr import LayerAttribution, LayerGradCam

    if len(images) == 0:
        return np.zeros((0, model.size, model.size), dtype=np.float32)
    net = model.net.cpu().eval()
    x = to_input(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)), torch.device("cpu"), channels_last=False)
    x = x.clone().requires_grad_(True)
    cam = LayerGradCam(net, target_layer(net, model.arch, model.size)).attribute(x, target=output, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, (model.size, model.size), interpolate_mode="bilinear").detach()[:, 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)[:, None, None]
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0).astype(np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The grey radiograph with the map in matplotlib's 'jet' on top: RGB uint8 (s, s, 3)."""
    from matplotlib import colormaps

    grey = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    heat = colormaps["jet"](cam)[..., :3]
    weight = alpha * cam[..., None]  # cold regions leave the radiograph visible
    return np.clip(np.rint(255 * ((1 - weight) * grey + weight * heat)), 0, 255).astype(np.uint8)


def saliency_sheet(panels: Sequence[tuple[np.ndarray, str]], title: str, out: Path, ncols: int = 6) -> Path:
    """RGB panels with captions in one PNG (written atomically)."""

    n = max(1, len(panels))
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    with png_figure(out, nrows, ncols, figsize=(2.2 * ncols, 2.45 * nrows + 0.3), squeeze=False) as (fig, axes):
        for ax in axes.flat:
            ax.axis("off")
        for ax, (img, caption) in zip(axes.flat, panels, strict=False):
            ax.imshow(img)
            ax.set_title(caption, fontsize=8)
        fig.suptitle(title, fontsize=9)
    return out


def pick_cases(y: np.ndarray, p: np.ndarray, threshold: float, per_kind: int = 2) -> list[tuple[int, str]]:
    """Indices of the most confident true positives, false positives and false negatives."""
    call = p >= threshold
    out: list[tuple[int, str]] = []
    for kind, mask, order in (("TP", (y == 1) & call, -p), ("FP", (y == 0) & call, -p), ("FN", (y == 1) & ~call, p)):
        idx = np.flatnonzero(mask)
        out += [(int(i), kind) for i in idx[np.argsort(order[idx], kind="stable")][:per_kind]]
    return out


def classifier_saliency_sheet(
    model: LoadedClassifier, images: np.ndarray, y: np.ndarray, p: np.ndarray, out: Path, output: int = 0, per_kind: int = 2
) -> Path | None:
    """The sheet a classifier materialisation shows: Grad-CAM of a few test TPs, FPs and FNs (None if none)."""
    cases = pick_cases(y, p, model.thresholds[output], per_kind)
    if not cases:
        return None
    idx = [i for i, _ in cases]
    cams = grad_cam(model, images[idx], output)
    panels = [(overlay(images[i], c), f"{kind} p={p[i]:.2f}") for (i, kind), c in zip(cases, cams, strict=True)]
    label = LABEL_BY_SLUG[model.slugs[output]]
    return saliency_sheet(panels, f"{label}: Grad-CAM on test images (threshold {model.thresholds[output]:.2f})", out)


def log_model(run, checkpoint: Path) -> None:
    """The checkpoint as an MLflow model in ``run`` (a ``TrackedRun``), where registration looks for it."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run.log_artifact(save_pyfunc(checkpoint, Path(d) / MODEL_ARTIFACT), MODEL_ARTIFACT)


def saliency_for(checkpoint: Path, images: np.ndarray, y: np.ndarray, p: np.ndarray, out: Path) -> Path | None:
    """The Grad-CAM sheet a fit shows, by model kind: a few test TPs / FPs / FNs (per-finding) or each finding's
    best TP (multi-label). ``y``, ``p``: (n,) or (n, labels) test targets and probabilities. None if no case."""
    model = load_checkpoint(checkpoint)
    if len(model.slugs) > 1:
        return multilabel_saliency_sheet(model, images, y, p, out)
    return classifier_saliency_sheet(model, images, y, p, out)


def write_rgb(rgb: np.ndarray, out: Path, min_side: int = 0) -> Path:
    """An RGB uint8 array as a PNG, written atomically; enlarged (bilinear) to ``min_side`` for viewing."""
    from PIL import Image

    im = Image.fromarray(rgb, mode="RGB")
    if min(im.size) < min_side:
        im = im.resize((min_side, min_side), Image.Resampling.BILINEAR)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_png(np.asarray(im), out)


def multilabel_saliency_sheet(model: LoadedClassifier, images: np.ndarray, y: np.ndarray, p: np.ndarray, out: Path) -> Path | None:
    """The multi-label model's sheet: for each finding, Grad-CAM of its most confident test true positive
    (``y``, ``p``: (n, labels); NaN targets are unusable under the policy). None if there is none."""
    panels = []
    for j, s in enumerate(model.slugs):
        cases = pick_cases(np.nan_to_num(y[:, j], nan=-1), p[:, j], model.thresholds[j], per_kind=1)
        tp = [i for i, kind in cases if kind == "TP"]
        if tp:
            cam = grad_cam(model, images[tp], j)[0]
            panels.append((overlay(images[tp[0]], cam), f"{LABEL_BY_SLUG[s]} p={p[tp[0], j]:.2f}"))
    if not panels:
        return None
    return saliency_sheet(panels, "Multi-label model: Grad-CAM of each finding's most confident test true positive", out, ncols=7)
