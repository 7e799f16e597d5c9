"""Shard builder vs the course project's naive loop vs bare decoding, on the same files.

Makes (once, cached) N synthetic chest DICOMs the size of MIMIC-CXR's (3056 x 2544,
12 to 16 bits stored): half uncompressed, as the MIMIC-CXR DICOM release ships them
(half of those with a VOI window in the header, half without, so the robust
percentile window runs), half JPEG 2000 (lossless); then measures in one run:

(a) decode-bound: ``pydicom.dcmread(f).pixel_array`` and nothing else, over
    the same number of worker processes as (c);
(b) naive: what the 2024 project did: one process, pydicom -> min-max ->
    PIL resize to 224 -> one PNG per image;
(c) the shard builder (``build_partition``): decode (JPEG 2000 at a reduced
    resolution level), modality/VOI window, anti-aliased letterbox, shard
    files + index, with ``--workers`` processes.

(d) two sizes (the classifiers' 224 px and the report model's 560 px tile): ``build_sizes`` decoding each
    file once for both against ``build_partition`` once per size (two decodes), on the uncompressed
    files and on the mixed set separately (JPEG 2000's reduced-resolution decode makes a small size
    cheap on its own, so the saving there is smaller).

(a) and (c) are timed in the steady state: their worker pools are started and
warmed first (start-up is printed on its own line). The last line:
``shards: X img/s; naive: Y img/s; decode-bound: Z img/s; speedup vs naive: A; fraction of decode bound: B;
uncompressed: U img/s, V vs naive, W of decode bound`` (the uncompressed files alone: what MIMIC-CXR is),
then ``two sizes: <img/s>, <x> vs one decode per size`` for the uncompressed files and the mixed set.

    python benchmarks/bench_shards.py [--n 48] [--workers 2] [--data DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.settings import paths

ROWS, COLS = 3056, 2544  # MIMIC-CXR's most common DICOM size


def make_files(root: Path, n: int) -> list[Path]:
    from cxr_pipeline.data.dicom_writer import write_plain_dicom
    from cxr_pipeline.data.phantom import Anatomy, render

    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        kind = "j2k" if i % 2 else "unc"
        f = root / f"files/p10/p100000{i:02d}/s5000000{i % 10}/{kind}-{i:03d}.dcm"
        files.append(f)
        if f.exists():
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        findings = {"Cardiomegaly": 1.0} if i % 3 == 0 else {"Pleural Effusion": 1.0} if i % 3 == 1 else {}
        bits = (12, 14, 16)[(i // 2) % 3]
        img = render(rng, ROWS, COLS, "PA", findings, Anatomy.draw(rng))
        arr = np.round(img * (2**bits - 1)).astype(np.uint16)
        voi = {"WindowCenter": 2 ** (bits - 1), "WindowWidth": 2**bits} if (i // 2) % 2 == 0 else {}
        write_plain_dicom(f, arr, bits=bits, jpeg2000=kind == "j2k", **voi)
        print(f"  made {f.name} ({bits} bits{', VOI window' if voi else ''})", file=sys.stderr)
    return files


def _bare(path: str) -> int:
    import pydicom

    return int(pydicom.dcmread(path).pixel_array.shape[0])


def _limit_threads() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def decode_bound(files: list[Path], pool: ProcessPoolExecutor) -> float:
    t0 = time.perf_counter()
    list(pool.map(_bare, [str(f) for f in files]))
    return len(files) / (time.perf_counter() - t0)


def warm(pool: ProcessPoolExecutor, workers: int) -> float:
    """Start every worker and import what it needs; returns the seconds it took."""
    from cxr_pipeline.data.decode_worker import work

    t0 = time.perf_counter()
    list(pool.map(work, ["."] * workers * 2, [[]] * workers * 2))
    return time.perf_counter() - t0


def _noop(_x: int) -> int:
    import pydicom  # noqa: F401

    return 0


def warm_bare(pool: ProcessPoolExecutor, workers: int) -> float:
    t0 = time.perf_counter()
    list(pool.map(_noop, range(workers * 2)))
    return time.perf_counter() - t0


def naive(files: list[Path], out: Path) -> float:
    """The 2024 notebooks' way: one process, full decode, min-max, PIL resize, a PNG per image."""
    import pydicom
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in files:
        arr = pydicom.dcmread(f).pixel_array.astype(np.float32)
        arr = (arr - arr.min()) / max(1.0, float(arr.max() - arr.min())) * 255
        Image.fromarray(arr.astype(np.uint8)).resize((224, 224), Image.BILINEAR).save(out / (f.stem + ".png"))
    return len(files) / (time.perf_counter() - t0)


