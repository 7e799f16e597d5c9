"""The report branch on a Llama-3.2-11B-Vision-shaped base: published ids, tiles, BOS, QLoRA, generation.

The base is built offline from the published configuration at reduced depth
(``reports/llama_shape.py``); its tokenizer adds ``<|begin_of_text|>`` the way
Llama-3's does, which is what the tiny default base cannot show.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxr_pipeline.reports import prompts, tiny_base, vlm
from cxr_pipeline.reports.llama_shape import LLAMA3_SPECIAL_IDS, PUBLISHED_11B, build_real_shape_base

TEXTS = [
    "The heart is enlarged. Small left pleural effusion.",
    "No acute cardiopulmonary process.",
    "Endotracheal tube terminates 4 cm above the carina. No pneumothorax.",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    # one local + one global vision layer keeps the QLoRA step and generation within the test budget
    return build_real_shape_base(tmp_path_factory.mktemp("real_shape") / "base", TEXTS * 20, vision_layers=1)


@pytest.fixture(scope="module")
def processor(base):
    from transformers import MllamaProcessor

    return MllamaProcessor.from_pretrained(str(base))


def examples(n: int, size: int = 96, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"image": (rng.random((size, size)) * 255).astype(np.uint8), "prompt": prompts.user_prompt(), "report": TEXTS[i % 3]}
        for i in range(n)
    ]


def test_published_ids_tiles_and_head_dimensions(base, processor):
    from transformers import MllamaConfig

    tok = processor.tokenizer
    assert len(tok) == 128257 and {t: tok.convert_tokens_to_ids(t) for t in LLAMA3_SPECIAL_IDS} == LLAMA3_SPECIAL_IDS
    assert tok("x")["input_ids"][0] == 128000  # the tokenizer adds BOS itself, as Llama-3's does
    assert processor.image_token_id == 128256
    ip = processor.image_processor
    assert (ip.size["height"], ip.size["width"], ip.max_image_tiles, ip.resample) == (560, 560, 4, 2)
    cfg = MllamaConfig.from_pretrained(str(base))
    v, t, pub = cfg.vision_config, cfg.text_config, PUBLISHED_11B
    assert (v.image_size, v.max_num_tiles, v.hidden_size, v.attention_heads) == (560, 4, 1280, 16)
    assert v.supported_aspect_ratios == pub["vision_config"]["supported_aspect_ratios"]
    assert t.hidden_size // t.num_attention_heads == 128 and t.num_attention_heads // t.num_key_value_heads == 4
    assert t.vocab_size == 128256 and t.bos_token_id == 128000 and t.pad_token_id == 128004
    from safetensors import safe_open

    with safe_open(str(next(base.glob("*.safetensors"))), "pt") as f:
        gates = [f.get_tensor(k) for k in f.keys() if k.endswith(tiny_base.CROSS_ATTENTION_GATES)]
    assert gates and all(float(g.abs().min()) > 0.5 for g in gates)  # open, as pretraining leaves them: the image reaches the text


def test_one_bos_reply_only_labels_and_the_real_tile_dimension(processor):
    tok = processor.tokenizer
    ex = examples(3)
    batch = prompts.MllamaCollator(processor)(ex)
    for i, e in enumerate(ex):
        ids = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        assert ids.count(128000) == 1 and ids[0] == 128000
        kept = [t for t in batch["labels"][i].tolist() if t != -100]
        assert tok.decode(kept) == e["report"] + "<|eot_id|>"  # the reply and its <|eot_id|>, nothing else
    assert batch["cross_attention_mask"].shape == (*batch["input_ids"].shape, 1, 4)  # (batch, tokens, images, tiles)
    assert tuple(batch["pixel_values"].shape[1:]) == (1, 4, 3, 560, 560)


@pytest.mark.slow(minutes=1.3)
def test_a_4bit_qlora_step_and_batched_generation_on_the_cpu(base, tmp_path):
    import torch

    adapter = tmp_path / "adapter"
    cfg = vlm.AdapterConfig(max_steps=1, batch_size=1, accumulation=1, lr=1e-3, warmup_steps=0)
    res = vlm.train_adapter(base, examples(1), cfg, adapter, device=torch.device("cpu"), card={"size": 96})
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert vlm.read_adapter_card(adapter)["quantize"] is True
    ims = [e["image"] for e in examples(2, seed=1)]
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:  # LoRA B starts at zero: one step moved it
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in f.keys() if "lora_B" in k)
    out = vlm.generate_reports(base, adapter, ims, [prompts.user_prompt()] * 2, max_new_tokens=2, batch_size=2, device="cpu")
    assert out[0] == _greedy(base, adapter, ims[0], 2)  # batched generate = a plain greedy loop over the model's logits
    assert all(prompts.INSTRUCTION not in t and "assistant" not in t for t in out)  # the new tokens only


def _greedy(base, adapter, image, n: int) -> str:
    """Greedy decoding written out: the full forward each step, the argmax appended, the cross-attention mask's
    last row repeated for the new token (as Mllama's generation does), stop at an end token."""
    import torch
    from peft import PeftModel
    from transformers import MllamaProcessor

    proc = MllamaProcessor.from_pretrained(str(base))
    model = PeftModel.from_pretrained(vlm.load_base(base, True, torch.device("cpu")), str(adapter)).eval()
    text = proc.apply_chat_template(prompts.messages(prompts.user_prompt()), add_generation_prompt=True)
    x = proc(images=[[prompts.to_rgb(image)]], text=[text], return_tensors="pt", add_special_tokens=False)
    ids, cam = x["input_ids"], x["cross_attention_mask"]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=x["pixel_values"],
                aspect_ratio_ids=x["aspect_ratio_ids"],
                aspect_ratio_mask=x["aspect_ratio_mask"],
                cross_attention_mask=cam,
                use_cache=False,
            ).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in eos:
            break
        ids, cam = torch.cat([ids, torch.tensor([[token]])], 1), torch.cat([cam, cam[:, -1:]], 1)
    return proc.tokenizer.decode(new, skip_special_tokens=True).strip()
