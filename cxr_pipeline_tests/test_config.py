"""One definition per setting: every field of every section can be set in pipeline.yaml and reaches the
domain call its asset makes; a resolved configuration has no auto left; ``cxr-pipeline config`` prints it;
the environment table is the declaration's."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from cxr_pipeline import config as C
from cxr_pipeline import fields as F
from cxr_pipeline.cli import main
from cxr_pipeline.settings import ENVIRONMENT, environment_table, paths, write_pipeline_config

ROOT = Path(__file__).resolve().parent.parent

# Values for fields whose type alone does not give a valid non-default value (choices, paths).
CHOICES = {
    "label_source": "negbio",
    "kernel": "gaussian",
    "signal": "features",
    "imbalance": "sampler",
    "precision": "fp32",
    "arch": "densenet121",
    "uncertain": "zeros",
    "blank": "ignore",
    "text_source": "impression",
    "target": "language+vision",
    "train_full": "multi_modal_projector",
    "device": "cpu",
    "views": ["AP", "LATERAL"],
    "sizes": [40, 48],
    "data": "streamed",
    "lr_schedule": "constant",
}


def other_value(d: C.FieldDoc, tmp: Path):
    """A valid value different from the field's default, from its type (or CHOICES)."""
    if d.section == "localization_metrics" and d.name == "boxes":  # a box table's path
        return str(tmp / "boxes.csv")
    if d.name in ("weights", "base"):
        (tmp / d.name).mkdir(exist_ok=True)
        return str(tmp / d.name)
    if d.name in CHOICES:
        return CHOICES[d.name]
    if d.section == "external_validation" and d.name.endswith("_dir"):  # an external set's folder
        return str(tmp / d.name)
    if d.section == "external_validation" and d.name.endswith("_labels"):  # its label file, relative to the folder
        return f"{d.name}.csv"
    t = d.type.replace(" | null", "")
    if t == "bool":
        return not d.default
    if t == "int":
        return 3 if d.default in (None, 0) else d.default + 2
    if t == "float":
        return 0.25 if not d.default else round(d.default * 1.5, 6)
    raise AssertionError(f"{d.section}.{d.name} ({d.type}): add a valid non-default value to CHOICES")


class Reached(dg.Failure):
    """Raised by a stand-in for a domain call once it has seen its configuration: a Failure that the GPU steps' retry
    policy leaves alone (retried, each of the seven GPU assets waited out the policy's 10 s: 70 s of this test's 96)."""

    def __init__(self, section: str):
        super().__init__(description=f"Reached {section}", allow_retries=False)


def materialize(asset, partition: str | None = None) -> None:
    from cxr_pipeline.definitions import build_defs

    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        job = defs.resolve_implicit_global_asset_job_def()
        if asset == "image_drift":  # its partitions are dynamic: the window must exist first
            instance.add_dynamic_partitions("drift_windows", [partition])
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(asset)], partition_key=partition, raise_on_error=False
        )
        errors = [e.step_failure_data.error for e in result.all_events if e.is_step_failure]
        assert errors and all("Reached" in e.to_string() for e in errors), [e.to_string() for e in errors]


def patch_everywhere(monkeypatch, home, name: str, stand_in) -> None:
    """``home.name`` replaced by ``stand_in`` there and in every loaded module of the package that imported it (the
    package imports at the module head, docs/layout.md: patching the home module alone would not reach an asset
    module loaded before the patch, as under pytest-xdist, where every test file is imported first)."""
    original = getattr(home, name)
    for module in [m for n, m in list(sys.modules.items()) if n.startswith("cxr_pipeline") and m is not None]:
        for attr, value in list(vars(module).items()):
            if value is original:
                monkeypatch.setattr(module, attr, stand_in)
    monkeypatch.setattr(home, name, stand_in)


