"""A trained classifier's one home: its files, its checkpoint format, its registry aliases, loading it back (from
its folder or from the MLflow registry by alias), registering it and publishing its model card.

Everything that knows what a classifier folder holds goes through here: the fit writes it
(:func:`write_checkpoint`), the pyfunc, ``predict``, ``serve``, external validation, the report hints and the
tables read it (:func:`read_config`, :func:`load_checkpoint`, :func:`load_registered`), and the assets register
it (:func:`register`) and publish its card (:func:`publish_model_card`). No other module spells a checkpoint file
name or an alias value (a test keeps it so).

The checkpoint is ``checkpoint/model.safetensors`` (no pickle) and ``checkpoint/config.json``, one typed shape for
both model kinds (:class:`CheckpointConfig`, ``format`` 2). Checkpoints written before it came in two shapes
(per-finding: ``pathology``/``threshold``/``calibration``; multi-label: ``labels``/``thresholds``/``calibration``
per slug); :func:`read_config` reads both, so a model registered before still loads: its MLflow model carries the
unchanged folder, and its code file imports ``vision.serving.CxrClassifier``, which loads through here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_pipeline.data.voi import WindowPrior, stored_windows
from cxr_pipeline.files import atomic_path
from cxr_pipeline.labels import slug
from cxr_pipeline.settings import Paths
from cxr_pipeline.tracking import TrackedRun, registered_model_or_none
from cxr_pipeline.vision.calibration import apply, calibrated_threshold
from cxr_pipeline.vision.evaluate import stored_threshold
from cxr_pipeline.vision.model_card import CARD_DIR, CARD_JSON, CARD_MD, build_card, data_source
from cxr_pipeline.vision.models import build_model
from cxr_pipeline.vision.train import RESUME_FILE, predict

# --- names ---------------------------------------------------------------------------------------------------

WEIGHTS, CONFIG = "model.safetensors", "config.json"
CHAMPION = "champion"  # the version the pipeline, predict, serve and external validation use
CANDIDATE = "candidate"  # the newest version, whether or not it beat the champion
ALIASES = (CHAMPION, CANDIDATE)
MODEL_ARTIFACT = "model"  # a run's MLflow model folder: the registered source (``vision.serving.save_pyfunc``)
METRICS = "metrics.json"  # the metrics rows: in the folder, and as its run's artifact (external validation reads it)
PER_PATHOLOGY = "per_pathology"  # a model kind: one finding's model, in its slug's folder
MULTILABEL = "multilabel"  # the other kind, its folder under classifier/ and its ``model`` value in the metrics rows
FORMAT = 2


@dataclass(frozen=True)
class ClassifierFiles:
    """What one classifier's folder holds (a finding's, or the multi-label model's)."""

    dir: Path

    @property
    def checkpoint(self) -> Path:
        """The weights and their configuration: the folder the registered MLflow model carries unchanged."""
        return self.dir / "checkpoint"

    @property
    def weights(self) -> Path:
        return self.checkpoint / WEIGHTS

    @property
    def config(self) -> Path:
        return self.checkpoint / CONFIG

    @property
    def metrics(self) -> Path:
        """The metrics rows (one per finding and test label source), or why the finding is not trainable."""
        return self.dir / METRICS

    @property
    def predictions(self) -> Path:
        """A network score for every manifest image with a shard (``prob``, or one column per finding)."""
        return self.dir / "predictions.parquet"

    @property
    def test_scores(self) -> Path:
        return self.dir / "test_scores.parquet"

    @property
    def curves(self) -> Path:
        return self.dir / "roc_pr.png"

    @property
    def saliency(self) -> Path:
        """Grad-CAM overlays of a few test true positives, false positives and false negatives."""
        return self.dir / "saliency.png"

    @property
    def resume(self) -> Path:
        """The training loop's state after its last epoch (``vision.train``), which a killed run resumes from."""

        return self.dir / RESUME_FILE

    @property
    def model_card(self) -> Path:
        """The registered version's model card (JSON) and which version it is: the subgroup audit adds its gaps."""
        return self.dir / "model_card.json"

    def clear_model(self) -> None:
        """Remove the model's files (a finding the current data cannot train keeps none: they would read as current)."""
        import shutil

        shutil.rmtree(self.checkpoint, ignore_errors=True)
        for f in (self.predictions, self.test_scores, self.curves, self.saliency, self.resume):
            f.unlink(missing_ok=True)


