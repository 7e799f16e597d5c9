"""The manifest assets through Dagster: definitions load, materialize raw -> manifest, track in MLflow without PHI, configuration."""

from __future__ import annotations

import shutil
import sqlite3

import dagster as dg
import polars as pl
import pydicom

from cxr_pipeline.definitions import build_defs
from cxr_pipeline.tracking import get_client
from cxr_pipeline_tests.conftest import raw_version, run_job  # noqa: F401


def test_definitions_load_with_graph_and_checks():
    defs = build_defs()
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"raw_mimic_cxr", "manifest", "manifest_rejects"} <= keys
    checks = {c.name for c in graph.asset_check_keys}
    assert {"manifest_unique_dicom_id", "manifest_splits_patient_disjoint", "manifest_label_domain", "manifest_files_exist"} <= checks


def test_materialize_manifest_tracks_mlflow_and_links_back(env, cxr_home):
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        run_job(defs, "observe_raw", instance)
        version = raw_version(instance)
        result = run_job(defs, "manifest_job", instance)
        mats = {e.asset_key.to_user_string(): e.materialization for e in result.get_asset_materialization_events()}
        assert set(mats) == {"manifest", "manifest_rejects"}
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 4 and all(c.passed for c in checks)
        md = mats["manifest"].metadata
        path = md["path"].value
        m = pl.read_parquet(path)
        assert md["dagster/row_count"].value == m.height > 0
        assert str(cxr_home) in path
        run_id = md["mlflow_run_id"].value
        assert f"/runs/{run_id}?workflowType=machine_learning" in md["mlflow_run"].value  # opens the model-training view

        client, _ = get_client()
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["dagster.run_id"] == result.run_id
        assert tags["dagster.data_version"] == version
        assert "manifest" in tags["dagster.asset_key"] and tags["dagster.code_version"]
        assert run.data.metrics["rows"] == m.height
        assert "prevalence.Cardiomegaly" in run.data.metrics
        assert run.data.params["views"] == '["PA"]'


def test_run_config_changes_the_policy(env):
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        cfg = {"ops": {"manifest": {"config": {"views": ["PA", "AP", "LATERAL"], "one_image_per_subject": False}}}}
        result = run_job(defs, "manifest_job", instance, run_config=cfg)
        md = next(
            e.materialization for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "manifest"
        ).metadata
        m = pl.read_parquet(md["path"].value)
        assert {"PA", "AP", "LATERAL"} == set(m["view_position"])


def test_data_version_changes_only_when_data_changes(env):
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        run_job(defs, "observe_raw", instance)
        v1 = raw_version(instance)
        run_job(defs, "observe_raw", instance)
        assert raw_version(instance) == v1
        # a new image file appears
        some = next((env / "files").glob("p*/p*/s*/*.dcm"))
        extra = env / "files" / "p19" / "p19999999" / "s59999999"
        extra.mkdir(parents=True)
        shutil.copy(some, extra / "x.dcm")
        run_job(defs, "observe_raw", instance)
        v2 = raw_version(instance)
        assert v2 != v1
        # a changed CSV byte changes it too
        lab = env / "mimic-cxr-2.1.0-test-set-labeled.csv"
        lab.write_text(lab.read_text() + "\n")
        run_job(defs, "observe_raw", instance)
        assert raw_version(instance) != v2


