"""Does the drift score notice the images changing, and does CBPE say what the AUC became? #51's benchmark.

A MIMIC replica (``--patients``, seed ``--seed``) trains the multi-label champion the demo's way (manifest, shards
at 64 px, ``multilabel_classifier``; registered champion, Platt-calibrated on validate). The reference is
``--reference`` frontal images of its **training** split, one per patient, from its shards (the asset's own
``reference_sample``). Windows of ``--window`` studies of as many different patients, one frontal image per study
(the test's unit is the patient: ``vision.drift``), each compared with the reference by two MMD tests with
permutation p-values (``vision.drift``): on the multi-label champion's calibrated probabilities (``--signal outputs``,
the asset's default, chosen on validation seeds 5 and 7) and on its backbone's pooled features (``features``, the
default before); a window is flagged when p < ``--alpha`` and its unbiased MMD² reaches the rule's tolerance
(``vision.drift.TOLERANCES``, chosen on validation seeds 5 and 7 by ``benchmarks/drift_rescore.py``; ``--tolerance``
sets the last line's), and how many are significant without the tolerance is printed beside:

- **no shift**: at least 40 windows from held-out MIMIC-replica data (a second replica drawn with another seed:
  new patients from the same generator), decoded as the shards decode;
- **format alone**: the CheXpert, NIH and PadChest-format replicas with no image shift (JPEG, 8- and 16-bit PNG,
  their own label files), which must not alarm;
- **graded shifts**: five levels each of exposure (a gain on the exported image that clips the bright end), noise
  and resolution, and one combined, each the no-shift CheXpert-format replica's patients (same seed: the same
  patients, labels and findings) rendered with the shift (``data.replica_external``), so each level's AUC drop is
  paired.

The AUC drop of a level is the multi-label champion's macro AUC (findings with at least 20 positives and 20
negatives in both) on the format-alone CheXpert replica minus that on the level's replica, pooled over its
windows; CBPE's error per level is the median over findings of |expected AUC (from calibrated probabilities alone)
- measured AUC|, on the level's whole set (every frontal image of its patients, from which its windows are drawn).
Spearman is over the 15 graded levels (the combined level counts in detection and CBPE, not in Spearman; the figure
with it is printed above the last line, as is each level whose CBPE error passes 0.05).
The held-out MIMIC images are also read as if their headers carried no window (the reader's percentile window, the
way PadChest's 16-bit PNGs are read): the AUC change and the windows flagged say what that reading alone does.
Every replica's seed follows ``--seed``, so a run at another seed sees none of these images (a validation run).

Each window is tested on each signal under every kernel ``image_drift.kernel`` offers (a Gaussian at the pooled
median distance, fixed before the first run; a Gaussian at the reference's own; a multiscale Gaussian; the energy
distance, the default since the validation run at seed 5), with the same permutations; the last line is
``--signal`` and ``--kernel``'s (the configured defaults unless given), the lines above it the others'. ``--dump``
keeps every window's features and network scores (``windows.npz``) and each level's AUC drop (``levels.json``) in
``--out``, so another alarm can be scored offline on the same windows:

    drift: false alarms <a>/<n>, detected <d>/<m> windows at levels with AUC drop >= 0.05, spearman(drift score, AUC drop) <r> over <k> levels, CBPE AUC error median <e>

Goals (#51): false alarms <= 5% of no-shift windows (held-out and format alone), detection >= 95% of windows at
levels whose pooled AUC drop is >= 0.05, Spearman >= 0.8 over the graded levels, median |CBPE AUC error| <= 0.05.

    python benchmarks/drift.py [--seed 3] [--patients 750] [--held-out 1500] [--level-patients 400] [--signal outputs|features] [--kernel gaussian|gaussian-reference|multiscale|energy] [--tolerance T] [--out /tmp/bench_drift] [--dump]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cxr_pipeline.vision.drift import KERNELS, SIGNALS, TOLERANCES, DriftSettings, alarmed

# Fixed before the first full run, from what the generator does (not tuned on its results): noise is drawn at the
# source's 256 rows, and the 64-px input averages 4x4 source pixels, so its sd reaches the model divided by about 4; a
# resolution below 0.25 renders fewer rows than the model's 64 (above it, the letterbox's resize loses nothing the
# model could see); exposure is a gain on the CheXpert-format export after its window (brighter, the bright end
# clipped), which the reader takes as it is.
LEVELS = {
    "exposure": [1.15, 1.3, 1.5, 1.8, 2.2],
    "noise": [0.05, 0.1, 0.2, 0.3, 0.45],
    "resolution": [0.3, 0.2, 0.14, 0.1, 0.07],
}
COMBINED = {"exposure": 1.3, "noise": 0.1, "resolution": 0.14}
MIN_CLASS = 20


def train(home: Path, raw: Path, patients: int, seed: int, epochs: int) -> None:
    """Replica, manifest, shards, the multi-label champion, in ``home`` (skipped when already there)."""
    import dagster as dg

    from cxr_pipeline.data.shard_reader import PARTITIONS
    from cxr_pipeline.data.synthetic import SynthConfig, generate
    from cxr_pipeline.definitions import build_defs
    from cxr_pipeline.defs.keys import MULTILABEL_CLASSIFIER
    from cxr_pipeline.demo import DEMO_RUN_CONFIG
    from cxr_pipeline.settings import paths, write_pipeline_config

    done = home / "trained.json"
    asked = {"patients": patients, "seed": seed, "epochs": epochs}
    os.environ["CXR_RAW_DIR"] = str(raw)  # the manifest's paths are under it (the window prior reads its files)
    if done.exists():
        if json.loads(done.read_text()) != asked:
            raise SystemExit(f"{home} holds a champion trained with {done.read_text()}, not {asked}: use another --out")
        return
    if not raw.exists():
        generate(SynthConfig(patients=patients, seed=seed, source_rows=256, workers=2), raw)
    p = paths()
    config = {**DEMO_RUN_CONFIG, "classifier": {**DEMO_RUN_CONFIG["classifier"], "size": 64, "epochs": epochs}}
    write_pipeline_config(p, {k: v for k, v in config.items() if k in ("manifest", "classifier")}, "bench_drift")
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        for job, part in [("manifest_job", None), *(("shards_job", x) for x in PARTITIONS)]:
            res = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=part, raise_on_error=False)
            if not res.success:
                raise SystemExit(f"{job} [{part}] failed")
        res = defs.resolve_job_def("classifier_summary_job").execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(MULTILABEL_CLASSIFIER)], raise_on_error=False
        )
        if not res.success:
            raise SystemExit("multilabel_classifier failed")
    done.write_text(json.dumps(asked))


def reference_images(n: int, seed: int) -> np.ndarray:
    """The asset's reference (``defs.drift.reference_sample``): ``n`` frontal training-split images, one per patient,
    from the 64-px shards."""
    import polars as pl

    from cxr_pipeline.data.shard_reader import Shards
    from cxr_pipeline.defs.drift import reference_sample
    from cxr_pipeline.settings import paths

    p = paths()
    return reference_sample(pl.read_parquet(p.manifest), Shards.open(p.shard_root(64), 64), n, seed).images


def decode_all(paths_: list[str]) -> np.ndarray:
    """The files at 64 px as the pipeline's shards hold them: a file without a window read through the training
    headers' windows (``data.window_prior``), as external validation and the drift asset read them."""
    from cxr_pipeline.data.dicom import prepare
    from cxr_pipeline.data.window_prior import training_window_prior
    from cxr_pipeline.settings import paths

    prior = training_window_prior(paths(), 64)
    return np.stack([prepare(p, 64, name=p, prior=prior) for p in paths_])


