"""The per-image work of the shard builder, in a module light enough for spawned workers.

Spawned processes import only this, ``dicom.py`` and numpy/pydicom/Pillow
(not polars or Dagster), so a pool of decoders starts in a fraction of a second.
"""

from __future__ import annotations

import os

import xxhash

from cxr_pipeline.data.dicom import DecodeError, decode, letterbox


def content_hash(data: bytes) -> str:
    """128-bit xxHash3 of the file: change detection, not security (70x faster than blake2b)."""
    return xxhash.xxh3_128_hexdigest(data)


def work(root: str, size: int, tasks: list[tuple[int, str, str | None]]) -> list[tuple]:
    """Read, hash and (unless the hash is already known) decode + letterbox.

    Returns per task (i, hash, pixels bytes | None, rows, cols, reason | None);
    pixels None with reason None means "unchanged content".
    """
    out = []
    for i, rel, known in tasks:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            out.append((i, None, None, 0, 0, "file missing"))
            continue
        except OSError as e:
            out.append((i, None, None, 0, 0, f"unreadable file ({type(e).__name__})"))
            continue
        h = content_hash(data)
        if known is not None and h == known:
            out.append((i, h, None, 0, 0, None))
            continue
        try:
            dec = decode(data, min_size=size, name=rel)
            px = letterbox(dec.image, size)
            out.append((i, h, px.tobytes(), dec.rows, dec.cols, None))
        except DecodeError as e:
            out.append((i, h, None, 0, 0, str(e).removeprefix(f"{rel}: ")))
        except Exception as e:  # never fail the partition for one image
            out.append((i, h, None, 0, 0, f"decode failed ({type(e).__name__})"))
    return out


def init_worker() -> None:
    import logging
    import warnings

    # one thread per process: the processes are the parallelism
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
