"""The tiny offline Mllama base: a randomly initialised ``MllamaForConditionalGeneration`` with Llama-3's
special tokens and chat template, a byte-level BPE tokenizer trained on the training reports and small
image tiles, optionally given some language pretraining, so that the real report code path (same
classes, 4-bit quantisation, LoRA, TRL's SFTTrainer) runs on a CPU in seconds. Also what the planner
needs to know of any base without loading it (its tile size, its name).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.labels import LABELS, SLUGS
from cxr_pipeline.reports.labeler import label_reports, labeler_version
from cxr_pipeline.reports.prompts import INSTRUCTION, MllamaCollator, findings_hint, to_rgb, user_prompt
from cxr_pipeline.vision.train import resolve_precision

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


def pretrain_language(
    base_dir: Path,
    texts: Sequence[str],
    steps: int,
    lr: float = 1e-3,
    batch: int = 16,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
) -> None:
    """Train a tiny base's language model on the training reports, images blank: a stand-in for what a real base brings.

    Llama-3.2-11B-Vision arrives knowing English and radiology phrasing; a random tiny base knows
    nothing, and an adapter given minutes on a CPU spends them learning to spell, then falls back to the
    most frequent sentence whatever the image. Only the language model's own weights train (not the
    vision tower, the projector or the cross-attention layers, which stay as built), so what the image
    adds is left for the adapter to learn. ``prompts`` (one per text; default: the instruction alone) is what each
    report follows (``instruct_prompts``: its own findings list). Saved in place.
    """
    import torch
    from transformers import MllamaForConditionalGeneration, MllamaProcessor

    processor = MllamaProcessor.from_pretrained(str(base_dir))
    model = MllamaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad = "language_model" in name and "cross_attn" not in name
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    collate, blank = MllamaCollator(processor), np.zeros((8, 8), np.uint8)
    prompts = list(prompts) if prompts is not None else [user_prompt()] * len(texts)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    # bf16 autocast only where the CPU runs bf16 natively (the classifiers' rule, vision.train.resolve_precision): on
    # an AVX2-only CPU it is emulated, and 1,500 steps took over 20 minutes instead of about one (2026-12-03)
    bf16 = model.device.type == "cpu" and resolve_precision("auto", model.device) == "bf16"
    for _ in range(steps):
        batch_ = collate([{"image": blank, "prompt": prompts[i], "report": texts[i]} for i in rng.integers(0, len(texts), batch)])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch_).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(base_dir))


def instruct_prompts(texts: Sequence[str]) -> list[str]:
    """For each training report, the prompt an instruction-tuned model would have learnt to follow: the instruction
    and the findings the labeler reads in that report, in the classifiers' hint format (``findings_hint``,
    probability 1.00; uncertain and negative mentions left out). Teaching a tiny base to write each report after
    its own findings (``pretrain_language`` with these) stands in for what the 11B Instruct model arrives with: told
    of a finding, it writes about it. Only the report's own text goes in; no classifier, no other split."""
    targets = report_targets(texts)
    return [user_prompt(findings_hint({s: 1.0 for s, y in zip(SLUGS, row, strict=True) if y == 1.0}, top=len(SLUGS))) for row in targets]


def report_targets(texts: Sequence[str]) -> np.ndarray:
    """The 14 labels the report labeler reads in each report, as training targets (n, 14): positive 1, negative or
    not mentioned 0, uncertain NaN (left out of the loss)."""
    labels, _bad = label_reports(texts)
    value = {1.0: 1.0, 0.0: 0.0, -1.0: np.nan, None: 0.0}
    return np.array([[value[row[name]] for name in LABELS] for row in labels], dtype=np.float32)


def pretrain_vision(
    base_dir: Path, images: Sequence, texts: Sequence[str], steps: int, lr: float = 1e-3, batch: int = 16, seed: int = 0
) -> list[float]:
    """Train a tiny base's vision tower to see what the training reports say: multi-label classification of each
    training image against the labels the report labeler reads in its report (``report_targets``), through a
    linear head on the tower's mean patch state that is thrown away after. Returns the losses.

    The replica's stand-in for what the 11B's pretrained vision encoder brings: Llama-3.2-Vision's tower arrives
    having learnt from billions of images; a random tiny one hands the text random features, and an adapter given
    minutes has to learn to see and to write at once. Only the tower trains (not the projector, the language model
    or its cross-attention layers); only training images and reports are given (the caller's training rows, keyed
    by ``training_digest``). Saved in place.
    """
    import torch
    from transformers import MllamaForConditionalGeneration, MllamaProcessor

    targets = torch.from_numpy(report_targets(texts))
    processor = MllamaProcessor.from_pretrained(str(base_dir))
    model = MllamaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    tower = model.model.vision_model
    for param in model.parameters():
        param.requires_grad = False
    for param in tower.parameters():
        param.requires_grad = True
    torch.manual_seed(seed)
    head = torch.nn.Linear(model.config.vision_config.vision_output_dim, targets.shape[1])
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=lr)
    rng, losses = np.random.default_rng(seed), []
    tower.train()
    for _ in range(steps):
        idx = rng.integers(0, len(texts), batch)
        pix = processor.image_processor(images=[[to_rgb(np.asarray(images[i]))] for i in idx], return_tensors="pt")
        states = tower(
            pixel_values=pix["pixel_values"], aspect_ratio_ids=pix["aspect_ratio_ids"], aspect_ratio_mask=pix["aspect_ratio_mask"]
        ).last_hidden_state  # (batch, images, tiles, patches, dim)
        logits = head(states.mean(dim=(1, 2, 3)))
        y = targets[idx]
        known = ~torch.isnan(y)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[known], y[known])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.save_pretrained(str(base_dir))
    return losses


