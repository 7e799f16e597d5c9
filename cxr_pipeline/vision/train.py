"""Training one binary classifier: a loop a reader can hold in their head.

Images arrive as one ``uint8`` tensor (n, size, size) from the shard reader.
Each batch is moved to the device, normalised (mean/std 0.5), augmented there
(training split only: per-image rotation and horizontal flip), expanded to
three channels and run in mixed precision. AdamW with a cosine schedule after a
linear warm-up; gradient accumulation (32 x 4 = 128 by default); class
imbalance by ``pos_weight`` or a balanced sampler. Early stopping on the
validation loss restores the best weights. A checkpoint after every epoch lets
a killed run resume where it stopped.

The same loop trains the multi-label model: targets (n, k) with NaN where a label
is unusable under the policy; the loss is masked there (those labels do not count),
``pos_weight`` is per label, validation AUC is the mean over labels.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cxr_pipeline.fields import at_least_one, setting
from cxr_pipeline.files import atomic_path
from cxr_pipeline.vision.evaluate import roc_auc_or_nan
from cxr_pipeline.vision.images import as_images, batches, default_workers, sequential
from cxr_pipeline.vision.models import build_model

# Grey uint8 -> [-1, 1]: ((x / 255) - MEAN) / STD. The saved checkpoint's config records them.
NORMALISE_MEAN = 0.5
NORMALISE_STD = 0.5
RESUME_FILE = "resume.pt"  # in the classifier folder (vision.checkpoint.ClassifierFiles.resume)
NOT_TRAINED = ("bootstrap", "eval_batch_size", "data", "memory_budget", "loader_workers")


@dataclass(frozen=True)
class TrainConfig:
    """A classifier's recipe and label policy (``pipeline.yaml``'s ``classifier`` section). Defaults follow
    the 2024 seeds: ResNet-18, AdamW 1e-4 / 0.01, batch 32 x 4, patience 5."""

    arch: str = setting("resnet18", "torchvision backbone: resnet18, resnet50, densenet121, vgg16")
    dropout: float = setting(0.2, "dropout before the logit head")
    weights: str | None = setting(None, "local backbone weights (.safetensors / .pt)", null="random initialisation")
    size: int = setting(224, "shard size (px) the classifier reads (the image shards are built at every size a consumer reads)")
    epochs: int = setting(20, "maximum epochs (early stopping on validation loss may end sooner)")
    batch_size: int = setting(32, "images per micro-batch")
    accumulation: int = setting(4, "micro-batches per optimizer step")
    lr: float = setting(1e-4, "AdamW learning rate")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    warmup_fraction: float = setting(0.05, "share of all optimizer steps spent in linear warm-up")
    patience: int = setting(5, "epochs without a better validation loss before stopping")
    imbalance: str = setting("pos_weight", "class imbalance: pos_weight, sampler (balanced) or none")
    rotation: float = setting(10.0, "random rotation in degrees (training split only)")
    hflip: bool = setting(True, "random horizontal flip (training split only)")
    seed: int = setting(0, "random seed of initialisation, sampling and augmentation")
    precision: str = setting("auto", "auto (bf16 where supported), bf16, fp16 or fp32; evaluation always runs in fp32")
    channels_last: bool = setting(True, "channels-last memory format")
    eval_batch_size: int = setting(128, "images per evaluation batch")
    steps_per_epoch: int | None = setting(None, "optimizer steps per epoch (smoke runs, the rehearsal)", null="the whole training split")
    uncertain: str = setting("ignore", "uncertain (-1) labels: ignore (left out), zeros (U-Zeros) or ones (U-Ones)")
    blank: str = setting("zeros", "blank (not mentioned) labels: zeros (negative) or ignore (left out)")
    bootstrap: int = setting(1000, "bootstrap resamples (by patient) for the test metrics' 95% intervals")
    data: str | None = setting(
        None,
        "where the images are while training and predicting: resident (the splits in one tensor on the device) "
        "or streamed (read from the memory-mapped shards batch by batch)",
        null="chosen per run: resident when the splits fit memory_budget, else streamed",
    )
    memory_budget: float = setting(0.5, "share of the free memory (the GPU's on CUDA, else the host's) resident images may take")
    loader_workers: int | None = setting(
        None,
        "processes reading streamed batches ahead (0: the training process)",
        auto="on a GPU half the cores, at most 8; on the CPU 0 (training uses every core)",
    )

    def __post_init__(self) -> None:
        if self.imbalance not in ("pos_weight", "sampler", "none"):
            raise ValueError(f"imbalance must be pos_weight, sampler or none, not {self.imbalance!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, not {self.precision!r}")
        at_least_one(self, "steps_per_epoch", "size")
        if self.data not in (None, "resident", "streamed"):
            raise ValueError(f"data must be resident, streamed or null (chosen per run), not {self.data!r}")
        if not 0 < self.memory_budget <= 1:
            raise ValueError(f"memory_budget must be a share of free memory in (0, 1], not {self.memory_budget}")

    def fingerprint(self) -> str:
        import hashlib

        # what the trained weights depend on (a resumed run must match it): evaluation-only fields and where
        # the images are read from (both modes train the same model) are left out
        trained = {k: v for k, v in asdict(self).items() if k not in NOT_TRAINED}
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    model: object
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0


def resolve_precision(precision: str, device) -> str:
    """``auto``: bf16 on a GPU that has it (else fp16); on a CPU, bf16 only where oneDNN runs it natively
    (AVX-512 or newer: ``torch.ops.mkldnn._is_mkldnn_bf16_supported``), fp32 elsewhere. On an AVX-512 machine
    bf16 trained ResNet-18 about twice as fast as fp32 (26 vs 13 img/s at 224 px, 2026-11); on an AVX2-only
    CPU (this project's 2026-12-03 machine, an AMD EPYC) bf16 is emulated and fell to a twentieth of fp32
    (``benchmarks/bench_training.py --precision`` measures both arms on the machine at hand)."""
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(device, precision: str):
    """Mixed precision for a resolved ``precision`` on ``device`` (a no-op for fp32): training and the benchmarks."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_input(x_uint8, device, channels_last: bool = True):
    """uint8 (b, s, s) -> normalised float (b, 3, s, s) on ``device``."""
    import torch

    x = x_uint8.to(device, non_blocking=True).float().unsqueeze(1)
    x = x.div_(255.0 * NORMALISE_STD).sub_(NORMALISE_MEAN / NORMALISE_STD)  # same as (x/255 - mean) / std
    x = x.expand(-1, 3, -1, -1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def augment(x, rotation: float, hflip: bool, gen):
    """Per-image random flip and rotation on the device (x: normalised, (b, c, s, s))."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if rotation:
        ang = ((torch.rand(b, generator=gen) * 2 - 1) * math.radians(rotation)).to(x.device)
        cos, sin = torch.cos(ang), torch.sin(ang)
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # pad with black (-1 after normalisation), as the letterbox does
        x = F.grid_sample(x + 1.0, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    return x


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def predict(
    model, images, device, batch_size: int = 128, precision: str = "fp32", channels_last: bool = True, workers: int = 0
) -> np.ndarray:
    """Probabilities (n,) (or (n, k)) for uint8 images (n, s, s): a tensor, or resident or streamed
    ``vision.images``; computed on ``device`` (the model is moved there)."""
    import torch

    images = as_images(images)
    model.to(device).eval()
    probs = []
    with torch.no_grad(), autocast(device, precision):
        for xb in batches(images, sequential(len(images), batch_size), device, workers):
            x = to_input(xb, device, channels_last)
            probs.append(torch.sigmoid(model(x).float().squeeze(1)).cpu())
    return torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float32)


def masked_bce(logits, y, pos_weight=None):
    """Mean binary cross-entropy; with several labels, over the known (non-NaN) targets only."""
    import torch
    import torch.nn.functional as F

    if y.dim() == 1:
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
    known = ~torch.isnan(y)
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y), pos_weight=pos_weight, reduction="none")
    return (loss * known).sum() / known.sum().clamp(min=1)


def pos_weights(y):
    """Negatives / positives per label over the known targets (None for a label without positives)."""
    import torch

    if y.dim() == 1:
        n_pos = float(y.sum())
        return torch.tensor([(len(y) - n_pos) / n_pos]) if n_pos > 0 else None
    known = ~torch.isnan(y)
    pos = torch.nan_to_num(y).sum(0)
    neg = known.sum(0) - pos
    return torch.where(pos > 0, neg / pos.clamp(min=1), torch.ones_like(pos))


def mean_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC-AUC, or with several labels the mean over labels that have both classes among known targets."""

    if y.ndim == 1:
        return roc_auc_or_nan(y, p)
    aucs = [roc_auc_or_nan(y[k, j], p[k, j]) for j in range(y.shape[1]) if (k := ~np.isnan(y[:, j])).any()]
    aucs = [a for a in aucs if a == a]
    return float(np.mean(aucs)) if aucs else float("nan")


def evaluate_loss(model, images, targets, device, cfg: TrainConfig, precision: str) -> tuple[float, np.ndarray]:
    import torch

    p = predict(model, images, device, cfg.eval_batch_size, precision, cfg.channels_last, loader_workers(cfg, device))
    if len(p) == 0:
        return float("nan"), p.reshape(tuple(targets.shape))
    pt = torch.from_numpy(p).double().clamp(1e-7, 1 - 1e-7)
    y = targets.double()
    per = -(y * pt.log() + (1 - y) * (1 - pt).log())  # NaN where a target is unknown
    loss = float(per[~torch.isnan(per)].mean()) if len(p) else float("nan")
    return loss, p


@dataclass
class TrainState:
    """Where training stands after an epoch: what ``resume.pt`` restores besides the tensors' owners."""

    epoch: int = 0
    best_loss: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None

    def to_payload(self) -> dict:
        return {
            "epoch": self.epoch,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": json.dumps(self.history),
            "best_state": self.best_state,
        }

    @classmethod
    def from_payload(cls, saved: dict) -> TrainState:
        return cls(
            epoch=saved["epoch"],
            best_loss=saved["best_loss"],
            best_epoch=saved["best_epoch"],
            bad_epochs=saved["bad_epochs"],
            history=json.loads(saved["history"]),
            best_state=saved["best_state"],
        )


@dataclass
class _Trainer:
    """The objects one training run owns (model, optimizer, schedule, scaler, sampler RNG)."""

    model: object
    opt: object
    sched: object
    scaler: object
    gen: object

    def resume_payload(self, identity: dict, state: TrainState) -> dict:
        import torch

        return {
            **identity,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            **state.to_payload(),
        }

    def restore(self, saved: dict) -> TrainState:
        import torch

        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        return TrainState.from_payload(saved)


def micro_batches(n: int, batch_size: int, accumulation: int = 1, steps_per_epoch: int | None = None) -> int:
    """Micro-batches per epoch. A last batch of a single image is left out of that epoch (the order is
    reshuffled every epoch, so no image is always left out): BatchNorm cannot train on one image.
    ``steps_per_epoch`` (None: no cap) caps the epoch at that many optimizer steps."""
    full, rest = divmod(n, batch_size)
    micro = max(1, full + (1 if rest > 1 or (rest == 1 and full == 0) else 0))
    return min(micro, steps_per_epoch * accumulation) if steps_per_epoch is not None else micro


def _build_trainer(cfg: TrainConfig, device, n: int, precision: str, outputs: int = 1) -> _Trainer:
    import torch

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, cfg.dropout, cfg.weights, outputs).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = max(1, math.ceil(micro_batches(n, cfg.batch_size, cfg.accumulation, cfg.steps_per_epoch) / cfg.accumulation)) * cfg.epochs
    warmup = max(1, int(round(cfg.warmup_fraction * total_steps)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup))
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
    return _Trainer(model, opt, sched, scaler, torch.Generator().manual_seed(cfg.seed))


def loader_workers(cfg: TrainConfig, device="cpu") -> int:
    """The configured loader processes (a recipe built without resolution: the default for ``device``)."""

    return default_workers(device) if cfg.loader_workers is None else cfg.loader_workers


def _train_epoch(t: _Trainer, train_images, y_train, cfg: TrainConfig, device, precision: str, pos_weight) -> tuple[float, int]:
    """One pass over the training split (or ``steps_per_epoch`` of it); returns the mean training loss and the images trained on. The batch order and the
    augmentation come from the trainer's generator here, whatever reads the images (``vision.images``)."""
    import torch

    n = len(train_images)
    n_pos = float(y_train.sum()) if y_train.dim() == 1 else 0.0  # the sampler balances one label only
    micro_per_epoch = micro_batches(n, cfg.batch_size, cfg.accumulation, cfg.steps_per_epoch)
    t.model.train()
    if cfg.imbalance == "sampler" and 0 < n_pos < n:
        w = torch.where(y_train > 0.5, 0.5 / n_pos, 0.5 / (n - n_pos))
        order = torch.multinomial(w, n, replacement=True, generator=t.gen)
    else:
        order = torch.randperm(n, generator=t.gen)
    running, seen = 0.0, 0
    t.opt.zero_grad(set_to_none=True)
    index_batches = [order[k * cfg.batch_size : (k + 1) * cfg.batch_size] for k in range(micro_per_epoch)]
    read = batches(train_images, [i.numpy() for i in index_batches], device, loader_workers(cfg, device))
    for k, (idx, xb) in enumerate(zip(index_batches, read, strict=True)):
        x = to_input(xb, device, cfg.channels_last)
        x = augment(x, cfg.rotation, cfg.hflip, t.gen)
        y = y_train[idx].to(device)
        with autocast(device, precision):
            logits = t.model(x)
            logits = logits.squeeze(1) if y.dim() == 1 else logits
        loss = masked_bce(logits.float(), y, pos_weight)
        t.scaler.scale(loss / cfg.accumulation).backward()
        running += float(loss.detach()) * len(idx)
        seen += len(idx)
        if (k + 1) % cfg.accumulation == 0 or k + 1 == micro_per_epoch:
            t.scaler.step(t.opt)
            t.scaler.update()
            t.opt.zero_grad(set_to_none=True)
            t.sched.step()
    return running / seen, seen


def train(
    train_images,
    train_targets,
    val_images,
    val_targets,
    cfg: TrainConfig,
    device,
    checkpoint_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    data_digest: str = "",
) -> TrainResult:
    """Train with early stopping; returns the best-validation-loss model.

    Images are a uint8 tensor or ``vision.images`` (resident or streamed: the same model either way).
    ``train_targets`` (n,) trains one logit; (n, k) with NaN for unusable labels trains k
    logits with the masked loss (the multi-label model).

    ``checkpoint_dir/resume.pt`` is written after every epoch and picked up by the
    next call only when it was made with the same configuration and the same
    data: ``data_digest`` names the data (the caller's digest of the training and
    validation rows, labels and image contents), so a retry after a kill resumes
    while a re-run on changed data with the same row count starts over.
    """
    import torch

    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    precision = resolve_precision(cfg.precision, device)
    train_images, val_images = as_images(train_images), as_images(val_images)
    n = len(train_images)
    y_train = train_targets.float()
    outputs = 1 if y_train.dim() == 1 else int(y_train.shape[1])
    t = _build_trainer(cfg, device, n, precision, outputs)
    pw = pos_weights(y_train) if cfg.imbalance == "pos_weight" else None
    pos_weight = pw.to(device) if pw is not None else None

    identity = {"fingerprint": cfg.fingerprint(), "n_train": n, "data_digest": data_digest, "outputs": outputs}
    state, resumed_from = TrainState(), 0
    ckpt = checkpoint_dir / RESUME_FILE if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        if all(saved.get(k) == v for k, v in identity.items()):
            state = t.restore(saved)
            resumed_from = state.epoch
            say(f"resumed after epoch {resumed_from} from {ckpt}")
        else:
            say(f"{ckpt} is from another configuration or data; starting over")

    images_seen = 0
    t_train = 0.0
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.bad_epochs >= cfg.patience:
            break
        t0 = time.perf_counter()
        train_loss, seen = _train_epoch(t, train_images, y_train, cfg, device, precision, pos_weight)
        dt = time.perf_counter() - t0
        t_train += dt
        images_seen += seen
        val_loss, val_p = evaluate_loss(t.model, val_images, val_targets, device, cfg, precision)
        val_auc = mean_auc(val_targets.numpy(), val_p)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_auc": val_auc,
            "lr": t.opt.param_groups[0]["lr"],
            "images_per_second": seen / dt,
        }
        state.history.append(row)
        if val_loss < state.best_loss - 1e-6:
            state.best_loss, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
            state.best_state = {k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()}
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        say(
            f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val AUC {val_auc:.3f}, {row['images_per_second']:.0f} img/s"
        )
        if on_epoch:
            on_epoch(row)
        if ckpt is not None:
            with atomic_path(ckpt) as tmp:
                torch.save(t.resume_payload(identity, state), tmp)

    if state.best_state is not None:
        t.model.load_state_dict(state.best_state)
    return TrainResult(
        model=t.model.cpu(),
        history=state.history,
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        resumed_from=resumed_from,
        seconds=time.perf_counter() - t_start,
        images_per_second=images_seen / t_train if t_train else 0.0,
    )