def shard_builder(root: Path, files: list[Path], out: Path, workers: int, pool: ProcessPoolExecutor) -> float:
    from cxr_pipeline.data.shards import ShardSpec, build_partition

    items = pl.DataFrame({"dicom_id": [f.stem for f in files], "path": [str(f.relative_to(root)) for f in files]})
    t0 = time.perf_counter()
    res = build_partition(root, out, items, ShardSpec(size=224, workers=workers, chunk=2), pool=pool)
    rate = len(files) / (time.perf_counter() - t0)
    assert res.stats["decoded"] == len(files) and res.rejects.height == 0, res.rejects
    return rate


TWO_SIZES = (224, 560)


def two_sizes(root: Path, files: list[Path], out: Path, workers: int, pool: ProcessPoolExecutor) -> tuple[float, float]:
    """Images/s building both sizes in one decode pass, and building them one size after the other."""
    from cxr_pipeline.data.shards import ShardSpec, build_partition, build_sizes

    items = pl.DataFrame({"dicom_id": [f.stem for f in files], "path": [str(f.relative_to(root)) for f in files]})
    spec = ShardSpec(workers=workers, chunk=2)
    t0 = time.perf_counter()
    res = build_sizes(root, {s: out / "once" / f"s{s}" for s in TWO_SIZES}, items, spec, pool=pool)
    once = len(files) / (time.perf_counter() - t0)
    assert all(r.stats["decoded"] == len(files) for r in res.values()) and res[TWO_SIZES[0]].stats["files_decoded"] == len(files)
    t0 = time.perf_counter()
    for s in TWO_SIZES:
        build_partition(root, out / "each" / f"s{s}", items, ShardSpec(s, spec.images_per_shard, workers, 2), pool=pool)
    each = len(files) / (time.perf_counter() - t0)
    return once, each


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--unc-copies", type=int, default=4)
    ap.add_argument("--data", default=str(paths().bench("dicom-mimic-size")))
    args = ap.parse_args()
    root = Path(args.data)
    files = make_files(root, args.n)
    unc = [f for f in files if f.name.startswith("unc")]
    j2k = [f for f in files if f.name.startswith("j2k")]
    # Uncompressed decoding is a copy: per image it costs milliseconds, so with a few
    # dozen files process start-up would dominate. Each uncompressed file is linked
    # under --unc-copies names (same bytes, same work) to measure the steady state.
    linked = []
    for f in unc:
        for k in range(1, args.unc_copies):
            g = f.with_name(f"{f.stem}-copy{k}.dcm")
            if not g.exists():
                os.link(f, g)
            linked.append(g)
    unc = unc + linked
    files = unc + j2k
    print(
        f"files: {len(unc)} uncompressed ({len(unc) // args.unc_copies} distinct) + {len(j2k)} JPEG 2000, {ROWS}x{COLS}, 12-16 bits; workers {args.workers}"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    from cxr_pipeline.data.shards import decoder_pool

    # Steady state: both pools are started and warmed before timing (a partition
    # of MIMIC holds ~37k images, so start-up is noise there); start-up is printed.
    bare = ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_limit_threads)
    with decoder_pool(args.workers) as shard_pool, bare as bare_pool:
        print(
            f"pool start-up: {warm(shard_pool, args.workers):.2f} s (shard workers), {warm_bare(bare_pool, args.workers):.2f} s (bare decode)"
        )
        try:
            per_kind = {}
            for label, subset in (("uncompressed", unc), ("jpeg2000", j2k)):
                a = decode_bound(subset, bare_pool)
                b = naive(subset, work / f"naive-{label}")
                c = shard_builder(root, subset, work / f"shards-{label}", args.workers, shard_pool)
                per_kind[label] = (a, b, c)
                print(
                    f"  {label:12s}: shards {c:6.1f} img/s; naive {b:6.1f} img/s; decode-bound {a:6.1f} img/s; speedup {c / b:.2f}; fraction {c / a:.2f}"
                )
            a = decode_bound(files, bare_pool)
            b = naive(files, work / "naive")
            c = shard_builder(root, files, work / "shards", args.workers, shard_pool)
            both = {
                label: two_sizes(root, subset, work / f"two-{label}", args.workers, shard_pool)
                for label, subset in (("uncompressed", unc), ("mixed", files))
            }
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ua, ub, uc = per_kind["uncompressed"]
    print(
        f"shards: {c:.1f} img/s; naive: {b:.1f} img/s; decode-bound: {a:.1f} img/s; speedup vs naive: {c / b:.2f}; fraction of decode bound: {c / a:.2f}; "
        f"uncompressed: {uc:.1f} img/s, {uc / ub:.2f} vs naive, {uc / ua:.2f} of decode bound"
    )
    for label, (once, each) in both.items():
        print(f"two sizes ({label}, {TWO_SIZES[0]} + {TWO_SIZES[1]} px): {once:.1f} img/s, {once / each:.2f} vs one decode per size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
