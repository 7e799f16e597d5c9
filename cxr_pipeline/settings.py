"""Where things live, and every environment variable the package reads.

Everything the pipeline writes is under ``CXR_HOME`` (:class:`Paths`). The environment
variables are declared once, in :data:`ENVIRONMENT` (name, default, meaning), and read only
through :func:`env`; the README's table and the reference page are generated from it.
Asset settings (views, sizes, epochs, the adapter recipe) are not environment variables: they
live in ``$CXR_HOME/pipeline.yaml`` (``cxr_pipeline.config``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cxr_pipeline.files import atomic_path

# Never phone home: set before mlflow is imported anywhere in the process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class EnvVar:
    """One environment variable the package reads: its default (as the code applies it) and meaning."""

    name: str
    default: str
    meaning: str


ENVIRONMENT: dict[str, EnvVar] = {
    v.name: v
    for v in (
        EnvVar("CXR_HOME", ".cxr", "all state: Dagster home (`dagster/`), MLflow (`mlflow.db`, `mlartifacts/`), asset files (`assets/`)"),
        EnvVar("CXR_RAW_DIR", "", "the MIMIC-CXR root (CSVs and `files/`); empty: the replica in `$CXR_HOME/raw`"),
        EnvVar("MLFLOW_TRACKING_URI", "", "any MLflow 3 tracking URI (a database or a server); empty: `sqlite:///$CXR_HOME/mlflow.db`"),
        EnvVar(
            "DAGSTER_HOME", "", "the Dagster instance folder; empty: `$CXR_HOME/dagster` (the repository's `dagster.yaml` is copied there)"
        ),
        EnvVar(
            "CXR_VLM_BASE",
            "",
            "local directory of the report model's base (e.g. Llama-3.2-11B-Vision-Instruct) where `report_adapter.base` is null;"
            " empty: the tiny offline Mllama",
        ),
        EnvVar(
            "CXR_MIMIC_IV_DIR",
            "",
            "a MIMIC-IV root (`hosp/patients.csv.gz`, `hosp/admissions.csv.gz`) for the subgroup audit; empty: `$CXR_RAW_DIR/mimic-iv`"
            " (the replica writes one there)",
        ),
        EnvVar("CXR_OBSERVE_CRON", "0 * * * *", "when the raw dataset is observed (cron)"),
        EnvVar("CXR_AUTOMATION_INTERVAL", "60", "seconds between evaluations of the automation sensor"),
        EnvVar(
            "CXR_GPUS",
            "",
            "the GPUs the pipeline may use: a count (`4`) or CUDA ordinals (`0,2,5`); GPU steps run that many at once, one device"
            " each; empty: every GPU torch sees (on a host without one: one step at a time)",
        ),
        EnvVar(
            "CXR_EXECUTOR",
            "",
            "`k8s`: one Kubernetes pod per step; `ray`: one Ray job per step on the cluster at `RAY_ADDRESS` (on both the"
            " deployment owns the `gpu` pool's limit); `in_process`: steps in the run's process; empty: multiprocess on one host",
        ),
        EnvVar("RAY_ADDRESS", "", "the Ray cluster `CXR_EXECUTOR=ray` submits steps to (its job server, e.g. `http://head:8265`)"),
        EnvVar(
            "CXR_LOCK_DIR",
            "",
            "node-local folder of the GPU device locks on one host with several GPUs (never a shared volume); empty:"
            " `cxr_pipeline-gpu-locks` in the system's temporary folder",
        ),
        EnvVar(
            "CXR_K8S_GPU_TOLERATIONS",
            '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
            "JSON list: the tolerations of a GPU step's pod (GPU node pools are usually tainted; NVIDIA's taint by default)",
        ),
        EnvVar(
            "CXR_K8S_GPU_NODE_SELECTOR",
            '{"nvidia.com/gpu.present": "true"}',
            "JSON object: the node selector of a GPU step's pod (NVIDIA GPU feature discovery's label by default; `{}`: none)",
        ),
        EnvVar("CXR_MLFLOW_UI", "http://127.0.0.1:5000", "where run links point when tracking to a database (the MLflow UI's address)"),
        EnvVar(
            "CXR_PACS_URL",
            "",
            "the Orthanc whose stable studies the `pacs_intake` sensor scores and stores results into (e.g. `http://127.0.0.1:8042`); "
            "empty: the sensor starts stopped",
        ),
        EnvVar("CXR_PACS_INTERVAL", "5", "seconds between the `pacs_intake` sensor's looks at the PACS's changes feed"),
        EnvVar(
            "CXR_PACS_PASSWORD",
            "",
            "`cxr-pipeline pacs --network`: the HTTP basic-authentication password of user `cxr` (never on the command line)",
        ),
        EnvVar("CXR_CACHE", "", "cache of fetched test material (the IU X-ray reports); empty: `~/.cache/cxr_pipeline`"),
    )
}


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity (``taskset``, a container's cpuset), capped by a
    container's CPU quota (cgroup v2 ``cpu.max``: a Kubernetes pod's CPU limit), both of which
    ``os.cpu_count()`` overstates; torch threads and worker pools sized by the machine's count would
    oversubscribe the cores they were given (OpenMP threads then spin-wait)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(n, quota) if quota else n)


def _cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The cgroup v2 CPU limit in whole cores (rounded up), or None where there is none."""
    try:
        quota, period = open(path).read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else -(-int(quota) // int(period))


def cluster_executor() -> bool:
    """Whether steps run on a cluster engine (``CXR_EXECUTOR`` ``k8s`` or ``ray``): the engine places each step and
    gives it its device, and the deployment, not the code, owns the ``gpu`` pool's limit."""
    return env("CXR_EXECUTOR") in ("k8s", "ray")


def env(name: str) -> str:
    """An environment variable declared in :data:`ENVIRONMENT`, or its default; read now, never at import."""
    if name not in ENVIRONMENT:
        raise KeyError(f"{name}: not declared in cxr_pipeline.settings.ENVIRONMENT")
    return os.environ.get(name) or ENVIRONMENT[name].default


def environment_table() -> str:
    """The Markdown table of :data:`ENVIRONMENT` (the README's and the reference page's)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{v.name}` | {f'`{v.default}`' if v.default else '(empty)'} | {v.meaning} |" for v in ENVIRONMENT.values()]
    return "\n".join(rows)


def observe_cron() -> str:
    return env("CXR_OBSERVE_CRON")


@dataclass(frozen=True)
class Paths:
    """Every path under ``CXR_HOME`` (and the dataset root), named once.

    The Dagster assets, the CLI, the demo and the benchmarks all find files
    through this object; nothing else spells out the layout. Properties only
    name paths; writers create parent folders (``files.atomic_path``).
    """

    home: Path
    raw: Path

    @property
    def assets(self) -> Path:
        return self.home / "assets"

    @property
    def dagster_home(self) -> Path:
        return Path(env("DAGSTER_HOME") or self.home / "dagster")

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
        return env("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"

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

    @property
    def external(self) -> Path:
        """Where the external validation sets live by default (one folder per dataset) and what is built from them."""
        return self.home / "external"

    def external_shard_root(self, dataset: str, size: int) -> Path:
        """An external set's shards: one partition folder, ``all`` (``data.external``)."""
        return self.home / "assets" / "external_shards" / dataset / f"s{size}"

    @property
    def external_validation(self) -> Path:
        return self.home / "assets" / "external_validation"

    @property
    def image_drift(self) -> Path:
        """One Parquet file per drift window (``<window>.parquet``)."""
        return self.home / "assets" / "image_drift"

    # classifiers
    @property
    def classifiers(self) -> Path:
        """One folder per classifier inside (``vision.checkpoint.ClassifierSet`` names what each holds)."""
        return self.assets / "classifier"

    @property
    def classifier_metrics(self) -> Path:
        return self.classifiers / "classifier_metrics.parquet"

    @property
    def classifier_curves(self) -> Path:
        return self.classifiers / "roc_pr_all.png"

    @property
    def localization(self) -> Path:
        """The localization table and contact sheets (``vision.localization_data``)."""
        return self.classifiers / "localization"

    @property
    def localization_metrics(self) -> Path:
        return self.localization / "localization_metrics.parquet"

    @property
    def classifier_reliability(self) -> Path:
        return self.classifiers / "reliability_all.png"

    @property
    def classifier_predictions(self) -> Path:
        return self.classifiers / "classifier_predictions.parquet"

    @property
    def report_hints(self) -> Path:
        """The report prompts' classifier probabilities and thresholds (``vision.folds.report_hints``)."""
        return self.classifiers / "report_hints.parquet"

    # subgroup audit
    @property
    def mimic_iv(self) -> Path:
        """The MIMIC-IV root whose ``hosp/`` demographics the subgroup audit reads (the replica writes one in its root)."""
        return Path(env("CXR_MIMIC_IV_DIR")).expanduser().resolve() if env("CXR_MIMIC_IV_DIR") else self.raw / "mimic-iv"

    @property
    def subgroups(self) -> Path:
        return self.classifiers / "subgroups"

    @property
    def subgroup_metrics(self) -> Path:
        return self.subgroups / "subgroup_metrics.parquet"

    # report generation
    @property
    def reports(self) -> Path:
        return self.assets / "reports"

    @property
    def report_pairs(self) -> Path:
        return self.reports / "report_pairs.parquet"

    def tiny_base_dir(self, width: int = 1, pretrain_steps: int = 0, vision_steps: int = 0, instruct_steps: int = 0) -> Path:
        """The tiny offline Mllamas of this width, their language model pretrained for ``pretrain_steps``, their
        vision tower for ``vision_steps`` and taught to write from a findings list for ``instruct_steps`` (0: none):
        one per training split, in a folder named by its digest (``tiny_base.ensure_tiny_base``)."""
        name = (
            f"w{width}_lm{pretrain_steps}"
            + (f"_v{vision_steps}" if vision_steps else "")
            + (f"_i{instruct_steps}" if instruct_steps else "")
        )
        return self.reports / "tiny_base" / name

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
    def report_sheet(self) -> Path:
        """The picture of a few test studies' generated reports beside their images (``reports.sheet``)."""
        return self.reports / "generated_reports.png"

    @property
    def report_metrics(self) -> Path:
        return self.reports / "report_metrics.parquet"

    @property
    def report_differences(self) -> Path:
        return self.reports / "report_differences.parquet"

    def table(self, asset: str) -> Path:
        """The Parquet file of a table asset: where the IO manager writes it and every other reader finds it."""
        tables = {
            "manifest": self.manifest,
            "manifest_rejects": self.manifest_rejects,
            "classifier_metrics": self.classifier_metrics,
            "classifier_predictions": self.classifier_predictions,
            "report_hints": self.report_hints,
            "subgroup_metrics": self.subgroup_metrics,
            "localization_metrics": self.localization_metrics,
            "report_pairs": self.report_pairs,
            "generated_reports": self.generated_reports,
            "report_metrics": self.report_metrics,
        }
        if asset not in tables:
            raise KeyError(f"{asset}: not a table asset (tables: {', '.join(tables)})")
        return tables[asset]


def paths() -> Paths:
    """Resolve the paths from the environment now (tests change it per session)."""
    home = Path(env("CXR_HOME")).expanduser().resolve()
    raw_env = env("CXR_RAW_DIR")
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

    header = "".join(f"# {line}\n" for line in note.splitlines())
    with atomic_path(p.pipeline_config) as tmp:
        tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return p.pipeline_config
