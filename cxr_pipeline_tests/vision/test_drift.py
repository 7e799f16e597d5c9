"""The drift signals and the label-free performance estimate (``vision.drift``) on constructed data whose answer is
known: a shifted sample is told apart and an unshifted one is not, at the rate the p-value promises; the CBPE
estimate matches the measured AUC, sensitivity and specificity when the probabilities are calibrated."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from cxr_pipeline.vision.drift import (
    KERNELS,
    SIGNALS,
    TOLERANCES,
    DriftSettings,
    Sample,
    acquisition,
    cbpe,
    compare,
    intensity_histogram,
    js_distance,
    ks_statistic,
    mmd_test,
    one_per_patient,
    view_mix,
)


def test_the_mmd_test_flags_a_shifted_window_and_holds_its_false_alarm_rate():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 16))
    shifted = rng.normal(size=(100, 16)) + np.r_[1.0, np.zeros(15)]  # one feature of 16 moved by 1 sd
    assert mmd_test(reference, shifted, permutations=300, seed=1).p_value < 0.01
    # windows from the reference's own distribution: p is uniform, so p < 0.05 in about 5% of them
    ps = [mmd_test(reference, rng.normal(size=(100, 16)), permutations=200, seed=k).p_value for k in range(40)]
    assert sum(p < 0.05 for p in ps) <= 6 and np.mean(ps) > 0.3


def test_the_unit_is_the_patient_so_a_window_of_few_patients_images_is_no_shift():
    """A patient's images are alike: windows of 20 patients' 5 images each, from the reference's own distribution,
    fail a test that treats images as exchangeable far more often than alpha; one image per patient holds the rate.
    ``compare`` refuses a side with a repeated patient."""
    rng = np.random.default_rng(2)

    def images_of(n: int, k: int) -> tuple[np.ndarray, pl.DataFrame]:
        centres = rng.normal(size=(n, 8))
        x = np.repeat(centres, k, axis=0) + 0.3 * rng.normal(size=(n * k, 8))
        ids = rng.integers(10**6, 10**7, size=n)
        return x, pl.DataFrame({"subject_id": np.repeat(ids, k), "study_id": np.arange(n * k)})

    reference, _ = images_of(300, 1)
    clustered = one = 0
    for k in range(30):
        x, rows = images_of(20, 5)
        clustered += mmd_test(reference, x, permutations=200, seed=k).p_value < 0.05
        kept = one_per_patient(rows.with_row_index("i"), seed=k)
        assert kept["subject_id"].n_unique() == kept.height == 20 and kept["i"].is_sorted()  # one each, in order
        one += mmd_test(reference, x[kept["i"].to_numpy()], permutations=200, seed=k).p_value < 0.05
    assert clustered >= 10 and one <= 5, (clustered, one)
    x, rows = images_of(20, 5)
    window = Sample(np.zeros((100, 8, 8), np.uint8), ["PA"] * 100, rows)
    with pytest.raises(ValueError, match="80 images repeat a patient"):
        compare("w", Sample(np.zeros((5, 8, 8), np.uint8), ["PA"] * 5), window, None, DriftSettings())


def test_the_mmd_statistic_grows_with_the_shift():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(200, 8))
    base = rng.normal(size=(100, 8))
    stats = [mmd_test(reference, base + d, permutations=50).statistic for d in (0.0, 0.3, 0.6, 1.2)]
    assert stats == sorted(stats) and stats[0] < stats[-1] / 10


def test_cbpe_matches_the_measured_figures_when_probabilities_are_calibrated():
    rng = np.random.default_rng(2)
    p = rng.beta(0.8, 2.5, size=20_000)
    y = rng.uniform(size=p.size) < p  # calibrated by construction
    est = cbpe(p, call=p >= 0.4)
    assert est["expected_auc"] == pytest.approx(roc_auc_score(y, p), abs=0.01)
    assert est["expected_sensitivity"] == pytest.approx((p[y] >= 0.4).mean(), abs=0.01)
    assert est["expected_specificity"] == pytest.approx((p[~y] < 0.4).mean(), abs=0.01)
    # overconfident probabilities (squashed towards 0 and 1): the estimate is optimistic, as CBPE's assumption says
    sharp = 1 / (1 + np.exp(-3 * np.log(p / (1 - p))))
    assert cbpe(sharp)["expected_auc"] > roc_auc_score(y, sharp) + 0.03
    assert np.isnan(cbpe(p)["expected_sensitivity"])  # no calls given: no sensitivity claimed


def test_histogram_distance_and_ks_are_zero_for_the_same_and_large_for_different():
    rng = np.random.default_rng(3)
    a = rng.integers(1, 256, size=(10, 32, 32), dtype=np.uint8)
    assert js_distance(intensity_histogram(a), intensity_histogram(a)) == 0.0
    dark = np.clip(a.astype(int) // 3, 1, 255).astype(np.uint8)
    assert js_distance(intensity_histogram(a), intensity_histogram(dark)) > 0.3
    padded = a.copy()
    padded[:, :4] = 0  # letterbox padding is not counted
    assert np.allclose(intensity_histogram(padded), intensity_histogram(a[:, 4:]))
    assert ks_statistic(np.arange(100), np.arange(100)) == 0.0 and ks_statistic(np.zeros(10), np.ones(10)) == 1.0
    assert view_mix(["PA", "AP", "LATERAL", "LL"]) == {"PA": 0.25, "AP": 0.25, "lateral": 0.5}


def test_a_shifted_window_is_flagged_and_an_unshifted_one_is_not(replica, registry):
    """The replica's frontal images through the registered multi-label model (random weights at 32 px: its outputs
    and features still see the images): a reference, a window of other images (no alarm) and the same window shifted
    (noise and a darker exposure: the alarm, on the outputs by default and on the features when configured); a per-finding champion's outputs are compared under the same window signals.
    (No header text in the table, MLflow or Dagster's metadata: ``defs/test_model_assets.py``, where the asset
    reads the files.)"""
    import pydicom

    from cxr_pipeline.data.dicom import prepare
    from cxr_pipeline.tracking import get_client
    from cxr_pipeline.vision.drift import DriftSettings, Sample, compare
    from cxr_pipeline.vision.external import load_champions

    files = sorted(replica.rglob("*.dcm"))
    heads = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    frontal = [f for f in files if heads[f].ViewPosition in ("PA", "AP")][:90]
    images = np.stack([prepare(str(f), 32) for f in frontal])
    views = [str(heads[f].ViewPosition) for f in frontal]
    client, uri = get_client()
    champ, edema = load_champions(client, uri, ["cxr-multilabel", "cxr-edema"])
    reference, window = Sample(images[:60], views[:60]), Sample(images[60:], views[60:])
    rng = np.random.default_rng(0)
    shifted = np.clip(window.images * 0.6 + rng.normal(0, 25, window.images.shape), 1, 255).astype(np.uint8)
    # tolerance 0: the alarm on significance alone. The validated tolerances (vision.drift.TOLERANCES) are sizes for
    # a trained champion's outputs; this random-weight model's barely move (its tolerance is tested below)
    cfg = DriftSettings(permutations=300, alpha=0.01, tolerance=0.0)
    same = compare("same", reference, window, champ, cfg)
    moved = compare("moved", reference, Sample(shifted, window.views), champ, cfg)
    # another champion's outputs on its own images (here the shifted ones, beside an unshifted multi-label side)
    mixed = compare("mixed", reference, window, champ, cfg, others=[(edema, reference, Sample(shifted, window.views))])
    assert not same[0]["drifted"] and moved[0]["drifted"]
    # a significant change smaller than the tolerance is reported, not alarmed; by default the validated tolerance
    above = compare("moved", reference, Sample(shifted, window.views), champ, replace(cfg, tolerance=moved[0]["drift_score"] * 1.01))[0]
    assert above["p_value"] < 0.01 and not above["drifted"] and above["tolerance"] == pytest.approx(moved[0]["drift_score"] * 1.01)
    # the default tolerance is in force: this model's shifted window is significant but moves its outputs less
    default = compare("moved", reference, Sample(shifted, window.views), champ, replace(cfg, tolerance=None))[0]
    assert default["tolerance"] == TOLERANCES[("outputs", "energy")] and default["p_value"] < 0.01
    assert default["drift_score"] < default["tolerance"] and not default["drifted"]
    # the alarm's signal is the outputs by default; the features are tested beside them, and alarm when configured to
    by_features = compare("moved", reference, Sample(shifted, window.views), champ, replace(cfg, signal="features"))
    assert moved[0]["signal"] == "outputs" and moved[0]["drift_score"] == moved[0]["outputs_mmd"] and by_features[0]["drifted"]
    assert by_features[0]["drift_score"] == by_features[0]["features_mmd"] == moved[0]["features_mmd"]
    assert not compare("same", reference, window, champ, replace(cfg, signal="features"))[0]["drifted"]
    assert by_features[0]["p_value"] == moved[0]["features_p_value"] and moved[0]["p_value"] == moved[0]["outputs_p_value"]
    # on the calibrated probabilities, not the network's scores: under a Platt map (this champion has none) the test
    # compares the mapped scores
    platt = {s: {"method": "platt", "a": 3.0, "b": -1.0} for s in champ.model.slugs}
    calibrated = replace(champ, model=replace(champ.model, config=replace(champ.model.config, calibration=platt)))
    got = compare("moved", reference, Sample(shifted, window.views), calibrated, cfg)[0]
    cm = calibrated.model
    want = mmd_test(cm.calibrate(cm.probabilities(reference.images)), cm.calibrate(cm.probabilities(shifted)), 300, 0).statistic
    assert got["outputs_mmd"] == pytest.approx(want) and got["outputs_mmd"] != pytest.approx(moved[0]["outputs_mmd"], rel=0.01)
    assert moved[0]["drift_score"] > same[0]["drift_score"] and moved[0]["histogram_distance"] > same[0]["histogram_distance"]
    assert len(same) == len(champ.model.slugs) and all(r["auc"] is None for r in same)  # no labels: CBPE only
    (own,) = [r for r in mixed if r["model"] == f"cxr-edema v{edema.version}"]  # its own finding, its own outputs
    em = edema.model
    want = ks_statistic(em.calibrate(em.probabilities(reference.images))[:, 0], em.calibrate(em.probabilities(shifted))[:, 0])
    assert own["slug"] == "edema" and own["output_ks"] == pytest.approx(want) and len(mixed) == len(champ.model.slugs) + 1
    assert own["drift_score"] == same[0]["drift_score"] and not own["drifted"]  # the window's signals: the multi-label side's
    small = Sample(window.images[:, ::2, ::2].copy(), window.views)  # images at another size than the champion reads
    with pytest.raises(ValueError, match="cxr-edema: its window images are 16 px, the model reads 32 px"):
        compare("w", reference, window, champ, cfg, others=[(edema, reference, small)])


def test_the_drift_score_is_the_unbiased_mmd_and_means_the_same_size_at_any_window_size():
    """The tolerance is a size, so the score may not grow with a window's size: the unbiased MMD² (the energy
    distance's U-statistic, recounted here from the pairwise distances) of a shift is about the same, on average, in
    windows of 50 and in one of 2,000, and about 0 without one; the biased V-statistic adds about the mean within-window distance over
    the window's size and would put windows of 50 over a tolerance one of 2,000 stays under."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(5)
    reference = rng.normal(size=(400, 4))

    def recount(a: np.ndarray, b: np.ndarray) -> float:
        n, m = len(a), len(b)
        return float(2 * cdist(a, b).mean() - cdist(a, a).sum() / (n * (n - 1)) - cdist(b, b).sum() / (m * (m - 1)))

    smalls, large = [rng.normal(size=(50, 4)) + 0.5 for _ in range(40)], rng.normal(size=(2000, 4)) + 0.5
    got = [mmd_test(reference, w, permutations=5).statistic for w in smalls]
    assert got[0] == pytest.approx(recount(reference, smalls[0]))
    big = mmd_test(reference, large, permutations=2).statistic
    # (the V-statistic's mean over these windows of 50 sits about 0.07 above its value on the window of 2,000)
    assert big == pytest.approx(recount(reference, large)) and float(np.mean(got)) == pytest.approx(big, abs=0.05) and big > 0.25
    nulls = [mmd_test(reference, rng.normal(size=(50, 4)), permutations=20, seed=k).statistic for k in range(20)]
    assert abs(float(np.mean(nulls))) < 0.03 and min(nulls) < 0  # unbiased: centred on 0, so it dips below


