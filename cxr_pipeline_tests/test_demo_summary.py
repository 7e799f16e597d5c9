"""The demo's report line says what the adapter did, from its own run: the steps and seconds it trained (its card),
its base's build (the tiny base's marker), and whether it reached the template (report_differences' paired
interval). The figures are read, never typed: a run below the template must say so."""

from __future__ import annotations

import json

import polars as pl
import pytest

from cxr_pipeline.demo import adapter_note
from cxr_pipeline.reports.tiny_base import TINY_MARKER
from cxr_pipeline.settings import paths


def _run(tmp, difference: float, lo: float, hi: float) -> None:
    p = paths()
    base = tmp / "base"
    base.mkdir()
    (base / TINY_MARKER).write_text(json.dumps({"build_seconds": 4.2}))
    p.adapter.mkdir(parents=True, exist_ok=True)
    (p.adapter / "cxr_adapter.json").write_text(json.dumps({"base": str(base), "steps": 900, "train_seconds": 97.5}))
    rows = [
        {"a": "adapter", "b": "template", "metric": "ce_micro14_f1", "difference": difference, "lo": lo, "hi": hi, "better": None},
        {"a": "adapter", "b": "template", "metric": "ROUGE_L", "difference": 0.5, "lo": 0.4, "hi": 0.6, "better": "adapter"},
    ]
    pl.DataFrame(rows).write_parquet(p.report_differences)


@pytest.mark.parametrize(
    ("difference", "lo", "hi", "verdict"),
    [(0.01, -0.015, 0.04, "at least the template's"), (0.0, -0.05, 0.05, "not shown to reach"), (-0.1, -0.2, -0.03, "not shown")],
)
def test_the_demo_says_how_long_the_adapter_trained_and_whether_it_reached_the_template(cxr_home, tmp_path, difference, lo, hi, verdict):
    _run(tmp_path, difference, lo, hi)
    note = adapter_note(paths(), "demo")
    assert "benchmarks/recipes/demo.yaml, 900 steps in 97.5 s of training, its base built in 4.2 s (once per training split)" in note
    assert "(within the 120 s budget for both;" in note
    assert f"adapter - template CE micro-F1 {difference:+.3f} [{lo:+.3f}, {hi:+.3f}]: {verdict}" in note


def test_a_demo_over_its_budget_says_so(cxr_home, tmp_path):
    _run(tmp_path, 0.0, -0.01, 0.01)
    card = paths().adapter / "cxr_adapter.json"
    card.write_text(json.dumps({**json.loads(card.read_text()), "train_seconds": 116.0}))  # + 4.2 s of base: 120.2 s
    assert "(OVER the 120 s budget for both;" in adapter_note(paths(), "demo")


def test_a_demo_without_a_report_run_says_no_figures(cxr_home):
    note = adapter_note(paths(), "learning")
    assert note.startswith("benchmarks/recipes/learning.yaml, ? steps") and "adapter - template" not in note
