"""The UIs in a real browser: the pages a user opens in Dagster and MLflow, driven by Playwright.

Chromium comes from Debian's packages (``.ci/run`` installs it when missing) and Playwright
drives it through ``executable_path``: nothing downloads a browser build. The state is small
and real: the replica, the manifest, every shard partition and two classifier partitions at
32 px, made by the project's own jobs. Screenshots of every page land in
``.cxr/test-artifacts/ui/`` (git-ignored), a few of them in the README's UI tour.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cxr_pipeline.tracking import MODEL_TRAINING_VIEW, run_url
from cxr_pipeline_tests.services import BIN, ROOT, free_port, mlflow_server, start, stop, wait_http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / ".cxr" / "test-artifacts" / "ui"
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no Chromium here (apt-get install chromium); CI installs it"
)
STATE = """
import polars as pl
from cxr_pipeline.data.shards import partition_of
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.demo import _Runner, ensure_dagster_home
from cxr_pipeline.settings import paths, write_pipeline_config

layout = paths()
generate(SynthConfig(patients=8, seed=11, source_rows=48), layout.raw)
write_pipeline_config(layout, {
    "manifest": {"views": ["PA", "AP"], "one_image_per_subject": False},
    "image_shards": {"sizes": [32], "workers": 1},
    "classifier": {"size": 32, "epochs": 1, "batch_size": 16, "accumulation": 1, "bootstrap": 20},
}, "browser test")
ensure_dagster_home()
run = _Runner()
assert run("observe_raw") and run("manifest_job")
m = pl.read_parquet(layout.manifest)
for part in sorted(set(m["path"].map_elements(partition_of, return_dtype=pl.String))):
    assert run("shards_job", part)
for label in ("support_devices", "pleural_effusion"):
    assert run("classifier_job", label)
"""


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> dict:
    assert CHROMIUM, "Chromium is missing: .ci/run installs it (apt-get install chromium)"
    root = tmp_path_factory.mktemp("ui")
    env = {**os.environ, "CXR_HOME": str(root / "home"), "CXR_RAW_DIR": str(root / "raw"), "DAGSTER_HOME": str(root / "home" / "dagster")}
    env.update(CXR_EXECUTOR="in_process", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", STATE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return {"env": env, "root": root}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def visit(page, url: str, shot: str, *texts: str, timeout: float = 60_000) -> str:
    """Open ``url``, wait until every text is on the page, screenshot it, return the page's text."""
    page.goto(url)
    for t in texts:
        page.get_by_text(t, exact=False).first.wait_for(timeout=timeout)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / f"{shot}.png"))
    return page.inner_text("body")


def test_dagster_ui_shows_groups_partitions_metadata_checks_and_automation(state, browser):
    port, log = free_port(), state["root"] / "webserver.log"
    proc = start(
        [str(BIN / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)], state["env"], log
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/server_info", 180, proc, log)
        base = f"http://127.0.0.1:{port}"
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        text = visit(page, f"{base}/asset-groups", "dagster-asset-graph", "Global asset lineage", "classifiers")
        for group in ("raw", "manifest", "images", "classifiers", "reports"):  # the five groups
            assert group in text.split(), group
        assert "Join the Dagster community" not in text  # the shipped dagster.yaml turns the pop-up off
        text = visit(page, f"{base}/assets/classifier?view=partitions", "dagster-classifier-partitions", "14 Partitions", "support_devices")
        assert "Materialized (2)" in text and "Missing (12)" in text
        text = visit(page, f"{base}/assets/classifier", "dagster-classifier-metadata", "roc_auc", "registered_model")
        assert "cxr-pleural-effusion v1" in text or "cxr-support-devices v1" in text
        # the Grad-CAM sheet: inline Markdown metadata, opened from the partition's metadata table
        visit(page, f"{base}/assets/classifier?view=partitions&partition=support_devices", "dagster-partition", "[Show Markdown]")
        page.get_by_text("[Show Markdown]").first.click()
        sheet = page.locator('img[src^="data:image/png;base64,"]')
        sheet.first.wait_for(timeout=30_000)
        assert sheet.first.evaluate("img => img.naturalWidth") > 100  # the PNG decoded in the browser
        page.screenshot(path=str(ARTIFACTS / "dagster-classifier-saliency.png"))
        page.keyboard.press("Escape")
        text = visit(page, f"{base}/assets/manifest?view=checks", "dagster-manifest-checks", "manifest_unique_dicom_id")
        for check in ("manifest_files_exist", "manifest_label_domain", "manifest_splits_patient_disjoint", "manifest_unique_dicom_id"):
            assert check in text
        assert "This is a blocking asset check." in text
        # the manifest is a table travelling through the IO manager: the catalog shows its columns
        text = visit(page, f"{base}/assets/manifest", "dagster-manifest-columns", "Columns", "dicom_id")
        assert "subject_id" in text and "view_position" in text
        text = visit(page, f"{base}/automation", "dagster-automation", "Automation condition sensor")
        loc = "cxr_pipeline.definitions"
        sensor = visit(page, f"{base}/locations/{loc}/sensors/automation", "dagster-automation-sensor", "automation", "Running")
        assert "Running" in sensor
        page.close()
    finally:
        stop(proc)


def test_mlflow_ui_lists_classifier_runs_and_compares_two(state, browser):
    home = Path(state["env"]["CXR_HOME"])
    port, log = free_port(), state["root"] / "mlflow.log"
    proc = mlflow_server(port, f"sqlite:///{home / 'mlflow.db'}", home / "mlartifacts", state["env"], log)
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, log)
        exp = json.loads(urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=cxr_pipeline", timeout=10).read())
        exp_id = exp["experiment"]["experiment_id"]
        req = urllib.request.Request(
            f"{api}/runs/search",
            data=json.dumps({"experiment_ids": [exp_id], "filter": "tags.pathology != ''"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        ids = [r["info"]["run_id"] for r in runs]
        assert len(ids) == 2, [r["data"].get("tags") for r in runs]
        base = f"http://127.0.0.1:{port}"
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        # the link the pipeline prints opens the model-training view (MLflow 3 starts on GenAI otherwise)
        link = run_url(f"http://127.0.0.1:{port}", exp_id, ids[0])
        text = visit(page, link, "mlflow-run", "Overview", "test_roc_auc")
        assert "Model registry" in text and "Judges" not in text  # model-training navigation, not GenAI's
        text = visit(
            page, f"{base}/#/experiments/{exp_id}?{MODEL_TRAINING_VIEW}", "mlflow-runs-table", "Runs", "classifier[support_devices]"
        )
        assert "classifier[pleural_effusion]" in text
        # the Dataset column: what each classifier run read (name and digest of its rows, per split)
        assert "mimic-cxr-32px" in text
        url = f"{base}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp_id])}"
        text = visit(page, url, "mlflow-compare-runs", "Comparing 2 Runs", "test_roc_auc")
        page.close()
    finally:
        stop(proc)


def test_the_documentation_site_shows_the_configuration_reference(browser, tmp_path):
    """The built site in a browser: the configuration page links to the generated reference, which shows a field."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "-d", str(site)], cwd=ROOT, env=env, check=True, capture_output=True)
    page = browser.new_page()
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        text = visit(page, (site / "configuration.html").as_uri(), "docs-configuration", "pipeline.yaml")
        assert "pipeline.yaml reference" in text
        page.get_by_role("link", name="pipeline.yaml reference").first.click()
        page.get_by_text("memory_budget").first.wait_for(timeout=10_000)
        assert "oof_folds" in page.inner_text("body") and "CXR_GPUS" not in page.inner_text("body")
    finally:
        page.close()