@dataclass(frozen=True)
class ClassifierSet:
    """The classifiers' folder: one :class:`ClassifierFiles` per finding, and the multi-label model's (the handle
    the summary assets receive)."""

    root: Path

    @classmethod
    def of(cls, paths: Paths) -> ClassifierSet:
        return cls(paths.classifiers)

    def classifier(self, folder: str) -> ClassifierFiles:
        """A finding's folder (its slug), or the multi-label model's (``multilabel``)."""
        return ClassifierFiles(self.root / folder)


# --- the checkpoint format -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointConfig:
    """What applying a checkpoint needs, for either kind: output ``j`` is finding ``labels[j]``; its threshold is on
    the network's scores (chosen on validate), its calibration the map fitted on validate (``vision.calibration``;
    None: none, as in a checkpoint written before calibration). ``training_config``: the resolved recipe whole,
    the label policy among it. ``window_prior``: the windows its training images were read through
    (``data.window_prior``, at ``size``), through which the served model reads a file that carries none, as
    external validation and the drift monitor read such files (empty: a checkpoint written before it travelled
    with the weights, or training images without a window; such a file is then read through the percentile window)."""

    arch: str
    size: int
    labels: tuple[str, ...]
    thresholds: Mapping[str, float | None]
    calibration: Mapping[str, dict | None]
    dropout: float = 0.0
    normalise: Mapping[str, Any] = field(default_factory=dict)
    training_config: Mapping[str, Any] = field(default_factory=dict)
    window_prior: tuple[tuple[float, float, str], ...] = ()

    @property
    def slugs(self) -> list[str]:
        return [slug(x) for x in self.labels]

    @property
    def kind(self) -> str:
        return MULTILABEL if len(self.labels) > 1 else PER_PATHOLOGY

    @property
    def policy(self) -> dict[str, str]:
        """The uncertain and blank label policy the model was trained with, as its recipe recorded it (targets
        elsewhere must follow it); a key a checkpoint did not record is absent (``CheckpointConfig`` written before
        the recipe travelled with the weights: its metrics rows say it, ``vision.external.Champion.policy``)."""
        return {k: self.training_config[k] for k in ("uncertain", "blank") if k in self.training_config}

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "arch": self.arch,
            "dropout": self.dropout,
            "size": self.size,
            "labels": list(self.labels),
            "thresholds": dict(self.thresholds),
            "calibration": dict(self.calibration),
            "normalise": dict(self.normalise),
            "input": "grey uint8 letterboxed, repeated to 3 channels",
            "training_config": dict(self.training_config),
            "window_prior": [list(w) for w in self.window_prior],
        }


def config_from_json(raw: Mapping[str, Any], where: str = CONFIG) -> CheckpointConfig:
    """Either on-disk shape -> :class:`CheckpointConfig` (errors name the file and the missing field)."""
    try:
        if "labels" in raw:  # format 2, or the multi-label shape before it (the same fields)
            labels = tuple(raw["labels"])
            thresholds = {slug(x): raw["thresholds"].get(slug(x)) for x in labels}
            calibration = {slug(x): (raw.get("calibration") or {}).get(slug(x)) for x in labels}
        else:  # the per-finding shape before format 2
            labels = (raw["pathology"],)
            thresholds = {slug(raw["pathology"]): raw.get("threshold")}
            calibration = {slug(raw["pathology"]): raw.get("calibration")}
        return CheckpointConfig(
            arch=raw["arch"],
            size=int(raw["size"]),
            labels=labels,
            thresholds=thresholds,
            calibration=calibration,
            dropout=float(raw.get("dropout", 0.0)),
            normalise=raw.get("normalise") or {},
            training_config=raw.get("training_config") or {},
            window_prior=stored_windows(() if raw.get("window_prior") is None else raw["window_prior"], f"{where}: field 'window_prior'"),
        )
    except KeyError as e:
        raise ValueError(f"{where}: field {e.args[0]!r} missing (not a cxr_pipeline classifier checkpoint?)") from None


