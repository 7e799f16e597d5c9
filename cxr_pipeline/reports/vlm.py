"""LLaMA-3.2-Vision (Mllama) report generation: the QLoRA adapter's recipe, training and generation.

The real base is ``meta-llama/Llama-3.2-11B-Vision-Instruct`` from a local
directory (``CXR_VLM_BASE``); nothing downloads at run time. The embedded
default is a tiny, randomly initialised ``MllamaForConditionalGeneration``
built here from a small ``MllamaConfig``, with a byte-level BPE tokenizer
trained on the training reports (Llama-3 special tokens and ``<|image|>``), a
Llama-3-style chat template and an ``MllamaImageProcessor`` with small tiles,
so that the real code path (same classes, 4-bit quantisation where
bitsandbytes can, LoRA, TRL's SFTTrainer) runs on a CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_pipeline.data.shard_reader import Shards, open_images
from cxr_pipeline.fields import at_least_one, record, setting
from cxr_pipeline.files import atomic_path
from cxr_pipeline.reports.prompts import MllamaCollator, TrainingPairs, messages, prompts_for, to_rgb
from cxr_pipeline.reports.tiny_base import base_info, ensure_tiny_base

# Kept out of 4-bit quantisation, as full module prefixes (bitsandbytes matches them against module names).
UNQUANTISED_MODULES = ("model.vision_model", "model.multi_modal_projector", "lm_head")
# Saved beside the adapter: what generation must reproduce (base, quantisation, image size, prompt variant).
ADAPTER_CARD = "cxr_adapter.json"


# pipeline.yaml's lr_schedule -> transformers' scheduler (both warm up linearly for warmup_steps first)
LR_SCHEDULES = {"linear": "linear", "constant": "constant_with_warmup"}


@dataclass(frozen=True)
class AdapterConfig:
    """The report adapter's recipe (``pipeline.yaml``'s ``report_adapter`` section): its base, prompt and QLoRA
    training. Defaults are the seeds' QLoRA recipe (r = alpha = 20, dropout 0, lr 1e-4 linear, warm-up 5, 200 steps, 8 x 4)."""

    base: str | None = setting(
        None, "local directory of the base model (Llama-3.2-11B-Vision-Instruct)", auto="CXR_VLM_BASE, else the tiny offline Mllama"
    )
    tiny_width: int = setting(1, "the tiny base's width multiplier (used when no base is given)")
    tiny_pretrain_steps: int = setting(
        0,
        "optimizer steps of language pretraining of the tiny base on the training reports, images blank (a stand-in for a pretrained base)",
    )
    tiny_vision_pretrain_steps: int = setting(
        0,
        "optimizer steps of vision pretraining of the tiny base: its tower classifies the training images against the labeler's labels"
        " of their reports (a stand-in for a pretrained vision encoder)",
    )
    tiny_instruct_steps: int = setting(
        0,
        "optimizer steps teaching the tiny base to write a report from a findings list: each training report after its own"
        " labeler labels in the prompt's findings format (a stand-in for an instruction-tuned base, which writes about the"
        " findings it is told of)",
    )
    size: int | None = setting(
        None, "shard size (px) the images are read at", auto="the base's tile (560 for the 11B, 56 for the tiny base)"
    )
    use_classifier_findings: bool = setting(True, "add the classifiers' findings to the prompt (when their predictions exist)")
    max_train_pairs: int | None = setting(None, "training pairs sampled (seeded)", null="every training pair")
    r: int = setting(20, "LoRA rank")
    alpha: int = setting(20, "LoRA alpha")
    dropout: float = setting(0.0, "LoRA dropout")
    target: str = setting("language", "LoRA target modules: language, or language+vision")
    train_full: str = setting(
        "", "modules trained in full beside LoRA (peft modules_to_save), comma-separated, e.g. multi_modal_projector; empty: LoRA only"
    )
    lr: float = setting(1e-4, "peak learning rate (after the warm-up; see lr_schedule)")
    lr_schedule: str = setting(
        "linear", "learning-rate schedule after the warm-up: linear (decays to 0 at max_steps, the seeds' recipe) or constant"
    )
    warmup_steps: int = setting(5, "linear warm-up steps")
    max_steps: int = setting(200, "optimizer steps")
    batch_size: int = setting(8, "pairs per micro-batch")
    accumulation: int = setting(4, "micro-batches per optimizer step")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    max_length: int = setting(2048, "tokens per training sequence (longer ones are truncated)")
    quantize: bool = setting(True, "4-bit NF4 base with double quantisation (QLoRA); bf16 compute on a GPU, float32 on a CPU")
    seed: int = setting(0, "seed of LoRA initialisation, data order and pair sampling")

    def __post_init__(self) -> None:
        at_least_one(self, "size", "max_train_pairs", "max_steps")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {sorted(LR_SCHEDULES)}, not {self.lr_schedule!r}")