def held_out(raw: Path, patients: int, seed: int, header_window: bool = True, prior: bool = True) -> tuple[np.ndarray, object]:
    """Frontal images of a second MIMIC replica (new patients, same generator), decoded as the shards decode, and
    their rows (subject_id, study_id and the study's labels as slugs). ``header_window=False``: each file read as if
    its header carried no window (through the training headers' windows, as PadChest's 16-bit PNGs are read).
    ``prior=False`` with it: through the reader's percentile window instead (how both read before the prior)."""

    import polars as pl

    from cxr_pipeline.data.dicom import prepare, without_window
    from cxr_pipeline.data.synthetic import SynthConfig, generate, patient_relpath
    from cxr_pipeline.data.window_prior import training_window_prior
    from cxr_pipeline.labels import LABELS, slug
    from cxr_pipeline.settings import paths

    if not raw.exists():
        generate(SynthConfig(patients=patients, seed=seed, source_rows=256, workers=2), raw)
    meta = pl.read_csv(raw / "mimic-cxr-2.0.0-metadata.csv.gz").filter(pl.col("ViewPosition").is_in(["PA", "AP"]))
    labels = pl.read_csv(raw / "mimic-cxr-2.0.0-chexpert.csv.gz").select(
        "subject_id", "study_id", *(pl.col(x).cast(pl.Float64).alias(slug(x)) for x in LABELS)
    )
    rows = meta.select("dicom_id", "subject_id", "study_id").join(labels, on=["subject_id", "study_id"], how="left", maintain_order="left")
    files = [
        str(raw / patient_relpath(s) / f"s{t}" / f"{d}.dcm") for d, s, t in rows.select("dicom_id", "subject_id", "study_id").iter_rows()
    ]
    if header_window:
        return decode_all(files), rows

    fitted = training_window_prior(paths(), 64) if prior else None
    return np.stack([prepare(without_window(f), 64, name=f, prior=fitted) for f in files]), rows


