"""Does a window of new images still look like the training images? Drift signals and label-free performance.

Three signals compare a window (a batch of incoming images) with a reference drawn from the training split only:

- **acquisition statistics** (no header text): the intensity histogram of the stored (windowed, letterboxed)
  images, by Jensen-Shannon distance; the share of each view; the source images' size;
- **learned representations**: the multi-label champion backbone's pooled features, compared by the maximum mean
  discrepancy (MMD; the energy distance by default, ``DriftSettings.kernel``) with a permutation p-value, computed
  in torch;
- **outputs**: each champion's calibrated probabilities: the multi-label champion's, every finding at once, by MMD
  with a permutation p-value (the alarm's signal by default), and per finding by the two-sample Kolmogorov-Smirnov
  statistic; each per-finding champion's, for its own finding, by KS.

The test's unit is the **patient**: a permutation test treats every image as exchangeable with every other, and
a patient's several images (and studies) are alike, so both sides hold one image per patient (``one_per_patient``;
``compare`` refuses a side with repeats). Without it, unshifted windows of consecutive images, a few patients'
images each, were flagged far more often than alpha (a smoke run of the benchmark: 7 of 25 at p < 0.01).

The alarm is decided by one MMD test (``DriftSettings.signal``): by default on the **outputs**, the multi-label
champion's calibrated probabilities (one dimension per finding: black-box shift detection, Lipton et al. 2018;
Rabanser et al. 2019, "Failing Loudly", found tests on a classifier's outputs among the most reliable shift
detectors they compared, theirs univariate KS tests on softmax outputs), else on the backbone's
**features**. **Drift score** = the unbiased MMD² of the window against the reference on that signal (the energy
distance by default, ``DriftSettings.kernel``; about 0 without drift whatever the window's size), **p-value** = its
permutation p-value; a window *drifts* when p < ``alpha`` **and** the drift score reaches ``tolerance`` (a size
chosen on the benchmark's validation seeds, ``TOLERANCES``; ``alarmed``): significance alone is not enough, since
a window of 100 patients whose findings' mix differs from the training split's (one with half its effusions) moves
the outputs significantly while its images are unchanged (seed 23's format-alone windows, #51; why their mix
differs was not found).
Both MMD tests are reported (``outputs_mmd``, ``features_mmd`` and their p-values), as are the other signals; none
but the configured one alarms (several alarms would multiply false ones). Why the outputs: on the drift benchmark's
validation seeds (5 and 7, ``benchmarks/drift_rescore.py``) they ranked the kinds of shift better against the AUC
they cost than the features did (a gain moves the features far and costs little AUC; noise the reverse; the
probabilities, bounded in [0, 1] and read through the model, move with what the model makes of the image), with as
few false alarms. The numbers, and what each catches and misses, are on the Monitoring docs page: a change in
prevalence alone moves the outputs (and so the default alarm) while the images are unchanged; a change the
model's outputs ignore is missed by it and may show in the features.

**Expected performance without labels** (confidence-based performance estimation, as NannyML's CBPE): if the
calibrated probabilities are right on the window, each image is a positive with its probability, so the expected
confusion matrix at the served threshold, and the expected ROC curve, follow from the probabilities alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from cxr_pipeline.data.harmonisation import NULL_IS_UNSCORABLE
from cxr_pipeline.fields import setting
from cxr_pipeline.labels import LABEL_BY_SLUG
from cxr_pipeline.vision.targets import targets
from cxr_pipeline.vision.train import to_input

HIST_BINS = 64


def intensity_histogram(images: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """The share of pixels in each of ``bins`` equal intensity bins of uint8 images, zeros left out: the letterbox
    pads with 0 (the darkest real pixels, clipped to 0 by the decoder's percentile window, go with them, the same
    way in every window)."""
    values = np.asarray(images, dtype=np.uint8).ravel()
    values = values[values > 0]
    hist = np.bincount((values.astype(np.int64) * bins) // 256, minlength=bins).astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2: 0 same, 1 disjoint) between two histograms (scipy's, in numpy: one line
    here is cheaper than importing scipy into the asset's process for it)."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (the largest gap between the two empirical CDFs)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))))


def embeddings(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The backbone's pooled features (the input of the classifier's last linear layer) of uint8 images, as the
    model sees them (its own preprocessing): (n, d) float32."""
    import torch

    net = model.net.cpu().eval()
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    hook = last.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().flatten(1)))
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = to_input(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.uint8)), torch.device("cpu"), False)
                net(x)
    finally:
        hook.remove()
    return torch.cat(captured).numpy().astype(np.float32) if captured else np.zeros((0, last.in_features), np.float32)


