"""Llama-3.2-11B-Vision as published, without its weights: configuration, tokenizer ids, image processor.

The real base is credentialed-download-only and cannot be fetched here, so the
report branch's real path is proven on a *real-shape* base built offline from
the published files' values (``config.json``, ``preprocessor_config.json``,
``tokenizer.json`` of ``meta-llama/Llama-3.2-11B-Vision-Instruct``): the same
tile size and tile count, head dimensions, vocabulary size and special-token
ids, and a tokenizer that adds ``<|begin_of_text|>`` itself as Llama-3's does,
at reduced depth (and text width) so that a QLoRA step runs on a CPU in tests.
``transformers.MllamaConfig()``'s defaults are *not* these values (its tiles
are 448 px), which is why they are written out here.

``benchmarks/bench_vlm.py --real-shape`` uses ``PUBLISHED_11B`` on the meta
device to count the full model's weight memory parameter by parameter.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path

from cxr_pipeline.reports.tiny_base import CHAT_TEMPLATE, open_cross_attention_gates

# meta-llama/Llama-3.2-11B-Vision-Instruct, config.json (the fields that set shapes and ids)
PUBLISHED_11B: dict = {
    "vision_config": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_global_layers": 8,
        "attention_heads": 16,
        "intermediate_size": 5120,
        "image_size": 560,
        "patch_size": 14,
        "max_num_tiles": 4,
        "num_channels": 3,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "vision_output_dim": 7680,  # 1280 x (1 + 5 intermediate layers)
        "norm_eps": 1e-5,
    },
    "text_config": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "tie_word_embeddings": False,
    },
    "image_token_index": 128256,
}
# preprocessor_config.json
PUBLISHED_PROCESSOR: dict = {
    "size": {"height": 560, "width": 560},
    "max_image_tiles": 4,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 2,  # bilinear
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
}
# tokenizer.json: Llama-3's 256 special tokens from 128000, then the vision model's <|image|>
LLAMA3_SPECIAL_IDS: dict[str, int] = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|image|>": 128256,
}
FIRST_SPECIAL = 128000
REAL_SHAPE_MARKER = "cxr_real_shape_mllama.json"


def _special_tokens() -> list[str]:
    """Ids 128000-128255 in Llama-3's order (named ones, the rest reserved), then <|image|>."""
    named = {i - FIRST_SPECIAL: t for t, i in LLAMA3_SPECIAL_IDS.items() if i < FIRST_SPECIAL + 256}
    out, reserved = [], 0
    for k in range(256):
        if k in named:
            out.append(named[k])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return [*out, "<|image|>"]


def llama3_tokenizer(texts: Iterable[str], bpe_vocab: int = 2000):
    """A byte-level BPE tokenizer trained on ``texts`` with Llama-3's vocabulary size and special-token
    ids, whose post-processor adds ``<|begin_of_text|>`` to every encoding as Llama-3's does.

    The merges are learnt from the reports (Llama-3's own are not available offline); the regular
    vocabulary is filled up to 128,000 entries with unreachable tokens so that every special id is real.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trained.train_from_iterator([t for t in texts if t], trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for i in range(len(vocab), FIRST_SPECIAL):
        vocab[f"<unused_{i}>"] = i
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _special_tokens()])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, LLAMA3_SPECIAL_IDS[bos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")


def mllama_config(
    vision_layers: int | None = None,
    global_layers: int | None = None,
    text_layers: int | None = None,
    cross_attention_layers: list[int] | None = None,
    text_width: int | None = None,
):
    """``MllamaConfig`` of the published 11B, or of a reduced-depth variant.

    Depth is reduced as asked; a reduced ``text_width`` keeps the head dimension (128) and the 4:1
    query-to-KV-head ratio and scales the MLP by the published 3.5. The vision tower keeps its real
    widths; with fewer layers its intermediate-layer taps are the first layers.
    """
    from transformers import MllamaConfig

    c = copy.deepcopy(PUBLISHED_11B)
    v, t = c["vision_config"], c["text_config"]
    if vision_layers is not None:
        v["num_hidden_layers"] = vision_layers
        v["intermediate_layers_indices"] = list(range(vision_layers))[: len(v["intermediate_layers_indices"])]
        v["vision_output_dim"] = v["hidden_size"] * (1 + len(v["intermediate_layers_indices"]))
    if global_layers is not None:
        v["num_global_layers"] = global_layers
    if text_layers is not None:
        t["num_hidden_layers"] = text_layers
        t["cross_attention_layers"] = cross_attention_layers if cross_attention_layers is not None else [text_layers // 2]
    if text_width is not None:
        head_dim = t["hidden_size"] // t["num_attention_heads"]
        t["num_attention_heads"] = text_width // head_dim
        t["num_key_value_heads"] = max(1, t["num_attention_heads"] // 4)
        t["hidden_size"] = text_width
        t["intermediate_size"] = int(text_width * 3.5)
    return MllamaConfig(vision_config=v, text_config=t, image_token_index=c["image_token_index"])


def build_real_shape_base(
    out_dir: Path,
    texts: Iterable[str],
    seed: int = 0,
    vision_layers: int = 2,
    global_layers: int = 1,
    text_layers: int = 3,
    text_width: int = 1024,
) -> Path:
    """Save a randomly initialised reduced-depth Llama-3.2-11B-Vision-shaped base + processor to ``out_dir``.

    Published: tile 560 px, 4 tiles and their aspect ratios, CLIP normalisation, vision widths and heads,
    head dimensions, vocabulary 128,256 + ``<|image|>`` and the special-token ids, BOS added by the
    tokenizer, the Instruct chat template's layout. Reduced: depth (``vision_layers`` + ``global_layers``,
    ``text_layers`` with one cross-attention layer) and the text width (``text_width``).
    """
    import torch
    from transformers import MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = llama3_tokenizer(texts)
    tok.chat_template = CHAT_TEMPLATE
    processor = MllamaProcessor(image_processor=MllamaImageProcessor(**PUBLISHED_PROCESSOR), tokenizer=tok, chat_template=CHAT_TEMPLATE)
    cfg = mllama_config(vision_layers, global_layers, text_layers, None, text_width)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg).to(torch.bfloat16)
    open_cross_attention_gates(model)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n = int(sum(p.numel() for p in model.parameters()))
    (out_dir / REAL_SHAPE_MARKER).write_text(json.dumps({"name": "cxr-real-shape-mllama", "seed": seed, "parameters": n}))
    return out_dir
