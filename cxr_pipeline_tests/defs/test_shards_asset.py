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
