"""A classifier's data: the manifest's rows under the label policy, per split, with their shard images
(resident or streamed) and targets. Shared by the per-pathology fit (``vision.fit``), the multi-label
model (``vision.multilabel``) and the tables read from their folders. No Dagster here."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl

from cxr_pipeline.data.shard_reader import Shards, open_images
from cxr_pipeline.labels import LABEL_BY_SLUG
from cxr_pipeline.vision.images import as_images, place
from cxr_pipeline.vision.targets import targets
from cxr_pipeline.vision.train import TrainConfig

SPLITS = ("train", "validate", "test")
RADIOLOGIST = "radiologist"  # the second test set: radiologist-labelled test studies, with those labels


def patients(rows: pl.DataFrame):
    return rows["subject_id"].to_numpy() if "subject_id" in rows.columns else None


@dataclass
class Split:
    images: object  # vision.images: resident (uint8 tensor (n, size, size)) or streamed from the shards
    targets: object  # float tensor (n,)
    rows: pl.DataFrame  # manifest rows aligned with the images (with content_hash)

    def __post_init__(self) -> None:

        self.images = as_images(self.images)  # a tensor in hand is resident


@dataclass
class ClassifierData:
    """A label's usable rows under the label policy, per split, with their images."""

    label_slug: str
    size: int
    uncertain: str
    blank: str
    splits: dict[str, Split]  # train / validate / test (automatic labels) / radiologist
    label_source: str = "chexpert"  # the automatic labels' source (the manifest's label_source)
    mode: str = "resident"  # where the images are: resident or streamed (``vision.images.choose_mode``)

    @property
    def label(self) -> str:
        return LABEL_BY_SLUG[self.label_slug]

    @property
    def counts(self) -> dict[str, int]:
        c = {f"n_{s}": int(self.splits[s].rows.height) for s in SPLITS}
        c.update({f"n_{s}_pos": int(self.splits[s].targets.sum()) for s in SPLITS})
        return c

    @property
    def untrainable_reason(self) -> str | None:
        c = self.counts
        if c["n_train"] == 0 or c["n_train_pos"] in (0, c["n_train"]):
            return (
                f"not trainable: the training split has {c['n_train_pos']} positives of {c['n_train']} "
                f"(uncertain={self.uncertain}, blank={self.blank})"
            )
        return None

    def digest(self) -> str:
        """What the model is fit on: training and validation ids, targets and image contents, and the size."""
        h = hashlib.sha256(f"{self.label_slug}:{self.size}\n".encode())
        for s in ("train", "validate"):
            rows = self.splits[s].rows.select("dicom_id", "target", "content_hash")
            for did, t, ch in rows.iter_rows():
                h.update(f"{s}\t{did}\t{t}\t{ch}\n".encode())
        return h.hexdigest()[:24]


def label_source(manifest: pl.DataFrame) -> str:
    """The automatic labels' source, as the manifest records it."""
    return manifest["label_source"][0] if manifest.height and "label_source" in manifest.columns else "chexpert"


def place_splits(named_rows: list[tuple[str, pl.DataFrame]], shards: Shards, cfg: TrainConfig, device, target) -> tuple[dict, str]:
    """Each split's shard images (resident or streamed, one decision for all: ``cfg.data``, ``cfg.memory_budget``)
    with its targets (``target(rows)``). ``shards`` must be at ``cfg.size``: the size the model and its
    checkpoint record is the one its images were read at."""
    import torch

    if shards.size != cfg.size:
        raise ValueError(f"{shards.root}: shards at {shards.size} px, but the model's size is {cfg.size} px")
    opened = [(name, *open_images(shards, rows)) for name, rows in named_rows]
    placed, mode = place([o[1] for o in opened], cfg.data, torch.device(device or "cpu"), cfg.memory_budget)
    return {name: Split(imgs, target(rows), rows) for (name, _, rows), imgs in zip(opened, placed, strict=True)}, mode


def load_data(manifest: pl.DataFrame, shards: Shards, label_slug: str, cfg: TrainConfig, device=None) -> ClassifierData:
    """The label's targets under the policy (``cfg.uncertain``, ``cfg.blank``), joined with the shard images
    (``cfg.size``, resolved) of each split: resident on ``device`` or streamed (``cfg.data``)."""
    import torch

    size, uncertain, blank = cfg.size, cfg.uncertain, cfg.blank

    usable = targets(manifest, label_slug, uncertain, blank)
    # radiologist-labelled test studies with the radiologist's labels; blank = not mentioned = negative
    rad = (
        manifest.filter((pl.col("split") == "test") & pl.col("radiologist_labelled"))
        if "radiologist_labelled" in manifest.columns
        else None
    )
    if rad is not None:
        rad = targets(rad.with_columns(pl.col(f"radiologist_{label_slug}").alias(label_slug)), label_slug, uncertain, "zeros")
    named = [*((s, usable.filter(pl.col("split") == s)) for s in SPLITS), (RADIOLOGIST, rad if rad is not None else usable.clear())]
    splits, mode = place_splits(named, shards, cfg, device, lambda rows: torch.tensor(rows["target"].to_numpy(), dtype=torch.float32))
    return ClassifierData(label_slug, size, uncertain, blank, splits, label_source(manifest), mode)
