"""The MLflow helper every asset uses: one MLflow run per materialization.

Runs are driven through ``MlflowClient`` with an explicit run id rather than
the fluent ``mlflow.start_run`` global, so concurrent steps in one process
never write into each other's run. Experiments are created with an artifact
location under ``CXR_HOME`` (MLflow 3 refuses the file store, so tracking is a
database URI; artifacts still go to a local folder unless a server says
otherwise).

Nothing here is allowed to see DICOM header text: callers pass counts,
parameters and tables of the manifest's own columns only.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_pipeline.settings import env, paths

EXPERIMENT = "cxr_pipeline"


@dataclass
class TrackedRun:
    """An open MLflow run: thin, explicit wrappers around ``MlflowClient``."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), ts, step or 0) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_table(self, df, name: str) -> None:
        """A polars (or pandas) frame as an MLflow table artifact (``<name>.json``)."""
        pdf = df.to_pandas() if hasattr(df, "to_pandas") else df
        self.client.log_table(self.run_id, data=pdf, artifact_file=f"{name}.json")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(data, indent=2, default=str))
            self.client.log_artifact(self.run_id, str(p))

    def log_datasets(self, name: str, splits: Mapping[str, Any], source: str | Path) -> None:
        """Record what the run read with MLflow's dataset tracking (the runs table's Dataset column).

        ``splits`` maps a context (``train`` / ``validate`` / ``test``) to a polars frame of the rows
        used; only the name, the digest of the rows, their schema and row count reach MLflow, never the
        rows themselves. Callers pass id / content-hash / target columns, never DICOM header text.
        """
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for context, df in splits.items():
            with warnings.catch_warnings():
                # MLflow registers two identical local-file sources and warns that a path matches both
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
                ds = mlflow.data.from_polars(df, source=str(source), name=name, digest=frame_digest(df))
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    @property
    def url(self) -> str:
        return run_url(self.tracking_uri, self.experiment_id, self.run_id)


def frame_digest(df) -> str:
    """Digest of every row in order (MLflow's own digest hashes a sample of the first rows only)."""
    import hashlib

    h = hashlib.sha256(",".join(df.columns).encode())
    for row in df.iter_rows():
        h.update("\t".join("" if v is None else str(v) for v in row).encode() + b"\n")
    return h.hexdigest()[:12]


def _metric_key(k: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / ; map anything else to _
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in k)


# MLflow 3.17's UI picks GenAI or model-training pages from this URL parameter (then remembers it), not
# from the experiment's kind tag while its workflow switch is shown; every link we print carries it.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A link to the run: the server's own page, or the local ``make mlflow-ui`` page."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else env("CXR_MLFLOW_UI")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def get_client(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or paths().tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri), uri


# MLflow 3 opens an experiment without this tag on its GenAI (traces) view; this one holds training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(client, name: str, artifact_root: Path | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        location = (artifact_root / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # created concurrently by another step
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextmanager
def tracked_run(
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    *,
    experiment: str = EXPERIMENT,
    tracking_uri: str | None = None,
    artifact_root: Path | None = None,
) -> Iterator[TrackedRun]:
    """Open an MLflow run; it ends FINISHED, or FAILED if the body raises."""
    client, uri = get_client(tracking_uri)
    if artifact_root is None and not uri.startswith("http"):
        artifact_root = paths().mlflow_artifacts
    exp_id = ensure_experiment(client, experiment, artifact_root)
    run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
    tr = TrackedRun(client=client, run_id=run.info.run_id, experiment_id=exp_id, tracking_uri=uri)
    try:
        yield tr
    except BaseException:
        client.set_terminated(tr.run_id, status="FAILED")
        raise
    client.set_terminated(tr.run_id, status="FINISHED")


# ------------------------------------------------------------------ model registry


def registered_model_or_none(client, name: str):
    """The registered model ``name``, or None when it does not exist; any other error is raised."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise  # a tracking-server error is not "no such model"
        return None
