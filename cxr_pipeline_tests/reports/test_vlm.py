"""The Mllama report generator on the tiny offline base: collator, QLoRA, adapter round trip."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_pipeline.reports import prompts, tiny_base, vlm

TEXTS = ["The heart is enlarged. Small left pleural effusion.", "No acute cardiopulmonary process.", "No pneumothorax. Lungs are clear."]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base.build_tiny_base(tmp_path_factory.mktemp("vlm") / "base", TEXTS * 20)


@pytest.fixture(scope="module")
def processor(base):
    from transformers import MllamaProcessor

    return MllamaProcessor.from_pretrained(str(base))


def examples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"image": (rng.random((64, 64)) * 255).astype(np.uint8), "prompt": prompts.user_prompt(), "report": TEXTS[i % 3]} for i in range(n)
    ]


def test_collator_puts_the_loss_on_report_tokens_only(processor):
    ex = examples(3)
    ex[1]["report"] = "Short."
    batch = prompts.MllamaCollator(processor)(ex)
    tok = processor.tokenizer
    ids, labels = batch["input_ids"], batch["labels"]
    assert batch["cross_attention_mask"].shape[:2] == ids.shape
    for i, e in enumerate(ex):
        kept = [t for t in labels[i].tolist() if t != -100]
        assert tok.decode(kept) == e["report"] + "<|eot_id|>"
    assert not (labels == processor.image_token_id).any()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    truncated = prompts.MllamaCollator(processor, max_length=20)(ex)
    assert all(truncated[k].shape[1] == 20 for k in ("input_ids", "attention_mask", "labels", "cross_attention_mask"))


def test_same_prompt_at_training_and_inference(processor):
    train_text = processor.apply_chat_template(prompts.messages(prompts.user_prompt(), "X."))
    infer_text = processor.apply_chat_template(prompts.messages(prompts.user_prompt()), add_generation_prompt=True)
    assert train_text.startswith(infer_text) and prompts.INSTRUCTION in infer_text
    hint = prompts.findings_hint({"Pleural Effusion": 0.91, "Edema": 0.2, "Cardiomegaly": 0.75})
    assert hint == "Classifier findings: pleural effusion 0.91, cardiomegaly 0.75"
    assert (
        prompts.user_prompt(hint).startswith(prompts.INSTRUCTION) and prompts.findings_hint({"Edema": 0.1}) == "Classifier findings: none"
    )


def test_tiny_qlora_lowers_loss_and_adapter_round_trips(base, tmp_path, capsys):
    from peft import PeftModel

    adapter = tmp_path / "adapter"
    res = vlm.train_adapter(
        base, examples(16), vlm.AdapterConfig(max_steps=8, batch_size=4, accumulation=1, lr=2e-3, warmup_steps=1), adapter
    )
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert "{'loss'" not in capsys.readouterr().out  # per-step dicts go to the log history (MLflow), not the console
    card = vlm.read_adapter_card(adapter)
    assert card["quantize"] is True and card["steps"] == 8 and 0 < card["train_seconds"] < 600  # what the demo's budget reads
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists()  # the adapter, not the base weights
    model = PeftModel.from_pretrained(vlm.load_base(base, quantize=True), str(adapter))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    ims = [e["image"] for e in examples(3, seed=1)]
    a = vlm.generate_reports(base, adapter, ims, [prompts.user_prompt()] * 3, max_new_tokens=6)
    b = vlm.generate_reports(base, adapter, ims, [prompts.user_prompt()] * 3, max_new_tokens=6, batch_size=2)
    assert a == b and len(a) == 3  # deterministic, and batching does not change it
    assert all("<|" not in t and prompts.INSTRUCTION not in t for t in a)  # only new tokens


def test_generation_loads_the_base_as_the_adapter_was_trained(base, tmp_path, monkeypatch):
    """An adapter trained on an unquantised base is evaluated on an unquantised base, on the given device."""
    import torch

    adapter = tmp_path / "adapter"
    cfg = vlm.AdapterConfig(max_steps=1, batch_size=2, accumulation=1, quantize=False)
    vlm.train_adapter(base, examples(2), cfg, adapter, device=torch.device("cpu"), card={"size": 64})
    card = vlm.read_adapter_card(adapter)
    assert card["quantize"] is False and card["size"] == 64 and card["base"] == str(base)
    loads = []
    real = vlm.load_base

    def spy(base_dir, quantize, device=None):
        loads.append((quantize, device))
        return real(base_dir, quantize, device)

    monkeypatch.setattr(vlm, "load_base", spy)
    vlm.generate_reports(base, adapter, [e["image"] for e in examples(1)], [prompts.user_prompt()], max_new_tokens=2, device="cpu")
    assert loads == [(False, torch.device("cpu"))]


def test_generation_writes_the_report_the_adapter_learned(base, tmp_path):
    """A known output: an adapter trained (QLoRA, 80 steps) on one report for every image writes exactly that report
    for images it never saw, whatever the batch: the new tokens only, decoded, nothing of the prompt."""
    import torch

    target = TEXTS[2]
    train = [{**e, "report": target} for e in examples(8)]
    cfg = vlm.AdapterConfig(max_steps=80, batch_size=4, accumulation=1, lr=3e-3, warmup_steps=0, lr_schedule="constant")
    vlm.train_adapter(base, train, cfg, tmp_path / "adapter", device=torch.device("cpu"))
    ims = [e["image"] for e in examples(3, seed=7)]
    for batch_size in (3, 2):
        out = vlm.generate_reports(base, tmp_path / "adapter", ims, [prompts.user_prompt()] * 3, max_new_tokens=16, batch_size=batch_size)
        assert out == [target] * 3, (batch_size, out)


@pytest.mark.parametrize("quantize", [False, True])
def test_modules_trained_in_full_travel_with_the_adapter(base, tmp_path, quantize):
    """``train_full`` (peft modules_to_save): the projector is trained whole, saved in the adapter, used at generation.
    Quantised too (the learning recipe's QLoRA): TRL casts a quantised model's trainable weights to bf16, which a
    CPU's float32 activations met in the projector ("mat1 and mat2 must have the same dtype")."""
    import torch
    from safetensors import safe_open

    adapter = tmp_path / "adapter"
    cfg = vlm.AdapterConfig(max_steps=2, batch_size=2, accumulation=1, lr=1e-2, quantize=quantize, train_full="multi_modal_projector")
    vlm.train_adapter(base, examples(4), cfg, adapter, device=torch.device("cpu"))
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = [k for k in f.keys() if "multi_modal_projector" in k and k.endswith("weight")]
        trained = f.get_tensor(saved[0]) if saved else None
    assert saved, "the projector's trained copy is not in the adapter"
    params = dict(vlm.load_base(base, quantize=False).named_parameters())
    original = next(v for n, v in params.items() if "multi_modal_projector" in n and n.endswith("weight")).detach()
    assert trained.shape == original.shape
    assert not torch.equal(trained.to(original.dtype), original)  # it was trained, not copied
    out = vlm.generate_reports(base, adapter, [e["image"] for e in examples(1)], [prompts.user_prompt()], max_new_tokens=2, device="cpu")
    assert len(out) == 1


@pytest.fixture(scope="module")
def bos_processor(base, tmp_path_factory):
    """The tiny base's processor with a tokenizer that adds <|begin_of_text|> itself, as Llama-3's does."""
    from tokenizers import processors
    from transformers import MllamaProcessor

    proc = MllamaProcessor.from_pretrained(str(base))
    tok = proc.tokenizer
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    out = tmp_path_factory.mktemp("bos")
    proc.save_pretrained(str(out))
    reloaded = MllamaProcessor.from_pretrained(str(out))
    assert reloaded.tokenizer("x")["input_ids"][0] == bos  # the post-processor survives a save, as in the real files
    return reloaded


def test_one_bos_and_labels_on_the_reply_only_with_a_bos_adding_tokenizer(bos_processor):
    """The chat template writes <|begin_of_text|>; a tokenizer that adds one too must not double it, and
    the prompt length must count it, or one prompt token is trained on."""
    tok = bos_processor.tokenizer
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    ex = examples(3)
    batch = prompts.MllamaCollator(bos_processor)(ex)
    for i, e in enumerate(ex):
        ids = batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist()
        assert ids.count(bos) == 1 and ids[0] == bos
        kept = [t for t in batch["labels"][i].tolist() if t != -100]
        assert tok.decode(kept) == e["report"] + "<|eot_id|>"


def test_generation_budget_lets_the_training_reports_finish(base):
    """max_new_tokens defaults from the training reports (99th percentile of their token counts + <|eot_id|>)."""
    from transformers import AutoTokenizer

    texts = [" ".join(["effusion"] * n) for n in range(1, 201)]
    tok = AutoTokenizer.from_pretrained(str(base))
    lengths = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)
    budget = vlm.report_token_budget(base, texts)
    assert lengths[196] <= budget <= lengths[-1] and budget > 96