def test_every_field_set_in_pipeline_yaml_reaches_the_domain_call(cxr_home, tmp_path, monkeypatch):
    """Walks every field of every section: set to a non-default value in pipeline.yaml, the asset's run
    hands exactly that value to the domain function it calls (a stand-in that records it and stops)."""
    import torch

    monkeypatch.setenv("CXR_RAW_DIR", str(tmp_path / "raw"))
    wanted = {s: {d.name: other_value(d, tmp_path) for d in C.field_docs(s)} for s in C.sections()}
    # the multi-label section adds its own field to the classifier recipe it inherits
    inherited = set(wanted["classifier"])
    file = {s: (v if s != "multilabel_classifier" else {k: x for k, x in v.items() if k not in inherited}) for s, v in wanted.items()}
    file["multilabel_classifier"]["epochs"] = 11  # and may override one for itself
    wanted["multilabel_classifier"]["epochs"] = 11
    write_pipeline_config(paths(), file, "every field set")
    seen: dict[str, dict] = {}

    def record(section, **values):
        seen[section] = values
        raise Reached(section)

    import cxr_pipeline.data.shard_reader as shard_reader
    import cxr_pipeline.defs.manifest as dman
    import cxr_pipeline.defs.shards as dsh
    import cxr_pipeline.reports.pairs as pairs
    import cxr_pipeline.reports.vlm as vlm
    import cxr_pipeline.vision.multilabel as multilabel
    import cxr_pipeline.vision.splits as splits

    manifest = pl.DataFrame({"dicom_id": ["d1"], "path": ["files/p10/p10000001/s50000001/d1.dcm"], "split": ["test"]})
    p = paths()
    # every size a consumer reads, built (a spec.json is what the checked handle opens): 40, the adapter card's below
    for size in {wanted[s]["size"] for s in ("classifier", "multilabel_classifier", "report_adapter")} | {40}:
        p.shard_partition(size, "p10").mkdir(parents=True, exist_ok=True)
        (p.shard_partition(size, "p10") / "spec.json").write_text(json.dumps({"size": size}))
    p.manifest.parent.mkdir(parents=True)
    manifest.write_parquet(p.manifest)  # the manifest table its consumers receive
    patch_everywhere(monkeypatch, dman, "build_manifest", lambda raw, policy: record("manifest", **vars(policy)))

    def build_partition_sizes(layout, partition, items, settings, progress=None):
        # every size in one pass; the run records every size it builds in MLflow before building any
        from cxr_pipeline.tracking import get_client

        client, _ = get_client()
        (run,) = client.search_runs(
            [client.get_experiment_by_name("cxr_pipeline").experiment_id], "tags.`dagster.asset_key` = 'image_shards'"
        )
        sizes = json.loads(run.data.params["sizes"])
        assert settings.sizes == sizes and all(layout.shard_partition(size, partition).parent.name == f"s{size}" for size in sizes)
        record("image_shards", sizes=sizes, images_per_shard=settings.images_per_shard, workers=settings.workers)

    patch_everywhere(monkeypatch, dsh, "build_partition_sizes", build_partition_sizes)
    patch_everywhere(monkeypatch, splits, "load_data", lambda m, root, label, cfg, *a: record("classifier", **vars(cfg)))
    patch_everywhere(monkeypatch, multilabel, "load_multilabel_data", lambda m, root, cfg, *a: record("multilabel_classifier", **vars(cfg)))
    patch_everywhere(monkeypatch, pairs, "build_pairs", lambda m, cfg: record("report_pairs", **vars(cfg)))
    patch_everywhere(monkeypatch, vlm, "adapter_training_set", lambda p, root, cfg, *a: record("report_adapter", **vars(cfg)))
    p.reports.mkdir(parents=True)
    test_rows = pl.DataFrame({"dicom_id": [f"d{i}" for i in range(9)], "split": ["test"] * 9, "text": ["x"] * 9})
    test_rows.write_parquet(p.report_pairs)
    p.adapter.mkdir()
    (p.adapter / "cxr_adapter.json").write_text(json.dumps({"base": str(tmp_path / "base"), "size": 40, "prompt_variant": "instruction"}))

    def load_images(shards, rows):
        seen["_test_rows"] = rows.height
        return [], rows

    patch_everywhere(monkeypatch, shard_reader, "load_images", load_images)

    def generate_reports(base, adapter, images, prompts, **kw):
        compute = {"device": str(kw["device"]), "threads": torch.get_num_threads()}
        seen["compute"] = compute
        record("generated_reports", **{k: kw[k] for k in ("max_new_tokens", "num_beams", "batch_size")}, max_test_pairs=seen["_test_rows"])

    patch_everywhere(monkeypatch, vlm, "generate_reports", generate_reports)

    # the subgroup audit: its statistics are the domain call; demographics and scores stand in, empty
    import cxr_pipeline.data.demographics as demographics
    import cxr_pipeline.defs.subgroups as dsub
    import cxr_pipeline.vision.subgroups as vsub
    from cxr_pipeline.data.demographics import Demographics

    p.classifier_metrics.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"model": ["per_pathology"], "slug": ["edema"]}).write_parquet(p.classifier_metrics)
    from cxr_pipeline.vision.folds import HINT_SCHEMA

    pl.DataFrame(schema=HINT_SCHEMA).write_parquet(p.report_hints)  # the classifier hints: none yet
    for module in (dsub, demographics):
        patch_everywhere(monkeypatch, module, "missing_reason", lambda root: None)
    patch_everywhere(monkeypatch, demographics, "read_demographics", lambda root: Demographics(pl.DataFrame(), pl.DataFrame(), root))
    patch_everywhere(monkeypatch, demographics, "per_image", lambda m, d: (pl.DataFrame(), {}))
    patch_everywhere(monkeypatch, vsub, "audit_scores", lambda *a: pl.DataFrame())
    patch_everywhere(monkeypatch, vsub, "audit", lambda scores, cfg: record("subgroup_metrics", **vars(cfg)))
    import cxr_pipeline.vision.external as vext

    def external_validation(paths, fmt, cfg, champions, shards, **k):
        seen["external_shards"] = vars(shards)  # an external set's shards are built with the image_shards settings
        record("external_validation", **vars(cfg))

    patch_everywhere(monkeypatch, vext, "external_validation", external_validation)
    # NIH present (its folder and label file, as pipeline.yaml names them) with a champion: the build's settings are resolved
    nih = wanted["external_validation"]
    Path(nih["nih_dir"]).mkdir(exist_ok=True)
    (Path(nih["nih_dir"]) / nih["nih_labels"]).write_text("")
    import cxr_pipeline.defs.external as dext

    monkeypatch.setattr(dext, "load_champions", lambda *a: ["a champion"])
    import cxr_pipeline.vision.localization_data as vloc

    patch_everywhere(
        monkeypatch, vloc, "localize", lambda paths, m, shards, champions, cfg, *a: record("localization_metrics", **vars(cfg))
    )
    # image drift: the window, the reference and the champion stand in; the comparison is the domain call
    import types

    import cxr_pipeline.defs.drift as ddrift

    fake = types.SimpleNamespace(name="cxr-multilabel", model=types.SimpleNamespace(size=40))
    monkeypatch.setattr(ddrift, "load_champions", lambda *a: [fake])
    monkeypatch.setattr(ddrift, "external_window", lambda paths, fmt, size, seed: (types.SimpleNamespace(images=[0, 0]), ""))
    monkeypatch.setattr(ddrift, "reference_sample", lambda *a: None)
    monkeypatch.setattr(ddrift, "compare", lambda window, ref, sample, champ, cfg, fmt, others: record("image_drift", **vars(cfg)))
    threads = torch.get_num_threads()
    try:
        for asset, partition in [
            ("manifest", None),
            ("image_shards", "p10"),
            ("classifier", "edema"),
            ("multilabel_classifier", None),
            ("subgroup_metrics", None),
            ("external_validation", "nih"),
            ("localization_metrics", None),
            ("image_drift", "external-nih"),
            ("report_pairs", None),
            ("report_adapter", None),
            ("generated_reports", None),
        ]:
            materialize(asset, partition)
    finally:
        torch.set_num_threads(threads)
    shard_settings = wanted["image_shards"]
    assert {k: seen["external_shards"][k] for k in ("sizes", "images_per_shard", "workers")} == {
        k: shard_settings[k] for k in ("sizes", "images_per_shard", "workers")
    }
    for section, values in wanted.items():
        got = seen[section]
        for name, value in values.items():
            v = got[name]
            assert (list(v) if isinstance(v, tuple) else v) == value, f"{section}.{name}: set {value!r}, the domain call got {v!r}"


