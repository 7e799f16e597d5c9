"""LLaMA-3.2-Vision (Mllama) report generation: the tiny offline base, the collator, QLoRA, generation.

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

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_pipeline.config import at_least_one, setting

INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|python_tag|>",
    "<|image|>",
)
# Llama-3 chat format (the 11B-Vision-Instruct template without its tool-calling branches).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
TINY_MARKER = "cxr_tiny_mllama.json"
TINY_TILE = 56  # the tiny base's tile (build_tiny_base); the real 11B's is 560
# Kept out of 4-bit quantisation, as full module prefixes (bitsandbytes matches them against module names).
UNQUANTISED_MODULES = ("model.vision_model", "model.multi_modal_projector", "lm_head")
# Saved beside the adapter: what generation must reproduce (base, quantisation, image size, prompt variant).
ADAPTER_CARD = "cxr_adapter.json"


CROSS_ATTENTION_GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate")


def open_cross_attention_gates(model, value: float = 1.0) -> None:
    """Set the text model's cross-attention gates as pretraining leaves them: open.

    Mllama multiplies each cross-attention layer's output by ``tanh(gate)``, and a freshly
    initialised model's gates are 0: the image cannot reach the text at all, and LoRA cannot
    open them (they are not linear layers). A pretrained base has them open; a randomly
    initialised stand-in must too, or every test of the report branch is image-blind.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(CROSS_ATTENTION_GATES):
                param.fill_(value)