def test_the_image_reaches_the_text(base, processor):
    """Two images, same prompt: different next-token logits. A fresh Mllama's cross-attention gates are
    zero, which makes the text blind to the image (the tiny base was, until this test)."""
    import torch
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(str(base)).eval()
    text = processor.apply_chat_template(prompts.messages(prompts.user_prompt()), add_generation_prompt=True)
    logits = []
    for fill in (0, 255):
        image = prompts.to_rgb(np.full((64, 64), fill, dtype=np.uint8))
        batch = processor(images=[[image]], text=[text], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits.append(model(**batch).logits[0, -1].float())
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_hints_use_each_findings_own_threshold():
    probs = {"pleural_effusion": 0.30, "edema": 0.45, "cardiomegaly": 0.60}
    thresholds = {"pleural_effusion": 0.25, "edema": 0.50, "cardiomegaly": 0.70}
    # effusion is named at 0.30 (its threshold 0.25); edema and cardiomegaly are not, though 0.6 > 0.5
    assert prompts.findings_hint(probs, thresholds) == "Classifier findings: pleural effusion 0.30"


def test_lr_schedule_reaches_the_trainer(base, tmp_path):
    """pipeline.yaml's lr_schedule is what the optimizer sees: linear decays to 0 at max_steps, constant holds
    the peak after the warm-up (the 2026-11 learning recipes ran at an effectively constant rate)."""
    rates = {}
    for schedule in ("linear", "constant"):
        cfg = vlm.AdapterConfig(max_steps=4, batch_size=2, accumulation=1, lr=1e-3, warmup_steps=1, lr_schedule=schedule)
        res = vlm.train_adapter(base, examples(8), cfg, tmp_path / schedule, tmp_path / f"{schedule}.ckpt")
        rates[schedule] = [h["learning_rate"] for h in res["log_history"] if "learning_rate" in h]
    assert rates["constant"][1:] == pytest.approx([1e-3] * 3)
    assert rates["linear"][1] == pytest.approx(1e-3) and rates["linear"][-1] < 0.5e-3
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        vlm.AdapterConfig(lr_schedule="cosine")


def test_checkpoints_of_another_training_set_are_not_resumed(base, tmp_path):
    """A finished run leaves no checkpoint; a checkpoint left for another base, recipe or training set (a data
    change) is not resumed: the new run trains every step from the start. The key a checkpoint must match changes
    with the pairs and the recipe, not between two identical calls."""
    import torch

    adapter, ckpt = tmp_path / "adapter", tmp_path / "ckpt"
    cfg = vlm.AdapterConfig(max_steps=4, batch_size=4, accumulation=1, lr=2e-3, warmup_steps=0)
    steps = lambda res: sum(1 for h in res["log_history"] if "loss" in h)  # noqa: E731
    first = vlm.train_adapter(base, examples(8), cfg, adapter, ckpt, device=torch.device("cpu"))
    assert steps(first) == 4 and not ckpt.exists()
    other = [{**e, "report": TEXTS[0]} for e in examples(8)]
    ckpt.mkdir()  # what a run on the old reports left: its final checkpoint, at max_steps
    (ckpt / vlm.RESUME_STAMP).write_text(vlm.resume_key(base, cfg, vlm.TrainingPairs.from_examples(examples(8))))
    (ckpt / "checkpoint-4").mkdir()
    again = vlm.train_adapter(base, other, cfg, adapter, ckpt, device=torch.device("cpu"))
    assert again["resumed_from"] is None and steps(again) == 4
    key = vlm.resume_key(base, cfg, vlm.TrainingPairs.from_examples(other))
    assert key == vlm.resume_key(base, cfg, vlm.TrainingPairs.from_examples(other))
    assert key != vlm.resume_key(base, vlm.AdapterConfig(max_steps=5), vlm.TrainingPairs.from_examples(other))
