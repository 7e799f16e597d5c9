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
    return int(os.environ.get("CXR_IMAGE_SIZE", "224"))


def observe_cron() -> str:
    return os.environ.get("CXR_OBSERVE_CRON", "0 * * * *")


@dataclass(frozen=True)
class Paths:
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
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

    def asset_dir(self, *parts: str) -> Path:
        p = self.assets.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


def paths() -> Paths:
    """Resolve the paths from the environment now (tests change it per session)."""
    home = Path(os.environ.get("CXR_HOME", ".cxr")).expanduser().resolve()
    raw_env = os.environ.get("CXR_RAW_DIR")
    raw = Path(raw_env).expanduser().resolve() if raw_env else home / "raw"
    return Paths(home=home, raw=raw)
