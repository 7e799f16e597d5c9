"""QLoRA step throughput / peak memory and batched generation for the report model.

Builds the tiny offline Mllama (the embedded default) and measures, on the
machine's device: tokens/s of QLoRA training steps (4-bit NF4 base, LoRA r=20,
gradient checkpointing, bf16, batch ``--batch``) with peak memory, and reports/s
of batched greedy generation. The baseline printed beside the QLoRA figure is
the same step without quantisation (bf16 base + LoRA), so the ratio shows what
4-bit costs in speed on this device.

The real Llama-3.2-11B-Vision shape (random weights from its published config)
needs a GPU and is not implemented yet.

    python benchmarks/bench_vlm.py [--steps 10] [--batch 4] [--gen 32]

Last line: ``qlora: X tokens/s, peak Y GB; generate: Z reports/s; device: NAME``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

TEXTS = [
    "The heart is enlarged. Small left pleural effusion with a meniscus.",
    "No acute cardiopulmonary process. The lungs are clear.",
    "No pneumothorax. Endotracheal tube terminates 4 cm above the carina.",
    "Moderate interstitial pulmonary edema with perihilar haziness.",
]


def peak_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def step_rate(base: Path, quantize: bool, batch: int, steps: int, device) -> float:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import MllamaProcessor

    from cxr_pipeline.reports.vlm import MllamaCollator, load_base, lora_target, user_prompt

    proc = MllamaProcessor.from_pretrained(str(base))
    model = load_base(base, quantize, device)
    if quantize:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=20, lora_alpha=20, lora_dropout=0.0, target_modules=lora_target("language"), task_type="CAUSAL_LM")
    ).to(device)
    rng = np.random.default_rng(0)
    ex = [
        {"image": (rng.random((64, 64)) * 255).astype(np.uint8), "prompt": user_prompt(), "report": TEXTS[i % len(TEXTS)]}
        for i in range(batch)
    ]
    b = {k: v.to(device) for k, v in MllamaCollator(proc)(ex).items()}
    n_tokens = int(b["attention_mask"].sum())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * n_tokens / (time.perf_counter() - t0)


def main() -> int:
    import torch

    from cxr_pipeline.reports.vlm import build_tiny_base, generate_reports, user_prompt

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gen", type=int, default=32, help="reports to generate")
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as d:
        base = build_tiny_base(Path(d) / "base", TEXTS * 50)
        bf16 = step_rate(base, False, args.batch, args.steps, device)
        qlora = step_rate(base, True, args.batch, args.steps, device)
        peak = peak_gb(device)
        rng = np.random.default_rng(1)
        ims = [(rng.random((64, 64)) * 255).astype(np.uint8) for _ in range(args.gen)]
        t0 = time.perf_counter()
        generate_reports(base, None, ims, [user_prompt()] * args.gen, max_new_tokens=args.new_tokens, batch_size=8)
        gen_rate = args.gen / (time.perf_counter() - t0)
    print(
        f"tiny Mllama, batch {args.batch}, {args.steps} steps; bf16 LoRA (no quantisation): {bf16:.0f} tokens/s; QLoRA/bf16 ratio {qlora / bf16:.2f}"
    )
    print(f"qlora: {qlora:.0f} tokens/s, peak {peak:.2f} GB; generate: {gen_rate:.2f} reports/s; device: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
