"""Training throughput with the real shard reader vs the same step fed from memory.

Builds (once, cached) shards of N synthetic radiographs at ``--size`` with the
project's shard builder, then times, in one run and on the same device:

- train: what ``vision.train.train`` does per micro-batch: index the uint8
  images that ``load_images`` returned from the memory-mapped shards, move them
  to the device, normalise, augment (rotation + flip), forward, backward,
  optimizer step, in the project's precision (bf16 autocast);
- in-memory: the same step (augmentation, forward, backward, optimizer) on one
  batch that is already a normalised float tensor on the device (no feeding).

The feeding overhead is 1 - train/in-memory. The last line:
``train: X img/s; in-memory: Y img/s; feeding overhead: Z%; device: NAME``

    python benchmarks/bench_training.py [--size 224] [--n 512] [--steps 12] [--arch resnet18]
    python benchmarks/bench_training.py --multilabel [--size 64] [--n 256] [--epochs 1]

``--multilabel``: the cost of the 14 per-pathology models against the one multi-label
model, each trained by ``vision.train.train`` exactly as the assets do (same recipe,
same images, ``--epochs``; labels drawn at random, a fraction ``--unusable`` of them
unusable under the policy, which a per-pathology model leaves out and the multi-label
loss masks) after a warm-up training, timed end to end (training and validation passes), in one
run. Last line: ``multilabel: X s; 14 per-pathology: Y s; ratio Y/X; device: NAME``.

``--streaming``: the classifiers' two data modes (``vision.images``) at two dataset sizes
(``--sizes 5000,40000`` images at ``--size``), each run in its own process so its peak memory is its
own: ``vision.train.train`` for ``--steps`` optimizer steps (batch ``--batch``) on the images placed
``resident`` (one tensor) or ``streamed`` (read per batch from the memory-mapped shards by the loader).
It prints the peak anonymous memory (``Pss_Anon`` of the process and its loader workers, sampled every
20 ms: RssAnon with the pages a forked worker shares with its parent counted once; shard pages are
file-backed page cache and do not count) and the training images/s. The larger
sets repeat the ``--n`` rendered images in new shard files (what is in a pixel does not change memory
or speed). Last line: ``streaming: peak <GB> GB at <n> images vs <GB> GB at <m>; <f> of resident speed``.

``--precision``: the same training steps (forward, backward, AdamW; ``--arch`` at ``--size``, batch ``--batch``,
``--steps`` after 2 warm-up steps, random images) in fp32 and under bf16 autocast, in one run, and the precision
``auto`` resolves to on this device (``vision.train.resolve_precision``). Last line:
``precision: fp32 X img/s, bf16 Y img/s, bf16/fp32 R; auto: P; device: NAME``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.settings import Paths, paths


def ensure_shards(layout, n: int, size: int) -> pl.DataFrame:
    """n phantom radiographs written as PNGs (cheap to decode) and sharded by the builder, in the pipeline's layout."""
    from PIL import Image

    from cxr_pipeline.data.phantom import Anatomy, render
    from cxr_pipeline.data.shards import ShardSpec, build_partition

    src = layout.raw
    src.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"files/p10/p100{i:05d}/s50000000/img{i:05d}.png"
        f = src / rel
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(i)
            img = render(rng, size, size, "PA", {"Pleural Effusion": 1.0} if i % 2 else {}, Anatomy.draw(rng))
            Image.fromarray(np.round(img * 255).astype(np.uint8)).save(f)
        rows.append({"dicom_id": f"img{i:05d}", "path": rel, "split": "train", "target": i % 2})
    items = pl.DataFrame(rows)
    build_partition(src, layout.shard_partition(size, "p10"), items, ShardSpec(size=size, workers=os.cpu_count() or 1))
    return items


def multilabel(args) -> int:
    import torch

    from cxr_pipeline.data.shard_reader import Shards, load_images
    from cxr_pipeline.labels import SLUGS
    from cxr_pipeline.vision.train import TrainConfig, train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    layout = Paths(home=Path(args.data), raw=Path(args.data) / "src")
    items = ensure_shards(layout, args.n, args.size)
    images, _rows = load_images(Shards.open(layout.shard_root(args.size), args.size), items)
    n_val = max(16, args.n // 8)
    xtr, xva = images[n_val:], images[:n_val]
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=(args.n, len(SLUGS))) < 0.3).astype(np.float32)
    y[rng.uniform(size=y.shape) < args.unusable] = np.nan  # unusable under the policy
    y = torch.from_numpy(y)
    ytr, yva = y[n_val:], y[:n_val]
    cfg = TrainConfig(arch=args.arch, batch_size=args.batch, accumulation=1, epochs=args.epochs, patience=args.epochs + 1)
    train(xtr[: 2 * args.batch], ytr[: 2 * args.batch], xva, yva, cfg, device)  # warm-up: thread pools, allocator, kernels
    t0 = time.perf_counter()
    train(xtr, ytr, xva, yva, cfg, device)
    multi = time.perf_counter() - t0
    t0 = time.perf_counter()
    for j in range(len(SLUGS)):  # each per-pathology model sees the images its label is usable on
        k_tr, k_va = ~torch.isnan(ytr[:, j]), ~torch.isnan(yva[:, j])
        train(xtr[k_tr], ytr[k_tr, j], xva[k_va], yva[k_va, j], cfg, device)
    per = time.perf_counter() - t0
    print(
        f"{args.arch} at {args.size}px, {args.n} images ({n_val} validation), batch {args.batch}, {args.epochs} epoch(s) each, "
        f"{args.unusable:.0%} of labels unusable"
    )
    print(f"multilabel: {multi:.1f} s; 14 per-pathology: {per:.1f} s; ratio {per / multi:.1f}; device: {name}")
    return 0


