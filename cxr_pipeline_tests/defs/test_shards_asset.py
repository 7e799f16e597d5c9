"""The image_shards partitions through Dagster: incremental builds, data versions, every size a consumer reads."""

from __future__ import annotations

import shutil

import dagster as dg
import polars as pl

from cxr_pipeline.definitions import build_defs
from cxr_pipeline.tracking import get_client
from cxr_pipeline_tests.conftest import raw_version, run_job  # noqa: F401


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
        # the version is what the partition holds: its images' ids and source bytes, recomputed here from the files
        import hashlib

        import xxhash

        from cxr_pipeline.settings import paths as _paths

        rows = m.filter(m["path"].map_elements(partition_of, return_dtype=pl.String) == part).sort("dicom_id")
        held = "".join(
            f"{d}:{xxhash.xxh3_128_hexdigest((_paths().raw / p).read_bytes())}\n" for d, p in rows.select("dicom_id", "path").iter_rows()
        )
        assert v[0] == v[1] == f"s64-{hashlib.sha256(held.encode()).hexdigest()[:24]}"
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


def test_a_consumer_asking_for_a_size_never_built_fails_naming_it_and_how_to_build_it(cxr_home, tmp_path, monkeypatch):
    """The classifier's run config (the launchpad) asks for 128 px; image_shards resolves its sizes from pipeline.yaml,
    so it never built them: the run fails saying so and how to build them, instead of training on no images."""
    import json

    from cxr_pipeline.config import resolve
    from cxr_pipeline.settings import paths

    monkeypatch.setenv("CXR_RAW_DIR", str(tmp_path / "raw"))
    p = paths()
    built = resolve(p, "image_shards").sizes
    assert 128 not in built
    for size in built:  # every size image_shards builds, built (its spec.json is what the handle checks)
        p.shard_partition(size, "p10").mkdir(parents=True)
        (p.shard_partition(size, "p10") / "spec.json").write_text(json.dumps({"size": size}))
    p.manifest.parent.mkdir(parents=True)
    pl.DataFrame({"dicom_id": ["d1"], "path": ["files/p10/p10000001/s50000001/d1.dcm"], "split": ["test"]}).write_parquet(p.manifest)
    job = build_defs().resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey("classifier")],
            partition_key="edema",
            run_config={"ops": {"classifier": {"config": {"size": 128}}}},
            raise_on_error=False,
        )
    (error,) = [e.step_failure_data.error.to_string() for e in result.all_events if e.is_step_failure]
    assert "no image shards at 128 px" in error and "materialize image_shards with 128 among its sizes" in error
    assert "image_shards.sizes in pipeline.yaml" in error and f"image_shards now builds {built} px" in error
    # at once: the GPU step's retry (for a lost node or a killed process) cannot mend a size never built
    assert not [e for e in result.all_events if e.is_step_up_for_retry]