def one_per_patient(rows: pl.DataFrame, seed: int) -> pl.DataFrame:
    """One image of each patient (``subject_id``), drawn with ``seed``, in the rows' order: the unit the MMD
    permutation test may treat as exchangeable (see the module's docstring)."""
    drawn = pl.Series("_r", np.random.default_rng(seed).random(rows.height))
    picked = rows.with_row_index("_o").with_columns(drawn).sort("_r").unique("subject_id", keep="first", maintain_order=True)
    return picked.sort("_o").drop("_o", "_r")


def repeated_patients(sample_rows) -> int:
    """How many images of a side repeat a patient already there (0 when the rows carry no ``subject_id``)."""
    if sample_rows is None or "subject_id" not in sample_rows.columns:
        return 0
    return sample_rows.height - sample_rows["subject_id"].n_unique()


@dataclass(frozen=True)
class MMDTest:
    statistic: float  # MMD² of window against reference, unbiased (U-statistic): about 0 without drift, may dip below
    p_value: float  # (1 + permutations at least as large) / (1 + permutations)
    bandwidth: float | None  # the Gaussian kernel's sigma (the middle one of a multiscale kernel); None for energy
    permutations: int


KERNELS = ("gaussian", "gaussian-reference", "multiscale", "energy")
SIGNALS = ("outputs", "features")  # what the alarm's MMD test compares (vision.drift's docstring)
SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the multiscale kernel's sigmas, times the median distance
# The alarm's tolerance per (signal, kernel): the smallest unbiased MMD² that alarms (with p < alpha). Chosen on the
# drift benchmark's validation seeds 5 and 7 alone, by benchmarks/drift_rescore.py's rule (the geometric midpoint
# between the largest no-shift window and the smallest one at a level whose AUC drop is at least 0.05):
#   python benchmarks/drift_rescore.py /tmp/bench_drift_s5 /tmp/bench_drift_s7 --candidates calibrated,features \
#       --kernels energy,gaussian,gaussian-reference,multiscale   (2-core x86_64, 2026-12-07, the code of 5e1def7)
# Why a tolerance: at the benchmark's seed 23, 5 of 17 windows of external-format replicas with no image shift were
# significant on the outputs (their findings' mix differed from the training split's: one had half its effusions;
# the cause of the difference is not known). Scope: set for the benchmark's champion (ResNet-18 at 64 px on a
# 750-patient replica); MMD² is in the units of the signal, the kernel and the champion (a sharper model's outputs
# move further for the same change, another backbone's features have another scale). For another champion the
# values are a starting point, not a validated size: the benchmark trains the demo's recipe at 64 px (its
# ``train``); windows of another champion, dumped as its --dump does, are what drift_rescore.py would derive one from.
TOLERANCES = {
    ("outputs", "energy"): 0.065,
    ("outputs", "gaussian"): 0.027,
    ("outputs", "gaussian-reference"): 0.027,
    ("outputs", "multiscale"): 0.023,
    ("features", "energy"): 0.59,
    ("features", "gaussian"): 0.019,
    ("features", "gaussian-reference"): 0.019,
    ("features", "multiscale"): 0.011,
}


def median_distance(x: np.ndarray) -> float:
    """The median distance between distinct points of ``x``: the Gaussian kernel's sigma by the median heuristic."""
    import torch

    t = torch.from_numpy(np.asarray(x, np.float64))
    return float(np.sqrt(float(_upper(torch.cdist(t, t).pow(2)).median())))


def _upper(d2):
    import torch

    return d2[torch.triu(torch.ones_like(d2, dtype=torch.bool), diagonal=1)]