def ensure_repeated_shards(layout, base: pl.DataFrame, size: int, n: int) -> Path:
    """A shard folder of ``n`` images repeating the rendered ones (1024 per file, as the builder writes)."""
    from cxr_pipeline.data.shard_reader import INDEX, Shards, gather, read_index

    out = layout.home / f"repeated-{n}" / f"s{size}"
    if (out / "p10" / INDEX).exists():
        return out
    built = Shards.open(layout.shard_root(size), size)
    src = gather(built, read_index(built).join(base.select("dicom_id"), on="dicom_id"))
    (out / "p10").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, start in enumerate(range(0, n, 1024)):
        pick = np.arange(start, min(start + 1024, n)) % len(src)
        src[pick].tofile(out / "p10" / f"shard-{k:05d}.u8")
        rows += [
            {"dicom_id": f"r{i:06d}", "path": "", "shard": f"shard-{k:05d}.u8", "offset": j}
            for j, i in enumerate(range(start, start + len(pick)))
        ]
    pl.DataFrame(rows).with_columns(pl.lit("h").alias("content_hash")).write_parquet(out / "p10" / INDEX)
    return out


def _anon(pid: int) -> int:
    """Anonymous memory (bytes) of a process: its share (``Pss_Anon``), so the pages a forked loader worker
    still shares with its parent count once, not twice as summed ``RssAnon`` would; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def streaming_child(args) -> int:
    """One (mode, n) arm in this process: place the images, train --steps steps, print a JSON line."""
    import json
    import threading

    import psutil
    import torch

    from cxr_pipeline.data.shard_reader import Shards, open_images
    from cxr_pipeline.vision.images import place
    from cxr_pipeline.vision.train import TrainConfig, train

    root = Path(args.child_root)
    me, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = _anon(me.pid) + sum(_anon(c.pid) for c in me.children(recursive=True))
            peak[0] = max(peak[0], total)
            stop.wait(0.02)

    threading.Thread(target=sample, daemon=True).start()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = pl.read_parquet(root / "p10" / "index.parquet").select("dicom_id")
    repeated = Shards(root, args.size)  # written by ensure_repeated_shards, without a spec.json: not opened
    lazy_tr, _ = open_images(repeated, ids.slice(256))
    lazy_va, _ = open_images(repeated, ids.head(256))
    cfg = TrainConfig(arch=args.arch, batch_size=args.batch, accumulation=1, epochs=1, steps_per_epoch=args.steps, data=args.child_mode)
    (xtr, xva), mode = place([lazy_tr, lazy_va], cfg.data, device, cfg.memory_budget)
    y = torch.from_numpy((np.arange(len(lazy_tr)) % 2).astype(np.float32))
    yva = torch.from_numpy((np.arange(len(lazy_va)) % 2).astype(np.float32))
    res = train(xtr, y, xva, yva, cfg, device)
    stop.set()
    print(json.dumps({"mode": mode, "n": len(lazy_tr) + len(lazy_va), "peak": peak[0], "ips": res.images_per_second}))
    return 0


def streaming(args) -> int:
    import json
    import subprocess

    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    layout = Paths(home=Path(args.data), raw=Path(args.data) / "src")
    base = ensure_shards(layout, args.n, args.size)
    counts = [int(c) for c in args.sizes.split(",")]
    out: dict[tuple[str, int], dict] = {}
    for n in counts:
        root = ensure_repeated_shards(layout, base, args.size, n)
        for mode in ("resident", "streamed"):
            cmd = [sys.executable, __file__, "--child-root", str(root), "--child-mode", mode, "--size", str(args.size)]
            cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--arch", args.arch]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = out[(mode, n)] = json.loads(line)
            print(f"{mode:>8} {n:>7} images: peak anonymous {r['peak'] / 1e9:.2f} GB, {r['ips']:.1f} img/s")
    small, large = counts[0], counts[-1]
    speed = np.mean([out[("streamed", n)]["ips"] / out[("resident", n)]["ips"] for n in counts])
    print(f"{args.arch} at {args.size}px, batch {args.batch}, {args.steps} steps per arm; device: {device}")
    print(
        f"streaming: peak {out[('streamed', small)]['peak'] / 1e9:.2f} GB at {small} images vs "
        f"{out[('streamed', large)]['peak'] / 1e9:.2f} GB at {large}; {speed:.2f} of resident speed"
    )
    return 0


def precision_arms(args) -> int:
    """fp32 against bf16 autocast on the same steps: on a CPU without native bf16 the emulation is far slower."""
    import torch
    import torch.nn.functional as F

    from cxr_pipeline.vision.models import build_model
    from cxr_pipeline.vision.train import autocast, resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch, 1), generator=gen).float().to(device)
    speed = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build_model(args.arch).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for i in range(2 + args.steps):
            if i == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with autocast(device, precision):
                loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        speed[precision] = args.steps * args.batch / (time.perf_counter() - t0)
    print(f"{args.arch} at {args.size}px, batch {args.batch}, {args.steps} steps per arm after 2 warm-up steps")
    print(
        f"precision: fp32 {speed['fp32']:.1f} img/s, bf16 {speed['bf16']:.1f} img/s, bf16/fp32 {speed['bf16'] / speed['fp32']:.2f};"
        f" auto: {resolve_precision('auto', device)}; device: {name}"
    )
    return 0


def main() -> int:
    import torch

    from cxr_pipeline.data.shard_reader import Shards, load_images
    from cxr_pipeline.vision.models import build_model
    from cxr_pipeline.vision.train import TrainConfig, augment, autocast, masked_bce, resolve_precision, to_input

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12, help="timed micro-batches per side (after 2 warm-up steps)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--data", default=str(paths().bench("training")))
    ap.add_argument("--multilabel", action="store_true", help="14 per-pathology trainings against one multi-label training")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per training (--multilabel)")
    ap.add_argument(
        "--unusable",
        type=float,
        default=0.05,
        help="fraction of labels unusable under the policy (--multilabel; 0.05: uncertain left out, blank = 0)",
    )
    ap.add_argument("--streaming", action="store_true", help="resident vs streamed images: peak memory and speed at two sizes")
    ap.add_argument("--sizes", default="5000,40000", help="dataset sizes (images) for --streaming")
    ap.add_argument("--precision", action="store_true", help="fp32 against bf16 autocast on the same steps, and what auto picks")
    ap.add_argument("--child-root", help=argparse.SUPPRESS)
    ap.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_root:
        return streaming_child(args)
    if args.streaming:
        return streaming(args)
    if args.precision:
        return precision_arms(args)
    if args.multilabel:
        return multilabel(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    cfg = TrainConfig(arch=args.arch, batch_size=args.batch)
    precision = resolve_precision(cfg.precision, device)
    layout = Paths(home=Path(args.data), raw=Path(args.data) / "src")
    items = ensure_shards(layout, args.n, args.size)
    images, rows = load_images(Shards.open(layout.shard_root(args.size), args.size), items)
    y_all = torch.tensor(rows["target"].to_numpy(), dtype=torch.float32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model = build_model(args.arch).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)

    def step(x, y):
        with autocast(device, precision):
            logits = model(x).squeeze(1)
        loss = masked_bce(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fed(_step: int):
        idx = torch.randint(0, images.shape[0], (args.batch,), generator=gen)
        x = augment(to_input(images[idx], device, True), cfg.rotation, cfg.hflip, gen)
        step(x, y_all[idx].to(device, non_blocking=True))

    fixed_x = to_input(images[: args.batch], device, True)
    fixed_y = y_all[: args.batch].to(device)

    def in_memory(_step: int):
        step(augment(fixed_x, cfg.rotation, cfg.hflip, gen), fixed_y)

    rates = {}
    for label, fn in (("in-memory", in_memory), ("train", fed), ("in-memory", in_memory), ("train", fed)):
        for k in range(2):
            fn(k)
        sync()
        t0 = time.perf_counter()
        for k in range(args.steps):
            fn(k)
        sync()
        rates.setdefault(label, []).append(args.steps * args.batch / (time.perf_counter() - t0))
    train_rate = max(rates["train"])
    mem_rate = max(rates["in-memory"])
    print(f"{args.arch} at {args.size}px, batch {args.batch}, {precision}, {args.steps} timed steps x 2 rounds each (best round)")
    print(
        f"train: {train_rate:.1f} img/s; in-memory: {mem_rate:.1f} img/s; feeding overhead: {100 * (1 - train_rate / mem_rate):.1f}%; device: {name}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
