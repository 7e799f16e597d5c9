"""Reading the image shards (``data.shards`` builds them): the on-disk format, the handle readers take, the
index, images gathered in one array or streamed batch by batch from memory-mapped shard files, and contact
sheets to look at.

The format, one folder per partition: ``shard-NNNNN.u8`` (raw uint8 arrays (n, size, size), C order, that
``numpy.memmap`` maps without a parser or pickle), ``index.parquet`` (one row per image: ``dicom_id, path,
shard, offset`` and the source file's ``file_size, mtime_ns, content_hash, rows, cols``) and ``spec.json``
(the size its shards were built at).

Every reader takes a :class:`Shards` handle (the root, its size and its partitions), opened with
:meth:`Shards.open`, which checks each built partition's ``spec.json``: the size travels with the root
instead of beside it, and a size that was never built is an error, not an empty index.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
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
SPEC = "spec.json"


class ShardsNotBuilt(FileNotFoundError):
    """No partition of a shard root was built at the size asked for (what ``Shards.open`` raises)."""


def spec_size(folder: Path) -> int | None:
    """The size a partition folder's shards were built at (its ``spec.json``); None where it has none."""
    f = Path(folder) / SPEC
    return json.loads(f.read_text()).get("size") if f.exists() else None


@dataclass(frozen=True)
class Shards:
    """A shard root with the size its images were built at and the partitions a reader looks in: what every
    reader takes, so the size is never passed beside the root (and never disagrees with it).

    Open it with :meth:`open` (which checks ``spec.json``); the constructor checks nothing (for a caller that
    has just written the files itself). Picklable: a loader worker receives it with its ``StreamedImages``.
    """

    root: Path
    size: int
    partitions: tuple[str, ...] = PARTITIONS

    @classmethod
    def open(cls, root: Path, size: int, partitions: Iterable[str] = PARTITIONS) -> Shards:
        """The shards under ``root`` at ``size``, checked: at least one of ``partitions`` was built (has a
        ``spec.json``), and every built one at ``size``. A size never built raises ``ShardsNotBuilt`` naming the
        size and how to build it (an empty index would read as "no images" and train on nothing); a folder
        built at another size raises ``ValueError``. A partition not built yet is left out, as ``read_index``
        leaves it out."""
        root, partitions = Path(root), tuple(partitions)
        built = {p: spec_size(root / p) for p in partitions if (root / p / SPEC).exists()}
        if not built:
            raise ShardsNotBuilt(
                f"no image shards at {size} px under {root} (none of {', '.join(partitions)} was built at that size): "
                f"materialize image_shards with {size} among its sizes (image_shards.sizes in pipeline.yaml or its run "
                "config; null builds every size the consumers' pipeline.yaml sections read, not a size set only in "
                "one run's config)"
            )
        wrong = {p: s for p, s in built.items() if s != size}
        if wrong:
            found = ", ".join(f"{root / p} at {s} px" for p, s in wrong.items())
            raise ValueError(f"shards opened at {size} px, but their spec.json says otherwise: {found}")
        return cls(root, size, partitions)

    def folder(self, partition: str) -> Path:
        return self.root / partition


def read_index(shards: Shards, partitions: Iterable[str] | None = None) -> pl.DataFrame:
    """The index of every built partition of ``shards`` (its own partitions, or ``partitions``), with a
    ``partition`` column."""
    frames = []
    for p in shards.partitions if partitions is None else partitions:
        f = shards.folder(p) / INDEX
        if f.exists():
            frames.append(pl.read_parquet(f).with_columns(pl.lit(p).alias("partition")))
    return pl.concat(frames) if frames else pl.DataFrame(schema={**INDEX_SCHEMA, "partition": pl.String})


def gather(shards: Shards, index_rows: pl.DataFrame) -> np.ndarray:
    """The images of ``index_rows`` (in that order) as one (n, size, size) uint8 array.

    Each shard is memory-mapped and read in offset order, so the page cache
    serves sequential runs; no pickle, no per-image files.
    """
    n, size = index_rows.height, shards.size
    out = np.empty((n, size, size), dtype=np.uint8)
    if n == 0:
        return out
    rows = index_rows.select("partition", "shard", "offset").with_row_index("_pos")
    for (part, shard), grp in rows.group_by(["partition", "shard"], maintain_order=True):
        path = shards.folder(part) / shard
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
    """``arr`` as a PNG, written atomically (a contact sheet a reader may be showing is never torn)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def load_images(shards: Shards, manifest: pl.DataFrame):
    """A split's images as one uint8 tensor (n, size, size), rows aligned with the returned frame.

    ``manifest`` is any selection of manifest rows (a split, a label subset);
    rows whose image is not in the shards (rejected, or a partition not built)
    are left out and counted in the frame's absence (``vision.images.make_resident``
    places images on a device). The frame carries each image's source ``content_hash`` (what a digest of the
    data a model saw is made from).
    """
    import torch

    lazy, rows = open_images(shards, manifest)
    return torch.from_numpy(lazy.take(np.arange(len(lazy)))), rows


class StreamedImages:
    """Images named by (shard file, offset), read on demand from the memory-mapped shards.

    What ``load_images`` returns in one array, for consumers that must not hold the images: the
    report adapter's training pairs (one image at a time, ``images[i]``) and a classifier too large
    for memory (a batch at a time, ``take``; ``vision.images``). Memory stays one map per shard
    file. Picklable without its maps (each loader worker opens its own).
    """

    def __init__(self, shards: Shards, files: np.ndarray, offsets: np.ndarray):
        self.shards, self.files, self.offsets = shards, files, offsets
        self._maps: dict[str, np.memmap] = {}

    @property
    def root(self) -> Path:
        return self.shards.root

    @property
    def size(self) -> int:
        return self.shards.size

    @classmethod
    def of_rows(cls, shards: Shards, rows: pl.DataFrame) -> StreamedImages:
        """The images of index rows (columns ``partition, shard, offset``), in row order."""
        files = np.array([f"{p}/{s}" for p, s in rows.select("partition", "shard").iter_rows()], dtype=object)
        return cls(shards, files, rows["offset"].to_numpy().astype(np.int64))

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
        return StreamedImages(self.shards, self.files[idx], self.offsets[idx])

    @property
    def nbytes(self) -> int:
        return len(self) * self.size * self.size


def open_images(shards: Shards, manifest: pl.DataFrame) -> tuple[StreamedImages, pl.DataFrame]:
    """``load_images`` without loading: ``StreamedImages`` aligned with the returned rows (with ``content_hash``),
    from the handle's partitions (MIMIC's pNN folders, or an external set's one, ``all``)."""
    idx = read_index(shards).select("dicom_id", "partition", "shard", "offset", "content_hash")
    rows = manifest.drop("content_hash", strict=False).join(idx, on="dicom_id", how="inner", maintain_order="left")
    return StreamedImages.of_rows(shards, rows), rows.drop("partition", "shard", "offset")