def mmd_test(
    reference: np.ndarray, window: np.ndarray, permutations: int = 500, seed: int = 0, kernel: str = "energy", sigma: float | None = None
) -> MMDTest:
    """The unbiased MMD² (U-statistic) and its permutation p-value, in torch: the pooled kernel matrix once, then
    every permutation's statistic from two matrix products of its membership vectors (alibi-detect does the same
    test, but pins numpy < 2 and transformers < 5; torch is already here). Unbiased because the alarm's tolerance
    (``DriftSettings.tolerance``) is a size: the biased V-statistic adds about the mean within-sample kernel
    distance over the window's size, so one threshold would mean a smaller shift in a window of 500 than in one of
    100 (this holds for the energy distance and a fixed bandwidth; the pooled median's bandwidth moves a little with
    the window's share of the pool). ``kernel``: ``gaussian`` (sigma: ``sigma``, else the median distance between the pooled points;
    ``gaussian-reference`` passes the reference's own), ``multiscale`` (the mean of Gaussians at ``SCALES`` times
    that sigma: one far-off window does not saturate it as it saturates a single Gaussian), ``energy`` (the
    distance-induced kernel, minus the distance: MMD² is then the energy distance, which grows with a shift instead
    of levelling off)."""
    import torch

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    x = torch.from_numpy(np.concatenate([reference, window]).astype(np.float64))
    n, m = len(reference), len(window)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 reference and 2 window points (got {n}, {m})")
    d2 = torch.cdist(x, x).pow(2)
    bandwidth = None
    if kernel == "energy":
        k = -d2.clamp_min(0).sqrt()
    else:
        bandwidth = float(sigma) if sigma is not None else float(np.sqrt(float(_upper(d2).median())))
        scales = SCALES if kernel == "multiscale" else (1.0,)
        k = sum(torch.exp(-d2 / (2 * max((c * bandwidth) ** 2, 1e-12))) for c in scales) / len(scales)
    k.fill_diagonal_(0.0)  # the U-statistic leaves out each point's kernel with itself
    total = float(k.sum())

    def unbiased(member: torch.Tensor) -> torch.Tensor:
        """MMD² of each row's split (1: counted as reference, 0: as window), from the within-reference and the
        cross sums (the within-window sum is what the total leaves)."""
        km = member @ k
        within, cross = (km * member).sum(dim=-1), (km * (1 - member)).sum(dim=-1)
        return within / (n * (n - 1)) + (total - within - 2 * cross) / (m * (m - 1)) - 2 * cross / (n * m)

    g = torch.Generator().manual_seed(seed)
    member = torch.cat([torch.ones(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)])
    perms = torch.stack([member[torch.randperm(n + m, generator=g)] for _ in range(permutations)])
    observed = float(unbiased(member))
    null = unbiased(perms)
    p = (1 + int((null >= observed - 1e-12 * max(1.0, abs(observed))).sum())) / (1 + permutations)
    return MMDTest(observed, p, bandwidth, permutations)


def cbpe(probabilities: np.ndarray, call: np.ndarray | None = None) -> dict[str, float]:
    """Expected AUC, sensitivity and specificity of calibrated probabilities on their own window (no labels): each
    image counts as p positive and 1 - p negative. The expected ROC curve is traced over the window's own scores
    (TPR(t) = sum of p above t / sum of p; FPR likewise with 1 - p) and integrated by trapezoids. ``call``: which
    images the served model calls positive (read on the network's scores at its threshold, as ``predict`` reads
    them: the calibrated threshold is for display); without it, no sensitivity or specificity."""
    p = np.clip(np.asarray(probabilities, float), 0.0, 1.0)
    pos, neg = p.sum(), (1 - p).sum()
    has_call = call is not None
    call = np.zeros(len(p), bool) if call is None else np.asarray(call, bool)
    out = {
        "expected_sensitivity": float(p[call].sum() / pos) if pos > 0 and has_call else float("nan"),
        "expected_specificity": float((1 - p)[~call].sum() / neg) if neg > 0 and has_call else float("nan"),
        "expected_prevalence": float(p.mean()) if len(p) else float("nan"),
    }
    if pos <= 0 or neg <= 0:
        return {**out, "expected_auc": float("nan")}
    order = np.argsort(-p, kind="stable")
    s = p[order]
    tp, fp = np.cumsum(s), np.cumsum(1 - s)
    last = np.r_[np.diff(s) != 0, True]  # ties: one point per distinct score
    tpr = np.r_[0.0, tp[last] / pos]
    fpr = np.r_[0.0, fp[last] / neg]
    return {**out, "expected_auc": float(np.trapezoid(tpr, fpr))}


