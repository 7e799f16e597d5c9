"""The per-image work of the shard builder, in a module light enough for spawned workers.

Spawned processes import only this, ``dicom.py`` and numpy/pydicom/Pillow
(not polars or Dagster), so a pool of decoders starts in a fraction of a second.
"""

from __future__ import annotations

import mmap
import os

import xxhash

from cxr_pipeline.data.dicom import Decoded, DecodeError, decode, decode_native_reduced, letterbox
from cxr_pipeline.data.voi import WindowPrior

# a private read-only map, pages faulted in up front (one pass, no per-page faults later)
_MAP_FLAGS = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)


def content_hash(data: bytes) -> str:
    """128-bit xxHash3 of the file: change detection, not security (70x faster than blake2b)."""
    return xxhash.xxh3_128_hexdigest(data)


def decode_letterboxed(rel: str, data, sizes: list[int], prior: WindowPrior | None = None, decode_at: int = 0) -> tuple[dict, Decoded]:
    """(pixels per size, the decode) for one file's bytes (or memory map): decoded once, at the resolution the
    largest size needs (or ``decode_at``, when larger: the level another set was read at), and letterboxed to each
    size from that one decode; a file that carries no window read through ``prior``'s (``data.dicom.WindowPrior``).
    The decode's ``window`` says how the file was read (its own window, the training windows, the percentile
    window). Raises ``DecodeError`` for a file that cannot be read."""
    top = max(*sizes, decode_at)
    dec = decode_native_reduced(data, top, rel, prior) if rel.lower().endswith(".dcm") else None
    if dec is None:
        dec = decode(bytes(data), min_size=top, name=rel, prior=prior)
    return {s: letterbox(dec.image, s).tobytes() for s in sizes}, dec


def decode_for_shards(rel: str, data, sizes: list[int], prior: WindowPrior | None = None, decode_at: int = 0) -> tuple:
    """(pixels per size, rows, cols, reason) for one file (``decode_letterboxed``); a file that cannot be read gives
    None and the reason, never an exception: one image never fails the partition."""
    try:
        pixels, dec = decode_letterboxed(rel, data, sizes, prior, decode_at)
        return pixels, dec.rows, dec.cols, None
    except DecodeError as e:
        return None, 0, 0, str(e).removeprefix(f"{rel}: ")
    except Exception as e:  # never fail the partition for one image
        return None, 0, 0, f"decode failed ({type(e).__name__})"


def work(
    root: str, tasks: list[tuple[int, str, dict[int, str | None]]], prior: WindowPrior | None = None, decode_at: int = 0
) -> list[tuple]:
    """Read, hash and decode + letterbox at the sizes whose indexed hash differs.

    A task is (i, relative path, {size: that size's indexed content hash, or None}). Returns per task
    (i, hash, {size: pixel bytes} | None, rows, cols, reason | None); a size left out of the pixels
    (or pixels None with reason None) means "unchanged content" at that size. Files are memory-mapped:
    hashing and the uncompressed fast path read the page cache in place, no copy.
    """
    out = []
    for i, rel, known in tasks:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    out.append((i, content_hash(b""), None, 0, 0, "empty file"))
                    continue
                with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ, flags=_MAP_FLAGS) as mm:
                    h = content_hash(mm)
                    need = sorted(s for s, k in known.items() if k != h)
                    if not need:
                        out.append((i, h, None, 0, 0, None))
                        continue
                    px, rows, cols, reason = decode_for_shards(rel, mm, need, prior, decode_at)
        except FileNotFoundError:
            out.append((i, None, None, 0, 0, "file missing"))
            continue
        except (OSError, ValueError) as e:
            out.append((i, None, None, 0, 0, f"unreadable file ({type(e).__name__})"))
            continue
        out.append((i, h, px, rows, cols, reason))
    return out


def init_worker() -> None:
    import logging
    import warnings

    # one thread per process: the processes are the parallelism
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
