"""Integration against a real PostgreSQL server: Dagster's storage and MLflow's backend store.

`.ci/run` starts a server (installing Debian's package when needed) and sets
CXR_TEST_POSTGRES_URL. Outside CI the tests skip when no URL is set; in CI
(CI=true) a missing or unreachable server is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import polars as pl
import pytest

from cxr_pipeline.data.shards import partition_fingerprints, slice_fingerprint
from cxr_pipeline_tests.services import BIN, free_port, mlflow_runs_for, mlflow_server, stop, wait_http

psycopg2 = pytest.importorskip("psycopg2")


def _with_db(url: str, db: str) -> str:
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, f"/{db}", u.query, u.fragment))


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get("CXR_TEST_POSTGRES_URL")
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if not url:
        if in_ci:
            pytest.fail("CI=true but CXR_TEST_POSTGRES_URL is not set (.ci/run starts a server and sets it)")
        pytest.skip("no PostgreSQL server: set CXR_TEST_POSTGRES_URL (or run .ci/postgres)")
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as e:
        if in_ci:
            pytest.fail(f"PostgreSQL at {url} unreachable: {e}")
        pytest.skip(f"PostgreSQL at {url} unreachable: {e}")
    return url


@pytest.fixture
def databases(pg_url):
    """Two fresh databases, one for Dagster and one for MLflow, dropped afterwards."""
    names = {kind: f"cxr_test_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("dagster", "mlflow")}
    admin = psycopg2.connect(pg_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'CREATE DATABASE "{name}"')
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3: name the installed driver, as docker/ does
    yield {kind: _with_db(pg_url, name).replace("postgresql://", "postgresql+psycopg2://", 1) for kind, name in names.items()}
    with admin.cursor() as cur:
        for name in names.values():
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _count(url: str, sql: str) -> int:
    with psycopg2.connect(url.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


@pytest.mark.slow(minutes=1.2)
def test_dagster_on_postgres_with_mlflow_server_on_postgres(databases, replica_copy, tmp_path, monkeypatch):
    home, dh = tmp_path / "home", tmp_path / "dagster_home"
    dh.mkdir(parents=True)
    (dh / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {databases['dagster']}\ntelemetry:\n  enabled: false\n")
    port = free_port()
    env = {**os.environ, "CXR_HOME": str(home), "CXR_RAW_DIR": str(replica_copy), "DAGSTER_HOME": str(dh)}
    mlflow = mlflow_server(port, databases["mlflow"], tmp_path / "artifacts", env, tmp_path / "mlflow.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, mlflow, tmp_path / "mlflow.log")
        for k, v in {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(k, v)
        with dg.DagsterInstance.from_config(str(dh)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"

            def launch(selection: str, partition: str | None = None) -> subprocess.Popen:
                # a run per process, as run launchers do; its steps in processes of their own
                # (the multiprocess executor), every one of them writing to Postgres
                cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "cxr_pipeline.definitions", "--select", selection]
                if partition:
                    cmd += ["--partition", partition, "-c", str(config)]
                return subprocess.Popen(cmd, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

            def finish(proc: subprocess.Popen) -> None:
                out, _ = proc.communicate(timeout=600)
                assert proc.returncode == 0, out[-4000:]

            config = tmp_path / "shards.yaml"
            config.write_text("ops:\n  image_shards:\n    config: {sizes: [64], workers: 1}\n")
            finish(launch("manifest,manifest_rejects"))  # the manifest, then its four checks as parallel steps
            manifest = pl.read_parquet(home / "assets/manifest/manifest.parquet")
            empty = slice_fingerprint(manifest.clear())
            parts = sorted(p for p, fp in partition_fingerprints(manifest).items() if fp != empty)[:3]
            assert len(parts) == 3
            for proc in [launch("image_shards,shard_rejects", p) for p in parts]:  # three partition runs at once
                finish(proc)

            (manifest_run,) = [r.dagster_run.run_id for r in instance.get_run_records() if "dagster/partition" not in r.dagster_run.tags]
            records = [r for r in instance.get_run_records() if "dagster/partition" in r.dagster_run.tags]
            assert sorted(r.dagster_run.tags["dagster/partition"] for r in records) == parts
            assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
            shard_runs = [r.dagster_run.run_id for r in records]
            first_end = min(r.end_time for r in records)
            assert sum(r.start_time < first_end for r in records) >= 2, "the partition runs did not overlap"
            for part in parts:
                ev = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey("image_shards"), asset_partitions=[part]), limit=1
                ).records
                assert ev and ev[0].asset_materialization.metadata["dagster/row_count"].value > 0
            assert instance.get_latest_materialization_event(dg.AssetKey("manifest")) is not None

        # what Dagster recorded is in Postgres itself
        n_mat = _count(databases["dagster"], "select count(*) from event_logs where dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert n_mat == 2 + 2 * len(parts)  # manifest + rejects, image_shards + shard_rejects per partition
        assert _count(databases["dagster"], "select count(*) from runs where status = 'SUCCESS'") == 1 + len(parts)

        # MLflow: one finished run per Dagster run, found through the REST API and stored in Postgres
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        for run_id in [manifest_run, *shard_runs]:
            found = mlflow_runs_for(api, run_id)
            assert len(found) == 1 and found[0]["info"]["status"] == "FINISHED"
        assert _count(databases["mlflow"], "select count(*) from runs where status = 'FINISHED'") == 1 + len(parts)
        sheets = list((tmp_path / "artifacts").rglob("contact_sheet.png"))
        assert len(sheets) == len(parts)  # artifacts went through the server to its artifact store
    finally:
        stop(mlflow)