def view_mix(views: Sequence[str]) -> dict[str, float]:
    """Share of PA, AP and lateral views (the rest as other)."""
    v = [str(x or "").upper() for x in views]
    n = max(len(v), 1)
    lateral = sum(x in ("LATERAL", "LL", "RL") for x in v)
    return {"PA": sum(x == "PA" for x in v) / n, "AP": sum(x == "AP" for x in v) / n, "lateral": lateral / n}


@dataclass(frozen=True)
class DriftSettings:
    """Image drift (``pipeline.yaml``'s ``image_drift`` section)."""

    reference: int = setting(500, "frontal images of the training split drawn as the reference, one per patient (never validate or test)")
    max_window: int = setting(
        500, "images of a window (one per patient) compared at most (drawn with the seed; a window of more is subsampled)"
    )
    permutations: int = setting(500, "permutations of the MMD test (the smallest p-value is 1 / (permutations + 1))")
    alpha: float = setting(0.01, "a window drifts (the alarm) when the MMD test's p-value is below this and its MMD² reaches the tolerance")
    tolerance: float | None = setting(
        None,
        "the smallest drift score (unbiased MMD²) that alarms, with p < alpha: a significant but smaller change is reported, not alarmed; "
        "in the units of the signal and kernel (set it again when changing either) and of the champion it was set for",
        null="the value chosen for the signal and kernel on the drift benchmark's validation seeds (vision.drift.TOLERANCES)",
    )
    signal: str = setting(
        "outputs",
        "what the alarm's MMD test compares: outputs (the multi-label champion's calibrated probabilities, one per finding; "
        "chosen on the drift benchmark's validation seeds) or features (its backbone's pooled features); both are reported",
    )
    pacs_window: int = setting(100, "studies the PACS intake receives per window (a window pacs-NNNN closes when it holds this many)")
    pacs_windows_kept: int = setting(52, "PACS windows whose images stay on disk, the newest (older ones are deleted as new ones close)")
    seed: int = setting(0, "the draws' and the permutations' seed")
    kernel: str = setting(
        "energy",
        "the MMD kernel: energy (the energy distance: no bandwidth, grows with a shift instead of levelling off; chosen "
        "on the drift benchmark's validation seed for the features and kept for the outputs), gaussian (sigma: the median "
        "distance between the pooled reference and window points), gaussian-reference (sigma: the reference's own), multiscale (Gaussians at 1/4 to 4 times the "
        "pooled median)",
    )

    def __post_init__(self) -> None:
        for name in ("reference", "max_window", "pacs_window", "pacs_windows_kept"):
            if getattr(self, name) < 2:
                raise ValueError(f"image_drift.{name} must be at least 2, not {getattr(self, name)}")
        if not 0 < self.alpha < 1 or 1 / (self.permutations + 1) >= self.alpha:
            raise ValueError(
                f"image_drift: alpha {self.alpha} with {self.permutations} permutations can never alarm (the smallest p-value "
                f"is 1 / (permutations + 1)): use at least {int(1 / self.alpha)} permutations"
            )
        if self.kernel not in KERNELS:
            raise ValueError(f"image_drift.kernel must be one of {', '.join(KERNELS)}, not {self.kernel!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"image_drift.signal must be one of {', '.join(SIGNALS)}, not {self.signal!r}")
        if self.tolerance is not None and not self.tolerance >= 0:  # (NaN too: it would switch the alarm off)
            raise ValueError(f"image_drift.tolerance must be at least 0 (null: the validated one), not {self.tolerance}")

    @property
    def alarm_tolerance(self) -> float:
        """The tolerance in force: the configured one, else the one validated for the signal and kernel."""
        return TOLERANCES[(self.signal, self.kernel)] if self.tolerance is None else float(self.tolerance)


def alarmed(p_value: float, score: float, alpha: float, tolerance: float) -> bool:
    """The alarm's rule, one place for the asset and the benchmark: significant (p < alpha) and large enough (the
    drift score, an unbiased MMD², at least the tolerance)."""
    return p_value < alpha and score >= tolerance


@dataclass
class Sample:
    """Images of one side of a comparison: uint8 (n, size, size) as the shards store them, their views, where labels
    exist the rows ``vision.targets`` reads (aligned with the images), and where known each source file's (bits
    stored, rows, columns) from its header (``data.dicom.header_geometry``; 0s where unreadable)."""

    images: np.ndarray
    views: list[str]
    rows: object = None  # a polars DataFrame with the label columns, or None (no labels: CBPE only)
    geometry: np.ndarray | None = None  # (n, 3) int: bits stored, rows, columns

    def draw(self, n: int, seed: int) -> Sample:
        if len(self.images) <= n:
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self.images), size=n, replace=False))
        rows = None if self.rows is None else self.rows[idx.tolist()]
        geometry = None if self.geometry is None else self.geometry[idx]
        return Sample(self.images[idx], [self.views[i] for i in idx], rows, geometry)