def read_config(checkpoint: Path) -> CheckpointConfig:
    """A checkpoint folder's configuration (either shape)."""
    f = Path(checkpoint) / CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {CONFIG} (not a cxr_pipeline classifier checkpoint)")
    return config_from_json(json.loads(f.read_text()), str(f))


def calibration_maps(files: ClassifierFiles) -> dict[str, dict]:
    """slug -> the calibration map of the checkpoint in ``files``; empty where there is no checkpoint or it was
    written before calibration (its scores are then used as they are)."""
    if not files.config.exists():
        return {}
    return {s: c for s, c in read_config(files.checkpoint).calibration.items() if c}


def write_checkpoint(model, files: ClassifierFiles, config: CheckpointConfig) -> None:
    """``model.safetensors`` (no pickle) and ``config.json``, each written atomically."""
    from safetensors.torch import save_file

    files.checkpoint.mkdir(parents=True, exist_ok=True)
    with atomic_path(files.weights) as tmp:
        save_file({k: v.contiguous() for k, v in model.cpu().state_dict().items()}, str(tmp))
    write_json(files.config, config.as_json())


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


@dataclass
class LoadedClassifier:
    """A checkpoint made usable: the network (eval mode, CPU) and what applying it needs."""

    net: Any
    config: CheckpointConfig

    @property
    def arch(self) -> str:
        return self.config.arch

    @property
    def size(self) -> int:
        return self.config.size

    @property
    def slugs(self) -> list[str]:
        return self.config.slugs

    @property
    def thresholds(self) -> list[float]:
        """Validation-chosen, on the network's own scores (0.5 only where none was chosen)."""

        return [stored_threshold(self.config.thresholds.get(s)) for s in self.slugs]

    @property
    def prior(self) -> WindowPrior | None:
        """The windows a file without one is read through (``CheckpointConfig.window_prior``); None: the percentile
        window."""
        return WindowPrior(self.config.window_prior) if self.config.window_prior else None

    @property
    def calibrated(self) -> bool:
        return any((c or {}).get("method") == "platt" for c in self.config.calibration.values())

    def calibration(self, j: int) -> dict | None:
        return self.config.calibration.get(self.slugs[j])

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """The network's scores (n, labels) -> calibrated probabilities, column by column (identity where none)."""

        probs = np.asarray(probs).reshape(-1, len(self.slugs))
        return np.stack([apply(self.calibration(j), probs[:, j]) for j in range(len(self.slugs))], axis=1) if len(probs) else probs

    @property
    def served_thresholds(self) -> list[float]:
        """The thresholds on the calibrated scale (each carried through its map), to show beside the probabilities;
        the calls are read on the network's scores at ``thresholds``."""

        return [calibrated_threshold(self.calibration(j), t) for j, t in enumerate(self.thresholds)]

    def probabilities(self, images: np.ndarray, device: str = "cpu", batch_size: int = 64) -> np.ndarray:
        """(n, len(slugs)) float32 network scores (before calibration) for uint8 images (n, size, size); fp32,
        as evaluation does."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
        p = predict(self.net, x, torch.device(device), batch_size, "fp32", channels_last=False)
        self.net.cpu()
        return p.reshape(-1, len(self.slugs)).astype(np.float32)


def load_checkpoint(checkpoint: Path) -> LoadedClassifier:
    """A checkpoint folder (either kind, either shape) -> its network in eval mode and its configuration."""
    from safetensors.torch import load_file

    config = read_config(checkpoint)
    net = build_model(config.arch, config.dropout, outputs=len(config.labels))
    net.load_state_dict(load_file(str(Path(checkpoint) / WEIGHTS)))
    return LoadedClassifier(net.eval(), config)


# --- the registry ---------------------------------------------------------------------------------------------


def register(run: TrackedRun, name: str, *, score: float | None, description: str, tags: Mapping[str, str], data_version: str = "") -> dict:
    """Register the run's MLflow model (:data:`MODEL_ARTIFACT`) as a new version of ``name``.

    The new version gets the alias ``candidate``; it becomes ``champion`` when its **validation** ``score``
    (recorded as tag ``val_auc``) beats the champion's, or when there is none. Selecting on the test figure would
    make the champion's test figure optimistic (it won on that very set). Scores are compared only on the same
    data: ``data_version`` (a digest of the validation rows the score was computed on) is recorded as a tag, and a
    champion scored on other data is no benchmark for the new version (after a data change a stale model would
    otherwise stay champion on an old, unrelated figure), so the comparison resets and the new version is
    promoted, with the reason in ``comparison``. The champion is read from the registered model's aliases, so any
    error talking to the tracking server fails the registration instead of promoting.
    """
    client = run.client
    model = registered_model_or_none(client, name) or client.create_registered_model(name, description=description)
    source = f"{client.get_run(run.run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    all_tags = {**tags, "val_auc": "nan" if score is None else f"{score:.6f}", "data_version": data_version}
    mv = client.create_model_version(name, source=source, run_id=run.run_id, tags=all_tags)
    client.set_registered_model_alias(name, CANDIDATE, mv.version)
    champion_version = (model.aliases or {}).get(CHAMPION)
    champion_score, comparison = None, "no champion yet"
    if champion_version is not None:
        champion_tags = client.get_model_version(name, str(champion_version)).tags
        champion_score = float(champion_tags.get("val_auc", "nan"))
        same_data = champion_tags.get("data_version", "") == data_version
        comparison = "same data" if same_data else "reset: the champion was scored on other data"
        if not same_data:
            champion_score = None
    promoted = score is not None and (champion_score is None or champion_score != champion_score or score > champion_score)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return {
        "name": name,
        "version": int(mv.version),
        CHAMPION: promoted,
        "previous_champion_score": champion_score,
        "comparison": comparison,
    }


def registered_label(reg: Mapping[str, Any]) -> str:
    """'cxr-edema v3 (champion)': a registration as the UI and the logs name it."""
    return f"{reg['name']} v{reg['version']}" + (f" ({CHAMPION})" if reg[CHAMPION] else "")


def retire_aliases(client, name: str, reason: str) -> list[str]:
    """Remove the aliases from ``name`` (the current data has no model for it) and record why."""
    model = registered_model_or_none(client, name)
    if model is None:
        return []
    removed = [a for a in ALIASES if a in (model.aliases or {})]
    for a in removed:
        client.delete_registered_model_alias(name, a)
    if removed:
        client.set_registered_model_tag(name, "cxr_pipeline.no_current_model", reason)
    return removed


@dataclass
class RegisteredClassifier:
    """A registered version loaded through MLflow's own loader (``models:/<name>@<alias>``): exactly what is
    registered. ``model`` is the :class:`LoadedClassifier` behind the pyfunc."""

    name: str
    version: str
    run_id: str
    pyfunc: Any

    @property
    def model(self) -> LoadedClassifier:
        return self.pyfunc.unwrap_python_model().model

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"

    def internal_rows(self, client) -> list[dict]:
        """Its run's metrics rows (the internal test split); empty for a version logged without them."""
        try:
            return json.loads(Path(client.download_artifacts(self.run_id, METRICS)).read_text())["rows"]
        except Exception:  # noqa: BLE001  (any failure to fetch means: no internal figures to compare with)
            return []


