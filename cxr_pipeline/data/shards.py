"""Resized uint8 image shards: build incrementally, read at full speed.

One folder per partition (MIMIC's own ``pNN`` groups) holds

- ``shard-NNNNN.u8``: raw ``uint8`` arrays of shape (n, size, size), C order,
  that ``numpy.memmap`` maps without a parser or pickle;
- ``index.parquet``: one row per image: ``dicom_id, path, shard, offset``
  (row within the shard), the source file's ``file_size, mtime_ns,
  content_hash`` and its full-resolution ``rows, cols``;
- ``rejects.parquet``: ``dicom_id, path, reason`` (+ the file's size / mtime,
  so an unchanged bad file is not decoded again).

Incremental and idempotent: a file whose (size, mtime) are unchanged is not
read; one whose bytes hash to the indexed content hash is not decoded; only
new or changed images are decoded, into new shard files (shards are
immutable, append-only). Every shard is written to a temporary name and
renamed, then the index is rewritten the same way, so a killed build leaves
no torn file and the next build resumes where it stopped (orphaned shards
from a kill between the two renames are deleted).

Decoding runs in ``workers`` processes (spawned, so no forked thread pools).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl

from cxr_pipeline.data.decode_worker import init_worker, work
from cxr_pipeline.data.shard_reader import INDEX, INDEX_SCHEMA, PARTITIONS, SPEC, Shards, contact_sheet, gather, write_png
from cxr_pipeline.data.voi import WindowPrior
from cxr_pipeline.fields import at_least_one, setting
from cxr_pipeline.files import atomic_path, write_parquet

REJECTS = "rejects.parquet"
SHARD_GLOB = "shard-*.u8"
REJECT_SCHEMA = {"dicom_id": pl.String, "path": pl.String, "reason": pl.String, "file_size": pl.Int64, "mtime_ns": pl.Int64}


def partition_of(path: str) -> str:
    """``files/p10/p10000032/...`` -> ``p10``."""
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "files" else "p??"


def partition_column(col: str = "path") -> pl.Expr:
    """``partition_of`` as a polars expression (vectorised; no Python call per row)."""
    parts = pl.col(col).str.split("/")
    return pl.when((parts.list.len() > 2) & (parts.list.first() == "files")).then(parts.list.get(1)).otherwise(pl.lit("p??"))


def slice_fingerprint(items: pl.DataFrame) -> str:
    """Digest of the ``(dicom_id, path)`` rows a shard partition is built from, order-free.

    The manifest records it for every partition and each shard partition records
    the one it was built from, so automation re-builds only the partitions whose
    rows changed (the manifest as a whole changes with any new patient).
    """
    h = hashlib.sha256()
    for did, rel in items.select("dicom_id", "path").unique().sort("dicom_id", "path").iter_rows():
        h.update(f"{did}\t{rel}\n".encode())
    return h.hexdigest()[:24]


def partition_fingerprints(manifest: pl.DataFrame) -> dict[str, str]:
    """``slice_fingerprint`` of every partition in ``PARTITIONS`` (empty ones included)."""
    part = manifest.select("dicom_id", "path").with_columns(partition_column().alias("_p"))
    return {p: slice_fingerprint(part.filter(pl.col("_p") == p)) for p in PARTITIONS}


@dataclass(frozen=True)
class ShardSettings:
    """How the shards are built (``pipeline.yaml``'s ``image_shards`` section)."""

    sizes: list[int] | None = setting(
        None,
        "square sizes (px) built, letterboxed; a size already built is only updated",
        auto="every size a consumer reads: the per-pathology and multi-label classifiers' sizes and the report model's (its base's tile)",
    )
    images_per_shard: int = setting(1024, "images per shard file")
    workers: int | None = setting(None, "decode processes", auto="one per CPU core this process may use (its affinity)")

    def __post_init__(self) -> None:
        at_least_one(self, "workers", "images_per_shard")
        if self.sizes is not None and (not self.sizes or min(self.sizes) < 8):
            raise ValueError(f"sizes must be a list of sizes of at least 8 px, or null (every size a consumer reads), not {self.sizes}")

    def spec(self, size: int) -> ShardSpec:
        """The build of one size."""
        return ShardSpec(size, self.images_per_shard, self.workers or 1)


@dataclass(frozen=True)
class ShardSpec:
    size: int = 224
    images_per_shard: int = 1024
    workers: int = 1
    chunk: int = 8  # images per task sent to a worker
    prior: WindowPrior | None = None  # the windows a file without one is read through (external sets: data.window_prior)
    decode_at: int = 0  # decode at least at this size's level (external sets: the level MIMIC's shards are read at)


@dataclass
class BuildResult:
    index: pl.DataFrame
    rejects: pl.DataFrame
    stats: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ workers


def decoder_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of decode processes (spawned: no forked thread pools), one thread each."""
    import multiprocessing as mp

    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_worker)


def _run_tasks(
    root: Path,
    tasks: list[tuple[int, str, dict]],
    workers: int,
    chunk: int,
    pool: ProcessPoolExecutor | None = None,
    prior: WindowPrior | None = None,
    decode_at: int = 0,
) -> Iterable[tuple]:
    """Yield worker results in task order, keeping a bounded number of chunks in flight."""
    chunks = [tasks[i : i + chunk] for i in range(0, len(tasks), chunk)]
    if pool is None and (workers <= 1 or len(tasks) <= chunk):
        init_worker()
        for c in chunks:
            yield from work(str(root), c, prior, decode_at)
        return
    with contextlib.nullcontext(pool) if pool is not None else decoder_pool(workers) as ex:
        pending: deque[Future] = deque()
        it = iter(chunks)
        for c in it:
            pending.append(ex.submit(work, str(root), c, prior, decode_at))
            if len(pending) >= 4 * workers:
                break
        while pending:
            yield from pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(work, str(root), nxt, prior, decode_at))


# ------------------------------------------------------------------ builder


def _read_or_empty(path: Path, schema: dict) -> pl.DataFrame:
    return pl.read_parquet(path) if path.exists() else pl.DataFrame(schema=schema)


def _clean(out: Path, index: pl.DataFrame) -> int:
    """Remove temp files and shards the index does not reference (a kill between renames)."""
    removed = 0
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    live = set(index["shard"].unique().to_list())
    for p in out.glob(SHARD_GLOB):
        if p.name not in live:
            p.unlink()
            removed += 1
    return removed


def _next_shard_number(index: pl.DataFrame) -> int:
    names = index["shard"].unique().to_list()
    nums = [int(n[6:11]) for n in names if n.startswith("shard-")]
    return max(nums, default=-1) + 1


@dataclass
class Plan:
    """What a build must do: rows kept as they are, known rejects, and the files to read."""

    keep_rows: list[dict]
    reject_rows: list[dict]
    tasks: list[tuple[int, str, str | None]]  # (task number, relative path, indexed content hash or None)
    task_meta: list[tuple[str, str, int, int]]  # (dicom_id, path, file size, mtime_ns)
    previous: dict[str, dict]  # the index rows before this build, by dicom_id


def plan_partition(
    root: Path, items: pl.DataFrame, index: pl.DataFrame, old_rejects: pl.DataFrame, stat: Callable[[Path], os.stat_result] = os.stat
) -> Plan:
    """Compare the wanted ``(dicom_id, path)`` rows with the index: only new or changed files are read.

    Reads nothing but ``stat``: a file with the indexed (size, mtime) keeps its row, a
    known-bad file with the same (size, mtime) keeps its reject, anything else is a task.
    (``stat``: shared by the plans of several sizes, so each file is stat'ed once.)
    """
    wanted = items.select("dicom_id", "path").unique("dicom_id", keep="first", maintain_order=True)
    by_id = {r["dicom_id"]: r for r in index.iter_rows(named=True)}
    rej_by_id = {r["dicom_id"]: r for r in old_rejects.iter_rows(named=True)}
    plan = Plan([], [], [], [], by_id)
    for did, rel in wanted.iter_rows():
        try:
            st = stat(root / rel)
        except FileNotFoundError:
            plan.reject_rows.append({"dicom_id": did, "path": rel, "reason": "file missing", "file_size": None, "mtime_ns": None})
            continue
        same = (rel, st.st_size, st.st_mtime_ns)
        prev = by_id.get(did)
        if prev and (prev["path"], prev["file_size"], prev["mtime_ns"]) == same:
            plan.keep_rows.append(prev)
            continue
        prev_rej = rej_by_id.get(did)
        if prev_rej and (prev_rej["path"], prev_rej["file_size"], prev_rej["mtime_ns"]) == same:
            plan.reject_rows.append(prev_rej)
            continue
        plan.tasks.append((len(plan.tasks), rel, prev["content_hash"] if prev and prev["path"] == rel else None))
        plan.task_meta.append((did, rel, st.st_size, st.st_mtime_ns))
    return plan


class _ShardWriter:
    """Appends decoded images to new shard files; rewrites the index after every shard.

    A kill at any point loses at most the shard being filled: every shard is renamed
    into place before the index that references it.
    """

    def __init__(self, out: Path, plan: Plan, first_shard: int, images_per_shard: int):
        self.out, self.plan, self.seq, self.per_shard = out, plan, first_shard, images_per_shard
        self.buf: list[bytes] = []
        self.buf_rows: list[dict] = []
        self.new_rows: list[dict] = []

    def add(self, row: dict, pixels: bytes) -> None:
        self.buf.append(pixels)
        self.buf_rows.append(row)
        if len(self.buf) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        name = f"shard-{self.seq:05d}.u8"
        with atomic_path(self.out / name) as tmp, open(tmp, "wb") as f:
            for b in self.buf:
                f.write(b)
        for off, r in enumerate(self.buf_rows):
            r["shard"], r["offset"] = name, off
        self.new_rows.extend(self.buf_rows)
        self.seq += 1
        self.buf, self.buf_rows = [], []
        self.write_index()

    def write_index(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        return _write_index(self.out, self.plan.keep_rows + self.new_rows, self.plan.reject_rows)


def _check_spec(out: Path, spec: ShardSpec) -> None:
    """Record the size a partition folder is built at (``spec.json``, what ``Shards.open`` checks) and how its files
    are read (the window prior a windowless file goes through, the level decoded at), or refuse a folder already
    built at another size. A folder read another way loses its index first (every image is read again; a kill
    after this resumes from none)."""
    spec_file = out / SPEC
    reading = {"window_prior": spec.prior.digest() if spec.prior is not None else None, "decoded_at": spec.decode_at or None}
    built = json.loads(spec_file.read_text()) if spec_file.exists() else None
    if built is not None and built.get("size") != spec.size:
        raise ValueError(f"{out}: shards were built at {built.get('size')} px, not {spec.size}; use a folder per size")
    if built is None or any(built.get(k) != v for k, v in reading.items()):
        (out / INDEX).unlink(missing_ok=True)
        record = {"size": spec.size, "dtype": "uint8", "layout": "n,size,size", **{k: v for k, v in reading.items() if v}}
        with atomic_path(spec_file) as tmp:
            tmp.write_text(json.dumps(record))


def build_partition(
    root: Path,
    out: Path,
    items: pl.DataFrame,
    spec: ShardSpec,
    progress: Callable[[int, int], None] | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> BuildResult:
    """Bring the shards in ``out`` up to date with ``items`` (columns ``dicom_id, path``): ``build_sizes`` at one size."""
    return build_sizes(root, {spec.size: Path(out)}, items, spec, progress, pool)[spec.size]


def build_sizes(
    root: Path,
    outs: dict[int, Path],
    items: pl.DataFrame,
    spec: ShardSpec,
    progress: Callable[[int, int], None] | None = None,
    pool: ProcessPoolExecutor | None = None,
) -> dict[int, BuildResult]:
    """Bring one partition's shards at every size in ``outs`` (size -> folder) up to date with ``items``.

    Each file that any size needs is read and decoded **once**, at the resolution the largest size
    needing it asks for, and letterboxed to each of those sizes from that decode: two sizes cost one
    decode, not two; a size added later decodes only its own missing images (the others' are
    unchanged). ``spec`` gives the shard length, workers and chunking (its ``size`` is ignored).
    ``pool``: an already started ``decoder_pool`` (a long-lived caller pays process start-up once).
    """
    import functools

    t0 = time.perf_counter()
    root = Path(root)
    plans, writers, stats = {}, {}, {}
    stat = functools.cache(os.stat)  # every size plans from the same files: stat each once (network file systems)
    for size, out in sorted(outs.items()):
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        _check_spec(out, replace(spec, size=size))
        index = _read_or_empty(out / INDEX, INDEX_SCHEMA)
        orphans = _clean(out, index)
        plan = plans[size] = plan_partition(root, items, index, _read_or_empty(out / REJECTS, REJECT_SCHEMA), stat)
        writers[size] = _ShardWriter(out, plan, _next_shard_number(index), spec.images_per_shard)
        stats[size] = {"images": len(plan.keep_rows) + len(plan.reject_rows) + len(plan.tasks), "unchanged": len(plan.keep_rows)}
        stats[size].update(to_read=len(plan.tasks), orphan_shards_removed=orphans, decoded=0, hash_unchanged=0)
    # one task per file that any size must read: {size: that size's indexed hash}
    wanted: dict[str, dict[int, tuple[int, str | None]]] = {}
    paths: dict[str, str] = {}
    for size, plan in plans.items():
        for (i, rel, known), (did, *_rest) in zip(plan.tasks, plan.task_meta, strict=True):
            wanted.setdefault(did, {})[size] = (i, known)
            paths[did] = rel
    order = list(wanted.values())
    tasks = [(j, paths[did], {s: k for s, (_, k) in by.items()}) for j, (did, by) in enumerate(wanted.items())]
    done = files_decoded = 0
    for j, h, px, rows, cols, reason in _run_tasks(root, tasks, spec.workers, spec.chunk, pool, spec.prior, spec.decode_at):
        files_decoded += px is not None
        for size, (i, _known) in order[j].items():
            _apply(plans[size], writers[size], stats[size], i, h, None if px is None else px.get(size), rows, cols, reason)
        done += 1
        if progress:
            progress(done, len(tasks))
    secs = time.perf_counter() - t0
    results = {}
    for size, writer in writers.items():
        writer.flush()
        idx, rej = writer.write_index()
        _clean(outs[size], idx)
        st = stats[size]
        st.update(rejected=rej.height, indexed=idx.height, shard_files=len(list(Path(outs[size]).glob(SHARD_GLOB))))
        st.update(shard_bytes=sum(p.stat().st_size for p in Path(outs[size]).glob(SHARD_GLOB)), seconds=round(secs, 3))
        st.update(files_decoded=files_decoded, decoded_per_second=round(files_decoded / secs, 2) if secs > 0 else 0.0)
        results[size] = BuildResult(index=idx, rejects=rej, stats=st)
    return results


def _apply(plan: Plan, writer: _ShardWriter, st: dict, i: int, h, px: bytes | None, rows: int, cols: int, reason: str | None) -> None:
    """One file's outcome at one size: a reject, an unchanged row refreshed, or new pixels appended."""
    did, rel, fsize, mtime = plan.task_meta[i]
    if reason is not None:
        plan.reject_rows.append({"dicom_id": did, "path": rel, "reason": reason, "file_size": fsize, "mtime_ns": mtime})
    elif px is None:  # same bytes as indexed at this size: refresh size/mtime only
        plan.keep_rows.append({**plan.previous[did], "file_size": fsize, "mtime_ns": mtime})
        st["hash_unchanged"] += 1
    else:
        row = {"dicom_id": did, "path": rel, "shard": "", "offset": 0, "file_size": fsize, "mtime_ns": mtime}
        writer.add({**row, "content_hash": h, "rows": rows, "cols": cols}, px)
        st["decoded"] += 1


def data_version(index: pl.DataFrame, size: int) -> str:
    """What is in a partition's shards (ids and source content hashes at this size), not when they were written."""
    digest = hashlib.sha256("".join(f"{d}:{h}\n" for d, h in index.select("dicom_id", "content_hash").iter_rows()).encode())
    return f"s{size}-{digest.hexdigest()[:24]}"


def write_contact_sheet(shards: Shards, index: pl.DataFrame, partition: str, n: int = 16) -> Path | None:
    """A grid of ``n`` sampled images of the partition (seeded), as ``contact_sheet.png`` in its folder."""
    if not index.height:
        return None
    sample = index.sample(min(n, index.height), seed=0).sort("dicom_id").with_columns(pl.lit(partition).alias("partition"))
    return write_png(contact_sheet(gather(shards, sample), ncols=8), shards.folder(partition) / "contact_sheet.png")


def _write_index(out: Path, rows: list[dict], reject_rows: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame]:
    idx = pl.DataFrame(rows, schema=INDEX_SCHEMA).sort("dicom_id") if rows else pl.DataFrame(schema=INDEX_SCHEMA)
    rej = pl.DataFrame(reject_rows, schema=REJECT_SCHEMA).sort("dicom_id") if reject_rows else pl.DataFrame(schema=REJECT_SCHEMA)
    write_parquet(idx, out / INDEX)
    write_parquet(rej, out / REJECTS)
    return idx, rej


@dataclass
class PartitionBuild:
    """One partition brought up to date at every size: each size's ``BuildResult`` and contact sheet."""

    partition: str
    folders: dict[int, Path]  # size -> the partition's folder at that size
    results: dict[int, BuildResult]
    sheets: dict[int, Path | None]
    fingerprint: str  # ``slice_fingerprint`` of the manifest rows it was built from

    @property
    def first(self) -> BuildResult:
        """The smallest size's result: its index and rejects, and the one decode pass every size shared."""
        return self.results[min(self.results)]

    @property
    def rejects(self) -> pl.DataFrame:
        """Files that could not be decoded or found (a file that cannot be decoded fails at every size)."""
        return self.first.rejects.select("dicom_id", "path", "reason")

    @property
    def sheet(self) -> Path | None:
        """The largest size's contact sheet."""
        return self.sheets[max(self.sheets)]

    def totals(self) -> dict[str, int]:
        """Images decoded, unchanged and rejected, shard files and bytes over every size; the shared decode pass."""
        stats = [r.stats for r in self.results.values()]
        total = {
            k: int(sum(float(st[k]) for st in stats)) for k in ("decoded", "unchanged", "hash_unchanged", "shard_files", "shard_bytes")
        }
        decode = self.first.stats  # one decode pass served every size: its files and seconds are shared
        return {
            "decoded": total["decoded"],
            "unchanged": total["unchanged"] + total["hash_unchanged"],
            "rejected": int(decode["rejected"]),
            "shard_files": total["shard_files"],
            "shard_bytes": total["shard_bytes"],
            "files_decoded": int(decode["files_decoded"]),
            "images_per_second": round(decode["files_decoded"] / max(decode["seconds"], 1e-9), 1),
        }

    @property
    def data_version(self) -> str:
        """What the partition's shards hold at every size (``data_version`` of each size, joined)."""
        return "+".join(data_version(r.index, size) for size, r in self.results.items())


def build_partition_sizes(
    paths, partition: str, items: pl.DataFrame, settings: ShardSettings, progress: Callable[[int, int], None] | None = None
) -> PartitionBuild:
    """One partition of the manifest (``items``: its rows) at every size ``settings`` resolved, in one decode pass
    (``build_sizes``), each size with its contact sheet; ``paths``: the layout (``settings.Paths``)."""
    folders = {size: paths.shard_partition(size, partition) for size in settings.sizes}
    results = build_sizes(paths.raw, folders, items, settings.spec(settings.sizes[0]), progress=progress)
    sheets = {}
    for size, r in results.items():
        shards = Shards.open(paths.shard_root(size), size, [partition])  # just built: its spec.json says ``size``
        sheets[size] = write_contact_sheet(shards, r.index, partition)
    return PartitionBuild(partition, folders, results, sheets, slice_fingerprint(items))