def test_an_unknown_field_or_a_bad_value_fails_naming_file_section_and_field(cxr_home):
    write_pipeline_config(paths(), {"report_adapter": {"train_ful": "x"}}, "typo")
    with pytest.raises(F.ConfigError, match=r"pipeline.yaml: report_adapter: unknown field\(s\) train_ful"):
        C.resolve(paths(), "report_adapter")
    write_pipeline_config(paths(), {"classifier": {"epochs": "many"}}, "bad type")
    with pytest.raises(F.ConfigError, match=r"pipeline.yaml: classifier: epochs: "):
        C.resolve(paths(), "classifier")
    write_pipeline_config(paths(), {"classifier": {"imbalance": "smote"}}, "bad choice")
    with pytest.raises(F.ConfigError, match="imbalance must be"):
        C.resolve(paths(), "classifier")


def test_resolution_works_out_every_auto_and_records_no_placeholder(cxr_home, monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_VLM_BASE", raising=False)
    p = paths()
    budget = {"max_new_tokens": lambda: 41}
    for section in C.sections():
        cfg = C.resolve(p, section, derived=budget if section == "generated_reports" else None)
        rec = F.record(cfg)
        assert set(rec) == {d.name for d in C.field_docs(section)}
        assert not [k for k, v in rec.items() if v is None or v == "auto"], (section, rec)
    assert C.resolve(p, "classifier").size == 224  # a pipeline.yaml default like every other
    tiny = C.resolve(p, "report_adapter")
    assert tiny.size == 56 and tiny.base == str(p.tiny_base_dir(1, 0))  # the tiny base's tile
    assert C.resolve(p, "image_shards").sizes == [56, 224]  # every size a consumer reads, from their resolved settings
    assert C.resolve(p, "generated_reports", derived=budget).max_new_tokens == 41
    assert C.resolve(p, "report_pairs").max_words is None and F.record(C.resolve(p, "report_pairs"))["max_words"] == "no limit"
    # a real base: its tile decides the report model's size, and so a second shard size
    base = tmp_path / "llama"
    base.mkdir()
    (base / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 560, "width": 560}}))
    monkeypatch.setenv("CXR_VLM_BASE", str(base))
    assert C.resolve(p, "report_adapter").size == 560 and C.resolve(p, "image_shards").sizes == [224, 560]
    with pytest.raises(F.ConfigError, match="max_new_tokens still auto"):
        C.resolve(p, "generated_reports")  # a run never starts with an auto left
    # a real zero stays a zero; a zero that would mean "no limit" is refused (that is null)
    write_pipeline_config(p, {"report_adapter": {"dropout": 0.0, "seed": 0, "warmup_steps": 0}}, "zeros")
    adapter = C.resolve(p, "report_adapter")
    assert (adapter.dropout, adapter.seed, adapter.warmup_steps) == (0.0, 0, 0)
    write_pipeline_config(p, {"classifier": {"steps_per_epoch": 0}}, "old magic zero")
    with pytest.raises(F.ConfigError, match=r"steps_per_epoch must be at least 1, or null \(the whole training split\)"):
        C.resolve(p, "classifier")


