"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it over ``path`` on success. The temporary name is this
    writer's alone (its pid and a random part): processes on two hosts sharing a volume (Kubernetes pods, Ray
    nodes) can have the same pid, and two writers of one file must not share a temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def png_figure(path: Path, *subplots_args, dpi: int = 80, **subplots_kw) -> Iterator:
    """``(fig, axes)`` from ``plt.subplots``; when the block ends without error the figure is laid out and written
    atomically as PNG at ``path``, and it is closed either way (pyplot keeps every open figure alive, so a
    long-lived process drawing charts would grow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*subplots_args, **subplots_kw)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression="zstd", statistics=True)
    return path


def file_digest(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[: 2 * n]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A CSV written atomically, gzipped when ``path`` ends in ``.gz`` with a fixed timestamp (same rows, same bytes)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(data)
        else:
            f.write(data)
