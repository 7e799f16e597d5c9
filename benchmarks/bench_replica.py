"""Replica generation with the phantom's line masks drawn on the block a segment can touch against the whole-grid
drawing they replaced (``reference_segment`` / ``reference_polyline`` below; ``test_phantom.py`` compares bytes
with them on every run of the suite), on the same configuration, one run each in this process; the two replicas
must be byte-identical (checked here, file by file).

    python benchmarks/bench_replica.py [--patients 60] [--source-rows 256]

By default the demo's replica (``demo.DEMO_REPLICA``, 256-row radiographs), in one process.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from cxr_pipeline.data import phantom
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.demo import DEMO_REPLICA, DEMO_SOURCE_ROWS


def reference_segment(x, y, x0, y0, x1, y1, width):
    """Soft line segment mask of the given half-width, on every pixel of the grid."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
    d = np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))
    return np.clip(1.0 - d / width, 0.0, 1.0)


def reference_polyline(x, y, pts, width):
    m = np.zeros_like(x)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        np.maximum(m, reference_segment(x, y, x0, y0, x1, y1, width), out=m)
    return m


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def timed(cfg: SynthConfig, out: Path) -> tuple[float, dict[str, int]]:
    t = time.perf_counter()
    counts = generate(cfg, out)
    return time.perf_counter() - t, counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--source-rows", type=int, default=DEMO_SOURCE_ROWS)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"bench_replica: {date.today()}, commit {commit}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    cfg = SynthConfig(patients=args.patients, source_rows=args.source_rows, workers=1, **DEMO_REPLICA)
    with tempfile.TemporaryDirectory() as tmp:
        block_s, counts = timed(cfg, Path(tmp) / "block")
        fast = (phantom._segment, phantom._polyline)
        phantom._segment, phantom._polyline = reference_segment, reference_polyline
        try:
            whole_s, _ = timed(cfg, Path(tmp) / "whole")
        finally:
            phantom._segment, phantom._polyline = fast
        same = tree(Path(tmp) / "block") == tree(Path(tmp) / "whole")
    print(f"{counts['patients']} patients, {counts['images']} images, {counts['image_bytes'] / 1e6:.0f} MB, one process")
    print(f"whole grid {whole_s:.1f} s, block {block_s:.1f} s: {whole_s / block_s:.2f}x; byte-identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