def test_the_learning_recipe_is_a_pipeline_yaml(cxr_home):
    """benchmarks/recipes/*.yaml are pipeline.yaml files: copied into CXR_HOME they resolve, every field known."""
    recipes = sorted((ROOT / "benchmarks" / "recipes").glob("*.yaml"))
    assert recipes, "no recipe files"
    for recipe in recipes:
        paths().home.mkdir(parents=True, exist_ok=True)
        paths().pipeline_config.write_text(recipe.read_text())
        for section in yaml.safe_load(recipe.read_text()):
            C.resolve(paths(), section, derived={"max_new_tokens": lambda: 8} if section == "generated_reports" else None)
    learning = yaml.safe_load((ROOT / "benchmarks" / "recipes" / "learning.yaml").read_text())["report_adapter"]
    assert learning["use_classifier_findings"] is False  # the check asks what the image adds: no classifier hints


def test_the_learning_recipe_holds_the_candidate_chosen_on_validate(cxr_home):
    """bench_vlm --learning chooses among recipes/candidates/learning.yaml on the validate split and records the
    scores (recipes/candidates/learning-validate.json); the choice is re-run here on those scores, and learning.yaml
    (what the test-split figures and a user's pipeline.yaml run) must be the base plus the winner, so the recipe
    cannot drift from the choice. Every candidate must resolve as a run would, and every one was scored."""
    from cxr_pipeline.reports.learning_check import choose_candidate, recipe_holds

    folder = ROOT / "benchmarks" / "recipes" / "candidates"
    candidates = yaml.safe_load((folder / "learning.yaml").read_text())["candidates"]
    paths().home.mkdir(parents=True, exist_ok=True)
    paths().pipeline_config.write_text((ROOT / "benchmarks" / "recipes" / "learning.yaml").read_text())
    resolved = {name: F.record(C.resolve(paths(), "report_adapter", overlay)) for name, overlay in candidates.items()}
    assert len({json.dumps(r, sort_keys=True, default=str) for r in resolved.values()}) == len(resolved), (
        "two candidates are the same recipe"
    )
    scores = json.loads((folder / "learning-validate.json").read_text())["validate_ce_micro14_f1"]
    assert list(scores) == list(candidates), "the recorded scores are not those of the candidates file"
    winner = choose_candidate(scores)
    assert recipe_holds(C.resolve(paths(), "report_adapter"), candidates[winner]) == []
    assert F.record(C.resolve(paths(), "report_adapter")) == resolved[winner]