@dataclass(frozen=True)
class GenerateConfig:
    """How the test reports are written (``pipeline.yaml``'s ``generated_reports`` section). Decoding is deterministic."""

    max_new_tokens: int | None = setting(
        None, "generation budget in tokens", auto="the 99th percentile of the training reports' token counts under the base's tokenizer"
    )
    num_beams: int = setting(1, "1: greedy; more: beam search (never sampling)")
    batch_size: int = setting(8, "images per generation batch")
    max_test_pairs: int | None = setting(None, "test pairs written (the first by dicom_id)", null="every test pair")

    def __post_init__(self) -> None:
        at_least_one(self, "max_new_tokens", "max_test_pairs", "batch_size")


def ensure_base(cfg: AdapterConfig, tiny_dir: Path, texts: Sequence[str], digest: str, log=None, images: Sequence | None = None) -> Path:
    """The base a resolved ``cfg`` names: the tiny offline base (under ``tiny_dir``, one per training split: built
    from ``texts`` (and, for vision pretraining, their ``images``) with the config's width and pretraining when the
    split ``digest`` names has none, ``tiny_base.ensure_tiny_base``), or a local directory that must exist (nothing
    is downloaded)."""
    base = Path(str(cfg.base))
    if base == Path(tiny_dir):
        return ensure_tiny_base(
            base,
            texts,
            digest,
            cfg.tiny_width,
            cfg.tiny_pretrain_steps,
            log,
            vision_steps=cfg.tiny_vision_pretrain_steps,
            images=images,
            instruct_steps=cfg.tiny_instruct_steps,
        )
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: base model directory not found (nothing is downloaded; set CXR_VLM_BASE to a local copy)")
    return base


def adapter_training_set(pairs, shards: Shards, cfg: AdapterConfig, hints=None):
    """The training split's (image, prompt, report) examples under a resolved ``cfg``, the rows they come
    from and the prompt variant. ``max_train_pairs`` samples (seeded); images are read from ``shards`` (at
    ``cfg.size``) batch by batch; prompts carry the classifiers' findings when ``use_classifier_findings``
    and ``hints`` (probabilities per ``dicom_id``) are given."""
    import polars as pl

    train = pairs.filter(pl.col("split") == "train")
    if cfg.max_train_pairs is not None:
        train = train.sample(min(cfg.max_train_pairs, train.height), seed=cfg.seed)
    images, rows = open_images(shards, train)
    prompts, variant = prompts_for(rows, hints, cfg.use_classifier_findings)
    return TrainingPairs(images, prompts, rows["text"].to_list()), rows, variant


def lora_target(target: str) -> str:
    """Regex over module names: attention (self and cross) and MLP projections."""
    proj = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    if target == "language":
        return rf".*language_model.*\.{proj}"
    if target == "language+vision":
        return rf".*(language_model|vision_model).*\.({proj[1:-1]}|fc1|fc2)"
    raise ValueError(f"target must be 'language' or 'language+vision', not {target!r}")


def compute_dtype(device=None):
    """bf16 on a GPU; float32 on a CPU. Most CPUs have no bf16 arithmetic (no AMX or AVX512-BF16), so PyTorch
    emulates it in scalar loops: one QLoRA step of the Llama-3.2-11B-shaped base at reduced depth spends many
    minutes in bf16 attention backward on a 2-core CPU (``benchmarks/bench_cpu_dtype.py`` measures both). The
    4-bit weights are the same; only the arithmetic differs."""
    import torch

    return torch.bfloat16 if _on_gpu(device) else torch.float32


def _on_gpu(device) -> bool:
    return device is not None and getattr(device, "type", "cpu") == "cuda"


