"""The windows the training split's images are read through, as a ``data.dicom.WindowPrior``: fitted from a sample
of the manifest's frontal training images at the size MIMIC's shards are decoded at, kept beside the assets and
fitted again when the sample (or this code's ``VERSION``) changes.

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

from cxr_pipeline.data.dicom import DecodeError, decode
from cxr_pipeline.data.voi import WindowPrior, usable_window
from cxr_pipeline.files import atomic_path

SAMPLE = 500  # training images whose windows make the prior (a fit decodes each once at the size asked)
SEED = 0
VERSION = 2  # 2: display orientation, LINEAR as exact, the percentile window of a windowless training image counted
FRONTAL = ("PA", "AP")  # the training views the prior is fitted on (the drift monitor reads these views)


def fit_window_prior(root: Path, rel_paths: list[str], size: int) -> WindowPrior | None:
    """The windows the files at ``rel_paths`` (under ``root``) are read through as the shard builder reads them at
    ``size``: their headers' (a windowless training image's percentile window counts as itself; a VOI LUT table,
    which has no scale-free form, does not); None when none counts (the percentile window stays). An unreadable file is skipped (the shard
    builder's rejects table names it); none readable at all is an error naming the root, not a silent "no window"
    (a wrong raw root would otherwise leave every windowless file on the percentile window)."""
    windows, unreadable = [], []
    for rel in rel_paths:
        try:
            dec = decode(Path(root) / rel, min_size=size, name=rel, units=True)
        except DecodeError as e:
            unreadable.append(str(e))
            continue
        if dec.window_units is not None:
            windows.append(tuple(round(float(v), 6) if not isinstance(v, str) else v for v in dec.window_units))
    if rel_paths and len(unreadable) == len(rel_paths):
        raise RawUnreadable(f"window prior: none of {len(rel_paths)} training images under {root} could be read (first: {unreadable[0]})")
    return _prior(windows)


def training_sample(manifest: pl.DataFrame, n: int = SAMPLE, seed: int = SEED) -> list[str]:
    """The relative paths of ``n`` frontal training-split images of ``manifest`` (all of them when fewer), drawn
    with ``seed``, in manifest order."""
    train = manifest.filter(pl.col("split") == "train")
    if "view_position" in manifest.columns:
        train = train.filter(pl.col("view_position").is_in(list(FRONTAL)))
    if train.height <= n:
        return train["path"].to_list()
    idx = np.sort(np.random.default_rng(seed).choice(train.height, size=n, replace=False))
    return train["path"].gather(idx).to_list()


class RawUnreadable(ValueError):
    """No training image of the sample could be read: the raw root is wrong or absent here."""


def _prior(windows) -> WindowPrior | None:
    """The usable windows of a fit or a kept file (finite, width above 0, a function the reader knows: a width that
    rounds to 0 is dropped, never stored where a checkpoint would refuse it), or None."""
    usable = tuple(w for w in (tuple(x) for x in windows) if usable_window(w))
    return WindowPrior(usable) if usable else None


def _kept_file(paths, size: int) -> Path:
    return paths.assets / "window_prior" / f"s{size}.json"


def _read_kept(paths, size: int) -> dict | None:
    """The prior file at ``size`` of this ``VERSION``, or None when absent, unreadable or of another version (a
    damaged file is a miss, fitted again)."""
    try:
        kept = json.loads(_kept_file(paths, size).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(kept, dict) and isinstance(kept.get("windows"), list) and kept.get("version") == VERSION
    return kept if ok else None


def kept_window_prior(paths, size: int) -> WindowPrior | None:
    """The prior last fitted at ``size`` (``training_window_prior``'s file), read without the raw files or a fit:
    for a caller that must not wait for a fit or need the raw root (the PACS intake, a step whose node has no raw
    root); None when none was fitted at this size (and version) or the file cannot be read."""
    kept = _read_kept(paths, size)
    return _prior(kept["windows"]) if kept else None


def training_window_prior(paths, size: int) -> WindowPrior | None:
    """The prior of ``paths``' manifest at ``size`` (None without a manifest or a windowed training image), fitted
    when its sample's files changed since the last fit (path, size, modification time) and kept in
    ``assets/window_prior/s<size>.json``."""
    if not paths.manifest.exists():
        return None
    manifest = pl.read_parquet(paths.manifest)
    rels = training_sample(manifest.select([c for c in ("path", "split", "view_position") if c in manifest.columns]))
    key = []
    for rel in rels:
        try:
            st = os.stat(paths.raw / rel)
            key.append([rel, st.st_size, st.st_mtime_ns])
        except OSError:
            key.append([rel, None, None])
    kept = _read_kept(paths, size)
    if kept and kept.get("sample") == key:
        return _prior(kept["windows"])
    prior = fit_window_prior(paths.raw, rels, size)
    record = {"version": VERSION, "size": size, "sample": key, "windows": [list(w) for w in prior.windows] if prior else []}
    try:
        with atomic_path(_kept_file(paths, size)) as tmp:
            tmp.write_text(json.dumps(record))
    except OSError:  # not kept (a full disk, a read-only assets folder): the fit still stands, fitted again next time
        pass
    return prior
