"""The windows the training split's headers carry, as a ``data.dicom.WindowPrior``: fitted from a sample of the
manifest's training images at the size the reader decodes them, kept beside the assets and fitted again when the
sample changes.

Why a prior at all, and why from the training split only: a file that carries no window (PadChest's 16-bit PNGs, a
DICOM without a VOI) is read through one of the windows the models' training images were read through (see
``WindowPrior``), so the prior describes the training images and nothing else; validate and test images never
enter it. The units are measured on the values as the reader windows them (box-reduced to the size asked, as the
shard builder decodes), because the percentile window of a reduced image is narrower than that of the full one: a
prior measured at full resolution left 10 of 47 windowless held-out windows flagged by the drift monitor, one
measured as read none (``benchmarks/drift.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.data.dicom import DecodeError, WindowPrior, decode
from cxr_pipeline.files import atomic_path

SAMPLE = 500  # training images whose windows make the prior (a fit decodes each once at the size asked)
SEED = 0


def fit_window_prior(root: Path, rel_paths: list[str], size: int) -> WindowPrior | None:
    """The windows of the files at ``rel_paths`` (under ``root``), read as the shard builder reads them at ``size``;
    None when none carries a window (the percentile window stays). Unreadable files are skipped: the shard
    builder's rejects table already names them."""
    windows = []
    for rel in rel_paths:
        try:
            dec = decode(Path(root) / rel, min_size=size, name=rel)
        except DecodeError:
            continue
        if dec.window_units is not None:
            windows.append(tuple(round(float(v), 6) if not isinstance(v, str) else v for v in dec.window_units))
    return WindowPrior(tuple(windows)) if windows else None


def training_sample(manifest: pl.DataFrame, n: int = SAMPLE, seed: int = SEED) -> list[str]:
    """The relative paths of ``n`` training-split images of ``manifest`` (all of them when fewer), drawn with
    ``seed``, in manifest order."""
    train = manifest.filter(pl.col("split") == "train")
    if train.height <= n:
        return train["path"].to_list()
    idx = np.sort(np.random.default_rng(seed).choice(train.height, size=n, replace=False))
    return train["path"].gather(idx).to_list()


def training_window_prior(paths, size: int) -> WindowPrior | None:
    """The prior of ``paths``' manifest at ``size`` (None without a manifest or a windowed training image), fitted
    when its sample's files changed since the last fit (path, size, modification time) and kept in
    ``assets/window_prior/s<size>.json``."""
    if not paths.manifest.exists():
        return None
    rels = training_sample(pl.read_parquet(paths.manifest, columns=["path", "split"]))
    key = []
    for rel in rels:
        try:
            st = os.stat(paths.raw / rel)
            key.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            key.append([rel, None, None])
    cache = paths.assets / "window_prior" / f"s{size}.json"
    if cache.exists():
        kept = json.loads(cache.read_text())
        if kept.get("sample") == key:
            return WindowPrior(tuple(tuple(w) for w in kept["windows"])) if kept["windows"] else None
    prior = fit_window_prior(paths.raw, rels, size)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps({"size": size, "sample": key, "windows": [list(w) for w in prior.windows] if prior else []}))
    return prior