def test_bad_dataset_fails_with_the_file_named(env):
    (env / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("manifest_job").execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert "mimic-cxr-2.0.0-metadata.csv.gz" in str(failure.step_failure_data.error.message) + str(
            failure.step_failure_data.user_failure_data
        )


def test_no_dicom_header_text_in_logs_or_tracking(env, cxr_home):
    phi = set()
    for f in (env / "files").glob("p*/p*/s*/*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        phi |= {str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate, ds.InstitutionName}
    assert phi
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        run_job(defs, "observe_raw", instance)
        result = run_job(
            defs, "manifest_job", instance, run_config={"ops": {"manifest": {"config": {"views": [], "one_image_per_subject": False}}}}
        )
        shards = [
            run_job(
                defs,
                "shards_job",
                instance,
                partition_key=part,
                run_config={"ops": {"image_shards": {"config": {"sizes": [32], "workers": 1}}}},
            )
            for part in ("p10", "p11", "p12", "p13", "p14", "p15", "p16", "p17", "p18", "p19")
        ]
        logs = "\n".join(str(e) for r in (result, *shards) for e in instance.all_logs(r.run_id))
    texts = [logs]
    db = cxr_home / "mlflow.db"
    con = sqlite3.connect(db)
    for table in ("params", "tags", "metrics", "runs", "experiments"):
        texts.append(str(con.execute(f"select * from {table}").fetchall()))
    con.close()
    for p in (cxr_home / "mlartifacts").rglob("*"):
        if p.is_file():
            texts.append(p.read_text(errors="replace"))
    blob = "\n".join(texts)
    leaked = sorted(v for v in phi if v in blob)
    assert not leaked


def test_pipeline_yaml_is_every_run_s_configuration_and_run_config_overrides_it(env, cxr_home):
    from cxr_pipeline.settings import paths, write_pipeline_config

    write_pipeline_config(paths(), {"manifest": {"views": ["AP"], "one_image_per_subject": False}}, "test")
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:

        def views(**kw) -> tuple[set, dict]:
            result = run_job(defs, "manifest_job", instance, **kw)
            md = next(
                e.materialization.metadata for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "manifest"
            )
            return set(pl.read_parquet(md["path"].value)["view_position"]), get_client()[0].get_run(md["mlflow_run_id"].value).data

        seen, run = views()  # no run config: the file
        assert seen == {"AP"} and run.params["views"] == '["AP"]'
        assert run.params["pipeline.manifest.views"] == '["AP"]' and run.tags["cxr_pipeline.config_sha256"]
        seen, _ = views(run_config={"ops": {"manifest": {"config": {"views": ["PA"]}}}})  # one run's own config wins, field by field
        assert seen == {"PA"}
        assert views()[0] == {"AP"}  # and only for that run

        write_pipeline_config(paths(), {"manifest": {"view": ["AP"]}}, "a typo")
        result = defs.resolve_job_def("manifest_job").execute_in_process(instance=instance, raise_on_error=False)
        failure = next(e for e in result.all_events if e.is_step_failure)
        assert "pipeline.yaml: manifest: unknown field(s) view" in failure.step_failure_data.error.message


def test_manifest_alone_writes_and_records_its_rejects(env, cxr_home):
    """Selecting only ``manifest`` (a catalog page's Materialize button, ``dagster asset materialize --select
    manifest``) still writes the rejects beside it, and records them as materialized by the same run: every
    planted bad row is in the rejects table, none is lost."""
    import gzip
    import os
    import subprocess
    import sys

    rec_path = env / "cxr-record-list.csv.gz"
    lines = gzip.decompress(rec_path.read_bytes()).decode().splitlines()
    header, rows = lines[0].split(","), [r.split(",") for r in lines[1:]]
    i_path, i_did = header.index("path"), header.index("dicom_id")
    outside, missing = rows[0][i_did], rows[1][i_did]
    rows[0][i_path] = "../../etc/passwd"
    rows[1][i_path] = rows[1][i_path].replace(".dcm", ".missing.dcm")
    rec_path.write_bytes(gzip.compress(("\n".join([",".join(header), *(",".join(r) for r in rows)]) + "\n").encode()))
    from cxr_pipeline.settings import paths, write_pipeline_config

    write_pipeline_config(paths(), {"manifest": {"views": [], "one_image_per_subject": False}}, "every image")  # no policy exclusion first

    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("manifest")])
        assert result.success
        rejects = pl.read_parquet(cxr_home / "assets" / "manifest" / "manifest_rejects.parquet")
        assert {outside, missing} <= set(rejects["dicom_id"])
        recorded = instance.get_latest_materialization_event(dg.AssetKey("manifest_rejects"))
        assert recorded is not None and recorded.run_id == result.run_id  # current, not stale
        assert recorded.asset_materialization.metadata["dagster/row_count"].value == rejects.height
        manifest_event = instance.get_latest_materialization_event(dg.AssetKey("manifest"))
        assert (
            manifest_event.asset_materialization.metadata["dagster/row_count"].value
            == pl.read_parquet(cxr_home / "assets" / "manifest" / "manifest.parquet").height
        )

    # the command line, on a clean state
    shutil.rmtree(cxr_home / "assets")
    environ = {**os.environ, "CXR_RAW_DIR": str(env), "CXR_HOME": str(cxr_home), "DAGSTER_HOME": str(cxr_home / "dagster")}
    (cxr_home / "dagster").mkdir(parents=True, exist_ok=True)
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    done = subprocess.run(
        [dagster, "asset", "materialize", "-m", "cxr_pipeline.definitions", "--select", "manifest"],
        env=environ,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rejects = pl.read_parquet(cxr_home / "assets" / "manifest" / "manifest_rejects.parquet")
    assert {outside, missing} <= set(rejects["dicom_id"])
