"""Dagster definitions load, materialize raw -> manifest, and track in MLflow without PHI."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import dagster as dg
import polars as pl
import pydicom
import pytest

from cxr_pipeline.cli import main
from cxr_pipeline.definitions import build_defs
from cxr_pipeline.defs.raw import RAW
from cxr_pipeline.tracking import get_client


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


def test_cli_demo_on_a_tiny_replica(cxr_home, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CXR_RAW_DIR", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    assert main(["demo", "--patients", "12", "--image-size", "48", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "manifest:" in out and "make ui" in out and "beside the one multi-label model (threshold chosen on validation" in out
    assert "multi-label auc" in out  # both AUC columns side by side
    # both test label sources, in the classifier table and in the report table
    assert out.count("┆ chexpert") >= 14 and out.count("┆ radiologist") >= 14 and "┆ labeler" in out
    assert (cxr_home / "raw" / ".replica.json").exists()
    assert "epochs: 1" in (cxr_home / "pipeline.yaml").read_text()  # the demo's choices, for make ui to continue
    assert (tmp_path / "dh" / "dagster.yaml").exists()
    with dg.DagsterInstance.get() as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("manifest")) is not None


def test_manifest_alone_can_be_selected(env):
    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("manifest")])
        assert result.success
        assert [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()] == ["manifest"]


def test_shard_partitions_materialize_incrementally(env, cxr_home):
    from cxr_pipeline.data.shards import partition_of

    defs = build_defs()
    cfg = {"ops": {"image_shards": {"config": {"sizes": [64], "workers": 1}}}}
    with dg.DagsterInstance.ephemeral() as instance:
        run_job(defs, "manifest_job", instance)
        m = pl.read_parquet(cxr_home / "assets" / "manifest" / "manifest.parquet")
        part = m["path"].map_elements(partition_of, return_dtype=pl.String).mode()[0]
        first = run_job(defs, "shards_job", instance, partition_key=part, run_config=cfg)
        mats = {e.asset_key.to_user_string(): e.materialization for e in first.get_asset_materialization_events()}
        assert set(mats) == {"image_shards", "shard_rejects"} and all(e.partition == part for e in mats.values())
        md = mats["image_shards"].metadata
        n_part = int((m["path"].map_elements(partition_of, return_dtype=pl.String) == part).sum())
        assert md["decoded"].value == n_part == md["dagster/row_count"].value
        assert md["rejected"].value == 0 and md["images_per_second"].value > 0
        assert (cxr_home / "assets" / "shards" / "s64" / part / "contact_sheet.png").exists()
        assert md["contact_sheet_preview"].value.startswith("![contact sheet](data:image/png;base64,")
        checks = first.get_asset_check_evaluations()
        assert checks and all(c.passed for c in checks)
        client, _ = get_client()
        run = client.get_run(md["mlflow_run_id"].value)
        assert run.data.tags["dagster.partition"] == part and run.data.metrics["s64_decoded"] == n_part
        assert any(a.path == "contact_sheet.png" for a in client.list_artifacts(run.info.run_id))
        # a broken build at another size must not block this size's check (nor automation behind it)
        broken = cxr_home / "assets" / "shards" / "s32" / part
        shutil.copytree(cxr_home / "assets" / "shards" / "s64" / part, broken)
        for f in broken.glob("shard-*.u8"):
            f.write_bytes(b"")
        again = run_job(defs, "shards_job", instance, partition_key=part, run_config=cfg)
        checked = [(c.passed, [r["size"] for r in c.metadata["sizes"].value]) for c in again.get_asset_check_evaluations()]
        assert checked == [(True, [64])]
        md2 = next(
            e.materialization for e in again.get_asset_materialization_events() if e.asset_key.to_user_string() == "image_shards"
        ).metadata
        assert md2["decoded"].value == 0 and md2["unchanged"].value == n_part
        # same content, same data version: downstream stays fresh
        v = [
            e.materialization.tags.get("dagster/data_version")
            for r in (first, again)
            for e in r.get_asset_materialization_events()
            if e.asset_key.to_user_string() == "image_shards"
        ]
        assert v[0] == v[1]
        # size 0 (the default): every size a consumer reads, here the classifiers' 64 and the tiny report
        # base's 56-px tile. The second size is built beside the first; the first is not rebuilt.
        from cxr_pipeline.settings import paths, write_pipeline_config

        write_pipeline_config(paths(), {"classifier": {"size": 64}}, "test")
        both = run_job(defs, "shards_job", instance, partition_key=part, run_config={"ops": {"image_shards": {"config": {"workers": 1}}}})
        md3 = next(e.materialization for e in both.get_asset_materialization_events() if e.asset_key.to_user_string() == "image_shards")
        assert md3.metadata["sizes"].value == [56, 64]
        assert md3.metadata["decoded"].value == n_part and md3.metadata["unchanged"].value == n_part
        assert (cxr_home / "assets" / "shards" / "s56" / part / "index.parquet").exists()
        assert all(c.passed for c in both.get_asset_check_evaluations())


def test_classifier_partition_trains_registers_and_summarises(env, cxr_home, monkeypatch):
    from cxr_pipeline.data.shards import partition_of

    defs = build_defs()
    size = 32
    with dg.DagsterInstance.ephemeral() as instance:
        run_job(defs, "manifest_job", instance, run_config={"ops": {"manifest": {"config": {"views": [], "one_image_per_subject": False}}}})
        m = pl.read_parquet(cxr_home / "assets" / "manifest" / "manifest.parquet")
        for part in sorted(set(m["path"].map_elements(partition_of, return_dtype=pl.String))):
            run_job(
                defs,
                "shards_job",
                instance,
                partition_key=part,
                run_config={"ops": {"image_shards": {"config": {"sizes": [size], "workers": 1}}}},
            )
        cfg = {
            "ops": {
                "classifier": {
                    "config": {"size": size, "epochs": 2, "blank": "zeros", "bootstrap": 50, "batch_size": 16, "accumulation": 1}
                }
            }
        }
        first = run_job(defs, "classifier_job", instance, partition_key="support_devices", run_config=cfg)
        md = next(e.materialization for e in first.get_asset_materialization_events()).metadata
        assert md["evaluable"].value is True and 0.0 <= md["roc_auc"].value <= 1.0
        assert md["registered_model"].value.startswith("cxr-support-devices v1")
        ckpt = cxr_home / "assets" / "classifier" / "support_devices" / "checkpoint"
        assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
        assert not (ckpt.parent / "resume.pt").exists()
        client, _ = get_client()
        run = client.get_run(md["mlflow_run_id"].value)
        assert "val_loss" in run.data.metrics and "test_roc_auc" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == md["epochs_run"].value
        assert str(client.get_model_version_by_alias("cxr-support-devices", "candidate").version) == "1"
        assert str(client.get_model_version_by_alias("cxr-support-devices", "champion").version) == "1"
        # the registered version is an MLflow model: MLflow's own loader applies it to the shard images
        import mlflow.pyfunc
        import numpy as np

        from cxr_pipeline.data.shards import load_images

        monkeypatch.setenv("MLFLOW_TRACKING_URI", get_client()[1])  # as a user points MLflow at the pipeline's store
        loaded = mlflow.pyfunc.load_model("models:/cxr-support-devices@champion")
        test_rows = m.filter(pl.col("split") == "test").head(4)
        imgs, test_rows = load_images(cxr_home / "assets" / "shards" / f"s{size}", test_rows, size)
        out = loaded.predict(imgs.numpy())
        stored = pl.read_parquet(ckpt.parent / "predictions.parquet")
        expect = test_rows.select("dicom_id").join(stored, on="dicom_id", how="left")["prob"].to_numpy()
        np.testing.assert_allclose(out["support_devices"].to_numpy(), expect, atol=1e-5)
        threshold = json.loads((ckpt / "config.json").read_text())["threshold"]
        assert (out["support_devices_call"].to_numpy() == (out["support_devices"].to_numpy() >= threshold)).all()
        # what the model saw, in MLflow's dataset tracking: one dataset per split, digests of the rows
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "validate", "test"} and inputs["train"].name == f"mimic-cxr-{size}px"
        assert json.loads(inputs["train"].profile)["num_rows"] == int(run.data.params["n_train"])
        assert len({d.digest for d in inputs.values()}) == 3
        # the Grad-CAM sheet: inline in the metadata, a file beside the checkpoint, an MLflow artifact
        assert md["saliency"].value.startswith("![") and "data:image/png;base64," in md["saliency"].value
        assert (ckpt.parent / "saliency.png").exists()
        assert "saliency.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        run_job(defs, "classifier_job", instance, partition_key="no_finding", run_config=cfg)
        summary = run_job(defs, "classifier_summary_job", instance, run_config={"ops": {"multilabel_classifier": cfg["ops"]["classifier"]}})
        mats = {e.asset_key.to_user_string(): e.materialization for e in summary.get_asset_materialization_events()}
        table = pl.read_parquet(mats["classifier_metrics"].metadata["path"].value)
        per = table.filter(pl.col("model") == "per_pathology")
        assert set(per["slug"]) == {"support_devices", "no_finding"}
        # the multi-label model: one row per label and test label source, evaluated like the others
        multi = table.filter(pl.col("model") == "multilabel")
        assert multi.height == 2 * 14 and set(multi["test_labels"]) == {"chexpert", "radiologist"}
        assert multi.filter(pl.col("slug") == "support_devices")["evaluable"].to_list()[0] is True
        assert mats["multilabel_classifier"].metadata["registered_model"].value.startswith("cxr-multilabel v1")
        assert "saliency" in mats["multilabel_classifier"].metadata
        assert str(client.get_model_version_by_alias("cxr-multilabel", "champion").version) == "1"
        for col in ("roc_auc_lo", "roc_auc_hi", "f1", "sensitivity", "specificity", "average_precision", "threshold", "n_pos", "n_neg"):
            assert col in table.columns
        preds = pl.read_parquet(mats["classifier_predictions"].metadata["path"].value)
        assert {"dicom_id", "split", "support_devices", "no_finding"} <= set(preds.columns) and preds.height == m.height

        # the report branch end to end on the tiny offline Mllama
        rcfg = {
            "ops": {
                "report_adapter": {"config": {"size": size, "max_steps": 3, "batch_size": 2, "accumulation": 1, "max_train_pairs": 12}},
                "generated_reports": {"config": {"max_new_tokens": 6, "max_test_pairs": 6}},
            }
        }
        rep = run_job(defs, "report_job", instance, run_config=rcfg)
        rmats = {e.asset_key.to_user_string(): e.materialization for e in rep.get_asset_materialization_events()}
        assert set(rmats) == {"report_pairs", "report_adapter", "generated_reports", "report_metrics"}
        assert rmats["report_adapter"].metadata["prompt_variant"].value == "instruction+classifier_findings"
        # training prompts carry out-of-fold hints from the multi-label model's 5 fold models
        assert rmats["report_adapter"].metadata["hint_source"].value == "multilabel_out_of_fold"
        hints = pl.read_parquet(cxr_home / "assets" / "classifier" / "multilabel" / "hint_predictions.parquet")
        assert set(hints.filter(pl.col("split") == "train")["source"]) == {"out_of_fold"}
        arun = client.get_run(rmats["report_adapter"].metadata["mlflow_run_id"].value)
        assert arun.data.params["base_model"].startswith("cxr-tiny-mllama") and "loss" in arun.data.metrics
        # every training and metrics run says what it read (MLflow dataset tracking)
        assert [(i.dataset.name, i.tags[0].value) for i in arun.inputs.dataset_inputs] == [(f"report-pairs-{size}px", "train")]
        mrun = client.get_run(mats["classifier_metrics"].metadata["mlflow_run_id"].value)
        assert [(i.dataset.name, i.tags[0].value) for i in mrun.inputs.dataset_inputs] == [("classifier-test-scores", "test")]
        assert any(a.path == "adapter" for a in client.list_artifacts(arun.info.run_id))
        # each configured asset's run recorded the configuration it resolved, whole, with no auto left
        for key, mat in {**mats, **rmats}.items():
            if key in ("classifier_metrics", "classifier_predictions", "report_metrics"):
                continue  # no configuration of their own
            resolved = mat.metadata["resolved_config"].value
            assert None not in resolved.values() and "auto" not in resolved.values(), (key, resolved)
            params = client.get_run(mat.metadata["mlflow_run_id"].value).data.params
            assert all(params[k] == (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in resolved.items()), key
        assert rmats["report_adapter"].metadata["resolved_config"].value["size"] == size
        assert rmats["generated_reports"].metadata["resolved_config"].value["max_new_tokens"] == 6
        card = json.loads((cxr_home / "assets" / "reports" / "adapter" / "cxr_adapter.json").read_text())
        assert card["config"] == rmats["report_adapter"].metadata["resolved_config"].value
        gen = pl.read_parquet(rmats["generated_reports"].metadata["path"].value)
        assert gen.height == 6 and {"reference", "adapter", "template", "retrieval"} <= set(gen.columns)
        rm = pl.read_parquet(rmats["report_metrics"].metadata["path"].value)
        assert rm.filter(pl.col("test_labels") == "labeler")["system"].to_list() == ["adapter", "template", "retrieval"]
        rad = gen.filter(pl.col("radiologist_labelled")).height
        assert rm.filter(pl.col("test_labels") == "radiologist")["system"].to_list() == (
            ["adapter", "template", "retrieval"] if rad else []
        )
        import shutil

        for col in (
            "BLEU_1",
            "BLEU_4",
            "ROUGE_L",
            "CIDEr",
            "ce_micro14_f1",
            "ce_macro5_f1",
            "ce_upos_micro14_f1",
            "ce_upos_macro5_f1",
            *(["METEOR"] if shutil.which("java") else []),
        ):
            assert col in rm.columns
        from cxr_pipeline.reports.labeler import labeler_version

        # the references are named (this test caps the test pairs: not the R2Gen convention), the labeler versioned
        assert set(rm["evaluation"]) == {"findings references, first 6 test pairs"}
        assert set(rm["labeler"]) == {labeler_version()}
        mrun = client.get_run(rmats["report_metrics"].metadata["mlflow_run_id"].value)
        assert mrun.data.params["labeler"] == labeler_version()
        lab = rm.filter(pl.col("test_labels") == "labeler")
        assert lab["ce_micro14_f1_lo"].is_not_null().all() and (lab["ROUGE_L_lo"] <= lab["ROUGE_L"]).all()
        diffs = pl.read_parquet(Path(rmats["report_metrics"].metadata["path"].value).with_name("report_differences.parquet"))
        assert {(a, b) for a, b in diffs.select("a", "b").iter_rows()} == {
            ("adapter", "template"),
            ("adapter", "retrieval"),
            ("template", "retrieval"),
        }


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
