"""Fixtures: one small MIMIC-CXR replica per test session, and a private CXR_HOME per test.

Environment read by the tests and CI only (the package's own variables are declared in
``cxr_pipeline.settings.ENVIRONMENT``):

- ``CI``: ``true`` (set by ``.ci/run``) makes the integration tests fail, not skip, when their
  server or browser is missing.
- ``CXR_TEST_POSTGRES_URL``: a PostgreSQL server for the Dagster/MLflow-on-Postgres tests
  (``.ci/run`` starts one).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import dagster as dg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` exports the user's DAGSTER_HOME (under .cxr): a test's instance is its own (cxr_home, or a layout's home)
os.environ.pop("DAGSTER_HOME", None)

from cxr_pipeline.data.synthetic import SynthConfig, generate  # noqa: E402
from cxr_pipeline.defs.keys import RAW  # noqa: E402
from cxr_pipeline_tests.registered import registry  # noqa: E402, F401  (a fixture: registered champions)


def pytest_configure(config):
    """Under pytest-xdist each worker keeps to its share of the cores, and so do the processes its tests start
    (they inherit the affinity; the product sizes torch threads and decode workers from it, ``settings.usable_cpus``).
    Two workers with two torch threads each on two cores oversubscribe them: OpenMP threads spin-wait on cores
    the other worker holds, and the README's demo ran past twice its time beside the daemon test."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= count:
            os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) % count :: count])
            # torch is imported by now (the fixtures' modules) with one intra-op thread per core it saw; a test that
            # trains outside a Dagster run (which sizes threads itself) would run two threads on this worker's one
            # core, spin-waiting on each other: the image-dependence test's adapter trainings took over 20 minutes
            # instead of one in a CI run where they started so
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(len(os.sched_getaffinity(0)))
            # likewise numpy's BLAS (OpenBLAS), started by now with a thread per core it saw; sched_setaffinity moves
            # only this thread, so its other threads stayed on both cores: the disclosure attacker's rank tests took
            # 84 s in a CI run instead of 4 s alone. threadpoolctl (scikit-learn's) sets OpenBLAS's count process-wide
            # (OpenMP's, which it sets too, is per thread: this one's).
            from threadpoolctl import threadpool_limits

            threadpool_limits(len(os.sched_getaffinity(0)))


def pytest_collection_modifyitems(config, items):
    """The longest files first (a file's ``slow(minutes=...)`` summed), the rest in their order: ``make test``
    runs the files on two workers (pytest-xdist, ``--dist loadfile --no-loadscope-reorder``, which keeps this
    order), and a long file started last would leave the other worker idle while it runs."""
    minutes: dict = {}
    for item in items:
        for mark in item.iter_markers("slow"):
            minutes[item.path] = minutes.get(item.path, 0) + mark.kwargs.get("minutes", 1)
    items.sort(key=lambda item: -minutes.get(item.path, 0))  # stable: the order within each group is kept


REPLICA = SynthConfig(patients=40, seed=7, source_rows=96, workers=2)


@pytest.fixture(scope="session")
def replica(tmp_path_factory) -> Path:
    """A 40-patient DICOM replica, made once; treat it as read-only."""
    out = tmp_path_factory.mktemp("replica")
    generate(REPLICA, out)
    return out


@pytest.fixture
def replica_copy(replica, tmp_path) -> Path:
    """A writable copy of the replica's CSVs, reports and MIMIC-IV files; ``files/`` images are symlinked."""
    out = tmp_path / "raw"
    out.mkdir()
    for p in replica.iterdir():
        if p.name == "files":
            continue
        if p.is_dir():  # mimic-iv/: the replica's MIMIC-IV demographics
            shutil.copytree(p, out / p.name)
        else:
            shutil.copy(p, out / p.name)
    (out / "files").mkdir()
    for pnn in (replica / "files").iterdir():
        for subj in pnn.iterdir():
            dest = out / "files" / pnn.name / subj.name
            dest.mkdir(parents=True)
            for item in subj.iterdir():
                if item.is_dir():
                    (dest / item.name).symlink_to(item)
                else:
                    shutil.copy(item, dest / item.name)
    return out


@pytest.fixture
def cxr_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("CXR_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


# --- shared by the Dagster asset tests (defs/) ---------------------------------------------


@pytest.fixture
def env(replica_copy, cxr_home, monkeypatch):
    monkeypatch.setenv("CXR_RAW_DIR", str(replica_copy))
    return replica_copy


def run_job(defs, name, instance, **kw):
    result = defs.resolve_job_def(name).execute_in_process(instance=instance, raise_on_error=False, **kw)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return result


def raw_version(instance):
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    rec = instance.get_latest_data_version_record(dg.AssetKey(RAW), is_source=True)
    return extract_data_version_from_entry(rec.event_log_entry).value
