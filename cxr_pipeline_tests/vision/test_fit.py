"""vision.fit: what one pathology's classifier folder holds after a fit, or after a label turns untrainable."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from cxr_pipeline.data.shard_reader import Shards
from cxr_pipeline.settings import Paths
from cxr_pipeline.vision import fit, folds, multilabel, tables
from cxr_pipeline.vision.checkpoint import ClassifierSet, read_config
from cxr_pipeline.vision.splits import ClassifierData, Split
from cxr_pipeline.vision.train import TrainConfig, TrainResult


def split(n: int, positives: int, name: str = "d") -> Split:
    ids = [f"{name}{i}" for i in range(n)]
    y = [1] * positives + [0] * (n - positives)
    rows = pl.DataFrame({"dicom_id": ids, "target": y, "content_hash": ["h"] * n, "split": ["x"] * n})
    return Split(torch.zeros(n, 8, 8, dtype=torch.uint8), torch.tensor(y, dtype=torch.float32), rows)


def data(train_pos: int = 4) -> ClassifierData:
    splits = {
        "train": split(8, train_pos, "tr"),
        "validate": split(6, 3, "va"),
        "test": split(6, 3, "te"),
        "radiologist": split(4, 2, "ra"),
    }
    return ClassifierData("edema", 8, "ignore", "zeros", splits)


def test_an_untrainable_label_leaves_no_model_from_an_earlier_run(tmp_path):
    files = ClassifierSet.of(Paths(home=tmp_path, raw=tmp_path / "raw")).classifier("edema")
    files.checkpoint.mkdir(parents=True)
    for f in (files.weights, files.curves, files.predictions, files.test_scores, files.resume):
        f.write_bytes(b"old")
    d = data(train_pos=0)
    assert d.untrainable_reason.startswith("not trainable: the training split has 0 positives of 8")
    rows = fit.record_untrainable(d, files)
    assert not files.checkpoint.exists() and not any(f.exists() for f in (files.curves, files.predictions, files.test_scores))
    assert json.loads(files.metrics.read_text()) == rows and not any(r["evaluable"] for r in rows)
    assert [(r["test_labels"], r["n_pos"], r["n_neg"]) for r in rows] == [("chexpert", 3, 3), ("radiologist", 2, 2)]


def test_metrics_table_of_untrainable_labels_only_has_every_column(tmp_path):
    classifiers = ClassifierSet.of(Paths(home=tmp_path, raw=tmp_path / "raw"))
    fit.record_untrainable(data(train_pos=0), classifiers.classifier("edema"))
    table = tables.metrics_table(classifiers)
    from cxr_pipeline.defs.classifier_tables import METRICS_SHOWN

    shown = table.select(METRICS_SHOWN)  # raised ColumnNotFoundError before
    assert shown["test_labels"].to_list() == ["chexpert", "radiologist"]
    assert shown["roc_auc"].to_list() == [None, None] and shown["reference_auc"].to_list() == [0.727, 0.727]


def test_evaluation_and_predictions_run_on_the_training_device(tmp_path, monkeypatch):
    """After training on a GPU, the all-image predictions run there too (not on the CPU), once: validation and both
    test label sources are read from that pass."""
    from cxr_pipeline.vision.models import build_model

    cuda = torch.device("cuda")  # never touched: training and prediction are stand-ins here
    used = []
    monkeypatch.setattr(fit, "train", lambda *a, **k: TrainResult(model=build_model("resnet18"), best_epoch=1, epochs_run=1))

    precisions = []

    def predict(model, images, device, batch_size=128, precision="fp32", *a, **k):
        used.append(device)
        precisions.append(precision)
        return np.linspace(0, 1, len(images))

    monkeypatch.setattr(fit, "predict", predict)
    d = data()
    every = pl.concat([sp.rows.select("dicom_id", pl.lit(name).alias("split")) for name, sp in d.splits.items()])
    monkeypatch.setattr(fit, "open_images", lambda *a, **k: (torch.zeros(every.height, 8, 8, dtype=torch.uint8), every))
    files = ClassifierSet.of(Paths(home=tmp_path, raw=tmp_path)).classifier("edema")
    recipe = TrainConfig(precision="bf16", bootstrap=10, uncertain="ones", blank="ignore")  # not the defaults
    out = fit.fit_and_save(d, every, Shards(tmp_path, 8), recipe, cuda, files)
    assert used == [cuda]  # one pass over every image; validation and both test sets are read from it
    assert precisions == ["fp32"]  # trained in bf16, evaluated in fp32 (bf16 logits tie and move AUC)
    assert pl.read_parquet(files.predictions)["dicom_id"].to_list() == every["dicom_id"].to_list()
    # validation targets 1,1,1,0,0,0 against rising stand-in probabilities: AUC 0, from validation
    assert out.row["val_roc_auc"] == 0.0 and out.row["blank_policy"] == "zeros"
    assert out.row["evaluable"] and files.weights.exists()
    assert [r["test_labels"] for r in json.loads(files.metrics.read_text())] == ["chexpert", "radiologist"]
    assert out.radiologist_row["n_pos"] == 2 and out.radiologist_row["threshold"] == out.row["threshold"]
    cfg = read_config(files.checkpoint)
    assert cfg.normalise == {"mean": 0.5, "std": 0.5} and cfg.size == 8 and cfg.kind == "per_pathology"
    assert cfg.thresholds == {"edema": out.row["threshold"]} and cfg.policy == {"uncertain": "ones", "blank": "ignore"}


def test_curve_figures_are_closed(tmp_path):
    import matplotlib.pyplot as plt

    from cxr_pipeline.vision.evaluate import save_curves

    before = len(plt.get_fignums())
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6])
    for i in range(3):
        assert save_curves({"Edema": (y, p)}, tmp_path / f"c{i}.png").stat().st_size > 0
    assert len(plt.get_fignums()) == before


def test_data_digest_changes_with_labels_and_images():
    a, b = data(), data()
    assert a.digest() == b.digest()
    b.splits["train"].rows = b.splits["train"].rows.with_columns(pl.lit("other").alias("content_hash"))
    assert a.digest() != b.digest()


def test_out_of_fold_hints_never_come_from_a_model_that_saw_the_image(monkeypatch):
    """Each training image gets exactly one hint, from the one fold model that did not train on it;
    a patient's images share a fold. The stand-in model's output is the mean pixel of what it
    was trained on, so the assertion also checks which images the model really received."""
    from cxr_pipeline.labels import SLUGS

    n = 30
    ids = [f"d{i}" for i in range(n)]
    subjects = [f"s{i // 3}" for i in range(n)]  # three images per patient
    images = torch.arange(n, dtype=torch.uint8)[:, None, None].expand(n, 8, 8).contiguous()  # image i is all i
    rows = pl.DataFrame({"dicom_id": ids, "subject_id": subjects, "content_hash": ["h"] * n, "split": ["train"] * n})
    y = torch.full((n, len(SLUGS)), float("nan"))
    y[:, 0] = torch.tensor([i % 2 for i in range(n)], dtype=torch.float32)
    val = Split(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.zeros(4, len(SLUGS)), rows.head(0))
    data = multilabel.MultilabelData(8, "ignore", "zeros", {"train": Split(images, y, rows), "validate": val})
    seen_by = []

    def train(xtr, ytr, xva, yva, cfg, device, **k):
        seen_by.append({int(v) for v in xtr.take(np.arange(len(xtr)))[:, 0, 0]})
        return TrainResult(model=len(seen_by) - 1)

    def predict(model, imgs, *a, **k):  # every output = the fold model's index
        return np.full((len(imgs), len(SLUGS)), float(model))

    monkeypatch.setattr(folds, "train", train)
    monkeypatch.setattr(folds, "predict", predict)
    fitted = folds.fit_out_of_fold(data, TrainConfig(), torch.device("cpu"), k=5)
    oof, trained_on = fitted.table, fitted.trained_on
    assert sorted(oof["dicom_id"]) == sorted(ids)  # every training image, once
    for did, fold, model in oof.select("dicom_id", "fold", SLUGS[0]).iter_rows():  # one-class validate: no map
        assert did not in trained_on[fold]  # the bookkeeping
        assert int(did[1:]) not in seen_by[int(model)]  # the images the predicting model was really given
    fold_of = dict(zip(oof["dicom_id"], oof["fold"], strict=True))
    for s in set(subjects):
        assert len({fold_of[d] for d, sub in zip(ids, subjects, strict=True) if sub == s}) == 1
    # the hint table: out-of-fold for training images, the final model's for the others
    every = pl.DataFrame({"dicom_id": [*ids, "t0"], "split": ["train"] * n + ["test"]}).with_columns(
        pl.lit(0.5, pl.Float32).alias(s) for s in SLUGS
    )
    hints = folds.hint_predictions(oof, every, dict.fromkeys(SLUGS, 0.25))
    assert hints.height == n + 1 and set(hints.filter(pl.col("split") == "train")["source"]) == {"out_of_fold"}
    assert hints.filter(pl.col("dicom_id") == "t0")["source"].to_list() == ["held_out"]
    assert hints.filter(pl.col("dicom_id") == "t0")[folds.threshold_column(SLUGS[0])].to_list() == [0.25]  # the final model's
    # the final model's calibration carries its probabilities and its threshold alike
    platt = {"method": "platt", "a": 1.0, "b": -1.0, "n": 10, "n_pos": 3}
    held = folds.hint_predictions(oof, every, dict.fromkeys(SLUGS, 0.25), dict.fromkeys(SLUGS, platt)).filter(pl.col("dicom_id") == "t0")
    assert held[SLUGS[0]][0] == pytest.approx(1 / (1 + np.e)) and held[folds.threshold_column(SLUGS[0])][0] == pytest.approx(
        1 / (1 + 3 * np.e)
    )


def test_each_fold_model_is_calibrated_and_read_at_its_own_validation_threshold(monkeypatch):
    """Fold model 2 scores everything 0.3 higher (its own score scale): its thresholds, chosen on the validation
    split like the final model's, are 0.3 higher too (0.9 against 0.6), and its own calibration map, fitted on the
    same split, carries both its scores and its thresholds. The hints hold calibrated probabilities, and every
    image's call at its stored threshold is its fold network's call at that fold's validation threshold."""
    from cxr_pipeline.labels import SLUGS
    from cxr_pipeline.vision import calibration

    n = 30
    rows = pl.DataFrame({"dicom_id": [f"d{i}" for i in range(n)], "subject_id": [f"s{i}" for i in range(n)], "split": ["train"] * n})
    rows = rows.with_columns(pl.lit("h").alias("content_hash"))
    y_val = torch.tensor([[1.0] * len(SLUGS), [0.0] * len(SLUGS), [1.0] * len(SLUGS), [0.0] * len(SLUGS)] * 3)
    y_val[0] = 0.0  # 12 validation images, both classes, not separable: one negative scored as a positive
    val = Split(torch.zeros(12, 8, 8, dtype=torch.uint8), y_val, rows.head(0))
    images = torch.zeros(n, 8, 8, dtype=torch.uint8)
    data = multilabel.MultilabelData(8, "ignore", "zeros", {"train": Split(images, torch.zeros(n, len(SLUGS)), rows), "validate": val})
    models = iter(range(5))
    monkeypatch.setattr(folds, "train", lambda *a, **k: TrainResult(model=next(models)))
    positive_like = np.array([1.0, 0, 1, 0] * 3)[:, None] * np.ones(len(SLUGS))  # what the network "sees" on validate
    raw_train = np.linspace(0.02, 0.6, n)  # the training images' scores before a fold's shift

    def shift(model):
        return 0.3 if model == 2 else 0.0

    def predict(model, imgs, *a, **k):
        if len(imgs) == 12:  # the validation split: positive-looking 0.6, the others 0.1, plus the fold model's shift
            return positive_like * 0.5 + 0.1 + shift(model)
        return np.repeat(raw_train[: len(imgs), None], len(SLUGS), axis=1) + shift(model)

    monkeypatch.setattr(folds, "predict", predict)
    fitted = folds.fit_out_of_fold(data, TrainConfig(), torch.device("cpu"), k=5)
    for fold, fits in fitted.fits.items():
        for s in SLUGS[:2]:
            assert fits[s]["threshold"] == pytest.approx(0.9 if fold == 2 else 0.6)
            assert fits[s]["calibration"]["method"] == "platt" and fits[s]["calibration"]["fitted_on"] == "validate"
    oof = fitted.table
    for fold in range(5):
        part = oof.filter(pl.col("fold") == fold)
        raw = raw_train[: part.height] + shift(fold)
        for s in SLUGS[:2]:
            fit = fitted.fits[fold][s]
            assert np.allclose(part[s].to_numpy(), calibration.apply(fit["calibration"], raw), atol=1e-6)  # calibrated
            assert part[folds.threshold_column(s)].unique().to_list() == [
                pytest.approx(calibration.calibrated_threshold(fit["calibration"], fit["threshold"]))
            ]
            calls = part[s].to_numpy() >= part[folds.threshold_column(s)].to_numpy()
            assert np.array_equal(calls, raw.astype(np.float32) >= fit["threshold"])  # the fold network's own calls
            assert part[folds.call_column(s)].to_list() == (raw >= fit["threshold"]).tolist()  # and the calls it carries


