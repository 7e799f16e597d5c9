"""torchvision backbones with a logit head (one, or one per label), and loading local weights safely."""

from __future__ import annotations

from pathlib import Path

ARCHS = ("resnet18", "resnet50", "densenet121", "vgg16")


def build_model(arch: str = "resnet18", dropout: float = 0.2, weights: str | Path | None = None, outputs: int = 1):
    """A classifier: backbone (random init unless ``weights``) + dropout + ``outputs`` logits
    (one for a per-pathology model, 14 for the multi-label one).

    ``weights``: a local ``.safetensors`` or ``.pt/.pth`` file (read with
    ``weights_only=True``) holding the backbone's state dict, e.g. ImageNet or
    CXR-pretrained weights; the classification head is always new. Shape
    mismatches raise a ``ValueError`` naming the tensors. Nothing downloads.
    """
    import torch
    from torch import nn
    from torchvision import models

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(models, arch)(weights=None)
    if weights:
        load_backbone_weights(net, Path(weights))
    if arch.startswith("resnet"):
        net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.fc.in_features, outputs))
    elif arch == "densenet121":
        net.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.classifier.in_features, outputs))
    else:  # vgg16: replace the last layer of its classifier
        net.classifier[-1] = nn.Sequential(nn.Dropout(dropout), nn.Linear(net.classifier[-1].in_features, outputs))
    torch.nn.init.zeros_(head(net, arch).bias)
    return net


def head(net, arch: str):
    if arch.startswith("resnet"):
        return net.fc[1]
    if arch == "densenet121":
        return net.classifier[1]
    return net.classifier[-1][1]


def read_state_dict(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_backbone_weights(net, path: Path) -> None:
    """Load every backbone tensor; the (ImageNet) head is skipped. Strict on shapes and names."""
    sd = read_state_dict(path)
    own = net.state_dict()
    head_prefixes = ("fc.", "classifier.")
    wanted = {k: v for k, v in own.items() if not k.startswith(head_prefixes)}
    given = {k.removeprefix("module."): v for k, v in sd.items()}
    missing = [k for k in wanted if k not in given]
    bad = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    if missing or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} backbone tensors missing (e.g. {', '.join(missing[:3])})")
        if bad:
            parts.append(f"{len(bad)} shape mismatches (e.g. {'; '.join(bad[:3])})")
        raise ValueError(f"{path}: weights do not fit this architecture: {'; '.join(parts)}")
    net.load_state_dict({**own, **{k: given[k] for k in wanted}})
