"""Calibration: fitted on validate, strictly increasing (the calls do not move), measured before and after."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_pipeline.vision import calibration as cal


def shifted_scores(n: int, seed: int, shift: float = 2.0):
    """Labels drawn at a known probability q, and the score a pos_weight-trained network gives: q's logit
    pushed up by ``shift`` (it ranks perfectly well, but over-calls)."""
    rng = np.random.default_rng(seed)
    q = 1 / (1 + np.exp(-rng.normal(-1.0, 1.5, n)))
    y = (rng.uniform(size=n) < q).astype(int)
    return y, 1 / (1 + np.exp(-(np.log(q / (1 - q)) + shift)))


def test_platt_scaling_fitted_on_validate_removes_an_offset_on_test():
    y_val, p_val = shifted_scores(600, seed=0)
    y_test, p_test = shifted_scores(2000, seed=1)
    fit = cal.fit_platt(y_val, p_val)
    assert fit["method"] == "platt" and fit["fitted_on"] == "validate" and fit["n"] == 600
    assert fit["a"] == pytest.approx(1.0, abs=0.25) and fit["b"] == pytest.approx(-2.0, abs=0.4)  # the planted offset, undone
    row = cal.calibration_row(y_test, p_test, fit, n_boot=100)
    assert row["ece_before"] > 0.15 and row["ece_after"] < 0.05, row
    assert row["brier_after"] < row["brier_before"]
    assert row["ece_after_lo"] < row["ece_after"] < row["ece_after_hi"] < row["ece_before_lo"]
    assert "Platt scaling on validate" in cal.describe(fit)


def test_the_map_is_strictly_increasing_so_every_call_stays_the_same():
    y_val, p_val = shifted_scores(400, seed=2)
    fit = cal.fit_platt(y_val, p_val)
    p = np.sort(np.random.default_rng(3).uniform(0, 1, 5000))
    mapped = cal.apply(fit, p)
    assert np.all(np.diff(mapped) > 0)
    for t in (0.05, 0.3, float(np.median(p_val)), 0.9):
        assert np.array_equal(p >= t, mapped >= cal.calibrated_threshold(fit, t))


def test_the_fit_is_scikit_learns_platt_fit_and_stays_finite_when_validate_is_separable():
    """The same map as scikit-learn's own sigmoid calibration (its private ``_SigmoidCalibration``: Platt's smoothed
    targets, an independent implementation) on the same logits; and a validation split the scores separate
    perfectly gives a finite slope, probabilities strictly inside (0, 1), not a step to 0 and 1."""
    from sklearn.calibration import _SigmoidCalibration

    y_val, p_val = shifted_scores(300, seed=8)
    p_new = np.random.default_rng(9).uniform(0.01, 0.99, 200)
    reference = _SigmoidCalibration().fit(cal._logit(p_val), y_val).predict(cal._logit(p_new))
    assert np.allclose(cal.apply(cal.fit_platt(y_val, p_val), p_new), reference, atol=2e-3)
    y = np.array([0] * 12 + [1] * 8)
    p = np.concatenate([np.linspace(0.05, 0.3, 12), np.linspace(0.6, 0.95, 8)])  # every positive above every negative
    fit = cal.fit_platt(y, p)
    assert fit["method"] == "platt" and np.isfinite(fit["a"]) and fit["a"] < 50
    mapped = cal.apply(fit, p)
    assert 0.01 < mapped.min() and mapped.max() < 0.99  # Platt's targets: 1/14 and 9/10
    assert mapped[y == 1].mean() == pytest.approx(9 / 10, abs=0.06) and mapped[y == 0].mean() == pytest.approx(1 / 14, abs=0.06)


def test_at_the_clip_the_map_ties_scores_so_calls_are_read_on_the_network_s_score():
    """A threshold of 0.9999997 and a score of 0.9999992: both clip to ``1 - _EPS`` and map to one probability,
    so the calibrated probability "reaches" the carried threshold though the network's score does not. The
    served call is the network's, and the model's metadata names each threshold by its scale, with no bare
    ``thresholds`` to compare the served probabilities with."""
    from cxr_pipeline.vision.checkpoint import CheckpointConfig, LoadedClassifier
    from cxr_pipeline.vision.serving import prediction_frame, threshold_metadata

    fit = cal.fit_platt(*shifted_scores(300, seed=10))
    t, below = 0.9999997, 0.9999992
    assert cal.apply(fit, [below])[0] >= cal.calibrated_threshold(fit, t)  # read through the map: a (wrong) positive
    model = LoadedClassifier(None, CheckpointConfig("resnet18", 32, ("Edema",), {"edema": t}, {"edema": fit}))
    frame = prediction_frame(model, np.array([[below], [t], [0.2]], dtype=np.float32))
    assert frame["edema_call"].tolist() == [False, True, False]
    meta = threshold_metadata(model)
    assert "thresholds" not in meta and meta["thresholds_uncalibrated"] == {"edema": t}
    assert meta["thresholds_calibrated"]["edema"] == pytest.approx(cal.calibrated_threshold(fit, t))
    assert "edema_call" in meta["calls"].replace("<slug>", "edema")


def test_a_validation_split_it_cannot_fit_on_gives_the_identity_and_says_why():
    one_class = cal.fit_platt(np.zeros(20), np.linspace(0, 1, 20))
    assert one_class["method"] == "none" and "one class" in one_class["reason"]
    inverted = cal.fit_platt(np.array([1] * 10 + [0] * 10), np.linspace(0.01, 0.99, 20))  # scores rank backwards
    assert inverted["method"] == "none" and "not positive" in inverted["reason"]
    p = np.array([0.2, 0.7])
    assert np.array_equal(cal.apply(one_class, p), p) and np.array_equal(cal.apply(None, p), p)


def test_ece_is_the_binned_gap_between_confidence_and_frequency():
    """Worked by hand: bins [0.1, 0.2) holds 0.1, 0.15 (no positive), [0.8, 0.9) holds 0.8, 0.85 (one positive),
    [0.9, 1.0] holds 0.95 (a positive): (2 * 0.125 + 2 * 0.325 + 1 * 0.05) / 5."""
    y = np.array([0, 0, 1, 0, 1])
    p = np.array([0.1, 0.15, 0.8, 0.85, 0.95])
    assert cal.ece(y, p) == pytest.approx((2 * 0.125 + 2 * 0.325 + 0.05) / 5, abs=1e-6)
    assert cal.brier(y, p) == pytest.approx(np.mean((p - y) ** 2))


def test_a_checkpoint_from_before_calibration_loads_and_says_it_is_uncalibrated(tmp_path):
    from safetensors.torch import save_file

    from cxr_pipeline.vision.checkpoint import load_checkpoint
    from cxr_pipeline.vision.models import build_model
    from cxr_pipeline.vision.serving import prediction_frame

    net = build_model("resnet18")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    config = {"arch": "resnet18", "dropout": 0.2, "size": 32, "pathology": "Cardiomegaly", "threshold": 0.4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = load_checkpoint(tmp_path)
    assert not old.calibrated and old.served_thresholds == old.thresholds == [0.4]
    scores = np.array([[0.3], [0.5]], dtype=np.float32)
    frame = prediction_frame(old, scores)
    assert frame["cardiomegaly"].tolist() == pytest.approx([0.3, 0.5]) and frame["cardiomegaly_call"].tolist() == [False, True]
    fit = cal.fit_platt(*shifted_scores(300, seed=4))
    (tmp_path / "config.json").write_text(json.dumps({**config, "calibration": fit}))
    new = load_checkpoint(tmp_path)
    frame = prediction_frame(new, scores)
    assert new.calibrated and frame["cardiomegaly"].tolist() == pytest.approx(cal.apply(fit, [0.3, 0.5]).tolist())
    assert frame["cardiomegaly_call"].tolist() == [False, True]  # the same calls
    assert new.served_thresholds[0] == pytest.approx(cal.calibrated_threshold(fit, 0.4))


def test_the_reliability_diagram_draws_every_finding_it_can(tmp_path):
    y, p = shifted_scores(300, seed=5)
    fit = cal.fit_platt(y, p)
    out = cal.reliability_diagram(
        {"Edema": (y, p, cal.apply(fit, p)), "Empty": (np.zeros(0), np.zeros(0), np.zeros(0))}, tmp_path / "r.png"
    )
    assert out is not None and out.stat().st_size > 5000
    assert cal.reliability_diagram({"Empty": (np.zeros(3), np.zeros(3), np.zeros(3))}, tmp_path / "none.png") is None


def test_the_demo_prints_calibration_before_and_after_for_every_finding_model_and_label_source():
    import polars as pl

    from cxr_pipeline.demo import calibration_table

    rows = [
        {"pathology": "Edema", "model": m, "test_labels": src, "evaluable": True, "n_pos": 30, "ece_before": 0.2, "ece_after": 0.05}
        | {"brier_before": 0.3, "brier_after": 0.2}
        for m in ("per_pathology", "multilabel")
        for src in ("chexpert", "radiologist")
    ]
    rows.append({**rows[0], "pathology": "Fracture", "evaluable": False, "ece_before": None, "ece_after": None})
    table = calibration_table(pl.DataFrame(rows))
    assert table.height == 2 and set(table["model"]) == {"per-finding", "multi-label"}
    assert table["ece_auto"].to_list() == ["0.2 -> 0.05"] * 2 and table["brier_rad"].to_list() == ["0.3 -> 0.2"] * 2
    assert calibration_table(pl.DataFrame({"pathology": ["Edema"], "roc_auc": [0.8]})).height == 0  # a table from before
    from cxr_pipeline.demo import classifier_table

    auc = {"roc_auc": 0.8, "roc_auc_lo": 0.7, "roc_auc_hi": 0.9, "reference_auc": 0.72}
    shown = classifier_table(pl.DataFrame([{**r, **auc} for r in rows[:4]]))
    assert shown.height == 1 and shown["ece auto"].to_list() == ["0.2 -> 0.05"] and shown["brier auto"].to_list() == ["0.3 -> 0.2"]


def test_a_model_card_is_built_from_the_run_s_records(tmp_path):
    from cxr_pipeline.vision.checkpoint import config_from_json
    from cxr_pipeline.vision.model_card import REPLICA_MARKER, build_card, data_source

    fit = cal.fit_platt(*shifted_scores(300, seed=6))
    config = {"arch": "resnet18", "size": 224, "pathology": "Edema", "threshold": 0.4, "calibration": fit}
    config["training_config"] = {"uncertain": "ignore", "blank": "zeros", "lr": 1e-4}
    row = {"pathology": "Edema", "test_labels": "chexpert", "evaluable": True, "n_test": 120, "n_pos": 31, "roc_auc": 0.81}
    row |= {"roc_auc_lo": 0.72, "roc_auc_hi": 0.88, "ece_before": 0.21, "ece_after": 0.04, "brier_before": 0.2, "brier_after": 0.15}
    rad = {"pathology": "Edema", "test_labels": "radiologist", "evaluable": False, "reason": "test split has only negatives", "n_test": 9}
    (tmp_path / REPLICA_MARKER).write_text(json.dumps({"patients": 300, "seed": 0}))
    md, card = build_card(
        name="cxr-edema", version="3", run_id="abc", config=config_from_json(config).as_json(), rows=[row, rad],
        counts={"train": {"images": 900, "positives": 200}}, views=["AP", "PA"], manifest_version="d1", source=data_source(tmp_path),
    )  # fmt: skip
    assert card["training_data"]["source"] == {
        "kind": "replica",
        "note": card["training_data"]["source"]["note"],
        "patients": 300,
        "seed": 0,
    }
    assert card["calibration"]["maps"]["Edema"].startswith("Platt scaling on validate")
    assert card["training_data"]["label_policy"] == {"uncertain": "ignore", "blank": "zeros"}
    assert "| Edema | chexpert | 120 (31) | 0.810 [0.720-0.880] |" in md and "not evaluable: test split has only negatives" in md
    assert "Trained and tested on the replica only" in md and "## Intended use" in md and "| train | 900 | 200 |" in md
    assert data_source(tmp_path / "elsewhere")["kind"] == "MIMIC-CXR"