def training_digest(rows: pl.DataFrame) -> str:
    """The identity of the data a tiny base is built from: SHA-256 of the training rows' ``dicom_id``, ``study_id``,
    report ``text`` and, where the rows carry it (rows read from the shards do), the image's ``content_hash``, in
    ``dicom_id`` order. Only training rows may be given (a row of another split is an error):
    the base's tokenizer and pretraining see the training split only, and a changed training split (new patients,
    a corrected report) keys a new base rather than reusing one trained on the old reports."""
    if "split" in rows.columns:
        other = rows.filter(pl.col("split") != "train")
        if other.height:
            raise ValueError(f"training_digest: {other.height} rows are not in the training split (first: {other['dicom_id'][0]})")
    h = hashlib.sha256()
    columns = ["dicom_id", "study_id", "text"] + (["content_hash"] if "content_hash" in rows.columns else [])
    for row in rows.select(columns).sort("dicom_id").iter_rows():
        h.update(json.dumps([str(v) if v is not None else None for v in row]).encode() + b"\n")
    return h.hexdigest()


def ensure_tiny_base(
    family_dir: Path,
    texts: Sequence[str],
    digest: str,
    width: int = 1,
    pretrain_steps: int = 0,
    log=None,
    vision_steps: int = 0,
    images: Sequence | None = None,
    instruct_steps: int = 0,
) -> Path:
    """The tiny offline base of this width and pretraining, built from the training data ``digest`` names
    (``training_digest``), in ``family_dir / <digest[:16]>`` (with vision or findings-list pretraining, a digest of
    that, the labeler's version and the hint format): built once (atomically: a killed build leaves no half
    base behind), then reused while the training split is the same. Bases of earlier data stay (an adapter's card
    names the base it was trained on). ``vision_steps`` > 0 pretrains the vision tower on ``images`` (aligned with
    ``texts``) first (``pretrain_vision``); ``instruct_steps`` > 0 then teaches it to write each report after its own
    findings list (``instruct_prompts``), after any plain language pretraining."""
    import shutil

    key = digest
    if vision_steps or instruct_steps:
        # their targets are the labeler's reading of the reports, and the findings list is the hint's format: a new
        # labeler or prompt format keys a new base, never one taught the old labels or wording
        key = hashlib.sha256(f"{digest}|{labeler_version()}|{user_prompt(findings_hint({'pleural_effusion': 1.0}))}".encode()).hexdigest()
    out_dir = Path(family_dir) / key[:16]
    if (out_dir / TINY_MARKER).exists():
        return out_dir
    if vision_steps and (images is None or len(images) != len(texts)):
        raise ValueError(f"vision pretraining needs one image per training report ({len(texts)} reports)")
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")  # this process's own: two builders never share one
    shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(
            f"building the tiny offline Mllama base (width {width}, {pretrain_steps} language, {vision_steps} vision and "
            f"{instruct_steps} findings-list pretraining steps) in {out_dir}"
        )
    started = time.monotonic()
    build_tiny_base(tmp, texts, width=width)
    extra: dict = {}
    if vision_steps:
        losses = pretrain_vision(tmp, images, list(texts), vision_steps)
        extra = {"vision_loss_first": losses[0], "vision_loss_last": float(np.mean(losses[-10:]))}
    if pretrain_steps:
        pretrain_language(tmp, [t for t in texts if t], pretrain_steps)
    if instruct_steps:
        written = [t for t in texts if t]
        pretrain_language(tmp, written, instruct_steps, prompts=instruct_prompts(written))
    marker = json.loads((tmp / TINY_MARKER).read_text())
    marker.update(
        width=width, pretrain_steps=pretrain_steps, vision_steps=vision_steps, instruct_steps=instruct_steps, training_digest=digest
    )
    marker.update(extra)
    marker["build_seconds"] = round(time.monotonic() - started, 3)  # tokenizer, model and pretraining: part of a demo's budget
    (tmp / TINY_MARKER).write_text(json.dumps(marker))
    try:
        tmp.replace(out_dir)
    except OSError:
        if not (out_dir / TINY_MARKER).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process built the same base first: its copy is as good
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
            "base_model": f"cxr-tiny-mllama w{m.get('width', 1)} lm{m.get('pretrain_steps', 0)}"
            + (f" v{m['vision_steps']}" if m.get("vision_steps") else "")
            + (f" i{m['instruct_steps']}" if m.get("instruct_steps") else "")
            + " (random init, built offline)",
            "base_revision": m.get("seed", 0),
            "base_training_digest": m.get("training_digest", "")[:16],
        }
    cfg = json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").exists() else {}
    return {"base_model": cfg.get("_name_or_path") or base_dir.name, "base_revision": cfg.get("transformers_version", "unknown")}
