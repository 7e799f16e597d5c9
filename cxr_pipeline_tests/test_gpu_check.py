"""``benchmarks/gpu_check.py --device cpu --small`` runs every GPU code path's CPU twin, so the check cannot rot."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

from cxr_pipeline_tests.services import ROOT


def test_gpu_check_runs_every_path_small_on_the_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "CXR_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    for arch in ("resnet18", "densenet121"):
        for mode in ("resident", "streamed"):
            assert _rate(lines, f"train {arch} {mode}: ", "img/s") > 0, (arch, mode, lines)
    assert _rate(lines, "qlora step: ", "s for 4 pairs") > 0 and _rate(lines, "generate: ", "new tokens/s") > 0
    assert _rate(lines, "pyfunc predict: ", "img/s") > 0
    assert any(line.startswith("peak memory: ") for line in lines), lines


def _rate(lines: list[str], prefix: str, unit: str) -> float:
    """The number before ``unit`` on the line starting with ``prefix``: a finite figure, not 'nan'."""
    line = next((x for x in lines if x.startswith(prefix)), None)
    assert line is not None, (prefix, lines)
    m = re.search(r"([0-9][0-9,]*\.?[0-9]*|nan|inf) " + re.escape(unit), line)
    assert m, line
    value = float(m.group(1).replace(",", ""))
    assert math.isfinite(value), line
    return value


def test_the_check_refuses_a_figure_that_is_not_a_measurement():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.measured("train", 12.5) == 12.5
    for bad in (float("nan"), 0.0, float("inf")):
        with pytest.raises(SystemExit, match="train resnet18 resident measured"):
            mod.measured("train resnet18 resident", bad)