def registered_versions(client, names: Sequence[str], alias: str = CHAMPION) -> list[str]:
    """Sorted ``name:version`` pairs of ``names`` under ``alias``, read from the registry without loading a model
    (how a warm scorer learns that a champion was promoted)."""
    out = []
    for name in names:
        rm = registered_model_or_none(client, name)
        if rm is not None and alias in (rm.aliases or {}):
            out.append(f"{name}:{rm.aliases[alias]}")
    return sorted(out)


def load_registered(client, uri: str, names: Sequence[str], alias: str = CHAMPION) -> list[RegisteredClassifier]:
    """Each of ``names`` with a version under ``alias`` in the store at ``uri``, loaded by MLflow's loader. The
    loader resolves models:/ URIs against the environment's store; it is set for the loads only, rather than with
    mlflow.set_tracking_uri, which would pin this store for the rest of the process."""
    import mlflow.pyfunc

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        out = []
        for name in names:
            rm = registered_model_or_none(client, name)
            if rm is None or alias not in (rm.aliases or {}):
                continue
            mv = client.get_model_version_by_alias(name, alias)
            # by the version just read, not the alias again: a promotion in between must not label v2's weights v1
            out.append(RegisteredClassifier(name, str(mv.version), mv.run_id, mlflow.pyfunc.load_model(f"models:/{name}/{mv.version}")))
        return out
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