def test_the_demo_recipe_holds_the_candidate_chosen_on_validate_within_the_budget(cxr_home):
    """bench_demo_adapter.py chooses the demo's adapter recipe among recipes/candidates/demo.yaml on the validate split of
    a demo-sized replica, among the candidates whose base and training fit the demo's budget on a 2-core CPU, and records
    the scores, seconds and each candidate's resolved recipe (recipes/candidates/demo-validate.json). The choice is re-run
    here on that record; every candidate must resolve, on the demo's settings, to the recipe that was trained and timed
    (an edit of recipes/demo.yaml's shared fields after the run fails here), and the demo must run the winner's."""
    from cxr_pipeline.demo import DEMO_ADAPTER_BUDGET_S, demo_config
    from cxr_pipeline.reports.learning_check import choose_within_budget

    folder = ROOT / "benchmarks" / "recipes" / "candidates"
    candidates = yaml.safe_load((folder / "demo.yaml").read_text())["candidates"]
    record = json.loads((folder / "demo-validate.json").read_text())
    assert list(record["validate_ce_micro14_f1"]) == list(candidates), "the recorded scores are not those of the candidates file"
    assert (record["budget_s"], record["device"], record["threads"]) == (DEMO_ADAPTER_BUDGET_S, "cpu", 2)  # the demo's machine
    write_pipeline_config(paths(), demo_config(), "test")

    def recipe(overlay=None) -> dict:
        return {k: v for k, v in F.record(C.resolve(paths(), "report_adapter", overlay)).items() if k != "base"}

    resolved = {name: recipe(overlay) for name, overlay in candidates.items()}
    assert len({json.dumps(r, sort_keys=True, default=str) for r in resolved.values()}) == len(resolved), "two candidates are the same"
    assert json.loads(json.dumps(resolved, default=str)) == record["recipes"], "a candidate is not the recipe that was trained"
    winner = choose_within_budget(record["validate_ce_micro14_f1"], record["seconds"], record["budget_s"])
    assert record["chosen"] == winner
    assert recipe() == resolved[winner]


def test_the_choice_among_candidates_takes_the_best_and_breaks_ties_by_order():
    from cxr_pipeline.reports.learning_check import choose_candidate, choose_within_budget, recipe_holds

    assert choose_candidate({"a": 0.30, "b": 0.41, "c": 0.40}) == "b"
    assert choose_candidate({"a": 0.40, "b": 0.41, "c": 0.41}) == "b"  # a tie: the first listed
    assert choose_candidate({"a": float("nan"), "b": 0.1}) == "b"  # NaN never wins
    with pytest.raises(ValueError, match="every score is NaN"):
        choose_candidate({"a": float("nan")})

    class Recipe:
        lr, target = 5e-4, "language+vision"

    assert recipe_holds(Recipe(), {"lr": 5e-4}) == [] and recipe_holds(Recipe(), {"lr": 2e-3}) == ["lr: 0.0005 != 0.002"]
    # within a budget: the best that fits, not the best
    assert choose_within_budget({"a": 0.30, "b": 0.41}, {"a": 60, "b": 121}, 120) == "a"
    with pytest.raises(ValueError, match="no candidate within"):
        choose_within_budget({"a": 0.30}, {"a": 121}, 120)