def test_the_p_value_counts_the_permutations_whose_unbiased_mmd_reaches_the_observed_one():
    """The permutation null recounted by brute force: the same permutations (torch's, from the seed), each split's
    unbiased MMD² computed directly, under the energy distance and a fixed-bandwidth Gaussian."""
    import torch
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(2)
    reference, window = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.4
    pooled = np.concatenate([reference, window])
    for kernel, sigma in (("energy", None), ("gaussian", 1.5)):
        d = cdist(pooled, pooled)
        k = -d if kernel == "energy" else np.exp(-(d**2) / (2 * sigma**2))

        def direct(ref: np.ndarray, win: np.ndarray, k=k) -> float:
            kr, kw = k[np.ix_(ref, ref)], k[np.ix_(win, win)]
            n, m = len(ref), len(win)
            within = (kr.sum() - np.trace(kr)) / (n * (n - 1)) + (kw.sum() - np.trace(kw)) / (m * (m - 1))
            return float(within - 2 * k[np.ix_(ref, win)].mean())

        g = torch.Generator().manual_seed(9)
        member = np.r_[np.ones(7), np.zeros(5)]
        null = [
            direct(np.flatnonzero(p), np.flatnonzero(1 - p)) for p in (member[torch.randperm(12, generator=g).numpy()] for _ in range(60))
        ]
        observed = direct(np.arange(7), np.arange(7, 12))
        got = mmd_test(reference, window, permutations=60, seed=9, kernel=kernel, sigma=sigma)
        assert got.statistic == pytest.approx(observed)
        assert got.p_value == pytest.approx((1 + sum(x >= observed - 1e-12 for x in null)) / 61), kernel


