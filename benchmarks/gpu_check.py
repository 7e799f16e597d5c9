"""Every GPU code path once, with its figure: the command to run the day a GPU machine is at hand.

    python benchmarks/gpu_check.py                       # on a CUDA machine: 224 px, the real-shape Llama base
    python benchmarks/gpu_check.py --device cpu --small  # 32 px, the tiny base: the test suite runs this (< 1 min)

One line per path:

- ``train <arch> <resident|streamed>``: ``vision.train.train`` (the product's loop: bf16 autocast,
  channels_last, on-device augmentation) for a fixed number of steps at batch ``--batch``, images
  resident on the device or streamed from a memory-mapped shard file by the loader (pinned memory,
  non-blocking copies); images/s. ResNet-18 and DenseNet-121. Goal on one H100/H200: ResNet-18 at
  224 px, batch 256, >= 8,000 img/s resident and >= 0.9 of that streamed. ``torch.compile`` is not
  used by the product; the line says so.
- ``qlora step``: the report base loaded in 4-bit NF4 (bitsandbytes), LoRA on the language model's
  attention, one optimizer step on a batch of image + prompt + report; seconds and peak memory.
- ``generate``: batched greedy generation on that model; new tokens/s.
- ``pyfunc predict``: a classifier saved as the registered MLflow model (``vision.serving.save_pyfunc``),
  loaded with ``mlflow.pyfunc.load_model`` and asked to predict on the device (``params={"device": ...}``).
- ``peak memory``: the most GPU memory the run held (CPU: the process's peak RSS), beside the README's
  estimate for the 11B base in 4-bit (about 8 GB of weights).

Exit status 0 when every path ran. The figures are printed, not asserted: a CPU run proves the code
paths run, a GPU run gives the figures.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def measured(what: str, value: float) -> float:
    """``value`` when it is a finite positive measurement; else the check fails, naming it. A step that trained
    no images or timed nothing gives NaN or 0 img/s, which must not pass as a figure."""
    if not (math.isfinite(value) and value > 0):
        raise SystemExit(f"gpu_check: {what} measured {value!r}: not a rate or a loss (did the step run?)")
    return value


def training(device, size: int, batch: int, steps: int, work: Path) -> None:
    import torch

    from cxr_pipeline.data.shard_reader import Shards, StreamedImages
    from cxr_pipeline.vision.images import make_resident
    from cxr_pipeline.vision.train import TrainConfig, train

    n = batch * steps + batch
    rng = np.random.default_rng(0)
    (work / "p10").mkdir(parents=True, exist_ok=True)
    rng.integers(0, 256, (n, size, size), dtype=np.uint8).tofile(work / "p10" / "shard-00000.u8")
    streamed = StreamedImages(Shards(work, size), np.array(["p10/shard-00000.u8"] * n, dtype=object), np.arange(n))
    y = torch.from_numpy((rng.uniform(size=n) < 0.3).astype(np.float32))
    for arch in ("resnet18", "densenet121"):
        cfg = TrainConfig(arch=arch, batch_size=batch, accumulation=1, epochs=1, steps_per_epoch=steps, precision="auto")
        for mode in ("resident", "streamed"):
            images = make_resident(streamed, device) if mode == "resident" else streamed
            train(images.subset(np.arange(batch)), y[:batch], images.subset(np.arange(2)), y[:2], cfg, device)  # warm-up
            _sync(device)
            res = train(images, y, images.subset(np.arange(batch)), y[:batch], cfg, device)
            print(
                f"train {arch} {mode}: {measured(f'train {arch} {mode}', res.images_per_second):,.0f} img/s at {size} px, batch {batch}, {steps} steps (torch.compile: not used)"
            )
            del images


def report_model(device, small: bool, work: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor

    from cxr_pipeline.reports.prompts import messages, to_rgb, user_prompt
    from cxr_pipeline.reports.tiny_base import build_tiny_base
    from cxr_pipeline.reports.vlm import load_base

    texts = ["FINDINGS: The lungs are clear. IMPRESSION: No acute cardiopulmonary process."] * 8
    if small:
        base = build_tiny_base(work / "base", texts)
    else:
        from cxr_pipeline.reports.llama_shape import build_real_shape_base

        base = build_real_shape_base(work / "base", texts)
    processor = AutoProcessor.from_pretrained(str(base))
    model = load_base(base, quantize=True, device=device)
    if device.type != "cuda":
        model = model.to(device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    image = to_rgb(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    prompt = processor.apply_chat_template(messages(user_prompt()), add_generation_prompt=True)
    full = processor.apply_chat_template(messages(user_prompt(), texts[0]))
    batch = processor(images=[[image]] * 4, text=[full] * 4, return_tensors="pt", padding=True).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    _sync(device)
    t0 = time.perf_counter()
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    opt.step()
    _sync(device)
    step_s, loss = time.perf_counter() - t0, measured("qlora loss", float(out.loss))
    print(f"qlora step: {measured('qlora step', step_s):.2f} s for 4 pairs, loss {loss:.3f}, 4-bit NF4 on {device}")
    model.eval()
    gen_in = processor(images=[[image]] * 4, text=[prompt] * 4, return_tensors="pt", padding=True).to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(**gen_in, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    _sync(device)
    new = (gen.shape[1] - gen_in["input_ids"].shape[1]) * gen.shape[0]
    print(f"generate: {measured('generate', new / (time.perf_counter() - t0)):,.1f} new tokens/s (batch 4, 32 tokens each)")


def pyfunc(device, size: int, work: Path) -> None:
    import mlflow.pyfunc
    import torch

    from cxr_pipeline.vision.checkpoint import CheckpointConfig, ClassifierFiles, write_checkpoint
    from cxr_pipeline.vision.models import build_model
    from cxr_pipeline.vision.serving import save_pyfunc

    files = ClassifierFiles(work / "cardiomegaly")
    config = CheckpointConfig("resnet18", size, ("Cardiomegaly",), {"cardiomegaly": 0.5}, {"cardiomegaly": None}, 0.2)
    write_checkpoint(build_model("resnet18"), files, config)
    model = mlflow.pyfunc.load_model(str(save_pyfunc(files.checkpoint, work / "pyfunc")))
    images = np.random.default_rng(0).integers(0, 256, (64, size, size), dtype=np.uint8)
    t0 = time.perf_counter()
    out = model.predict(images, params={"device": str(device)})
    _sync(device)
    assert len(out) == 64 and torch.isfinite(torch.tensor(out["cardiomegaly"].to_numpy())).all()
    print(
        f"pyfunc predict: {measured('pyfunc predict', 64 / (time.perf_counter() - t0)):,.0f} img/s on {device} through mlflow.pyfunc.load_model"
    )


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="32-px images, the tiny report base (what the test suite runs)")
    ap.add_argument("--batch", type=int, help="training batch (default 256; --small: 16)")
    ap.add_argument("--steps", type=int, help="timed training steps (default 50; --small: 2)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = 32 if args.small else 224
    batch, steps = args.batch or (16 if args.small else 256), args.steps or (2 if args.small else 50)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    print(f"device: {name}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        training(device, size, batch, steps, work / "train")
        report_model(device, args.small, work / "report")
        pyfunc(device, size, work / "serve")
    print(
        f"peak memory: {_peak_gb(device):.2f} GB ({'GPU' if device.type == 'cuda' else 'host RSS'}); README estimate for the 11B base in 4-bit: ~8 GB of weights"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