def test_config_cli_prints_the_resolved_configuration(cxr_home, capsys, monkeypatch):
    config = {"classifier": {"size": 128}, "report_adapter": {"train_full": "multi_modal_projector", "lr": 5e-4}}
    write_pipeline_config(paths(), config, "test")
    assert main(["config", "report_adapter"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["report_adapter"]
    assert shown["train_full"] == "multi_modal_projector" and shown["lr"] == 5e-4 and shown["size"] == 56
    assert main(["config"]) == 0
    every = yaml.safe_load(capsys.readouterr().out)
    assert set(every) == set(C.sections()) and every["image_shards"]["sizes"] == [56, 128]
    assert every["generated_reports"]["max_new_tokens"].startswith("auto: ")  # its inputs do not exist yet: said so
    assert main(["config", "classifier_metrics"]) == 2
    assert "no configuration" in capsys.readouterr().err


def test_the_dagster_run_configs_are_generated_from_the_sections():
    from cxr_pipeline.definitions import defs

    for job, op, section in [("report_job", "report_adapter", "report_adapter"), ("classifier_job", "classifier", "classifier")]:
        fields = defs.resolve_job_def(job).run_config_schema.config_type.fields["ops"].config_type.fields[op]
        names = set(fields.config_type.fields["config"].config_type.fields)
        assert names == {d.name for d in C.field_docs(section)}


def test_code_version_follows_the_asset_s_section(cxr_home):
    from cxr_pipeline.definitions import build_defs

    def versions():
        g = build_defs().resolve_asset_graph()
        return {k.to_user_string(): g.get(k).code_version for k in g.get_all_asset_keys()}

    def changed(before, after):
        return {k for k in before if before[k] != after[k]}

    v0 = versions()
    write_pipeline_config(paths(), {"report_adapter": {"max_steps": 7}}, "test")
    v1 = versions()
    assert changed(v0, v1) == {"report_adapter"}
    write_pipeline_config(paths(), {"report_adapter": {"max_steps": 7, "size": 64}}, "test")
    v2 = versions()
    assert changed(v1, v2) == {"report_adapter", "image_shards", "shard_rejects"}  # a new size for the shards to build
    write_pipeline_config(paths(), {"report_adapter": {"max_steps": 7, "size": 64}, "classifier": {"epochs": 2}}, "test")
    # the multi-label model follows the recipe, and so do the report hints its fold models compute
    assert changed(v2, versions()) == {"classifier", "multilabel_classifier", "report_hints"}


def test_environment_is_declared_once_and_the_reference_table_is_generated_from_it():
    page = (ROOT / "docs" / "reference" / "environment.md").read_text()
    assert environment_table() in page, "docs/reference/environment.md differs from settings.ENVIRONMENT: run `make docs`"
    # every variable the package reads is declared (read through settings.env, nowhere else)
    read = set()
    for f in (ROOT / "cxr_pipeline").rglob("*.py"):
        text = f.read_text()
        read |= set(re.findall(r'env\("([A-Z0-9_]+)"\)', text))
        read |= set(re.findall(r'\{"env": "([A-Z0-9_]+)"\}', text))  # a Dagster config value read from the environment
        if f.name != "settings.py":
            assert not re.search(r'os\.environ\.get\("CXR_|os\.getenv\("CXR_', text), f"{f}: read CXR_* through settings.env"
    assert read <= set(ENVIRONMENT) and set(ENVIRONMENT) <= read | {"CXR_HOME", "CXR_RAW_DIR"}


def test_no_import_from_the_dagster_layer_below_it():
    for pkg in ("data", "vision", "reports"):
        for f in (ROOT / "cxr_pipeline" / pkg).rglob("*.py"):
            text = f.read_text()
            assert "cxr_pipeline.defs" not in text and "import dagster" not in text, f


def test_every_field_is_documented_and_says_what_null_means():
    for section in C.sections():
        for d in C.field_docs(section):
            assert d.doc, f"{section}.{d.name} has no documentation"
            assert not (d.auto and d.null), f"{section}.{d.name}: null cannot mean both auto and a value"
            assert "null" not in d.type or d.auto or d.null, f"{section}.{d.name}: say what null means (auto= or null=)"


def test_auto_threads_and_workers_follow_the_cpu_affinity(cxr_home):
    """A process pinned to one core (taskset, a container's cpuset) resolves one torch thread and one decode
    worker, not the machine's core count: more would oversubscribe the core it was given."""
    import os
    import subprocess
    import sys

    code = (
        "from cxr_pipeline import config as C; from cxr_pipeline.settings import paths; "
        "print(C.resolve(paths(), 'compute').threads, C.resolve(paths(), 'image_shards').workers)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=lambda: os.sched_setaffinity(0, {0}), capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["1", "1"]


def test_the_shards_are_built_at_every_size_a_consumer_reads(cxr_home):
    """One resolver for the shard sizes, from each consumer's own resolution: a size set for the multi-label
    model alone is built too (it once read only the per-pathology section)."""
    monkey = {"classifier": {"size": 64}, "multilabel_classifier": {"size": 96}}
    write_pipeline_config(paths(), monkey, "test")
    assert C.resolve(paths(), "image_shards").sizes == [56, 64, 96]  # 56: the tiny report base's tile
    assert C.resolve(paths(), "multilabel_classifier").size == 96 and C.resolve(paths(), "classifier").size == 64
    write_pipeline_config(paths(), {**monkey, "image_shards": {"sizes": [32]}}, "test")
    assert C.resolve(paths(), "image_shards").sizes == [32]  # set: as set
