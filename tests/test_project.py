"""The README's commands are the ones CI and users run."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    commands = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    test_command, image_test_command = readme_commands()[1:3]
    # The suite first, then the image test, and nothing else.
    assert commands == [test_command, image_test_command]
    assert "pytest" in test_command
    assert image_test_command.startswith(".venv/bin/pytest -m docker ")


def test_readme_opens_with_the_service_then_the_tests() -> None:
    serve, test = readme_commands()[:2]
    for command in (serve, test):
        assert command.startswith("python3.11 -m venv .venv && .venv/bin/pip install -e ")
    assert serve.endswith(".venv/bin/python -m app")


def test_pins_and_lean_serving_install() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.14.1" in project["dependencies"]
    assert "torchvision==0.29.1" in project["dependencies"]
    core = " ".join(project["dependencies"])
    for training_only in ("scikit-learn", "matplotlib", "tqdm"):
        assert training_only not in core
        assert any(training_only in d for d in project["optional-dependencies"]["train"])
    # Serving runs exported files with ONNX Runtime; only exporting needs onnx/onnxscript.
    names = {re.split(r"[<>=!~\[; ]", d)[0] for d in project["dependencies"]}
    train = {re.split(r"[<>=!~\[; ]", d)[0] for d in project["optional-dependencies"]["train"]}
    assert "onnxruntime" in names and not {"onnx", "onnxscript"} & names
    assert {"onnx", "onnxscript"} <= train
