"""Registered champions for tests: small random-init ResNet-18 checkpoints at 32 px, registered through the
project's own writer and MLflow (the ``registry`` fixture, shared through conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from cxr_pipeline.labels import LABELS, SLUGS, slug
from cxr_pipeline.tracking import tracked_run
from cxr_pipeline.vision.checkpoint import CheckpointConfig, ClassifierFiles, register, write_checkpoint
from cxr_pipeline.vision.models import build_model
from cxr_pipeline.vision.serving import log_model

SIZE = 32


def legacy_checkpoint(folder: Path, label: str | None, threshold: float, seed: int) -> Path:
    """A random-init ResNet-18 checkpoint in the oldest shape the pipeline wrote (before calibration and the recipe
    travelled with the weights): per-pathology (``pathology``/``threshold``) or multi-label if label is None
    (``labels``/``thresholds``/``outputs``); the shape af43cf9 last wrote is the fixture below."""
    import torch

    torch.manual_seed(seed)
    outputs = 1 if label else len(SLUGS)
    net = build_model("resnet18", 0.2, outputs=outputs)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    cfg = {"arch": "resnet18", "dropout": 0.2, "size": SIZE}
    if label:
        cfg.update(pathology=label, threshold=threshold)
    else:
        cfg.update(labels=list(LABELS), thresholds=dict.fromkeys(SLUGS, threshold), outputs=outputs)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def checkpoint(folder: Path, label: str, threshold: float, seed: int) -> Path:
    """The same through today's writer (``vision.checkpoint.write_checkpoint``, format 2)."""
    import torch

    torch.manual_seed(seed)
    files = ClassifierFiles(folder)
    recipe = {"arch": "resnet18", "uncertain": "ones", "blank": "zeros"}
    config = CheckpointConfig("resnet18", SIZE, (label,), {slug(label): threshold}, {slug(label): None}, 0.2, training_config=recipe)
    write_checkpoint(build_model("resnet18", 0.2, outputs=1), files, config)
    return files.checkpoint


def register_folder(folder: Path, name: str) -> None:
    with tracked_run(f"test[{name}]") as run:
        log_model(run, folder)
        register(run, name, score=0.7, description="test", tags={})


@pytest.fixture
def registry(cxr_home, tmp_path, monkeypatch):
    """cxr-cardiomegaly (threshold 0: always positive; registered before format 2) and cxr-edema (today's format)
    registered as champions, plus cxr-multilabel (before format 2)."""
    from cxr_pipeline.settings import paths

    monkeypatch.setenv("MLFLOW_TRACKING_URI", paths().tracking_uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ck = {
        "cardiomegaly": legacy_checkpoint(tmp_path / "ck_card", "Cardiomegaly", 0.0, 1),
        "edema": checkpoint(tmp_path / "ck_edema", "Edema", 0.99, 2),
        "multilabel": legacy_checkpoint(tmp_path / "ck_multi", None, 0.5, 3),
    }
    register_folder(ck["cardiomegaly"], "cxr-cardiomegaly")
    register_folder(ck["edema"], "cxr-edema")
    register_folder(ck["multilabel"], "cxr-multilabel")
    return ck