def build_tiny_base(
    out_dir: Path, texts: Iterable[str], seed: int = 0, tile: int = TINY_TILE, vocab_size: int = 2000, width: int = 1
) -> Path:
    """Train a tokenizer on ``texts`` and save a tiny random Mllama + processor to ``out_dir``.

    ``width`` multiplies every hidden size (1: about 250k parameters; ``bench_vlm.py --learning`` uses a wider one).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [t for t in texts if t] + [INSTRUCTION, "Classifier findings: none", "user assistant system"]
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>"
    )
    hf.chat_template = CHAT_TEMPLATE
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=1),
        tokenizer=hf,
        chat_template=CHAT_TEMPLATE,
    )
    cfg = MllamaConfig(
        vision_config={
            "hidden_size": 32 * width,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "intermediate_size": 64 * width,
            "image_size": tile,
            "patch_size": 14,
            "max_num_tiles": 1,
            "supported_aspect_ratios": [[1, 1]],
            "intermediate_layers_indices": [0],
            "vision_output_dim": 64 * width,  # hidden_size x (1 + len(intermediate_layers_indices))
        },
        text_config={
            "vocab_size": len(hf),
            "hidden_size": 64 * width,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128 * width,
            "cross_attention_layers": [1, 3],
            "max_position_embeddings": 2048,
            "bos_token_id": hf.bos_token_id,
            "eos_token_id": hf.eos_token_id,
            "pad_token_id": hf.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        },
        image_token_index=hf.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg)
    open_cross_attention_gates(model)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / TINY_MARKER).write_text(
        json.dumps({"name": "cxr-tiny-mllama", "seed": seed, "parameters": int(sum(p.numel() for p in model.parameters()))})
    )
    return out_dir


def pretrain_language(base_dir: Path, texts: Sequence[str], steps: int, lr: float = 1e-3, batch: int = 16, seed: int = 0) -> None:
    """Train a tiny base's language model on the training reports, images blank: a stand-in for what a real base brings.

    Llama-3.2-11B-Vision arrives knowing English and radiology phrasing; a random tiny base knows
    nothing, and an adapter given minutes on a CPU spends them learning to spell, then falls back to the
    most frequent sentence whatever the image. Only the language model's own weights train (not the
    vision tower, the projector or the cross-attention layers, which stay as built), so what the image
    adds is left for the adapter to learn. Saved in place.
    """
    import torch
    from transformers import MllamaForConditionalGeneration, MllamaProcessor

    processor = MllamaProcessor.from_pretrained(str(base_dir))
    model = MllamaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad = "language_model" in name and "cross_attn" not in name
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    collate, blank, prompt = MllamaCollator(processor), np.zeros((8, 8), np.uint8), user_prompt()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch_ = collate([{"image": blank, "prompt": prompt, "report": texts[i]} for i in rng.integers(0, len(texts), batch)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.device.type == "cpu"):
            loss = model(**batch_).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(base_dir))


def ensure_tiny_base(out_dir: Path, texts: Sequence[str], width: int = 1, pretrain_steps: int = 0, log=None) -> Path:
    """The tiny offline base of this width and pretraining in ``out_dir``: built once (atomically: a killed
    build leaves no half base behind), then reused."""
    import shutil

    out_dir = Path(out_dir)
    if (out_dir / TINY_MARKER).exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(f"building the tiny offline Mllama base (width {width}, {pretrain_steps} language pretraining steps) in {out_dir}")
    build_tiny_base(tmp, texts, width=width)
    if pretrain_steps:
        pretrain_language(tmp, [t for t in texts if t], pretrain_steps)
    marker = json.loads((tmp / TINY_MARKER).read_text())
    (tmp / TINY_MARKER).write_text(json.dumps({**marker, "width": width, "pretrain_steps": pretrain_steps}))
    tmp.replace(out_dir)
    return out_dir


def base_tile_size(base_dir: Path | str | None) -> int:
    """The image size a base model sees: its image processor's tile (560 for Llama-3.2-11B-Vision); the tiny
    default base's (``TINY_TILE``) when ``base_dir`` is None. Read from ``preprocessor_config.json``, without
    loading the model, so the shard sizes can be planned before any training."""
    if base_dir is None:
        return TINY_TILE
    f = Path(base_dir) / "preprocessor_config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: not found; a base model directory holds its image processor's preprocessor_config.json")
    size = json.loads(f.read_text()).get("size") or {}
    if "height" not in size:
        raise ValueError(f"{f}: field 'size' has no 'height' (has: {size})")
    return int(size["height"])


def base_info(base_dir: Path) -> dict:
    """Name and revision of a base model directory, for MLflow params."""
    base_dir = Path(base_dir)
    marker = base_dir / TINY_MARKER
    if marker.exists():
        m = json.loads(marker.read_text())
        return {
            "base_model": f"cxr-tiny-mllama w{m.get('width', 1)} lm{m.get('pretrain_steps', 0)} (random init, built offline)",
            "base_revision": m.get("seed", 0),
        }
    cfg = json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").exists() else {}
    return {"base_model": cfg.get("_name_or_path") or base_dir.name, "base_revision": cfg.get("transformers_version", "unknown")}


def user_prompt(findings_hint: str | None = None) -> str:
    """The one instruction used at training and at inference (optionally with classifier findings)."""
    return INSTRUCTION if not findings_hint else f"{INSTRUCTION}\n{findings_hint}"


def findings_hint(probs: dict[str, float], thresholds: dict[str, float] | None = None, top: int = 5) -> str:
    """'Classifier findings: pleural effusion 0.91, ...' from per-pathology probabilities; a finding is
    named when it reaches its own validation-chosen threshold (0.5 where none is given)."""
    thresholds = thresholds or {}
    picked = sorted(((p, k) for k, p in probs.items() if p is not None and p >= thresholds.get(k, 0.5)), reverse=True)[:top]
    if not picked:
        return "Classifier findings: none"
    return "Classifier findings: " + ", ".join(f"{k.replace('_', ' ').lower()} {p:.2f}" for p, k in picked)


def prompts_for(rows, predictions, use_findings: bool, thresholds: dict[str, float] | None = None) -> tuple[list[str], str]:
    """The prompt of each row (a polars frame with ``dicom_id``) and the prompt variant's name.

    With ``use_findings`` and a predictions table (``dicom_id`` + one probability
    column per pathology slug), each prompt carries that image's classifier findings.
    """
    from cxr_pipeline.labels import SLUGS

    if not use_findings or predictions is None:
        return [user_prompt()] * rows.height, "instruction"
    cols = [s for s in SLUGS if s in predictions.columns]
    j = rows.select("dicom_id").join(predictions, on="dicom_id", how="left", maintain_order="left")
    return [
        user_prompt(findings_hint({c: r[c] for c in cols}, thresholds)) for r in j.iter_rows(named=True)
    ], "instruction+classifier_findings"


def messages(prompt: str, report: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if report is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": report}]})
    return msgs


def to_rgb(img: np.ndarray):
    """A uint8 grey shard image -> the RGB PIL image the processor expects."""
    from PIL import Image

    return Image.fromarray(np.asarray(img, dtype=np.uint8), mode="L").convert("RGB")


@dataclass
class MllamaCollator:
    """Batches (image, prompt, report) for SFT, with the loss on the report tokens only.

    TRL's built-in vision collator leaves Mllama's ``<|image|>`` token in the
    labels and does not keep ``cross_attention_mask`` the length of a truncated
    sequence; this one masks the prompt (everything up to and including the
    assistant header), padding and the image token with -100, and truncates
    ``input_ids``, ``attention_mask``, ``labels`` and ``cross_attention_mask``
    together.
    """

    processor: object
    max_length: int = 2048
    images: Sequence | None = None  # examples carrying ``idx`` instead of ``image`` are read from here

    def __call__(self, examples: Sequence[dict]) -> dict:
        proc = self.processor
        tok = proc.tokenizer
        full = [proc.apply_chat_template(messages(e["prompt"], e["report"])) for e in examples]
        prompts = [proc.apply_chat_template(messages(e["prompt"]), add_generation_prompt=True) for e in examples]
        images = [[to_rgb(e["image"] if "image" in e else self.images[e["idx"]])] for e in examples]
        tok.padding_side = "right"
        # the chat template already writes <|begin_of_text|>: a tokenizer that adds one itself (Llama-3's
        # does) must not add a second, and the prompt length below counts the same tokens
        batch = proc(images=images, text=full, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = batch["input_ids"]
        labels = ids.clone()
        for i, p in enumerate(prompts):
            n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
            labels[i, :n_prompt] = -100
        labels[batch["attention_mask"] == 0] = -100
        labels[ids == proc.image_token_id] = -100
        batch["labels"] = labels
        if ids.shape[1] > self.max_length:
            for k in ("input_ids", "attention_mask", "labels", "cross_attention_mask"):
                batch[k] = batch[k][:, : self.max_length]
        return dict(batch)


@dataclass
class TrainingPairs:
    """(image, prompt, report) examples as a map-style dataset; ``images`` may be lazy (``data.shards.StreamedImages``)."""

    images: Sequence
    prompts: Sequence[str]
    reports: Sequence[str]

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "prompt": self.prompts[i], "report": self.reports[i]}

    @classmethod
    def from_examples(cls, examples: Sequence[dict]) -> TrainingPairs:
        return cls([e["image"] for e in examples], [e["prompt"] for e in examples], [e["report"] for e in examples])


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
    quantize: bool = setting(True, "4-bit NF4 base with double quantisation and bf16 compute (QLoRA)")
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


def ensure_base(cfg: AdapterConfig, tiny_dir: Path, texts: Sequence[str], log=None) -> Path:
    """The base a resolved ``cfg`` names: the tiny offline base (``tiny_dir``, built from ``texts`` with the
    config's width and language pretraining when missing), or a local directory that must exist (nothing is
    downloaded)."""
    base = Path(str(cfg.base))
    if base == Path(tiny_dir):
        return ensure_tiny_base(base, texts, cfg.tiny_width, cfg.tiny_pretrain_steps, log)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: base model directory not found (nothing is downloaded; set CXR_VLM_BASE to a local copy)")
    return base


def adapter_training_set(pairs, shard_root: Path, cfg: AdapterConfig, hints=None, thresholds: dict[str, float] | None = None):
    """The training split's (image, prompt, report) examples under a resolved ``cfg``, the rows they come
    from and the prompt variant. ``max_train_pairs`` samples (seeded); images are read from the shards at
    ``cfg.size`` batch by batch; prompts carry the classifiers' findings when ``use_classifier_findings``
    and ``hints`` (probabilities per ``dicom_id``) are given."""
    import polars as pl

    from cxr_pipeline.data.shards import open_images

    train = pairs.filter(pl.col("split") == "train")
    if cfg.max_train_pairs is not None:
        train = train.sample(min(cfg.max_train_pairs, train.height), seed=cfg.seed)
    images, rows = open_images(shard_root, train, cfg.size)
    prompts, variant = prompts_for(rows, hints, cfg.use_classifier_findings, thresholds)
    return TrainingPairs(images, prompts, rows["text"].to_list()), rows, variant


def lora_target(target: str) -> str:
    """Regex over module names: attention (self and cross) and MLP projections."""
    proj = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    if target == "language":
        return rf".*language_model.*\.{proj}"
    if target == "language+vision":
        return rf".*(language_model|vision_model).*\.({proj[1:-1]}|fc1|fc2)"
    raise ValueError(f"target must be 'language' or 'language+vision', not {target!r}")


def load_base(base_dir: Path, quantize: bool, device=None):
    """The base model, 4-bit NF4 (vision tower, projector and lm_head kept unquantised) when asked."""
    import torch
    from transformers import BitsAndBytesConfig, MllamaForConditionalGeneration

    kwargs: dict = {"dtype": torch.bfloat16}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(UNQUANTISED_MODULES),
        )
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    return MllamaForConditionalGeneration.from_pretrained(str(base_dir), **kwargs)


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_adapter_card(adapter_dir: Path, card: dict) -> None:
    from cxr_pipeline.data.io import atomic_path

    with atomic_path(Path(adapter_dir) / ADAPTER_CARD) as tmp:
        tmp.write_text(json.dumps(card, indent=2))


def read_adapter_card(adapter_dir: Path) -> dict:
    f = Path(adapter_dir) / ADAPTER_CARD
    if not f.exists():
        raise FileNotFoundError(f"{f}: not found; is {adapter_dir} an adapter trained by cxr_pipeline?")
    return json.loads(f.read_text())


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
        bf16=True,
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
    last = None
    if ckpt_dir.exists():
        cks = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        last = str(cks[-1]) if cks else None
        if last and log:
            log(f"resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    model.save_pretrained(str(adapter_dir))
    processor.save_pretrained(str(adapter_dir))
    from cxr_pipeline.config import record

    config = record(cfg) if cfg.base is not None and cfg.size is not None else None  # a resolved config is recorded whole
    card = {"base": str(base_dir), "quantize": cfg.quantize, **base_info(base_dir), "config": config, **(card or {})}
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