def acquisition(reference: np.ndarray | None, window: np.ndarray | None) -> dict[str, float | None]:
    """Bit depth and size of the source files, window beside reference: the most common bits stored, the median
    rows, and the window's median rows over the reference's (a resolution shift shows here before anywhere else)."""
    out: dict[str, float | None] = dict.fromkeys(
        ("bits_stored", "bits_stored_reference", "source_rows", "source_rows_reference", "source_size_ratio")
    )
    if reference is None or window is None:
        return out
    for key, g in (("", window), ("_reference", reference)):
        known = g[(g > 0).all(axis=1)]
        if len(known):
            values, counts = np.unique(known[:, 0], return_counts=True)
            out[f"bits_stored{key}"], out[f"source_rows{key}"] = int(values[np.argmax(counts)]), float(np.median(known[:, 1]))
    if out["source_rows"] and out["source_rows_reference"]:
        out["source_size_ratio"] = out["source_rows"] / out["source_rows_reference"]
    return out


def compare(
    window: str,
    reference: Sample,
    sample: Sample,
    champion,
    cfg: DriftSettings,
    fmt: str = "mimic",
    others: Sequence[tuple[object, Sample, Sample]] = (),  # (vision.external.Champion, reference, window)
) -> list[dict]:
    """One window against the reference: a row per finding of the multi-label ``champion`` (``vision.external``'s
    Champion), the window's signals repeated on each (the drift score and p-value decide ``drifted``; the rest are
    reported beside), the finding's output shift (KS), CBPE's expected AUC, sensitivity and specificity and, where
    the window has labels, the measured ones at the same threshold; then the same per-finding rows for each of
    ``others`` (another champion, with the reference and the window at its input size: the per-finding
    champions), under the same window signals."""
    for side, s in [("the reference", reference), (f"window {window}", sample)] + [
        (f"{who} at {c.model.size} px", x) for c, r, w in others for who, x in (("the reference", r), (f"window {window}", w))
    ]:
        if repeats := repeated_patients(s.rows):
            raise ValueError(f"{side}: {repeats} images repeat a patient; the test's unit is the patient (draw with one_per_patient)")
    m = champion.model
    sample = sample.draw(cfg.max_window, cfg.seed)
    scores = m.probabilities(reference.images), m.probabilities(sample.images)
    sides = {
        "features": (embeddings(m, reference.images), embeddings(m, sample.images)),
        "outputs": (m.calibrate(scores[0]), m.calibrate(scores[1])),
    }
    tests = {name: mmd_between(ref_x, win_x, cfg) for name, (ref_x, win_x) in sides.items()}
    test = tests[cfg.signal]
    mix_ref, mix_win = view_mix(reference.views), view_mix(sample.views)
    window_row = {
        "window": window,
        "n_window": len(sample.images),
        "n_reference": len(reference.images),
        "drift_score": test.statistic,
        "p_value": test.p_value,
        "signal": cfg.signal,
        **{f"{name}_{k}": v for name, t in tests.items() for k, v in (("mmd", t.statistic), ("p_value", t.p_value))},
        "kernel": cfg.kernel,
        "kernel_sigma": test.bandwidth,
        "drifted": alarmed(test.p_value, test.statistic, cfg.alpha, cfg.alarm_tolerance),
        "alpha": cfg.alpha,
        "tolerance": cfg.alarm_tolerance,
        "histogram_distance": js_distance(intensity_histogram(reference.images), intensity_histogram(sample.images)),
        "mean_intensity_change": float(sample.images[sample.images > 0].mean() - reference.images[reference.images > 0].mean()),
        **acquisition(reference.geometry, sample.geometry),
        **{f"share_{k}": v for k, v in mix_win.items()},
        **{f"share_{k}_change": mix_win[k] - mix_ref[k] for k in mix_win},
    }
    out = champion_rows(window_row, champion, reference, sample, fmt, scores)
    for other, ref, win in others:
        out += champion_rows(window_row, other, ref, win.draw(cfg.max_window, cfg.seed), fmt)
    return out


