"""Re-take the README's and the manual's UI screenshots from a real state (e.g. after ``make demo``).

    .venv/bin/python docs/ui/capture.py [CXR_HOME]      # default: .cxr

Starts ``dagster-webserver`` and ``mlflow server`` (one worker) on free local ports against
that state, drives Debian's Chromium with Playwright (nothing downloads a browser) and
writes ``docs/ui/*.png``: the asset graph with every group expanded (assets and arrows visible), a
classifier partition's Grad-CAM sheet, and the MLflow runs table. The browser test (``cxr_pipeline_tests/test_ui_browser.py``) visits
the same pages on a small state and asserts what they show; this script only photographs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cxr_pipeline_tests.services import BIN, free_port, mlflow_server, start, stop, wait_http  # noqa: E402

OUT = ROOT / "docs" / "ui"


def asset_graph(page, port: int) -> None:
    """Global asset lineage with every group expanded (Dagster's Alt+E), navigation hidden, zoomed to fit the
    1600 x 1300 viewport (three clicks on the zoom-out control, bottom right), cropped to the graph."""
    page.goto(f"http://127.0.0.1:{port}/asset-groups")
    page.get_by_text("Hide navigation").first.click(timeout=60_000)
    page.locator("button").nth(5).click()  # the asset tree's toggle beside the search box
    page.wait_for_timeout(1000)
    page.keyboard.press("Alt+e")  # expand all groups
    page.wait_for_timeout(3000)
    for _ in range(3):
        page.mouse.click(1572, 1151)  # zoom out
        page.wait_for_timeout(700)
    page.mouse.move(10, 500)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(OUT / "dagster-asset-graph.png"), clip={"x": 330, "y": 180, "width": 1020, "height": 940})
    page.close()


def main() -> int:
    from playwright.sync_api import sync_playwright

    home = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".cxr").resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("capture: no Chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    env = {**os.environ, "CXR_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    dport, mport = free_port(), free_port()
    web = start(
        [str(BIN / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(dport)],
        env,
        home / "capture-web.log",
    )
    ml = mlflow_server(mport, f"sqlite:///{home / 'mlflow.db'}", home / "mlartifacts", env, home / "capture-mlflow.log")
    try:
        wait_http(f"http://127.0.0.1:{dport}/server_info", 180, web, home / "capture-web.log")
        wait_http(f"http://127.0.0.1:{mport}/health", 180, ml, home / "capture-mlflow.log")
        api = f"http://127.0.0.1:{mport}/api/2.0/mlflow"
        exp = json.loads(urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=cxr_pipeline", timeout=10).read())
        exp_id = exp["experiment"]["experiment_id"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
            asset_graph(browser.new_page(viewport={"width": 1600, "height": 1300}), dport)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{dport}/assets/classifier?view=partitions&partition=cardiomegaly")
            page.get_by_text("[Show Markdown]").first.click(timeout=60_000)
            page.locator('img[src^="data:image/png;base64,"]').first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(OUT / "dagster-classifier-saliency.png"))
            page.goto(f"http://127.0.0.1:{mport}/#/experiments/{exp_id}?workflowType=machine_learning")
            page.get_by_text("classifier[cardiomegaly]").first.wait_for(timeout=60_000)
            assistant = page.get_by_text("MLflow Assistant")
            if assistant.count():  # the chat side panel covers the table's right half: close it
                panel_close = page.locator("button[aria-label*='lose']").last
                if panel_close.count():
                    panel_close.click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT / "mlflow-runs-datasets.png"))
            browser.close()
    finally:
        stop(web)
        stop(ml)
    print(f"capture: {OUT / 'dagster-asset-graph.png'}, {OUT / 'dagster-classifier-saliency.png'}, {OUT / 'mlflow-runs-datasets.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
