"""Every benchmark script imports: they share helpers, and a renamed helper must not leave
a script that fails only when someone runs it (the benchmarks are not run by the suite)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

# Modules from an optional extra that the test command does not install (the `bench` extra).
OPTIONAL = {"litserve": "bench"}
SCRIPTS = sorted(p.stem for p in (Path(__file__).parents[2] / "benchmarks").glob("*.py"))


def test_the_benchmarks_are_found() -> None:
    assert {"serve_load", "explain_load", "overload", "bench_model"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_script_imports(name: str) -> None:
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL:
            raise
        pytest.skip(f"benchmarks/{name}.py needs the {OPTIONAL[exc.name]} extra ({exc.name})")
    assert module.__doc__, f"benchmarks/{name}.py says what it measures in its docstring"