def external(folder: Path, fmt: str, patients: int, seed: int, **shift) -> tuple[np.ndarray, object]:
    """A ``fmt``-format replica with ``shift``: its frontal images (decoded as the shards decode) and their rows."""
    from cxr_pipeline.data.external import DEFAULT_LABEL_FILES, read_labels, resolve_images, select_images
    from cxr_pipeline.data.replica_external import ExternalReplica, generate_external

    if not folder.exists():
        generate_external(ExternalReplica(fmt, patients=patients, seed=seed, **shift), folder)
    found = read_labels(fmt, folder / DEFAULT_LABEL_FILES[fmt])
    rows = resolve_images(folder, select_images(found.manifest, ("PA", "AP"), None, 0))
    return decode_all([str(folder / p) for p in rows["path"]]), rows


def measured_and_expected(champ, rows, raw: np.ndarray, fmt: str) -> dict[str, tuple[float, float]]:
    """Per finding with enough of each class: (measured AUC, CBPE's expected AUC) of the calibrated probabilities."""
    import polars as pl
    from sklearn.metrics import roc_auc_score

    from cxr_pipeline.data.harmonisation import NULL_IS_UNSCORABLE
    from cxr_pipeline.vision.drift import cbpe
    from cxr_pipeline.vision.targets import targets

    m = champ.model
    prob = m.calibrate(raw)
    indexed = rows.with_row_index("_i")
    out = {}
    for j, s in enumerate(m.slugs):
        if s not in rows.columns:
            continue
        usable = indexed.filter(pl.col(s).is_not_null()) if fmt in NULL_IS_UNSCORABLE else indexed
        t = targets(usable, s, champ.policy["uncertain"], champ.policy["blank"])
        y, idx = t["target"].to_numpy().astype(int), t["_i"].to_numpy()
        if min(y.sum(), len(y) - y.sum()) < MIN_CLASS:
            continue
        out[s] = (float(roc_auc_score(y, prob[idx, j])), cbpe(prob[idx, j])["expected_auc"])
    return out


