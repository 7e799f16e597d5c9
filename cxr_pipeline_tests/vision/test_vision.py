"""Classifier training, evaluation and label policies on small, fast data."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from cxr_pipeline.data.phantom import Anatomy, render
from cxr_pipeline.vision import train as train_mod
from cxr_pipeline.vision.evaluate import choose_threshold, evaluate
from cxr_pipeline.vision.models import build_model, load_backbone_weights
from cxr_pipeline.vision.targets import targets
from cxr_pipeline.vision.train import TrainConfig, augment, predict, to_input, train

CPU = torch.device("cpu")
FAST = TrainConfig(
    epochs=3, batch_size=32, accumulation=1, lr=1e-3, patience=5, precision="fp32", rotation=10, hflip=True, eval_batch_size=64
)


def phantom_set(n: int, finding: str, seed: int, size: int = 40):
    """Images with the finding planted in about half of them, as the shard builder stores them."""
    from cxr_pipeline.data.dicom import letterbox

    rng = np.random.default_rng(seed)
    imgs, ys = [], []
    for i in range(n):
        y = int(rng.uniform() < 0.5)
        r = np.random.default_rng([seed, i])
        img = render(r, size * 2, size * 2, "PA", {finding: 1.0} if y else {}, Anatomy.draw(r))
        imgs.append(letterbox(img, size))
        ys.append(y)
    return torch.from_numpy(np.stack(imgs)), torch.tensor(ys, dtype=torch.float32)


@pytest.fixture(scope="module")
def effusion():
    xtr, ytr = phantom_set(240, "Pleural Effusion", 1)
    xva, yva = phantom_set(60, "Pleural Effusion", 2)
    xte, yte = phantom_set(80, "Pleural Effusion", 3)
    return xtr, ytr, xva, yva, xte, yte


def test_training_learns_a_planted_finding(effusion):
    xtr, ytr, xva, yva, xte, yte = effusion
    res = train(xtr, ytr, xva, yva, TrainConfig(**{**FAST.__dict__, "epochs": 4}), CPU)
    p = predict(res.model, xte, CPU)
    row = evaluate(yte.numpy(), p, yva.numpy(), predict(res.model, xva, CPU), n_boot=100)
    assert row["evaluable"] and row["roc_auc"] > 0.85, row


def test_best_weights_are_restored(effusion):
    xtr, ytr, xva, yva, *_ = effusion
    res = train(xtr, ytr, xva, yva, TrainConfig(**{**FAST.__dict__, "lr": 3e-3, "epochs": 4}), CPU)
    best = min(res.history, key=lambda r: r["val_loss"])
    assert res.best_epoch == best["epoch"]
    loss, _ = train_mod.evaluate_loss(res.model, xva, yva, CPU, FAST, "fp32")
    assert loss == pytest.approx(best["val_loss"], rel=1e-4)


def test_early_stopping_stops(effusion, monkeypatch):
    xtr, ytr, xva, yva, *_ = effusion
    calls = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    real = train_mod.evaluate_loss
    monkeypatch.setattr(train_mod, "evaluate_loss", lambda *a: (next(calls), real(*a)[1]))
    res = train(xtr[:64], ytr[:64], xva, yva, TrainConfig(**{**FAST.__dict__, "epochs": 10, "patience": 2}), CPU)
    assert res.epochs_run == 3 and res.best_epoch == 1


def test_only_training_batches_are_augmented(effusion, monkeypatch):
    """Validation (early stopping, threshold) and test images are never augmented: during
    training only the training images pass through ``augment``, once per epoch."""
    xtr, ytr, xva, yva, xte, _ = effusion
    seen = []
    real = train_mod.augment

    def spy(x, *a, **k):
        seen.append(int(x.shape[0]))
        return real(x, *a, **k)

    monkeypatch.setattr(train_mod, "augment", spy)
    cfg = TrainConfig(**{**FAST.__dict__, "epochs": 2})
    res = train(xtr[:64], ytr[:64], xva, yva, cfg, CPU)
    assert sum(seen) == 64 * res.epochs_run  # the 64 training images per epoch, no validation image
    seen.clear()
    a, b = predict(res.model, xte, CPU), predict(res.model, xte, CPU)
    assert seen == [] and np.array_equal(a, b)
    res.model.eval()
    with torch.no_grad():
        direct = torch.sigmoid(res.model(to_input(xte[:8], CPU)).squeeze(1)).numpy()
    np.testing.assert_allclose(a[:8], direct, rtol=1e-5, atol=1e-6)


def test_augment_changes_training_images_per_image():
    x = to_input(torch.arange(4 * 16 * 16, dtype=torch.uint8).reshape(4, 16, 16), CPU, channels_last=False)
    g = torch.Generator().manual_seed(0)
    y = augment(x.clone(), 10.0, True, g)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert torch.equal(augment(x.clone(), 0.0, False, g), x)


def test_same_seed_same_weights(effusion):
    xtr, ytr, xva, yva, *_ = effusion
    cfg = TrainConfig(**{**FAST.__dict__, "epochs": 1})
    a = train(xtr[:64], ytr[:64], xva, yva, cfg, CPU).model.state_dict()
    b = train(xtr[:64], ytr[:64], xva, yva, cfg, CPU).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_training_resumes_from_its_checkpoint(effusion, tmp_path):
    xtr, ytr, xva, yva, *_ = effusion
    cfg = TrainConfig(**{**FAST.__dict__, "epochs": 3})
    clean = train(xtr[:96], ytr[:96], xva, yva, cfg, CPU)

    class Killed(Exception):
        pass

    def die(row):
        if row["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train(xtr[:96], ytr[:96], xva, yva, cfg, CPU, checkpoint_dir=tmp_path, on_epoch=die)
    assert (tmp_path / "resume.pt").exists()
    resumed = train(xtr[:96], ytr[:96], xva, yva, cfg, CPU, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 3
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    a, b = clean.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_resume_point_from_other_data_is_not_reused(effusion, tmp_path):
    """Same config and same number of training images, other data: training starts over."""
    xtr, ytr, xva, yva, *_ = effusion
    cfg = TrainConfig(**{**FAST.__dict__, "epochs": 3})

    class Killed(Exception):
        pass

    def die(row):
        if row["epoch"] == 2:  # killed during epoch 2: resume.pt holds epoch 1
            raise Killed

    with pytest.raises(Killed):
        train(xtr[:64], ytr[:64], xva, yva, cfg, CPU, checkpoint_dir=tmp_path, on_epoch=die, data_digest="manifest-a")
    assert (tmp_path / "resume.pt").exists()
    other = train(xtr[64:128], ytr[64:128], xva, yva, cfg, CPU, checkpoint_dir=tmp_path, data_digest="manifest-b")
    assert other.resumed_from == 0 and [r["epoch"] for r in other.history] == [1, 2, 3]
    with pytest.raises(Killed):
        train(xtr[:64], ytr[:64], xva, yva, cfg, CPU, checkpoint_dir=tmp_path, on_epoch=die, data_digest="manifest-a")
    same = train(xtr[:64], ytr[:64], xva, yva, cfg, CPU, checkpoint_dir=tmp_path, data_digest="manifest-a")
    assert same.resumed_from == 1


def test_threshold_is_chosen_on_validation():
    y_val = np.array([0, 0, 0, 1, 1, 1])
    p_val = np.array([0.1, 0.2, 0.25, 0.3, 0.35, 0.9])
    t, how = choose_threshold(y_val, p_val)
    assert t == pytest.approx(0.3) and how == "youden_j_on_validation"
    y_test = np.array([0, 0, 1, 1])
    p_test = np.array([0.1, 0.31, 0.32, 0.9])  # at 0.5 one positive would be missed
    row = evaluate(y_test, p_test, y_val, p_val, n_boot=50)
    assert row["threshold"] == pytest.approx(0.3)
    assert row["sensitivity"] == 1.0 and row["specificity"] == 0.5 and row["roc_auc"] == 1.0
    # a useful but imperfect score on 200 test images: the interval holds the point, has a width, and excludes chance
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.3, 200), 0, 1)
    noisy = evaluate(y, p, y_val, p_val, n_boot=300)
    assert noisy["roc_auc_lo"] < noisy["roc_auc"] < noisy["roc_auc_hi"] and 0.5 < noisy["roc_auc_lo"]
    assert 0.03 < noisy["roc_auc_hi"] - noisy["roc_auc_lo"] < 0.25, noisy


def test_bootstrap_counts_the_resamples_it_skips():
    """Three test images, one positive: many resamples hold one class only; they are skipped and counted."""
    row = evaluate(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.9]), np.array([0, 1]), np.array([0.2, 0.8]), n_boot=200, seed=0)
    # P(no positive drawn) = (2/3)^3, P(only the positive) = (1/3)^3: about 33% of 200 resamples
    assert 40 <= row["bootstrap_skipped"] <= 95 and row["bootstrap_resamples"] == 200 and row["bootstrap_unit"] == "image"
    big = evaluate(np.tile([0, 1], 50), np.linspace(0, 1, 100), np.array([0, 1]), np.array([0.2, 0.8]), n_boot=100)
    assert big["bootstrap_skipped"] == 0


def test_bootstrap_resamples_patients_when_they_repeat():
    from cxr_pipeline.vision.resampling import resample_indices

    groups = np.array(["p1", "p1", "p1", "p2", "p3", "p3"])
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx, unit = resample_indices(len(groups), groups, rng)
        assert unit == "patient"
        drawn = groups[idx]
        for g in ("p1", "p2", "p3"):  # a patient is drawn whole, with all its images, or not at all
            k = int((drawn == g).sum())
            assert k % int((groups == g).sum()) == 0
    idx, unit = resample_indices(4, np.array(["a", "b", "c", "d"]), rng)
    assert unit == "image" and len(idx) == 4  # one image each: plain image resampling
    y = np.array([0, 0, 1, 1, 0, 1])
    row = evaluate(y, np.linspace(0, 1, 6), np.array([0, 1]), np.array([0.2, 0.8]), n_boot=50, groups=groups)
    assert row["bootstrap_unit"] == "patient"


def test_single_class_test_set_is_not_evaluable():
    row = evaluate(np.zeros(10), np.random.rand(10), np.array([0, 1]), np.array([0.2, 0.8]), n_boot=10)
    assert row["evaluable"] is False and "only negatives" in row["reason"] and row["roc_auc"] is None
    assert evaluate([], [], [0, 1], [0.1, 0.9])["reason"] == "no test images"
    t, how = choose_threshold(np.ones(4), np.random.rand(4))
    assert t == 0.5 and "one class" in how


def test_label_policies():
    m = pl.DataFrame(
        {"dicom_id": list("abcde"), "edema": [1, 0, -1, None, 1], "no_finding": [None, 1, None, 1, None]},
        schema_overrides={"edema": pl.Int8, "no_finding": pl.Int8},
    )
    t = lambda **k: dict(zip(*targets(m, "edema", **k).select("dicom_id", "target").to_dict(as_series=False).values(), strict=True))  # noqa: E731
    assert t() == {"a": 1, "b": 0, "e": 1}
    assert t(uncertain="zeros") == {"a": 1, "b": 0, "c": 0, "e": 1}
    assert t(uncertain="ones") == {"a": 1, "b": 0, "c": 1, "e": 1}
    assert t(blank="zeros") == {"a": 1, "b": 0, "d": 0, "e": 1}
    nf = targets(m, "No Finding")
    assert dict(zip(nf["dicom_id"], nf["target"], strict=True)) == {"a": 0, "b": 1, "c": 0, "d": 1, "e": 0}
    with pytest.raises(ValueError, match="uncertain policy"):
        targets(m, "edema", uncertain="maybe")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121", "vgg16"])
def test_architectures_have_one_logit_at_any_shard_size(arch):
    net = build_model(arch).eval()
    with torch.no_grad():
        for size in (32, 48):  # adaptive pooling: the shard size is a config choice, not fixed by the backbone
            assert net(torch.zeros(2, 3, size, size)).shape == (2, 1)


def test_local_weights_load_and_mismatch_is_clear(tmp_path):
    from safetensors.torch import save_file
    from torchvision import models

    src = models.resnet18(weights=None)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    net = build_model("resnet18", weights=tmp_path / "r18.safetensors")
    assert torch.equal(net.conv1.weight, src.conv1.weight)
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    assert torch.equal(build_model("resnet18", weights=tmp_path / "r18.pt").layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    with pytest.raises(ValueError, match="do not fit this architecture"):
        load_backbone_weights(models.resnet50(weights=None), tmp_path / "r18.safetensors")
    with pytest.raises(FileNotFoundError):
        build_model("resnet18", weights=tmp_path / "nope.safetensors")


def test_a_last_batch_of_one_image_does_not_break_batchnorm(effusion):
    """17 training images in batches of 16: BatchNorm cannot train on the 17th alone (seen in a daemon run)."""
    from cxr_pipeline.vision.train import micro_batches

    assert [micro_batches(n, 16) for n in (1, 15, 16, 17, 18, 33)] == [1, 1, 1, 1, 2, 2]
    # steps_per_epoch caps optimizer steps (x accumulation micro-batches), never raises the count
    assert [micro_batches(1000, 16, 4, k) for k in (None, 1, 3, 100)] == [63, 4, 12, 63]
    xtr, ytr, xva, yva, *_ = effusion
    res = train(xtr[:17], ytr[:17], xva, yva, TrainConfig(**{**FAST.__dict__, "epochs": 1, "batch_size": 16}), CPU)
    assert res.epochs_run == 1 and np.isfinite(res.history[0]["train_loss"])


def test_masked_loss_ignores_unusable_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    got = train_mod.masked_bce(logits, y)
    known = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert got == pytest.approx(float(known))
    # changing the logit of an unusable label changes nothing
    assert train_mod.masked_bce(torch.tensor([[2.0, 99.0], [0.5, 3.0]]), y) == pytest.approx(float(got))


def test_multilabel_training_learns_two_findings_with_missing_labels():
    """One backbone, two logits: effusion and cardiomegaly planted independently; a third of each
    label unusable (NaN). Each output learns its own finding."""
    rng = np.random.default_rng(0)

    def make(n, seed):
        from cxr_pipeline.data.dicom import letterbox

        imgs, ys = [], []
        for i in range(n):
            y = rng.uniform(size=2) < 0.5
            r = np.random.default_rng([seed, i])
            findings = {k: 1.0 for k, on in zip(("Pleural Effusion", "Cardiomegaly"), y, strict=True) if on}
            imgs.append(letterbox(render(r, 80, 80, "PA", findings, Anatomy.draw(r)), 40))
            ys.append(y.astype(np.float32))
        return torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(ys))

    xtr, ytr = make(240, 1)
    ytr[torch.from_numpy(rng.uniform(size=ytr.shape) < 0.33)] = float("nan")
    xva, yva = make(60, 2)
    xte, yte = make(80, 3)
    res = train(xtr, ytr, xva, yva, TrainConfig(**{**FAST.__dict__, "epochs": 5}), CPU)
    p = predict(res.model, xte, CPU)
    assert p.shape == (80, 2)
    from cxr_pipeline.vision.evaluate import roc_auc_or_nan

    aucs = [roc_auc_or_nan(yte[:, j].numpy(), p[:, j]) for j in range(2)]
    assert min(aucs) > 0.8, aucs
    assert res.history[-1]["val_auc"] == res.history[-1]["val_auc"]  # the mean over labels, not NaN


def _as_shards(tmp_path, images: torch.Tensor, per_file: int = 50):
    """The tensor written as shard files (``per_file`` images each), opened as streamed images."""
    from cxr_pipeline.data.shard_reader import Shards, StreamedImages

    n, size = images.shape[0], images.shape[1]
    (tmp_path / "p10").mkdir(parents=True, exist_ok=True)
    files, offsets = [], []
    for k, start in enumerate(range(0, n, per_file)):
        images[start : start + per_file].numpy().tofile(tmp_path / "p10" / f"shard-{k:05d}.u8")
        files += [f"p10/shard-{k:05d}.u8"] * len(images[start : start + per_file])
        offsets += list(range(len(images[start : start + per_file])))
    return StreamedImages(Shards(tmp_path, size), np.array(files, dtype=object), np.array(offsets))


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_images_train_the_same_model_as_resident_ones(effusion, tmp_path, workers):
    """Same seed, same batches, same augmentation, same weights and validation curve, whether the split is one
    tensor in memory or read batch by batch from the memory-mapped shards (in loader worker processes or not)."""
    xtr, ytr, xva, yva, *_ = effusion
    cfg = TrainConfig(**{**FAST.__dict__, "epochs": 2, "loader_workers": workers})
    resident = train(xtr, ytr, xva, yva, cfg, CPU)
    streamed = train(_as_shards(tmp_path / "tr", xtr), ytr, _as_shards(tmp_path / "va", xva), yva, cfg, CPU)
    assert [r["val_loss"] for r in streamed.history] == [r["val_loss"] for r in resident.history]
    for (k, a), b in zip(resident.model.state_dict().items(), streamed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_the_data_mode_follows_the_memory_budget(effusion, tmp_path):
    from cxr_pipeline.vision.images import ResidentImages, choose_mode, place

    xtr, *_ = effusion
    lazy = _as_shards(tmp_path, xtr)
    assert choose_mode(None, lazy.nbytes, CPU, 0.5) == "resident"  # 384 kB fits any host
    assert choose_mode(None, 10**16, CPU, 0.5) == "streamed"  # 10 PB does not
    assert choose_mode("streamed", 1, CPU, 0.5) == "streamed"  # as configured, whatever fits
    (placed,), mode = place([lazy], "resident", CPU, 0.5)
    assert mode == "resident" and isinstance(placed, ResidentImages) and torch.equal(placed.tensor, xtr)
    sub = placed.subset(np.array([5, 3])).subset(np.array([1]))  # a view of a view: image 3
    assert torch.equal(sub.take(np.array([0])), xtr[[3]]) and np.array_equal(lazy.subset(np.array([5, 3]))[1], xtr[3].numpy())
    with pytest.raises(ValueError, match="data must be"):
        TrainConfig(data="gpu")
