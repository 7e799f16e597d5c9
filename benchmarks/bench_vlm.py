"""QLoRA step throughput / peak memory and batched generation for the report model.

Builds the tiny offline Mllama (the embedded default) and measures, on the
machine's device: tokens/s of QLoRA training steps (4-bit NF4 base, LoRA r=20,
gradient checkpointing, bf16, batch ``--batch``) with peak memory, and reports/s
of batched greedy generation. The baseline printed beside the QLoRA figure is
the same step without quantisation (bf16 base + LoRA), so the ratio shows what
4-bit costs in speed on this device.

``--real-shape``: the real Llama-3.2-11B-Vision. Its weight memory under this
project's 4-bit recipe is counted parameter by parameter from the published
configuration on the meta device (nothing allocated): 4-bit NF4 with double
quantisation for the language model's linear layers; the vision tower, the
projector, ``lm_head``, embeddings and norms in bf16 when loaded, and in fp32
during training (``peft.prepare_model_for_kbit_training`` upcasts them). A
training step adds the LoRA weights, their gradients and 8-bit AdamW states,
and the activations of one example (4 tiles, gradient checkpointing), counted
from the shapes with every attention matrix materialised (an upper bound:
SDPA kernels keep none), times the batch. Then a reduced-depth real-shape
base (``reports/llama_shape.py``) is built and a QLoRA step measured on this
device (tokens/s, peak memory).

    python benchmarks/bench_vlm.py [--steps 10] [--batch 4] [--gen 32]
    python benchmarks/bench_vlm.py --real-shape [--text-tokens 256]
    python benchmarks/bench_vlm.py --learning [--recipe learning] [--seeds 3]

``--learning``: does the report model use the image? Run with the product's recipe and code. The
recipe is a ``pipeline.yaml`` (``benchmarks/recipes/learning.yaml``: copied to a CXR_HOME's ``pipeline.yaml``,
the pipeline trains the same adapter), resolved by ``cxr_pipeline.config`` exactly as a run resolves it.
Two replicas (600 patients each, every frontal image), each in its own CXR_HOME under the work folder: the
choice replica (``--choice-replica-seed``, 0) and a fresh test replica (``--replica-seed``, 2; 1 before #48) that no
candidate was chosen on. For each, the manifest, the shards at the report model's size and the report pairs
are computed with the calls the assets make, and the tiny base of the recipe's width and
pretraining, language and vision (``reports.vlm.ensure_base``) on that replica's training reports. References: the replica's
CheXpert labels (the planted findings with 2% of labels flipped, as a labeller errs).

1. **Choice, on the choice replica's validate split only.** Each candidate in
   ``recipes/candidates/learning.yaml`` (the recipes tried so far, each a ``report_adapter`` overlay on
   learning.yaml) trains with images (the first seed, the recipe's ``max_steps``) and writes the validate
   split's reports (the first ``max_test_pairs`` by dicom_id), scored by CE micro-F1.
   ``reports.learning_check.choose_candidate`` picks the best; its scores go to ``<work>/learning-validate.json``
   (committed as ``recipes/candidates/learning-validate.json``, which a test re-runs the choice on), and the
   benchmark says whether learning.yaml holds the winner.
2. **Test, on the fresh replica, once per arm and seed.** The chosen recipe trains with images and with every
   image blanked (training and test), ``--seeds`` seeds each (the same seeds, the same ``max_steps`` optimizer
   steps), and writes the test split's reports.
3. **The image-blind bars**, each chosen on the fresh replica's validate split and scored on its test split:
   shuffled references (each seed's with-images reports scored against references permuted across patients,
   ``reports.baselines.shuffled_references``: the model's outputs kept, their link to the image broken); the
   best constant report (the training report with the highest validate CE micro-F1, written for every test
   study); the optimal constant report (the template's report of the findings validate prevalence favours,
   ``reports.baselines.optimal_constant_report``); and the template baseline. Seed-averaged CE micro-F1 with
   95% intervals from a two-stage bootstrap (seeds with replacement, then test patients;
   ``reports.metrics.seed_mean_intervals``), paired across arms; each seed's difference is printed too.

Finished runs (adapter steps and reports) are kept in each replica's ``runs.json``, keyed by the recipe, the
arm, the data's digest, the patients, the replica seed and the code version: a killed benchmark resumes, and a
changed replica or package retrains. A second process with ``--reverse`` (the same arguments, on another core)
takes the runs from the other end: replicas, bases and adapters are locked (``flock``), so each is built once and
the processes share the work; either prints the same figures. ``--time-limit`` is a safety stop only. Exits 1 when the test arms trained
unequal steps (or other than the recipe's ``max_steps``) or when learning.yaml does not hold the validate
winner. Last line: ``learning: with images F [lo-hi], images blanked F, shuffled references F, best constant F,
optimal constant F, images vs best constant D [lo-hi], images vs blanked D [lo-hi], seeds N, steps S, test
replica seed R``.

Last line: ``qlora: X tokens/s, peak Y GB; generate: Z reports/s; device: NAME``, or with
``--real-shape``: ``qlora 11B estimate: weights <GB> GB, step bs1 <GB> GB, bs8 <GB> GB;
reduced-depth measured: <tok/s> tokens/s, peak <GB> GB; device: <name>``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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

    from cxr_pipeline.reports.prompts import MllamaCollator, user_prompt
    from cxr_pipeline.reports.vlm import load_base, lora_target

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


GB = 1024**3
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmax blocks


def weights_11b() -> dict:
    """Bytes of the published 11B under the 4-bit recipe, from its modules on the meta device."""
    import re

    import torch
    from transformers import MllamaForConditionalGeneration

    from cxr_pipeline.reports.llama_shape import mllama_config
    from cxr_pipeline.reports.vlm import UNQUANTISED_MODULES, AdapterConfig, lora_target

    with torch.device("meta"):
        model = MllamaForConditionalGeneration(mllama_config())
    out = {"params": 0, "nf4": 0.0, "other_bf16": 0.0, "other_fp32": 0.0, "lora_params": 0}
    target, r = re.compile(lora_target("language")), AdapterConfig().r
    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if not own:
            continue
        n = sum(p.numel() for p in own)
        out["params"] += n
        if isinstance(mod, torch.nn.Linear) and not name.startswith(UNQUANTISED_MODULES):
            w = mod.weight.numel()
            out["nf4"] += w * NF4_BYTES_PER_PARAM
            out["other_bf16"] += (n - w) * 2  # a bias stays bf16
            out["other_fp32"] += (n - w) * 4
            if target.fullmatch(name):
                out["lora_params"] += r * (mod.in_features + mod.out_features)
        else:
            out["other_bf16"] += n * 2
            out["other_fp32"] += n * 4
    cfg = model.config
    out["config"] = cfg
    return out


def activations_per_example(cfg, text_tokens: int) -> float:
    """Bytes one example's training step holds at its peak with gradient checkpointing (fp32 hidden states,
    as the upcast embeddings produce them), every attention matrix materialised."""
    v, t = cfg.vision_config, cfg.text_config
    tiles, patches = v.max_num_tiles, (v.image_size // v.patch_size) ** 2 + 1
    vision_tokens = tiles * patches
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    L, f = text_tokens, 4
    checkpoints = t.num_hidden_layers * L * h * f  # each layer's input, kept for the recompute
    cross_states = vision_tokens * h * f  # projected vision features, shared by the cross-attention layers
    self_layer = L * (3 * h + 2 * kv + 3 * t.intermediate_size) * f + t.num_attention_heads * L * L * f
    cross_layer = vision_tokens * 2 * kv * f + t.num_attention_heads * L * vision_tokens * f + L * 3 * t.intermediate_size * f
    logits = 2 * L * (t.vocab_size + 8) * f  # logits and their gradient, fp32
    # the frozen vision tower runs without saving activations; its largest transient is one layer's attention
    vision = vision_tokens * (v.intermediate_size + 4 * v.hidden_size) * f + v.attention_heads * tiles * patches * patches * f
    return checkpoints + cross_states + max(self_layer, cross_layer, vision) + logits


def real_shape(args, device, name: str) -> None:
    from cxr_pipeline.reports.llama_shape import build_real_shape_base

    w = weights_11b()
    train_weights = w["nf4"] + w["other_fp32"]
    lora = w["lora_params"] * (4 + 4 + 2)  # fp32 weights and gradients, 8-bit AdamW's two states
    act = activations_per_example(w["config"], args.text_tokens)
    overhead = 1.0 * GB  # CUDA context, cuBLAS workspace, allocator slack
    step = {b: (train_weights + lora + b * act + overhead) / GB for b in (1, 8)}
    print(f"Llama-3.2-11B-Vision (published config, meta device): {w['params'] / 1e9:.2f} B parameters")
    print(f"  4-bit language linears {w['nf4'] / GB:.2f} GB; the rest bf16 {w['other_bf16'] / GB:.2f} GB (generation)")
    print(
        f"  weights when loaded for generation {(w['nf4'] + w['other_bf16']) / GB:.2f} GB; in training (fp32 upcast) {train_weights / GB:.2f} GB"
    )
    print(
        f"  LoRA r=20 on the language model: {w['lora_params'] / 1e6:.1f} M parameters, {lora / GB:.2f} GB with gradients and 8-bit AdamW"
    )
    print(f"  activations per example (4 tiles, {args.text_tokens} text tokens, checkpointing, upper bound): {act / GB:.2f} GB")
    with tempfile.TemporaryDirectory() as d:
        base = build_real_shape_base(Path(d) / "base", TEXTS * 50, vision_layers=2, text_layers=3)
        tps = step_rate(base, True, 1, args.steps, device)
        peak = peak_gb(device)
    print(
        f"reduced depth (2+1 vision, 3 text layers at width 1024, 4 tiles of 560 px): QLoRA batch 1 {tps:.0f} tokens/s, peak {peak:.2f} GB"
    )
    print(
        f"qlora 11B estimate: weights {train_weights / GB:.1f} GB, step bs1 {step[1]:.1f} GB, bs8 {step[8]:.1f} GB; "
        f"reduced-depth measured: {tps:.0f} tokens/s, peak {peak:.2f} GB; device: {name}"
    )


RECIPES = Path(__file__).resolve().parent / "recipes"
CHOICE_SCORES = RECIPES / "candidates" / "learning-validate.json"  # the last choice's validate scores, committed


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path`` (created): several benchmark processes on one machine (``--reverse``, one
    per core) share a work folder, and each replica, base and adapter is built by one of them while the others wait."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _code_version() -> str:
    """A digest of the package's source: a kept run is reused only by the code that made it."""
    import cxr_pipeline

    root = Path(cxr_pipeline.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _recipe_state(recipe: Path, home: Path):
    """``home`` as a CXR_HOME whose ``pipeline.yaml`` is the recipe: what the pipeline would resolve, resolved."""
    from cxr_pipeline.settings import Paths

    p = Paths(home=home, raw=home / "raw")
    home.mkdir(parents=True, exist_ok=True)
    p.pipeline_config.write_text(recipe.read_text())
    return p


def _learning_data(recipe: Path, work: Path, patients: int, replica_seed: int, workers: int):
    """One replica (``patients``, drawn with ``replica_seed``) in its own CXR_HOME under ``work``, then what the
    manifest, image_shards and report_pairs assets compute from it under the recipe, with the same domain calls;
    only the report model's shard size is built. A home whose replica was drawn otherwise is wiped and redrawn
    (its marker holds the replica's settings), never reused. Returns (paths, pairs with labels, data digest):
    the digest covers the pairs (ids, splits, texts, labels) and the shard files the reports are read from."""
    from dataclasses import asdict

    from cxr_pipeline.config import resolve
    from cxr_pipeline.data.mimic import build_manifest
    from cxr_pipeline.data.shard_reader import PARTITIONS
    from cxr_pipeline.data.shards import build_partition, partition_column
    from cxr_pipeline.data.synthetic import SynthConfig, generate
    from cxr_pipeline.labels import SLUGS
    from cxr_pipeline.reports.pairs import build_pairs

    home = work / f"replica-seed{replica_seed}-{patients}p"
    synth = SynthConfig(
        patients=patients,
        seed=replica_seed,
        source_rows=128,
        jpeg2000_fraction=0.0,
        workers=workers,
        validate_fraction=0.1,
        test_fraction=0.15,
    )
    marker = home / "replica.json"
    want = json.dumps({k: v for k, v in asdict(synth).items() if k != "workers"}, sort_keys=True)
    with _locked(work / f"{home.name}.lock"):
        if home.exists() and (not marker.exists() or marker.read_text() != want):
            print(f"{home}: drawn with other settings or unfinished: redrawn", file=sys.stderr, flush=True)
            shutil.rmtree(home)
        p = _recipe_state(recipe, home)
        if not marker.exists():
            print(f"generating a {patients}-patient replica (seed {replica_seed}) in {p.raw} (once) ...", file=sys.stderr, flush=True)
            generate(synth, p.raw)
            marker.write_text(want)
        manifest = build_manifest(p.raw, resolve(p, "manifest")).manifest
        size, shards = resolve(p, "report_adapter").size, resolve(p, "image_shards")
        for part in PARTITIONS:
            items = manifest.filter(partition_column() == part)
            if items.height:
                build_partition(p.raw, p.shard_partition(size, part), items, shards.spec(size))
    pairs = build_pairs(manifest, resolve(p, "report_pairs")).join(manifest.select("dicom_id", *SLUGS), on="dicom_id", how="left")
    h = hashlib.sha256(pairs.select("dicom_id", "subject_id", "split", "text", *SLUGS).sort("dicom_id").write_csv().encode())
    for f in sorted(q for q in p.shard_root(size).rglob("*") if q.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return p, pairs, h.hexdigest()[:16]


class _Blank:
    """Every image black: what the model sees when the image path is cut."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return np.zeros_like(np.asarray(self.images[i]))


def _split_reports(pairs, split: str, cap: int | None, shards):
    """A split's pairs (the first ``cap`` by dicom_id, as generated_reports takes them), their images, the
    replica's CheXpert labels as reference labels (the planted findings, 2% of them flipped as a labeller errs)
    and each report's patient."""
    import polars as pl

    from cxr_pipeline.data.shard_reader import load_images
    from cxr_pipeline.labels import LABEL_BY_SLUG, SLUGS

    rows = pairs.filter(pl.col("split") == split).sort("dicom_id")
    rows = rows.head(cap) if cap is not None else rows
    images, rows = load_images(shards, rows)
    refs = [{LABEL_BY_SLUG[s]: r[s] for s in SLUGS} for r in rows.select(SLUGS).iter_rows(named=True)]
    return [im.numpy() for im in images], refs, rows["subject_id"].to_list()


class _Runs:
    """Each adapter the benchmark trains, with the reports it wrote, kept in ``runs.json`` in its replica's home
    so that a killed benchmark resumes where it stopped. A run is keyed by its resolved recipe, arm and split,
    the data's digest, the replica's patients and seed, and the code version: a run is reused only for the
    data and the code that made it."""

    def __init__(self, p, examples, device, time_limit: float, data: dict, base_digest: str) -> None:
        self.p, self.examples, self.device, self.time_limit, self.data = p, examples, device, time_limit, data
        self.base_digest = base_digest  # the training rows' (tiny_base.training_digest): which tiny base
        self.file = p.home / "runs.json"

    @property
    def done(self) -> dict:
        """The finished runs, read afresh: another process sharing the folder may have added some."""
        return json.loads(self.file.read_text()) if self.file.exists() else {}

    def _record(self, key: str, entry: dict) -> None:
        from cxr_pipeline.files import atomic_path

        with _locked(self.file.with_suffix(".lock")):  # read-merge-write: no process loses another's runs
            done = self.done
            done[key] = entry
            with atomic_path(self.file) as tmp:  # the project's atomic write: a kill never leaves half a runs.json
                tmp.write_text(json.dumps(done))

    def reports(self, cfg, blank: bool, split: str, images: list, log) -> tuple[list[str], int]:
        from cxr_pipeline.fields import record

        key = json.dumps(
            {"recipe": record(cfg), "blank": blank, "split": split, "n": len(images), **self.data}, sort_keys=True, default=str
        )
        train_key = json.dumps({"recipe": record(cfg), "blank": blank, **self.data}, sort_keys=True, default=str)
        adapter = self.p.reports / "runs" / hashlib.sha256(train_key.encode()).hexdigest()[:12]
        if key not in self.done:
            with _locked(adapter.with_name(adapter.name + ".lock")):  # one process trains it; another waits, then reads it
                if key not in self.done:
                    self._record(key, self._run(cfg, blank, images, adapter, log))
        entry = self.done[key]
        return entry["reports"], entry["steps"]

    def _run(self, cfg, blank: bool, images: list, adapter: Path, log) -> dict:
        from cxr_pipeline.config import resolve
        from cxr_pipeline.reports.prompts import TrainingPairs
        from cxr_pipeline.reports.vlm import ensure_base, generate_reports, report_token_budget, train_adapter

        ex = self.examples
        tiny = self.p.tiny_base_dir(cfg.tiny_width, cfg.tiny_pretrain_steps, cfg.tiny_vision_pretrain_steps, cfg.tiny_instruct_steps)
        with _locked(tiny.with_name(tiny.name + ".lock")):
            base = ensure_base(cfg, tiny, ex.reports, self.base_digest, log=log, images=ex.images)
        gen = resolve(self.p, "generated_reports", derived={"max_new_tokens": lambda: report_token_budget(base, ex.reports)})
        # one adapter per recipe and arm scores both splits; a half-trained one is retrained from scratch, never resumed
        t0 = time.perf_counter()
        steps_file = adapter / "steps.txt"
        if not steps_file.exists():
            ckpt = adapter.with_name(adapter.name + ".ckpt")
            for stale in (adapter, ckpt):
                shutil.rmtree(stale, ignore_errors=True)
            arm = TrainingPairs(_Blank(ex.images) if blank else ex.images, ex.prompts, ex.reports)
            res = train_adapter(base, arm, cfg, adapter, ckpt, device=self.device, time_budget_s=self.time_limit)
            steps_file.write_text(str(sum(1 for h in res["log_history"] if "loss" in h)))  # one log line per optimizer step
            shutil.rmtree(ckpt, ignore_errors=True)
        steps = int(steps_file.read_text())
        ims = [np.zeros_like(im) for im in images] if blank else images
        hyps = generate_reports(
            base,
            adapter,
            ims,
            [ex.prompts[0]] * len(ims),  # the recipe's instruction-only prompt
            max_new_tokens=gen.max_new_tokens,
            num_beams=gen.num_beams,
            batch_size=gen.batch_size,
            device=self.device,
        )
        return {"reports": hyps, "steps": steps, "seconds": round(time.perf_counter() - t0)}


def _replica_runs(args, recipe: Path, work: Path, replica_seed: int, device, code: str):
    """A replica's data, its training examples under the recipe, its validate and test reports, and its runs."""
    from cxr_pipeline.config import resolve
    from cxr_pipeline.data.shard_reader import Shards
    from cxr_pipeline.reports.tiny_base import training_digest
    from cxr_pipeline.reports.vlm import adapter_training_set

    p, pairs, digest = _learning_data(recipe, work, args.patients, replica_seed, os.cpu_count() or 1)
    shipped = resolve(p, "report_adapter")
    shards = Shards.open(p.shard_root(shipped.size), shipped.size)
    examples, rows, variant = adapter_training_set(pairs, shards, shipped)  # the recipe's prompt: no hints
    cap = resolve(p, "generated_reports", derived={"max_new_tokens": lambda: 1}).max_test_pairs
    val = _split_reports(pairs, "validate", cap, shards)
    test = _split_reports(pairs, "test", cap, shards)
    data = {"data": digest, "patients": args.patients, "replica_seed": replica_seed, "code": code}
    print(
        f"replica seed {replica_seed} ({args.patients} patients, data {digest}): {len(examples.reports)} training pairs ({variant}), "
        f"{len(val[0])} validate and {len(test[0])} test reports ({len(set(val[2]))} and {len(set(test[2]))} patients)",
        flush=True,
    )
    return p, shipped, examples, val, test, _Runs(p, examples, device, args.time_limit, data, training_digest(rows))


def _order(items: list, reverse: bool) -> list:
    return items[::-1] if reverse else items


def learning(args, device, name: str) -> int:
    """The learning check (module docstring). Returns the exit status: 1 when the arms trained unequal steps
    or when the recipe file does not hold the candidate chosen on validate, else 0."""
    import yaml

    from cxr_pipeline.config import resolve
    from cxr_pipeline.files import atomic_path
    from cxr_pipeline.reports.baselines import best_constant_report, optimal_constant_report, shuffled_references, template_report
    from cxr_pipeline.reports.learning_check import choose_candidate, recipe_holds
    from cxr_pipeline.reports.metrics import clinical_efficacy, seed_mean_intervals
    from cxr_pipeline.settings import paths

    if args.replica_seed == args.choice_replica_seed:
        raise SystemExit(f"--replica-seed {args.replica_seed}: the test replica must be drawn with another seed than the choice's")
    recipe = Path(args.recipe) if args.recipe.endswith(".yaml") else RECIPES / f"{args.recipe}.yaml"
    candidates = yaml.safe_load(Path(args.candidates).read_text())["candidates"]
    seeds = list(range(args.seeds))
    work = Path(args.work or paths().bench("vlm-learning"))
    code = _code_version()
    t_start = time.perf_counter()
    print(f"code {code}; seeds {seeds}; references: the replica's CheXpert labels (planted findings, 2% flipped)", flush=True)

    # 1. choose the recipe on the validate split of the choice replica (with images, the first seed)
    p0, shipped, _ex0, val0, _test0, runs0 = _replica_runs(args, recipe, work, args.choice_replica_seed, device, code)
    print(f"choice on validate of replica seed {args.choice_replica_seed} ({Path(args.candidates).name}, seed {seeds[0]}):", flush=True)
    scores, cand_steps = {}, {}
    for cname in _order(list(candidates), args.reverse):  # a --reverse helper trains from the other end
        cfg = resolve(p0, "report_adapter", explicit={**candidates[cname], "seed": seeds[0]})
        runs0.reports(cfg, False, "validate", val0[0], log=print)
    for cname, overlay in candidates.items():
        cfg = resolve(p0, "report_adapter", explicit={**overlay, "seed": seeds[0]})
        hyps, cand_steps[cname] = runs0.reports(cfg, False, "validate", val0[0], log=print)
        ce, _ = clinical_efficacy([""] * len(hyps), hyps, val0[1])
        scores[cname] = ce["ce_micro14_f1"]
        print(
            f"  {cname:24} validate CE micro-F1 {ce['ce_micro14_f1']:.3f}, macro-F1 {ce['ce_macro14_f1']:.3f}, {cand_steps[cname]} steps",
            flush=True,
        )
    winner = choose_candidate(scores)
    drift = recipe_holds(shipped, candidates[winner])
    record = {
        "replica_seed": args.choice_replica_seed,
        "patients": args.patients,
        "code": code,
        "seed": seeds[0],
        "validate_ce_micro14_f1": scores,
    }
    with atomic_path(work / "learning-validate.json") as tmp:  # benchmarks/recipes/candidates/learning-validate.json is a copy
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"chosen on validate: {winner} ({scores[winner]:.3f}); {recipe.name} "
        + ("holds it" if not drift else f"does NOT hold it ({'; '.join(drift)}): set {candidates[winner]} in {recipe}"),
        flush=True,
    )

    # 2. the chosen recipe on the test split of a replica drawn with a new seed, once per arm and seed
    p, shipped1, examples, val, test, runs = _replica_runs(args, recipe, work, args.replica_seed, device, code)
    arms: dict[str, list[list[str]]] = {"with images": [], "images blanked": []}
    steps_by_arm: dict[str, list[int]] = {"with images": [], "images blanked": []}
    for seed, blank in _order([(s, b) for s in seeds for b in (False, True)], args.reverse):  # train (shared with a helper)
        runs.reports(resolve(p, "report_adapter", explicit={**candidates[winner], "seed": seed}), blank, "test", test[0], log=print)
    for seed in seeds:
        cfg = resolve(p, "report_adapter", explicit={**candidates[winner], "seed": seed})
        for arm, blank in (("with images", False), ("images blanked", True)):
            hyps, steps = runs.reports(cfg, blank, "test", test[0], log=print)
            steps_by_arm[arm].append(steps)
            arms[arm].append(hyps)
            ce, _ = clinical_efficacy([""] * len(hyps), hyps, test[1])
            print(
                f"  seed {seed} {arm:15} test CE micro-F1 {ce['ce_micro14_f1']:.3f}, macro-F1 {ce['ce_macro14_f1']:.3f}, "
                f"{steps} steps, {len(set(hyps))} distinct reports; e.g. {hyps[0][:90]!r}",
                flush=True,
            )
    # 3. the image-blind bars, chosen on the test replica's validate split and scored on its test split
    shuffled = [shuffled_references(test[1], test[2], seed=s) for s in seeds]
    arms["shuffled references"] = arms["with images"]
    constant, f_best_val = best_constant_report(examples.reports, val[1])
    optimal, f_opt_val = optimal_constant_report(val[1])
    arms["best constant"] = [[constant] * len(test[1])]
    arms["optimal constant"] = [[optimal] * len(test[1])]
    stats, diffs = seed_mean_intervals(test[1], arms, test[2], n_boot=args.n_boot, arm_references={"shuffled references": shuffled})
    template, _ = clinical_efficacy([""] * len(test[1]), [template_report({})] * len(test[1]), test[1])
    print(f"best constant report (among the training reports; validate CE micro-F1 {f_best_val:.3f}): {constant[:120]!r}")
    print(f"optimal constant report (the findings validate prevalence favours; validate {f_opt_val:.3f}): {optimal[:120]!r}")
    for arm, (f, lo, hi) in stats.items():
        print(f"  {arm:19} test CE micro-F1 {f:.3f} [{lo:.3f}-{hi:.3f}] (mean over {len(arms[arm])} run(s))")
    refs_of = {"shuffled references": shuffled}  # the control's references; every other arm's are the test labels

    def seed_f1(arm: str, i: int) -> float:  # one run's CE micro-F1, seed i (a constant arm has one run)
        j = i if len(arms[arm]) > 1 else 0
        return clinical_efficacy([""] * len(test[1]), arms[arm][j], refs_of[arm][i] if arm in refs_of else test[1])[0]["ce_micro14_f1"]

    with_images = [seed_f1("with images", i) for i in range(len(seeds))]
    for (a, b), (d, lo, hi) in diffs.items():
        if a == "with images":
            each = [with_images[i] - seed_f1(b, i) for i in range(len(seeds))]
            print(f"  {a} - {b}: {d:+.3f} [{lo:+.3f}-{hi:+.3f}]; by seed {', '.join(f'{x:+.3f}' for x in each)}")
    print(
        f"intervals: 95%, two-stage bootstrap ({args.n_boot} resamples: the {len(seeds)} seeds with replacement, then the "
        f"{len(set(test[2]))} test patients), paired across arms"
    )
    print(f"template baseline (no classifier): test CE micro-F1 {template['ce_micro14_f1']:.3f}")
    print(f"whole benchmark {time.perf_counter() - t_start:.0f} s on {name} (finished runs are reused from {runs0.file} and {runs.file})")
    all_steps = steps_by_arm["with images"] + steps_by_arm["images blanked"]
    (f_img, lo_img, hi_img) = stats["with images"]
    dc, dclo, dchi = diffs[("with images", "best constant")]
    db, dblo, dbhi = diffs[("with images", "images blanked")]
    steps_txt = "/".join(str(s) for s in sorted(set(all_steps)))
    print(
        f"learning: with images {f_img:.3f} [{lo_img:.3f}-{hi_img:.3f}], images blanked {stats['images blanked'][0]:.3f}, "
        f"shuffled references {stats['shuffled references'][0]:.3f}, best constant {stats['best constant'][0]:.3f}, "
        f"optimal constant {stats['optimal constant'][0]:.3f}, images vs best constant {dc:+.3f} [{dclo:+.3f}-{dchi:+.3f}], "
        f"images vs blanked {db:+.3f} [{dblo:+.3f}-{dbhi:+.3f}], seeds {len(seeds)}, steps {steps_txt}, test replica seed {args.replica_seed}"
    )
    status = 0
    if len(set(all_steps)) != 1 or all_steps[0] != shipped1.max_steps:
        print(f"FAILED: the arms trained unequal steps {steps_by_arm} (the recipe asks {shipped1.max_steps})", file=sys.stderr)
        status = 1
    if drift:
        print(f"FAILED: {recipe} does not hold the candidate chosen on validate ({winner})", file=sys.stderr)
        status = 1
    return status


def main() -> int:
    import torch

    from cxr_pipeline.reports.prompts import user_prompt
    from cxr_pipeline.reports.tiny_base import build_tiny_base
    from cxr_pipeline.reports.vlm import generate_reports

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--gen", type=int, default=32, help="reports to generate")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--real-shape", action="store_true", help="the 11B's memory, and a reduced-depth real-shape step")
    ap.add_argument("--text-tokens", type=int, default=256, help="prompt + report tokens per example (--real-shape)")
    ap.add_argument("--learning", action="store_true", help="with images against images blanked, same recipe and steps")
    ap.add_argument("--recipe", default="learning", help="a pipeline.yaml recipe: a name under benchmarks/recipes/ or a path (--learning)")
    ap.add_argument("--time-limit", type=float, default=1800, help="safety limit in seconds per adapter (--learning)")
    ap.add_argument(
        "--candidates", default=str(RECIPES / "candidates" / "learning.yaml"), help="recipes chosen among on validate (--learning)"
    )
    ap.add_argument("--patients", type=int, default=600, help="replica patients (--learning; a quick trial: fewer)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm on test (--learning)")
    ap.add_argument("--choice-replica-seed", type=int, default=0, help="the replica the candidates are chosen on (--learning)")
    ap.add_argument(
        "--replica-seed", type=int, default=2, help="the fresh replica the chosen recipe is tested on (--learning; 1 was 2026-12-03's)"
    )
    ap.add_argument(
        "--reverse",
        action="store_true",
        help="take the runs from the other end: a second process on another core shares the work (--learning)",
    )
    ap.add_argument("--n-boot", type=int, default=1000, help="patient resamples for the intervals (--learning)")
    ap.add_argument("--work", default="", help="state folder (--learning; default $CXR_HOME/bench/vlm-learning)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    if args.real_shape:
        real_shape(args, device, name)
        return 0
    if args.learning:
        return learning(args, device, name)
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
