"""Every command in the README, run on a clean state, as written, except the ones ``NOT_RUN`` names with why.

The README's code blocks are parsed, not copied here, so a command added to the README without a way to run
it fails this test. ``make demo`` runs on a smaller replica (``DEMO_ARGS``: the same command and code path as
the README's, 40 patients, one epoch, the 80-step ``short`` adapter recipe instead of the chosen one's 100 s of base
building) so the suite stays within its time budget; the demo's own output is
checked here too: a console that shows progress, not logs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cxr_pipeline_tests.services import ROOT

README = ROOT / "README.md"
# command (as it starts in the README) -> why this test does not run it
NOT_RUN = {
    "make test": "the test suite itself (CI runs it: .ci/run)",
    "make ui": "a long-running server (the browser, daemon and services tests start dagster dev / the webserver)",
    "make serve": "a long-running server (test_serving.py serves a registered model with mlflow models serve)",
    "make mlflow-ui": "a long-running server (the browser test starts mlflow server)",
    "make docs-serve": "a long-running server (test_docs.py builds the same site)",
    "export CXR_RAW_DIR=": "real MIMIC-CXR (credentialed; not on this machine)",
    "export CXR_MIMIC_IV_DIR=": "real MIMIC-IV (credentialed; not on this machine)",
    "export CXR_VLM_BASE=": "a real Llama-3.2-11B-Vision base (no weights can be downloaded here)",
}
DEMO_ARGS = "--patients 40 --source-rows 48 --epochs 1 --adapter-recipe short"  # enough validation patients for a champion (val AUC needs both classes)


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[str]:
    """Every shell command of the README's bash blocks, comments stripped."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            cmd = re.sub(r"\s+#.*$", "", line).strip()
            if cmd:
                out.append(cmd)
    return out


@pytest.mark.slow(minutes=4)
def test_every_readme_command_runs_on_a_clean_state(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CXR_RAW_DIR", "DAGSTER_HOME")}
    env.update(CXR_HOME=str(home), HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true")
    work = tmp_path / "work"  # where a user's own files are: study.dcm, cams/
    work.mkdir()
    ran, skipped = [], []
    for cmd in commands():
        reason = next((why for start, why in NOT_RUN.items() if cmd.startswith(start)), None)
        if reason:
            skipped.append(cmd)
            continue
        if cmd == "make demo":
            out = _run(["make", "-C", str(ROOT), "demo", f"DEMO_ARGS={DEMO_ARGS}"], env, work)
            _check_demo_console(out, home)
            dicom = next((home / "raw" / "files").rglob("*.dcm"))
            shutil.copy(dicom, work / "study.dcm")  # the radiograph the README's predict commands name
        elif cmd.startswith(".venv/bin/"):
            out = _run([str(ROOT / cmd.split()[0]), *cmd.split()[1:]], env, work)
            assert "cxr-cardiomegaly" in out.stdout  # the champion's table for the radiograph
        elif cmd.startswith("make "):
            _run(["make", "-C", str(ROOT), *cmd.split()[1:]], env, work)
        else:
            raise AssertionError(f"README command {cmd!r}: neither run by this test nor listed in NOT_RUN with a reason")
        ran.append(cmd)
    assert "make demo" in ran and any(c.startswith(".venv/bin/cxr-pipeline predict") for c in ran)
    assert {"make lint", "make docs"} <= set(ran)
    _run_python_blocks(env, work)


def _run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=1800)
    # decoded here, not with text=True: its universal newlines would turn each "\r" of a progress bar's redraw into a line
    out.stdout, out.stderr = out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _check_demo_console(out: subprocess.CompletedProcess, home: Path) -> None:
    """What the demo shows: progress and the summary, not logs; every library line in the log file."""
    text = out.stdout + out.stderr
    assert "manifest:" in out.stdout and "make ui" in out.stdout and "threshold chosen on validation" in out.stdout
    # one row per finding: both models and both test label sources side by side
    for column in ("per-finding auto", "per-finding rad", "multi-label auto", "multi-label rad"):
        assert column in out.stdout
    assert out.stdout.count("│ Cardiomegaly ") == 1 and "┆ labeler" in out.stdout and "┆ radiologist" in out.stdout
    # calibration beside the AUCs: ECE and Brier before -> after, for the per-finding models
    assert "┆ ece auto" in out.stdout and "┆ brier auto" in out.stdout and " -> " in out.stdout
    # the report line says what the adapter did, read from its run (card, base marker, paired interval), not typed
    assert "report adapter: benchmarks/recipes/short.yaml, " in out.stdout and "? steps" not in out.stdout
    assert "s of training, its base built in " in out.stdout and "adapter - template CE micro-F1 " in out.stdout
    assert "subgroups (MIMIC-IV demographics" in out.stdout and "planted in the replica: Cardiomegaly" in out.stdout
    # the external validation: the champions on replicas of the three external formats, said to be replicas
    assert "external validation (the project's REPLICAS" in out.stdout and "median change" in out.stdout
    assert "  chexpert: " in out.stdout and "  nih: " in out.stdout and "  padchest: " in out.stdout
    # where the models look: a line per model kind, against the mean training box
    assert "localization (Grad-CAM against the replica's planted boxes" in out.stdout
    assert "  per_pathology: median pointing " in out.stdout and "  multilabel: median pointing " in out.stdout
    (log,) = (home / "logs").glob("demo-*.log")
    assert str(log) in out.stderr and "classifiers" in out.stderr and "report branch" in out.stderr
    assert "dagster - INFO" not in text and "Warning" not in text and "Validating input example" not in text
    assert "dagster - INFO" in log.read_text()
    # the log and the terminal end with where the time went: a row per stage, then the total
    table = log.read_text().split("where the time went:\n")[-1]
    stages = [line.split()[0] for line in table.strip().splitlines()[1:]]
    assert "where the time went:" in out.stdout and stages[-1] == "total" and {"classifiers", "report"} <= set(stages)
    # lines as a terminal shows them: a bar redraws in place with "\r", its last drawing stays; make's own lines left out
    shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n") if not line.startswith("make")]
    assert len(shown) <= 100, "\n".join(shown)
    bars = [line for line in shown if "|" in line and "step" in line]
    assert len(bars) >= 4 and all("100%" in b for b in bars), bars  # each bar stage's last drawing: complete, with its time


def _run_python_blocks(env: dict, work: Path) -> None:
    """The README's Python, in the user's working directory, against the demo's MLflow store; ``images`` is the
    user's own data (here: black images at the registered model's size)."""
    code = "\n".join(blocks("python"))
    script = work / "readme_snippet.py"
    size = 64  # the demo's shard size
    script.write_text(f"import numpy as np\nimages = np.zeros((2, {size}, {size}), np.uint8)\n" + code + "\nprint('ok')\n")
    mlflow_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{Path(env['CXR_HOME']) / 'mlflow.db'}"}
    out = _run([str(ROOT / ".venv" / "bin" / "python"), str(script)], mlflow_env, work)
    assert out.stdout.strip().endswith("ok")
