"""``benchmarks/gpu_check.py --device cpu --small`` runs every GPU code path's CPU twin, so the check cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys

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
            assert any(line.startswith(f"train {arch} {mode}: ") and "img/s" in line for line in lines), (arch, mode, lines)
    for prefix in ("qlora step: ", "generate: ", "pyfunc predict: ", "peak memory: "):
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)