def load_base(base_dir: Path, quantize: bool, device=None):
    """The base model, 4-bit NF4 (vision tower, projector and lm_head kept unquantised) when asked, computing
    in ``compute_dtype(device)``."""
    from transformers import BitsAndBytesConfig, MllamaForConditionalGeneration

    dtype = compute_dtype(device)
    kwargs: dict = {"dtype": dtype}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=list(UNQUANTISED_MODULES),
        )
    if _on_gpu(device):
        kwargs["device_map"] = {"": device.index or 0}
    return MllamaForConditionalGeneration.from_pretrained(str(base_dir), **kwargs)


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_adapter_card(adapter_dir: Path, card: dict) -> None:

    with atomic_path(Path(adapter_dir) / ADAPTER_CARD) as tmp:
        tmp.write_text(json.dumps(card, indent=2))


def read_adapter_card(adapter_dir: Path) -> dict:
    f = Path(adapter_dir) / ADAPTER_CARD
    if not f.exists():
        raise FileNotFoundError(f"{f}: not found; is {adapter_dir} an adapter trained by cxr_pipeline?")
    return json.loads(f.read_text())


RESUME_STAMP = "cxr_resume_key.txt"


def resume_key(base_dir: Path, cfg: AdapterConfig, pairs: TrainingPairs) -> str:
    """What a checkpoint must have been written for to be resumed: the base's folder (the tiny base's is named by
    its training split's digest), the whole recipe, and every training pair's prompt and report in order (the
    images are read by the pairs' rows: a changed image under the same row and text is not seen here)."""
    h = hashlib.sha256(
        json.dumps({"base": str(Path(base_dir).resolve()), "config": dataclasses.asdict(cfg)}, sort_keys=True, default=str).encode()
    )
    for prompt, report in zip(pairs.prompts, pairs.reports, strict=True):
        h.update(json.dumps([prompt, report]).encode())
    return h.hexdigest()


def train_adapter(
    base_dir: Path,
    train_examples: Sequence[dict],
    cfg: AdapterConfig,
    adapter_dir: Path,
    checkpoint_dir: Path | None = None,
    *,
    device=None,
    card: dict | None = None,
    log=None,
    on_log=None,
    time_budget_s: float | None = None,
) -> dict:
    """QLoRA SFT with TRL's SFTTrainer; saves only the adapter (and its card) to ``adapter_dir``.

    Checkpoints every 50 steps in ``checkpoint_dir`` (default: ``<adapter_dir>_checkpoints``): a
    retried run resumes from the last one. The card records the base, ``quantize`` and whatever
    ``card`` adds (image size, prompt variant), so generation loads the base the same way.
    ``time_budget_s`` stops training after that many seconds (benchmarks compare runs at equal time).
    Returns the trainer's log history.
    """
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import MllamaProcessor, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    t_start = time.monotonic()  # the training's whole cost: model load, quantisation, the peft wrap, the steps
    adapter_dir = Path(adapter_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else adapter_dir.with_name(adapter_dir.name + "_checkpoints")
    device = torch.device(device) if device is not None else default_device()
    processor = MllamaProcessor.from_pretrained(str(base_dir))
    model = load_base(base_dir, cfg.quantize, device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)  # the LoRA weights are initialised here, before the trainer seeds anything
    model = get_peft_model(
        model,
        LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=lora_target(cfg.target),
            modules_to_save=[m.strip() for m in cfg.train_full.split(",") if m.strip()] or None,
            task_type="CAUSAL_LM",
        ),
    )
    # TRL wants a datasets.Dataset; it holds only the row number, prompt and report, and the collator
    # reads each batch's images (from the shards, for ``TrainingPairs`` built on ``StreamedImages``). Images
    # stored in the dataset as Python lists cost ~1.8 MB per 224-px image, ~85 GB at MIMIC's 47k pairs.
    pairs = train_examples if isinstance(train_examples, TrainingPairs) else TrainingPairs.from_examples(train_examples)
    ds = Dataset.from_dict({"idx": list(range(len(pairs))), "prompt": list(pairs.prompts), "report": list(pairs.reports)})
    collator = MllamaCollator(processor, cfg.max_length, images=pairs.images)

    started = time.monotonic()

    class Relay(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and on_log:
                on_log(state.global_step, logs)

        def on_step_end(self, args, state, control, **kw):
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                control.should_training_stop = True

    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.accumulation,
        learning_rate=cfg.lr,
        lr_scheduler_type=LR_SCHEDULES[cfg.lr_schedule],
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        optim="adamw_torch" if device.type == "cpu" else "adamw_bnb_8bit",
        bf16=compute_dtype(device) == torch.bfloat16,
        activation_checkpointing=False,  # already enabled (non-reentrant) by prepare_model_for_kbit_training
        logging_steps=1,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=1,
        report_to=[],
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        seed=cfg.seed,
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, data_collator=collator, processing_class=processor, callbacks=[Relay()])
    # with the progress bar off, transformers prints every step's log dict to stdout (PrinterCallback);
    # those numbers go to MLflow through ``on_log``, so the console (``make demo``) stays one line per stage
    trainer.remove_callback(PrinterCallback)
    if compute_dtype(device) != torch.bfloat16:
        # TRL casts a quantised model's trainable weights to bf16 (the QLoRA paper's advice) whatever the compute dtype.
        # On a CPU the model computes in float32 (compute_dtype): a module trained in full (train_full) would meet
        # float32 activations with bf16 weights, and LoRA would run in emulated bf16. The optimizer is built at
        # train(), so casting back here is what it sees.
        for param in model.parameters():
            if param.requires_grad and param.dtype == torch.bfloat16:
                param.data = param.data.to(compute_dtype(device))
    last = None
    key = resume_key(base_dir, cfg, pairs)
    stamp = ckpt_dir / RESUME_STAMP
    if ckpt_dir.exists() and (not stamp.exists() or stamp.read_text() != key):
        # checkpoints of another base, recipe or training set (a finished run's last one, or a killed run's before a
        # data change): resuming would hand the new run the old weights, and at max_steps train nothing
        shutil.rmtree(ckpt_dir)
        if log:
            log(f"checkpoints in {ckpt_dir} were written for another base, recipe or training set: not resumed")
    if ckpt_dir.exists():
        cks = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        last = str(cks[-1]) if cks else None
        if last and log:
            log(f"resuming from {last}")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)
    trainer.train(resume_from_checkpoint=last)
    model.save_pretrained(str(adapter_dir))
    processor.save_pretrained(str(adapter_dir))
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: the next materialization trains afresh

    config = record(cfg) if cfg.base is not None and cfg.size is not None else None  # a resolved config is recorded whole
    card = {"base": str(base_dir), "quantize": cfg.quantize, **base_info(base_dir), "config": config, **(card or {})}
    # this call's training time and the steps it ran (a resumed run: since it resumed), which the demo's budget is read against
    resumed_at = int(Path(last).name.split("-")[-1]) if last else 0
    card.update(train_seconds=round(time.monotonic() - t_start, 1), steps=trainer.state.global_step - resumed_at)
    write_adapter_card(adapter_dir, card)
    return {"log_history": trainer.state.log_history, "resumed_from": last}