def window_cbpe(champ, rows, raw: np.ndarray, windows: list[np.ndarray], fmt: str, min_class: int = 5) -> np.ndarray:
    """CBPE as the asset reports it (``vision.drift.compare``), on each window: per (window, finding with at least
    ``min_class`` of each class among its labelled images), |expected - measured| of the AUC, the sensitivity and
    the specificity, expected over every image of the window and measured over its labelled ones, the calls read
    on the network's scores at its threshold (as ``predict`` reads them); then 1 where the window's calls are all
    one class (expected and measured sensitivity and specificity then agree trivially), and the measured AUC's
    standard error (Hanley and McNeil 1982: the noise the error is measured against), and the window's index in
    ``windows``. Shape (pairs, 6)."""
    from sklearn.metrics import roc_auc_score

    from cxr_pipeline.vision.drift import cbpe, labelled

    m = champ.model
    prob = m.calibrate(raw)
    indexed = rows.with_row_index("_i")
    out = []
    for j, s in enumerate(m.slugs):
        if s not in rows.columns:
            continue
        target = dict(zip(*(a.tolist() for a in labelled(indexed, s, champ.policy, fmt)), strict=True))
        for k, w in enumerate(windows):
            idx = np.array([i for i in w.tolist() if i in target], dtype=np.int64)
            y = np.array([target[i] for i in idx.tolist()], dtype=int)
            if min(y.sum(), len(y) - y.sum()) < min_class:
                continue
            calls = raw[w, j] >= m.thresholds[j]
            e = cbpe(prob[w, j], calls)
            call = raw[idx, j] >= m.thresholds[j]
            auc = roc_auc_score(y, prob[idx, j])
            measured = (auc, call[y == 1].mean(), (~call[y == 0]).mean())
            expected = (e["expected_auc"], e["expected_sensitivity"], e["expected_specificity"])
            n1, n0 = int(y.sum()), int(len(y) - y.sum())
            q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
            se = np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0))
            out.append([abs(a - b) for a, b in zip(expected, measured, strict=True)] + [float(calls.all() or not calls.any()), se, k])
    return np.array(out, dtype=float).reshape(-1, 6)


def said_cbpe(errors: np.ndarray) -> str:
    """Median |error| of AUC, sensitivity and specificity over (window, finding) pairs."""
    if not len(errors):
        return "no window with enough of each class"
    med = np.median(errors[:, :3], axis=0)
    split = errors[errors[:, 3] == 0, :3]
    mixed = np.median(split, axis=0) if len(split) else np.full(3, np.nan)
    return (
        f"AUC {med[0]:.3f}, sensitivity {med[1]:.3f}, specificity {med[2]:.3f} over {len(errors)} (window, finding) pairs, "
        f"{int(errors[:, 3].sum())} of them with every call alike (sensitivity {mixed[1]:.3f}, specificity {mixed[2]:.3f} without "
        f"those); the measured AUC's median standard error {np.median(errors[:, 4]):.3f}"
    )


def cbpe_error(per: dict[str, tuple[float, float]], findings: list[str]) -> float:
    """The median over ``findings`` of |CBPE's expected AUC - the measured AUC| (no sign to cancel)."""
    return float(np.median([abs(per[f][1] - per[f][0]) for f in findings])) if findings else float("nan")


