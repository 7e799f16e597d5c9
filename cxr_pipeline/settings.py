"""Where things live. Everything the pipeline writes is under ``CXR_HOME``.

Environment variables (all optional):

- ``CXR_HOME``: state root (default ``./.cxr``): Dagster home, MLflow database
  and artifacts, asset files.
- ``CXR_RAW_DIR``: MIMIC-CXR root holding the CSVs and ``files/`` (default: the
  demo replica ``$CXR_HOME/raw``). Point it at the real dataset to use it.
- ``MLFLOW_TRACKING_URI``: default ``sqlite:///$CXR_HOME/mlflow.db``.
- ``CXR_VLM_BASE``: base vision-language model (a local directory).
- ``CXR_IMAGE_SIZE``: default shard size in pixels (224), shared by the shard,
  classifier and report assets so that runs started by automation agree.
- ``CXR_OBSERVE_CRON``: when the raw dataset is observed (default hourly).

Asset policy (views, sizes, epochs, architectures, the adapter recipe) lives in
``$CXR_HOME/pipeline.yaml`` (``read_pipeline_config``), one section per asset,
read by every run at its start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Never phone home: set before mlflow is imported anywhere in the process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def image_size() -> int:
    """The shard size assets use when their config leaves it 0; read when a run starts, not at import."""
    return int(os.environ.get("CXR_IMAGE_SIZE", "224"))


def observe_cron() -> str:
    return os.environ.get("CXR_OBSERVE_CRON", "0 * * * *")


@dataclass(frozen=True)
class ClassifierFiles:
    """What one pathology's classifier folder holds."""

    dir: Path

    @property
    def checkpoint(self) -> Path:
        """``model.safetensors`` + ``config.json``: the weights inside the registered MLflow model."""
        return self.dir / "checkpoint"

    @property
    def hints(self) -> Path:
        """The multi-label model's report-hint probabilities (out-of-fold for training images)."""
        return self.dir / "hint_predictions.parquet"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def predictions(self) -> Path:
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
        return self.dir / "resume.pt"


@dataclass(frozen=True)
class Paths:
    """Every path under ``CXR_HOME`` (and the dataset root), named once.

    The Dagster assets, the CLI, the demo and the benchmarks all find files
    through this object; nothing else spells out the layout. Properties only
    name paths; writers create parent folders (``data.io.atomic_path``).
    """

    home: Path
    raw: Path

    @property
    def assets(self) -> Path:
        return self.home / "assets"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def pipeline_config(self) -> Path:
        """The user's asset configuration (``read_pipeline_config``)."""
        return self.home / "pipeline.yaml"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    def bench(self, name: str) -> Path:
        """A benchmark's cached inputs (``benchmarks/``)."""
        return self.home / "bench" / name

    # manifest
    @property
    def manifest(self) -> Path:
        return self.assets / "manifest" / "manifest.parquet"

    @property
    def manifest_rejects(self) -> Path:
        return self.assets / "manifest" / "manifest_rejects.parquet"

    # image shards: one folder per size, one per pNN partition inside it
    @property
    def shards(self) -> Path:
        return self.assets / "shards"

    def shard_root(self, size: int) -> Path:
        return self.shards / f"s{size}"

    def shard_partition(self, size: int, partition: str) -> Path:
        return self.shard_root(size) / partition

    # classifiers
    @property
    def classifiers(self) -> Path:
        return self.assets / "classifier"

    def classifier(self, label_slug: str) -> ClassifierFiles:
        return ClassifierFiles(self.classifiers / label_slug)

    @property
    def classifier_metrics(self) -> Path:
        return self.classifiers / "classifier_metrics.parquet"

    @property
    def classifier_curves(self) -> Path:
        return self.classifiers / "roc_pr_all.png"

    @property
    def classifier_predictions(self) -> Path:
        return self.classifiers / "classifier_predictions.parquet"

    # report generation
    @property
    def reports(self) -> Path:
        return self.assets / "reports"

    @property
    def report_pairs(self) -> Path:
        return self.reports / "report_pairs.parquet"

    @property
    def tiny_base(self) -> Path:
        return self.reports / "tiny_base"

    @property
    def adapter(self) -> Path:
        """The trained adapter (peft files, processor, ``cxr_adapter.json``)."""
        return self.reports / "adapter"

    @property
    def adapter_checkpoints(self) -> Path:
        """The trainer's resumable checkpoints while an adapter trains."""
        return self.reports / "adapter_checkpoints"

    @property
    def generated_reports(self) -> Path:
        return self.reports / "generated_reports.parquet"

    @property
    def report_metrics(self) -> Path:
        return self.reports / "report_metrics.parquet"


def paths() -> Paths:
    """Resolve the paths from the environment now (tests change it per session)."""
    home = Path(os.environ.get("CXR_HOME", ".cxr")).expanduser().resolve()
    raw_env = os.environ.get("CXR_RAW_DIR")
    raw = Path(raw_env).expanduser().resolve() if raw_env else home / "raw"
    return Paths(home=home, raw=raw)


def read_pipeline_config(p: Paths) -> dict[str, dict]:
    """``$CXR_HOME/pipeline.yaml``: ``{asset: {field: value}}``, the run config every run starts from.

    Runs started by automation, schedules, the UI or the CLI without a run config of
    their own use it; a run config given for one run overrides it field by field.
    Missing file: ``{}`` (the assets' defaults). A malformed file raises ``ValueError``
    naming it.
    """
    import yaml

    f = p.pipeline_config
    if not f.exists():
        return {}
    try:
        data = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{f}: not valid YAML: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{f}: expected a mapping of asset name -> {{field: value}}")
    return data


def write_pipeline_config(p: Paths, config: dict[str, dict], note: str) -> Path:
    """Write ``config`` as ``pipeline.yaml`` (atomically), with ``note`` as its header comment."""
    import yaml

    from cxr_pipeline.data.io import atomic_path

    header = "".join(f"# {line}\n" for line in note.splitlines())
    with atomic_path(p.pipeline_config) as tmp:
        tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return p.pipeline_config