def labelled(indexed: pl.DataFrame, slug: str, policy: dict[str, str], fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``indexed`` (a ``_i`` row index beside the label columns) with a definite ``slug`` label under the
    model's uncertain / blank ``policy`` (a format whose blank means "not scorable" drops its blanks first): their
    ``_i`` and their 0/1 targets. What CBPE's estimate is measured against, here and in ``benchmarks/drift.py``."""
    usable = indexed.filter(pl.col(slug).is_not_null()) if fmt in NULL_IS_UNSCORABLE else indexed
    tt = targets(usable, slug, policy["uncertain"], policy["blank"])
    return tt["_i"].to_numpy(), tt["target"].to_numpy().astype(int)


def mmd_between(reference: np.ndarray, window: np.ndarray, cfg: DriftSettings) -> MMDTest:
    """``mmd_test`` under ``cfg``'s kernel, permutations and seed (``gaussian-reference``: sigma from the reference)."""
    sigma = median_distance(reference) if cfg.kernel == "gaussian-reference" else None
    return mmd_test(reference, window, cfg.permutations, cfg.seed, cfg.kernel.removesuffix("-reference"), sigma)


def champion_rows(
    window_row: dict, champion, reference: Sample, sample: Sample, fmt: str, scores: tuple[np.ndarray, np.ndarray] | None = None
) -> list[dict]:
    """A row per finding ``champion`` scores, under the window's signals: its calibrated probabilities' shift from
    the reference (KS), CBPE's expected figures, and where the window has labels the measured ones. ``scores``:
    the network's scores of the reference and the window when already computed (``compare`` has them)."""
    from sklearn.metrics import roc_auc_score

    m = champion.model
    for side, x in (("reference", reference.images), ("window", sample.images)):
        if x.shape[-1] != m.size:  # the network takes any size: images for another champion would score silently
            raise ValueError(f"{champion.name}: its {side} images are {x.shape[-1]} px, the model reads {m.size} px")
    ref_raw, win_raw = scores if scores is not None else (m.probabilities(reference.images), m.probabilities(sample.images))
    ref_p = m.calibrate(ref_raw)
    win_p, win_call = m.calibrate(win_raw), win_raw >= np.asarray(m.thresholds)[None, :]  # calls on the network's scores
    window_row = {**window_row, "model": f"{champion.name} v{champion.version}"}
    out = []
    indexed = None if sample.rows is None else sample.rows.with_row_index("_i")
    for j, s in enumerate(m.slugs):
        t = m.served_thresholds[j]
        row = {**window_row, "slug": s, "pathology": LABEL_BY_SLUG[s], "threshold": t, "output_ks": ks_statistic(ref_p[:, j], win_p[:, j])}
        row.update(cbpe(win_p[:, j], win_call[:, j]))
        measured = {"n_labelled": 0, "auc": None, "sensitivity": None, "specificity": None, "prevalence": None}
        if indexed is not None and s in indexed.columns:
            idx, y = labelled(indexed, s, champion.policy, fmt)
            p, c = win_p[idx, j], win_call[idx, j]
            measured["n_labelled"] = int(len(y))
            if len(y):
                measured["prevalence"] = float(y.mean())
            if 0 < y.sum() < len(y):
                measured.update(
                    auc=float(roc_auc_score(y, p)), sensitivity=float(c[y == 1].mean()), specificity=float(1 - c[y == 0].mean())
                )
        row.update(measured)
        row["auc_estimate_error"] = None if measured["auc"] is None else row["expected_auc"] - measured["auc"]
        out.append(row)
    return out