def test_the_tolerance_in_force_is_the_validated_one_for_the_signal_and_kernel_unless_set():
    for (signal, kernel), value in TOLERANCES.items():
        assert DriftSettings(signal=signal, kernel=kernel).alarm_tolerance == value
        assert DriftSettings(signal=signal, kernel=kernel, tolerance=0.0).alarm_tolerance == 0.0
    assert set(TOLERANCES) == {(s, k) for s in SIGNALS for k in KERNELS}
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="tolerance must be at least 0"):
            DriftSettings(tolerance=bad)


def test_acquisition_statistics_give_the_bit_depth_and_size_beside_the_reference():
    reference = np.array([[12, 3000, 2500]] * 6 + [[16, 2800, 2300]] * 2 + [[0, 0, 0]])  # an unreadable header left out
    window = np.array([[8, 390, 320]] * 5 + [[16, 400, 330]])
    got = acquisition(reference, window)
    assert (got["bits_stored"], got["bits_stored_reference"]) == (8, 12)
    assert got["source_rows"] == 390 and got["source_rows_reference"] == 3000 and got["source_size_ratio"] == pytest.approx(0.13)
    assert set(acquisition(None, window).values()) == {None}  # where the headers are not at hand: no figure


def test_every_kernel_flags_a_shift_and_only_the_energy_distance_keeps_growing_far_off():
    """Why the energy distance is the default: a Gaussian kernel's MMD² levels off once a window is far from the
    reference (the cross-similarities reach 0), so a larger shift no longer scores higher; the energy distance grows."""
    rng = np.random.default_rng(3)
    reference, base = rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
    sigma = float(np.sqrt(2 * 8))  # about the reference's own median distance
    for kernel, s in (("gaussian", None), ("gaussian", sigma), ("multiscale", None), ("energy", None)):
        assert mmd_test(reference, base + 1.0, permutations=100, kernel=kernel, sigma=s).p_value < 0.02, kernel
        assert mmd_test(reference, base, permutations=100, kernel=kernel, sigma=s).p_value > 0.05, kernel
    far = {
        k: [mmd_test(reference, base + d, permutations=10, kernel=k).statistic for d in (4.0, 8.0, 16.0)] for k in ("gaussian", "energy")
    }
    assert far["gaussian"][-1] < far["gaussian"][0] * 1.2 and far["energy"][-1] > far["energy"][0] * 3
    with pytest.raises(ValueError, match="kernel must be one of"):
        mmd_test(reference, base, kernel="laplace")


def test_settings_that_could_never_alarm_are_refused():
    with pytest.raises(ValueError, match="can never alarm"):
        DriftSettings(permutations=50, alpha=0.01)  # the smallest p-value would be 1/51 > 0.01
    with pytest.raises(ValueError, match="at least 2"):
        DriftSettings(pacs_window=1)
    with pytest.raises(ValueError, match="kernel must be one of"):
        DriftSettings(kernel="laplace")
    with pytest.raises(ValueError, match="signal must be one of outputs, features, not 'pixels'"):
        DriftSettings(signal="pixels")
    assert DriftSettings(permutations=100, alpha=0.01).permutations == 100