def report_token_budget(base_dir: Path, texts: Sequence[str], quantile: float = 0.99) -> int:
    """``max_new_tokens`` that lets all but the longest 1% of the training reports finish: their token count
    under the base's tokenizer (plus ``<|eot_id|>``) at ``quantile``. A fixed 96 cuts MIMIC findings short."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no training reports to size the generation budget from")
    if len(texts) > 20_000:  # a percentile from 20k reports is as good as from all 369k, at a fraction of the memory
        texts = [texts[i] for i in np.random.default_rng(0).choice(len(texts), 20_000, replace=False)]
    lengths = [len(ids) + 1 for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]
    return int(np.ceil(np.quantile(lengths, quantile)))


def generate_reports(
    base_dir: Path,
    adapter_dir: Path | None,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    max_new_tokens: int = 96,
    num_beams: int = 1,
    batch_size: int = 8,
    quantize: bool | None = None,
    device=None,
) -> list[str]:
    """Deterministic decoding (greedy or beam), batched, on ``device``; only the new tokens are returned.

    ``quantize`` None: as the adapter was trained (its card), else 4-bit.
    """
    import torch
    from peft import PeftModel
    from transformers import MllamaProcessor

    if quantize is None:
        quantize = bool(read_adapter_card(adapter_dir).get("quantize", True)) if adapter_dir is not None else True
    device = torch.device(device) if device is not None else default_device()
    processor = MllamaProcessor.from_pretrained(str(base_dir))
    model = load_base(base_dir, quantize, device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"  # generation continues from the right edge
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        texts = [processor.apply_chat_template(messages(p), add_generation_prompt=True) for p in prompts[i : i + batch_size]]
        chunk = [[to_rgb(im)] for im in images[i : i + batch_size]]
        batch = processor(images=chunk, text=texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, pad_token_id=tok.pad_token_id
            )
        new = gen[:, batch["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return out