# At the calibration map's clip (scores within 1e-6 of 1) a raw threshold of 0.9999997 and a score of 0.9999992 map to one
# probability: read through the map, the score "reaches" the threshold; the network's own call is that it does not.
EDGE_THRESHOLD, BELOW, ABOVE = 0.9999997, 0.9999992, 0.9999999
PLATT = {"method": "platt", "a": 1.0, "b": -1.0, "n": 10, "n_pos": 3}


def test_a_hint_at_the_calibration_clip_is_called_on_the_network_s_score():
    """The hints carry each finding's call, decided on the network's score at its threshold, and the prompts name
    what the calls name: both ways the hints are built without fold models (the final model's held-out predictions,
    and the per-finding models'), for a score just under the threshold and one just over it."""
    from types import SimpleNamespace

    from cxr_pipeline.labels import SLUGS
    from cxr_pipeline.reports.prompts import prompts_for

    s = "pleural_effusion"
    rows = pl.DataFrame({"dicom_id": ["t0", "t1"]})
    scores = pl.DataFrame({"dicom_id": ["t0", "t1"], "split": ["test", "test"]}).with_columns(
        pl.Series(x, [BELOW, ABOVE] if x == s else [0.0, 0.0], dtype=pl.Float32) for x in SLUGS
    )
    no_folds = pl.DataFrame(schema={c: t for c, t in folds.HINT_SCHEMA.items() if c not in ("split", "source")})
    thresholds = {x: EDGE_THRESHOLD if x == s else 0.5 for x in SLUGS}
    held_out = folds.hint_predictions(no_folds, scores, thresholds, {s: PLATT})
    metrics = pl.DataFrame({"model": ["per_pathology"], "test_labels": ["chexpert"], "slug": [s], "threshold": [EDGE_THRESHOLD]})
    per_finding_scores = scores.select("dicom_id", "split", s)
    per_finding = folds.report_hints(SimpleNamespace(oof_folds=0), None, None, per_finding_scores, metrics, None, None, {s: PLATT}).table
    for hints in (held_out, per_finding):
        assert hints[s].n_unique() == 1  # the map made the two scores one probability: it cannot tell them apart
        prompts, _ = prompts_for(rows, hints, use_findings=True)
        assert "pleural effusion" not in prompts[0] and "pleural effusion" in prompts[1], prompts
        assert hints[folds.call_column(s)].to_list() == [False, True]


