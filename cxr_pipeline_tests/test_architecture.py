"""The house's rules, as the architecture issue (#32) set them: floors and no import cycle (the import-linter
contract in pyproject.toml, imports inside functions counted), no private name taken from another module,
modules a reader can hold (500 lines at most), Dagster glue that stays thin (no function in defs/ over 40
lines, counted from its ``def`` line to its last line, decorators not counted); and no benchmark that imports
the test tree (#46: what a benchmark and a test share lives in the package, e.g. ``local_ray``); one owner for a
trained model (#46: no checkpoint file name or alias value outside ``vision.checkpoint``) and asset modules that
never import each other (every defs module is an asset module in that import-linter contract, or plumbing)."""

from __future__ import annotations

import ast
import re
import subprocess

from cxr_pipeline_tests.services import BIN, ROOT

PACKAGE = ROOT / "cxr_pipeline"


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_contract_holds():
    out = subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "5 kept, 0 broken" in out.stdout


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


# the values only vision.checkpoint may spell: as a string of their own, or as a path or URI component inside one
# (".../checkpoint/config.json", "models:/cxr-edema@champion", an f-string's pieces). Prose that names them
# ("registry alias to load (champion, candidate, ...)") is user-facing text, not a use. Hugging Face's config.json
# of the report model's base is another file with the same name.
OWNED = ("config.json", "model.safetensors", "champion", "candidate")
OWNED_IN = re.compile(r"(?:^|[/@\\])(" + "|".join(re.escape(o) for o in OWNED) + r")(?:$|[/\\])")
ELSEWHERE = {"cxr_pipeline/reports/tiny_base.py": {"config.json"}}


def owned_literals(source: str) -> list[tuple[int, str]]:
    found = []
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            found += [(n.lineno, m.group(1)) for m in OWNED_IN.finditer(n.value)] if n.value not in OWNED else [(n.lineno, n.value)]
    return sorted(found)


def test_checkpoint_file_names_and_alias_values_live_in_vision_checkpoint():
    files = [*_modules(), *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "docs").rglob("*.py")]
    found = []
    for f in files:
        rel = str(f.relative_to(ROOT))
        if rel == "cxr_pipeline/vision/checkpoint.py":
            continue
        found += [f"{rel}:{line} {v!r}" for line, v in owned_literals(f.read_text()) if v not in ELSEWHERE.get(rel, set())]
    assert not found, found
    probe = 'x = "champion"\ny = f"{d}/checkpoint/config.json"\nz = "models:/cxr-edema@candidate"\nw = "alias (champion, ...)"'
    assert owned_literals(probe) == [(1, "champion"), (2, "config.json"), (3, "candidate")]


ASSET_MAKERS = (
    "asset",
    "multi_asset",
    "observable_source_asset",
    "asset_check",
    "multi_asset_check",
    "graph_asset",
    "graph_multi_asset",
    "AssetSpec",
)  # AssetSpec: an external asset (pacs_results)


def _defines_assets(tree: ast.Module) -> bool:
    """Whether a module makes an asset or a check at its top level: a decorator of a module-level function, or a
    module-level call, of Dagster's makers or of a maker of the project's own (``classifiers_asset``,
    ``reports_asset``: ``asset_factory``'s). A maker called inside a function (``specs.asset_factory``) makes none."""
    targets = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            targets += [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        else:
            targets += [n.func for n in ast.walk(node) if isinstance(n, ast.Call)]
    names = [t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "") for t in targets]
    return any(name in ASSET_MAKERS or name.endswith("_asset") for name in names)


def test_every_asset_module_is_in_the_independence_contract_and_plumbing_defines_no_asset():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = set(next(c for c in contracts if c["id"] == "assets-independent")["modules"])
    asset_modules = {
        ".".join(f.relative_to(ROOT).with_suffix("").parts)
        for f in (PACKAGE / "defs").rglob("*.py")
        if _defines_assets(ast.parse(f.read_text()))
    }
    assert asset_modules == independent, f"asset modules {sorted(asset_modules - independent)} not in the contract"
    assert _defines_assets(ast.parse("@dg.asset(name='x')\ndef x(): pass")) and not _defines_assets(ast.parse("def y(): pass"))
    assert _defines_assets(ast.parse("x = dg.asset(name='x')(f)")) and _defines_assets(
        ast.parse("@dg.multi_asset_check(specs=[])\ndef c(): pass")
    )


# Libraries slow to import (each 150 ms to 12 s on the 2-core machine, -X importtime, 2026-12-06) or that pull one
# in (transformers, trl, peft, bitsandbytes, safetensors.torch and torchvision pull torch): a function may import
# a module of the package lazily only when that module brings one of these that the importing module does not
# already load at its head. Everything else is imported at the head, so a module's neighbours show at its top.
HEAVY = {
    *("torch", "torchvision", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "safetensors", "captum"),
    *("mlflow", "dagster", "sklearn", "scipy", "matplotlib", "pandas", "spacy", "medspacy", "nltk"),
    *("pydicom", "pylibjpeg", "highdicom", "kubernetes", "ray"),
}


def _imports(path, module: str, modules: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
    """(what the module imports at its head, [(line, module) imported inside a function]); names resolved to the
    package's modules where they are one (``from cxr_pipeline.x import y``: ``cxr_pipeline.x.y`` if a module)."""
    head, inside = set(), []

    def names(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom) and not getattr(child, "level", 0):
                if in_function:
                    inside.extend((child.lineno, n) for n in names(child))
                else:
                    head.update(names(child))
            elif isinstance(child, ast.If) and not in_function and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            else:
                visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text()), False)
    return head, inside


def needless_lazy_imports(root) -> list[str]:
    """Function-level imports of the package's own modules that bring no heavy library the importing module lacks."""
    files = {
        ".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f for f in (root / "cxr_pipeline").rglob("*.py")
    }
    parsed = {m: _imports(f, m, set(files)) for m, f in files.items()}
    memo: dict[str, set[str]] = {}

    def heavy(module: str, seen: frozenset = frozenset()) -> set[str]:
        if module not in memo:
            out = set()
            for name in parsed[module][0]:
                out |= {name.split(".")[0]} & HEAVY
                parts = name.split(".")
                for i in range(2, len(parts) + 1):  # importing a.b.c imports the packages a.b and a.b.c
                    if (p := ".".join(parts[:i])) in parsed and p not in seen:
                        out |= heavy(p, seen | {module})
            memo[module] = out
        return memo[module]

    found = []
    for m, (_head, inside) in parsed.items():
        for line, name in inside:
            if name.startswith("cxr_pipeline") and name in parsed and not heavy(name) - heavy(m):
                found.append(f"{files[m].relative_to(root)}:{line} {name}")
    return sorted(found)


def test_a_module_imports_the_package_lazily_only_to_put_off_a_heavy_library(tmp_path):
    assert not needless_lazy_imports(ROOT), "move these to the module's head (docs/layout.md)"
    pkg = tmp_path / "cxr_pipeline"
    pkg.mkdir()
    (pkg / "light.py").write_text("import json\n")
    (pkg / "slow.py").write_text("import torch\n")
    (pkg / "user.py").write_text("def f():\n    from cxr_pipeline import light\n\n\ndef g():\n    from cxr_pipeline import slow\n")
    assert needless_lazy_imports(tmp_path) == ["cxr_pipeline/user.py:2 cxr_pipeline.light"]
