"""Why the report model computes in float32 on a CPU (``reports.vlm.compute_dtype``): one QLoRA step of the
Llama-3.2-11B-Vision-shaped base at reduced depth (``reports/llama_shape.py``, one local and one global vision
layer, 4 tiles of 560 px), trained by the product's ``vlm.train_adapter``, in float32 (the project's choice on a
CPU) and in bf16 (its choice on a GPU, and what it did on a CPU before), with the same base, example and seed.

    python benchmarks/bench_cpu_dtype.py [--steps 1]

Last line: ``cpu dtype: float32 <s> s/step, bf16 <s> s/step, bf16/float32 <ratio>x; cpu: <name>``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

TEXTS = [
    "The heart is enlarged. Small left pleural effusion.",
    "No acute cardiopulmonary process.",
    "Endotracheal tube terminates 4 cm above the carina. No pneumothorax.",
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def step_seconds(base: Path, dtype, steps: int, out: Path) -> float:
    import torch

    from cxr_pipeline.reports import prompts, vlm

    real = vlm.compute_dtype
    vlm.compute_dtype = lambda device=None: dtype  # the arm's arithmetic; everything else as the product runs it
    try:
        rng = np.random.default_rng(0)
        ex = [{"image": (rng.random((96, 96)) * 255).astype(np.uint8), "prompt": prompts.user_prompt(), "report": TEXTS[0]}]
        cfg = vlm.AdapterConfig(max_steps=steps, batch_size=1, accumulation=1, lr=1e-3, warmup_steps=0)
        t0 = time.perf_counter()
        vlm.train_adapter(base, ex, cfg, out, device=torch.device("cpu"), card={"size": 96})
        return (time.perf_counter() - t0) / steps
    finally:
        vlm.compute_dtype = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    import torch

    from cxr_pipeline.reports.llama_shape import build_real_shape_base

    with tempfile.TemporaryDirectory() as d:
        base = build_real_shape_base(Path(d) / "base", TEXTS * 20, vision_layers=1)
        fp32 = step_seconds(base, torch.float32, args.steps, Path(d) / "fp32")
        print(f"float32: {fp32:.1f} s/step (model load and adapter save included)", flush=True)
        bf16 = step_seconds(base, torch.bfloat16, args.steps, Path(d) / "bf16")
        print(f"bf16: {bf16:.1f} s/step", flush=True)
    print(f"cpu dtype: float32 {fp32:.1f} s/step, bf16 {bf16:.1f} s/step, bf16/float32 {bf16 / fp32:.1f}x; cpu: {cpu_name()}")


if __name__ == "__main__":
    main()
