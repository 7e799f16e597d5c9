"""Reading the image shards (``data.shards`` builds them): the on-disk format, the index, images gathered in
one array or streamed batch by batch from memory-mapped shard files, and contact sheets to look at.

The format, one folder per partition: ``shard-NNNNN.u8`` (raw uint8 arrays (n, size, size), C order, that
``numpy.memmap`` maps without a parser or pickle) and ``index.parquet`` (one row per image: ``dicom_id, path,
shard, offset`` and the source file's ``file_size, mtime_ns, content_hash, rows, cols``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.files import atomic_path

INDEX = "index.parquet"
INDEX_SCHEMA = {
    "dicom_id": pl.String,
    "path": pl.String,
    "shard": pl.String,
    "offset": pl.Int64,
    "file_size": pl.Int64,
    "mtime_ns": pl.Int64,
    "content_hash": pl.String,
    "rows": pl.Int32,
    "cols": pl.Int32,
}
PARTITIONS = tuple(f"p{n}" for n in range(10, 20))


def read_index(shard_root: Path, partitions: Iterable[str] = PARTITIONS) -> pl.DataFrame:
    """The index of every built partition under ``shard_root`` (with a ``partition`` column)."""
    frames = []
    for p in partitions:
        f = Path(shard_root) / p / INDEX
        if f.exists():
            frames.append(pl.read_parquet(f).with_columns(pl.lit(p).alias("partition")))
    return pl.concat(frames) if frames else pl.DataFrame(schema={**INDEX_SCHEMA, "partition": pl.String})


def gather(shard_root: Path, index_rows: pl.DataFrame, size: int) -> np.ndarray:
    """The images of ``index_rows`` (in that order) as one (n, size, size) uint8 array.

    Each shard is memory-mapped and read in offset order, so the page cache
    serves sequential runs; no pickle, no per-image files.
    """
    n = index_rows.height
    out = np.empty((n, size, size), dtype=np.uint8)
    if n == 0:
        return out
    rows = index_rows.select("partition", "shard", "offset").with_row_index("_pos")
    for (part, shard), grp in rows.group_by(["partition", "shard"], maintain_order=True):
        path = Path(shard_root) / part / shard
        mm = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, size, size)
        g = grp.sort("offset")
        out[g["_pos"].to_numpy()] = mm[g["offset"].to_numpy()]
        del mm
    return out


def contact_sheet(images: np.ndarray, ncols: int = 8) -> np.ndarray:
    """A grid of uint8 images (n, s, s) with 2-pixel grey gutters."""
    n, s = images.shape[0], images.shape[1]
    if n == 0:
        return np.zeros((s, s), dtype=np.uint8)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    sheet = np.full((nrows * (s + 2) - 2, ncols * (s + 2) - 2), 96, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncols)
        sheet[r * (s + 2) : r * (s + 2) + s, c * (s + 2) : c * (s + 2) + s] = images[k]
    return sheet


def write_png(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def load_images(shard_root: Path, manifest: pl.DataFrame, size: int):
    """A split's images as one uint8 tensor (n, size, size), rows aligned with the returned frame.

    ``manifest`` is any selection of manifest rows (a split, a label subset);
    rows whose image is not in the shards (rejected, or a partition not built)
    are left out and counted in the frame's absence (``vision.images.make_resident``
    places images on a device). The frame carries each image's source ``content_hash`` (what a digest of the
    data a model saw is made from).
    """
    import torch

    lazy, rows = open_images(shard_root, manifest, size)
    return torch.from_numpy(lazy.take(np.arange(len(lazy)))), rows


class StreamedImages:
    """Images named by (shard file, offset), read on demand from the memory-mapped shards.

    What ``load_images`` returns in one array, for consumers that must not hold the images: the
    report adapter's training pairs (one image at a time, ``images[i]``) and a classifier too large
    for memory (a batch at a time, ``take``; ``vision.images``). Memory stays one map per shard
    file. Picklable without its maps (each loader worker opens its own).
    """

    def __init__(self, root: Path, files: np.ndarray, offsets: np.ndarray, size: int):
        self.root, self.files, self.offsets, self.size = Path(root), files, offsets, size
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def of_rows(cls, root: Path, rows: pl.DataFrame, size: int) -> StreamedImages:
        """The images of index rows (columns ``partition, shard, offset``), in row order."""
        files = np.array([f"{p}/{s}" for p, s in rows.select("partition", "shard").iter_rows()], dtype=object)
        return cls(root, files, rows["offset"].to_numpy().astype(np.int64), size)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def _map(self, f: str) -> np.memmap:
        mm = self._maps.get(f)
        if mm is None:
            mm = self._maps[f] = np.memmap(self.root / f, dtype=np.uint8, mode="r").reshape(-1, self.size, self.size)
        return mm

    def __getitem__(self, i) -> np.ndarray:
        """One image (an int) or several (a list or array of positions), as numpy."""
        if np.ndim(i):
            return self.take(np.asarray(i))
        return np.array(self._map(self.files[i])[self.offsets[i]])

    def take(self, idx: np.ndarray) -> np.ndarray:
        """The images at positions ``idx`` (in that order) as one (b, size, size) uint8 array, each file read in offset order."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.size, self.size), dtype=np.uint8)
        files = self.files[idx]
        for f in dict.fromkeys(files.tolist()):
            at = np.flatnonzero(files == f)
            at = at[np.argsort(self.offsets[idx[at]], kind="stable")]
            out[at] = self._map(f)[self.offsets[idx[at]]]
        return out

    def subset(self, idx: np.ndarray) -> StreamedImages:
        return StreamedImages(self.root, self.files[idx], self.offsets[idx], self.size)

    @property
    def nbytes(self) -> int:
        return len(self) * self.size * self.size


def open_images(
    shard_root: Path, manifest: pl.DataFrame, size: int, partitions: Iterable[str] = PARTITIONS
) -> tuple[StreamedImages, pl.DataFrame]:
    """``load_images`` without loading: ``StreamedImages`` aligned with the returned rows (with ``content_hash``).
    ``partitions``: MIMIC's pNN folders, or an external set's one (``all``)."""
    idx = read_index(shard_root, partitions).select("dicom_id", "partition", "shard", "offset", "content_hash")
    rows = manifest.drop("content_hash", strict=False).join(idx, on="dicom_id", how="inner", maintain_order="left")
    return StreamedImages.of_rows(shard_root, rows, size), rows.drop("partition", "shard", "offset")
