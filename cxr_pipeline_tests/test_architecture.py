"""The house's rules, as the architecture issue (#32) set them: floors and no import cycle (the import-linter
contract in pyproject.toml, imports inside functions counted), no private name taken from another module,
modules a reader can hold (500 lines at most), Dagster glue that stays thin (no function in defs/ over 40
lines, counted from its ``def`` line to its last line, decorators not counted); and no benchmark that imports
the test tree (#46: what a benchmark and a test share lives in the package, e.g. ``local_ray``)."""

from __future__ import annotations

import ast
import subprocess

from cxr_pipeline_tests.services import BIN, ROOT

PACKAGE = ROOT / "cxr_pipeline"


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_contract_holds():
    out = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_no_module_imports_another_modules_private_name():
    found = []
    for f in [*_modules(), *(ROOT / "cxr_pipeline_tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cxr_pipeline"):
                found += [
                    f"{f.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.endswith("__")
                ]
    assert not found, found


def _imports_test_tree(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "cxr_pipeline_tests" or n.startswith("cxr_pipeline_tests.") for n in names):
            return True
    return False


def test_no_benchmark_imports_the_test_tree():
    assert _imports_test_tree("from cxr_pipeline_tests.services import ROOT")  # the check can fail
    assert _imports_test_tree("def f():\n    import cxr_pipeline_tests.services")
    assert not _imports_test_tree("from cxr_pipeline.local_ray import two_node_cluster")
    found = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "benchmarks").rglob("*.py")) if _imports_test_tree(f.read_text())]
    assert not found, found


def test_no_module_over_500_lines():
    long = {str(f.relative_to(ROOT)): n for f in _modules() if (n := len(f.read_text().splitlines())) > 500}
    assert not long, long


def test_no_function_in_defs_over_40_lines():
    long = []
    for f in (PACKAGE / "defs").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 40:
                long.append(f"{f.name}:{node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