def commit() -> str:
    """The checkout's commit, marked ``-dirty`` when its tracked files differ from it (a figure names its tree)."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here, capture_output=True).returncode != 0
    except OSError:  # no git on this machine: the figures still print
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown (not a git checkout)"


def patient_windows(rows, size: int, seed: int) -> list[np.ndarray]:
    """Windows of ``size`` studies of ``size`` different patients, one frontal image per study (drawn with ``seed``):
    row indices. The MMD test's unit is the patient (``vision.drift``), so no window holds a patient twice; a
    patient's studies go to different windows (those with the most studies left first, ties at random), until fewer
    than ``size`` patients have a study left."""
    import polars as pl

    rng = np.random.default_rng(seed)
    indexed = rows.with_row_index("_i").with_columns(pl.Series("_r", rng.random(rows.height))).sort("_r")
    studies = indexed.unique("study_id", keep="first", maintain_order=True)  # a random frontal image of each study
    left: dict = {}
    for subject, i in studies.select("subject_id", "_i").iter_rows():
        left.setdefault(subject, []).append(int(i))
    tie = {k: rng.random() for k in left}
    out = []
    while sum(1 for v in left.values() if v) >= size:
        chosen = sorted((k for k, v in left.items() if v), key=lambda k: (-len(left[k]), tie[k]))[:size]
        out.append(np.sort([left[k].pop() for k in chosen]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patients", type=int, default=750, help="patients of the training replica (>= 500 in its training split)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=1500, help="patients of the held-out MIMIC replica (>= 40 windows)")
    ap.add_argument("--level-patients", type=int, default=400)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--reference", type=int, default=500)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--permutations", type=int, default=500)
    ap.add_argument("--kernel", choices=KERNELS, default=DriftSettings().kernel, help="the kernel the last line reports")
    ap.add_argument("--signal", choices=SIGNALS, default=DriftSettings().signal, help="the signal the last line reports")
    ap.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="the last line's rule's tolerance (default: its validated one, vision.drift.TOLERANCES)",
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_drift"))
    ap.add_argument(
        "--dump",
        action="store_true",
        help="keep every window's features and scores in OUT/windows.npz, each level's AUC drop in OUT/levels.json",
    )
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ["CXR_HOME"] = str(a.out / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    train(a.out / "home", a.out / "raw", a.patients, a.seed, a.epochs)

    from scipy.stats import spearmanr

    from cxr_pipeline.tracking import get_client
    from cxr_pipeline.vision.checkpoint import MULTILABEL
    from cxr_pipeline.vision.drift import embeddings, median_distance, mmd_test
    from cxr_pipeline.vision.external import load_champions
    from cxr_pipeline.vision.registry import registered_name

    client, uri = get_client()
    (champ,) = load_champions(client, uri, [registered_name(MULTILABEL)])
    m = champ.model

    def sides(images: np.ndarray) -> dict[str, np.ndarray]:
        """What each signal's test compares (``vision.drift``): the calibrated probabilities and the pooled features;
        with the network's own scores, which ``--dump`` keeps."""
        scores = m.probabilities(images)
        return {"outputs": m.calibrate(scores), "features": embeddings(m, images), "scores": scores}

    reference = reference_images(a.reference, a.seed)
    refs = sides(reference)
    sigmas = {sig: median_distance(refs[sig]) for sig in SIGNALS}
    rules = {f"{sig}/{kern}": (sig, kern) for sig in SIGNALS for kern in KERNELS}
    chosen = f"{a.signal}/{a.kernel}"
    saved: dict[str, np.ndarray] = {}
    if a.dump:
        saved.update({"reference/emb": refs["features"], "reference/score": refs["scores"]})

    def test(images: np.ndarray, rows, seed: int, name: str = "") -> list[dict[str, tuple[float, float]]]:
        """Per window, (MMD², p) under each signal and kernel (the same permutations); with ``--dump``, each window's
        features and network scores are kept under ``name``."""
        out = []
        for k, w in enumerate(patient_windows(rows, a.window, seed)):
            xs = sides(images[w])
            if a.dump and name:
                saved.update({f"{name}/w{k}/emb": xs["features"], f"{name}/w{k}/score": xs["scores"]})
            tests = {
                r: mmd_test(
                    refs[sig],
                    xs[sig],
                    a.permutations,
                    seed * 1000 + k,
                    kern.removesuffix("-reference"),
                    sigmas[sig] if kern.endswith("-reference") else None,
                )
                for r, (sig, kern) in rules.items()
            }
            out.append({r: (t.statistic, t.p_value) for r, t in tests.items()})
        return out

    tolerance = {r: TOLERANCES[rules[r]] for r in rules} | ({chosen: a.tolerance} if a.tolerance is not None else {})

    def flagged(windows: list[dict], rule: str, significant_only: bool = False) -> int:
        """Windows that alarm (p < alpha and MMD² at least the rule's tolerance); ``significant_only``: p < alpha alone."""
        return sum(alarmed(w[rule][1], w[rule][0], a.alpha, -np.inf if significant_only else tolerance[rule]) for w in windows)

    def said(windows: list[dict]) -> str:
        return ", ".join(f"{r} {flagged(windows, r)}/{len(windows)}" for r in rules)

    s = 1000 * a.seed  # every replica's seed follows --seed: a run at another seed sees none of these images
    images, rows = held_out(a.out / "held_out", a.held_out, a.seed + 100)
    no_shift = test(images, rows, seed=1, name="held-out")
    print(f"held-out MIMIC: {len(no_shift)} windows, flagged (p < {a.alpha} and MMD² at least the tolerance): {said(no_shift)}", flush=True)
    scores = champ.model.probabilities(images)
    mimic = measured_and_expected(champ, rows, scores, "mimic")
    mimic_windows = window_cbpe(champ, rows, scores, patient_windows(rows, a.window, 1), "mimic")
    for prior, how in (
        (False, "the percentile window, as PadChest's PNGs were read"),
        (True, "the training headers' windows, as PadChest's PNGs are read"),
    ):
        plain, _rows = held_out(a.out / "held_out", a.held_out, a.seed + 100, header_window=False, prior=prior)
        unwindowed = measured_and_expected(champ, rows, champ.model.probabilities(plain), "mimic")
        common = sorted(set(mimic) & set(unwindowed))
        change = float(np.mean([mimic[f][0] - unwindowed[f][0] for f in common]))
        windowless = test(plain, rows, seed=1)  # the same windows and permutations as the held-out ones
        print(
            f"held-out MIMIC read without the header's window ({how}): AUC drop {change:+.3f} "
            f"over {len(common)} findings, windows flagged: {said(windowless)}",
            flush=True,
        )
    fmt_windows: dict[str, list[dict]] = {}
    base = s + 21  # the CheXpert-format baseline's seed, and every level's: the same patients and labels, shifted
    base_images, base_rows = external(a.out / "ext" / f"chexpert-none-s{base}", "chexpert", a.level_patients, base)
    baseline = measured_and_expected(champ, base_rows, champ.model.probabilities(base_images), "chexpert")
    for k, fmt in enumerate(("chexpert", "nih", "padchest")):
        images, rows = (
            (base_images, base_rows)
            if fmt == "chexpert"
            else external(a.out / "ext" / f"{fmt}-none-s{base + k}", fmt, a.level_patients, base + k)
        )
        fmt_windows[fmt] = test(images, rows, seed=2 + k, name=fmt)
        print(f"{fmt} format, no shift: {len(fmt_windows[fmt])} windows, flagged: {said(fmt_windows[fmt])}", flush=True)
    levels = [(kind, v, {kind: v}) for kind, vs in LEVELS.items() for v in vs] + [("combined", 0.0, COMBINED)]
    results = []
    for k, (kind, value, shift) in enumerate(levels):
        images, rows = external(a.out / "ext" / f"chexpert-{kind}-{value}-s{base}", "chexpert", a.level_patients, base, **shift)
        scores = champ.model.probabilities(images)
        per = measured_and_expected(champ, rows, scores, "chexpert")
        common = sorted(set(per) & set(baseline))
        drop = float(np.mean([baseline[f][0] - per[f][0] for f in common])) if common else float("nan")  # paired: same patients
        signed = float(np.mean([per[f][1] - per[f][0] for f in common])) if common else float("nan")
        res = test(images, rows, seed=10 + k, name=f"{kind} {value}")
        per_window = window_cbpe(champ, rows, scores, patient_windows(rows, a.window, 10 + k), "chexpert")
        score = {r: float(np.median([w[r][0] for w in res])) for r in rules}
        results.append(
            {
                "kind": kind,
                "value": value,
                "drop": drop,
                "cbpe_error": cbpe_error(per, common),
                "score": score,
                "windows": res,
                "per_window": per_window,
            }
        )
        print(
            f"{kind} {value}: AUC drop {drop:+.3f} over {len(common)} findings, CBPE macro error {signed:+.3f}, median |error| "
            f"{results[-1]['cbpe_error']:.3f}; median MMD² "
            + ", ".join(f"{r} {v:.4f}" for r, v in score.items())
            + f"; windows flagged: {said(res)}",
            flush=True,
        )
    nulls = no_shift + [w for ws in fmt_windows.values() for w in ws]
    if a.dump:
        np.savez(a.out / "windows.npz", **saved)
        levels_json = [{"kind": r["kind"], "value": r["value"], "drop": r["drop"], "cbpe_error": r["cbpe_error"]} for r in results]
        (a.out / "levels.json").write_text(json.dumps(levels_json, indent=1))
    big = [w for r in results if r["drop"] >= 0.05 for w in r["windows"]]
    errors = [r["cbpe_error"] for r in results] + [cbpe_error(baseline, sorted(baseline))]
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}; commit {commit()}; "
        f"{time.perf_counter() - t0:.0f} s; "
        f"seed {a.seed}; alpha {a.alpha}, {a.permutations} permutations, reference {len(reference)} training patients (median distance: outputs {sigmas['outputs']:.3f}, features {sigmas['features']:.3f}), "
        f"windows of {a.window} patients; CBPE median |error| per finding: CheXpert format, no shift {errors[-1]:.3f}, held-out MIMIC "
        f"{cbpe_error(mimic, sorted(mimic)):.3f}; levels (and the no-shift CheXpert set) within 0.05: {sum(e <= 0.05 for e in errors)}/{len(errors)}, "
        f"largest {max(errors):.3f}"
    )
    small = np.concatenate([r["per_window"] for r in results if r["drop"] < 0.05] or [np.zeros((0, 6))])
    large = np.concatenate([r["per_window"] for r in results if r["drop"] >= 0.05] or [np.zeros((0, 6))])
    print(
        f"CBPE on {a.window}-patient windows, median |error|: held-out MIMIC {said_cbpe(mimic_windows)}; levels with AUC drop < 0.05 "
        f"{said_cbpe(small)}; levels with AUC drop >= 0.05 {said_cbpe(large)}"
    )
    named = [f"{r['kind']} {r['value']}" if r["kind"] != "combined" else "combined" for r in results]
    over = [f"{n} {r['cbpe_error']:.3f}" for n, r in zip(named, results, strict=True) if r["cbpe_error"] > 0.05]
    print(f"CBPE per level over 0.05: {', '.join(over) or 'none'}")
    # CBPE assumes the calibration still holds on the window; the alarm is what says it may not. Its error, split
    # by what the default alarm said: per level (by how many of its windows alarmed) and per window.
    alarms = [[alarmed(w[chosen][1], w[chosen][0], a.alpha, tolerance[chosen]) for w in r["windows"]] for r in results]
    by_level: dict[str, list[tuple[str, float]]] = {"no window alarms": [], "some windows alarm": [], "every window alarms": []}
    for n, r, al in zip(named, results, alarms, strict=True):
        how = "no window alarms" if not any(al) else "every window alarms" if all(al) else "some windows alarm"
        by_level[how].append((n, r["cbpe_error"]))
    print(
        f"CBPE per level by the alarm ({chosen}): "
        + "; ".join(
            f"{how}: {len(ls)} level{'s' * (len(ls) != 1)}"
            + (
                f", {sum(e <= 0.05 for _, e in ls)} within 0.05, largest {max(e for _, e in ls):.3f} ({max(ls, key=lambda x: x[1])[0]})"
                if ls
                else ""
            )
            for how, ls in by_level.items()
        )
    )
    pairs = [(r["per_window"], np.array(al, bool)) for r, al in zip(results, alarms, strict=True)]
    silent = np.concatenate([pw[~al[pw[:, 5].astype(int)]] for pw, al in pairs if len(pw)] or [np.zeros((0, 6))])
    loud = np.concatenate([pw[al[pw[:, 5].astype(int)]] for pw, al in pairs if len(pw)] or [np.zeros((0, 6))])
    print(
        f"CBPE on {a.window}-patient windows at the levels, by the alarm ({chosen}): silent {said_cbpe(silent)}; alarmed {said_cbpe(loud)}"
    )
    graded = [r for r in results if r["kind"] != "combined"]  # the goal's Spearman is over the graded levels alone
    for rule in sorted(rules, key=lambda r: r == chosen):  # the chosen signal and kernel's line last: the benchmark's answer
        every = float(spearmanr([r["score"][rule] for r in results], [r["drop"] for r in results]).statistic)
        print(f"spearman ({rule}) over the {len(results)} levels with the combined one: {every:.2f}")
        rho = float(spearmanr([r["score"][rule] for r in graded], [r["drop"] for r in graded]).statistic)
        per_set = ", ".join(f"{name} {flagged(ws, rule)}/{len(ws)}" for name, ws in [("held-out", no_shift), *fmt_windows.items()])
        print(f"false alarms by set ({rule}, tolerance {tolerance[rule]}): {per_set}")
        print(
            f"significant at p < {a.alpha} without the tolerance ({rule}): no shift {flagged(nulls, rule, True)}/{len(nulls)}, "
            f"at levels with AUC drop >= 0.05 {flagged(big, rule, True)}/{len(big)}"
        )
        print(
            f"{'drift' if rule == chosen else f'drift ({rule})'}: false alarms {flagged(nulls, rule)}/{len(nulls)}, "
            f"detected {flagged(big, rule)}/{len(big)} windows at levels with AUC drop >= 0.05, spearman(drift score, AUC drop) "
            f"{rho:.2f} over {len(graded)} levels, CBPE AUC error median {float(np.median(errors)):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