def test_a_fold_model_s_hint_at_the_calibration_clip_is_its_network_s_call(monkeypatch):
    """A fold model whose validation threshold is at the clip: its training images just under it are not called,
    those at or over it are, though their calibrated probabilities are one value."""
    from cxr_pipeline.labels import SLUGS

    n = 10
    rows = pl.DataFrame({"dicom_id": [f"d{i}" for i in range(n)], "subject_id": [f"s{i}" for i in range(n)], "split": ["train"] * n})
    rows = rows.with_columns(pl.lit("h").alias("content_hash"))
    y_val = torch.tensor([[1.0], [0.0], [1.0], [0.0]] * 3).repeat(1, len(SLUGS))
    y_val[1] = 1.0  # not separable: Platt's fit has a finite slope
    val = Split(torch.zeros(12, 8, 8, dtype=torch.uint8), y_val, rows.head(0))
    train = Split(torch.zeros(n, 8, 8, dtype=torch.uint8), torch.zeros(n, len(SLUGS)), rows)
    data = multilabel.MultilabelData(8, "ignore", "zeros", {"train": train, "validate": val})
    monkeypatch.setattr(folds, "train", lambda *a, **k: TrainResult(model=0))
    train_scores = np.array([BELOW, EDGE_THRESHOLD, ABOVE] * 4)

    def predict(model, imgs, *a, **k):
        if len(imgs) == 12:  # validate: positives at the threshold, negatives at 0.2
            return np.repeat(np.where(np.arange(12) % 2 == 0, EDGE_THRESHOLD, 0.2)[:, None], len(SLUGS), axis=1)
        return np.repeat(train_scores[: len(imgs), None], len(SLUGS), axis=1)

    monkeypatch.setattr(folds, "predict", predict)
    fitted = folds.fit_out_of_fold(data, TrainConfig(), torch.device("cpu"), k=2)
    s = SLUGS[0]
    for fold in (0, 1):
        fit = fitted.fits[fold][s]
        assert fit["threshold"] == EDGE_THRESHOLD and fit["calibration"]["method"] == "platt"
        part = fitted.table.filter(pl.col("fold") == fold)
        raw = train_scores[: part.height]
        assert part[s].n_unique() == 1  # one probability for every score at the clip
        assert part[folds.call_column(s)].to_list() == (raw >= EDGE_THRESHOLD).tolist()
        assert not part[folds.call_column(s)].all() and part[folds.call_column(s)].any()


