"""The package layout's rules: a torch-free schema, a service that needs no training code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def test_the_model_json_schema_imports_no_torch() -> None:
    loaded = _modules_after("import wastenet.schema, wastenet.classes")
    assert "wastenet.schema" in loaded
    assert "torch" not in loaded and "torchvision" not in loaded


def test_settings_help_imports_no_torch() -> None:
    code = (
        "import contextlib, io, runpy\n"
        "sys.argv = ['app', '--help-settings']\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    runpy.run_module('app', run_name='__main__')"
    )
    loaded = _modules_after(code)
    assert "app.settings" in loaded
    assert "torch" not in loaded


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_service_imports_the_shared_core_and_never_training() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] == "training"
        )
        for path in (ROOT / "app").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    service_imports = set().union(*(_imported_modules(p) for p in (ROOT / "app").rglob("*.py")))
    assert {"wastenet.schema", "wastenet.artifacts", "wastenet.preprocess"} <= service_imports


def test_the_shared_core_imports_neither_side() -> None:
    for path in (ROOT / "wastenet").rglob("*.py"):
        sides = {m.split(".")[0] for m in _imported_modules(path)} & {"app", "training"}
        assert not sides, f"{path.relative_to(ROOT)} imports {sides}"


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for package in ("app", "training", "wastenet"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert long == []