# --- the model card -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedCard:
    markdown: str
    uri: str  # runs:/<run>/model_card/model_card.md


def publish_model_card(
    run: TrackedRun,
    reg: Mapping[str, Any],
    files: ClassifierFiles,
    rows: list[dict],
    counts: Mapping[str, Mapping[str, int]],
    views: Sequence[str],
    digest: str,
    raw_dir: Path | None,
) -> PublishedCard:
    """The registered version's model card (``vision.model_card``), generated from the checkpoint and the metrics
    rows: Markdown and JSON artifacts under ``model_card/`` in the run, the version's description (which MLflow's
    UI renders as Markdown) links them and carries the Markdown, and the folder keeps the JSON."""

    md, card = build_card(
        name=reg["name"],
        version=str(reg["version"]),
        run_id=run.run_id,
        config=read_config(files.checkpoint).as_json(),
        rows=rows,
        counts=counts,
        views=views,
        manifest_version=digest,
        source=data_source(raw_dir),
    )
    return write_model_card(run.client, reg["name"], str(reg["version"]), run.run_id, md, card, files)


def write_model_card(client, name: str, version: str, run_id: str, md: str, card: dict, files: ClassifierFiles) -> PublishedCard:
    """The card as artifacts of the version's run (``model_card/``), in its description, and in the classifier's
    folder (``model_card.json``, with the version it belongs to: how the subgroup audit finds the card to add its
    gaps to, then re-publishes it here)."""

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / CARD_DIR
        folder.mkdir()
        (folder / CARD_MD).write_text(md)
        (folder / CARD_JSON).write_text(json.dumps(card, indent=1, default=str))
        client.log_artifacts(run_id, str(folder), CARD_DIR)
    link = f"runs:/{run_id}/{CARD_DIR}/{CARD_MD}"
    client.update_model_version(name, version, description=f"Model card: `{link}` (JSON beside it)\n\n{md}")
    with atomic_path(files.model_card) as tmp:
        tmp.write_text(json.dumps({"name": name, "version": version, "run_id": run_id, "card": card}, indent=1, default=str))
    return PublishedCard(md, link)


def read_model_card(files: ClassifierFiles) -> dict | None:
    """The card kept in the folder (name, version, run_id, card), or None where none was published."""
    return json.loads(files.model_card.read_text()) if files.model_card.exists() else None