def test_bootstrap_counts_the_resamples_it_had_to_skip():
    """One positive in six test images: about a third of the resamples (5/6)^6 hold no positive, have no
    AUC and are skipped; the count says how many, so an interval from few resamples is visible."""
    from cxr_pipeline.vision.evaluate import evaluate

    y_test, p_test = [1, 0, 0, 0, 0, 0], [0.9, 0.2, 0.3, 0.4, 0.1, 0.6]
    y_val, p_val = [1, 1, 0, 0], [0.8, 0.7, 0.2, 0.1]
    row = evaluate(y_test, p_test, y_val, p_val, n_boot=300, seed=0)
    assert 300 * 0.2 < row["bootstrap_skipped"] < 300 * 0.5  # expected 100 of 300
    both = evaluate([1, 1, 1, 0, 0, 0], p_test, y_val, p_val, n_boot=300, seed=0)
    assert both["bootstrap_skipped"] < row["bootstrap_skipped"] / 4  # (1/2)^6 x 2: about 9


def test_auto_precision_on_a_cpu_is_bf16_only_where_onednn_runs_it_natively(monkeypatch):
    """An AVX2-only CPU emulates bf16 at a fifteenth of fp32's speed (benchmarks/bench_training.py --precision);
    an AVX-512 one runs it natively and faster than fp32."""
    from cxr_pipeline.vision.train import resolve_precision

    cpu = torch.device("cpu")
    for native, expected in ((False, "fp32"), (True, "bf16")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("bf16", cpu) == "bf16"  # an explicit choice stands
