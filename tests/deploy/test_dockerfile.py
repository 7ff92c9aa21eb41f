"""Static checks of the Dockerfile: stages, one source of requirements, image contents."""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from app.settings import Settings
from tests.deploy.serving import app_routes
from tests.deploy.specs import (
    REPO,
    DockerIgnore,
    Instruction,
    copy_sources,
    healthcheck_command,
    load_dockerfile,
    run_script,
)

DOCKERFILE = load_dockerfile()
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
CORE = PROJECT["dependencies"]
TRAIN_EXTRA = PROJECT["optional-dependencies"]["train"]
SERVE = DOCKERFILE.image("serve")
TRAIN = DOCKERFILE.image("train")
# Import names of the packages only the `train` extra installs.
TRAIN_ONLY_IMPORTS = {"sklearn", "matplotlib", "tqdm"}


def runs(stage_names: list[str]) -> list[tuple[str, Instruction]]:
    return [
        (s.name or str(s.index), ins)
        for s in DOCKERFILE.stages
        if s.name in stage_names
        for ins in s.of("RUN")
    ]


def shell_commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script (split on ; && || | and case/esac syntax)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|()"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(script: str) -> list[list[str]]:
    """Arguments of every ``pip install`` (or ``python -m pip install``) in a RUN script."""
    found = []
    for words in shell_commands(script):
        if words[:2] == ["pip", "install"]:
            found.append(words[2:])
        elif words[:4] == ["python", "-m", "pip", "install"]:
            found.append(words[4:])
    return found


def python_snippets(script: str) -> list[str]:
    return [w[2] for w in shell_commands(script) if w[:2] == ["python", "-c"]]


def test_targets_are_serve_by_default_and_train_on_request() -> None:
    assert DOCKERFILE.stages[-1].name == "serve", "the default target must be the service"
    assert [s.name for s in SERVE.chain] == ["base", "deps", "serve"]
    assert [s.name for s in TRAIN.chain] == ["base", "deps", "train-deps", "train"]
    # The service is not built on top of the training environment.
    assert "train-deps" not in [s.name for s in SERVE.chain]


def test_base_image_python_satisfies_requires_python() -> None:
    image = DOCKERFILE.global_args["PYTHON_IMAGE"]
    m = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", image)
    assert m, f"expected an official python slim image, got {image!r}"
    assert Version(m.group(1)) in SpecifierSet(PROJECT["requires-python"])


def test_requirements_are_generated_from_pyproject(tmp_path: Path) -> None:
    (install_run,) = [ins for _, ins in runs(["deps"]) if pip_installs(run_script(ins))]
    snippets = python_snippets(run_script(install_run))
    assert len(snippets) == 1, "one python snippet extracts the requirements"
    (tmp_path / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    subprocess.run([sys.executable, "-c", snippets[0]], cwd=tmp_path, check=True)

    def lines(name: str) -> list[str]:
        return (tmp_path / name).read_text().splitlines()

    assert lines("requirements.txt") == CORE
    assert lines("requirements-train.txt") == CORE + TRAIN_EXTRA
    # Each line is a valid requirement that pip will read (no stray TOML syntax).
    assert [str(Requirement(r)) for r in lines("requirements-train.txt")]


def test_each_stage_installs_its_requirement_set_and_nothing_hand_written() -> None:
    installs = {
        name: [args for args in pip_installs(run_script(ins))]
        for name, ins in runs(["deps", "train-deps", "train", "serve"])
    }
    assert installs["deps"] == [["-r", "requirements.txt"]]
    assert installs["train-deps"] == [["-r", "requirements-train.txt"]]
    # The project itself goes in without dependencies: they are already there.
    assert installs["train"] == [["--no-deps", "."]]
    assert installs["serve"] == [["--no-deps", "."]]
    # No pinned or named requirement anywhere in the Dockerfile: pyproject.toml is the list.
    text = "\n".join(i.text for s in DOCKERFILE.stages for i in s.instructions)
    for req in CORE + TRAIN_EXTRA:
        name = Requirement(req).name
        assert not re.search(rf"(?<![\w-]){re.escape(name)}\s*(==|>=|<=|~=|!=|\[)", text), name
    assert not any(
        "requirements" in s
        for i in (DOCKERFILE.stages)
        for c in i.of("COPY")
        for s in copy_sources(c)[0]
    ), "requirements files are generated, not copied"


def test_dependency_layer_comes_before_any_source() -> None:
    deps = DOCKERFILE.stage("deps")
    copies = [copy_sources(c)[0] for c in deps.of("COPY")]
    assert copies == [["pyproject.toml"]], "only pyproject.toml may feed the dependency layer"
    for target in ("serve", "train"):
        stage = DOCKERFILE.stage(target)
        kinds = [i.keyword for i in stage.instructions]
        first_copy = kinds.index("COPY")
        install = next(k for k, i in enumerate(stage.instructions) if i.keyword == "RUN")
        assert first_copy < install, f"{target}: the sources are copied, then installed"


def test_cpu_variant_switches_the_torch_index_for_the_same_pins(tmp_path: Path) -> None:
    deps = DOCKERFILE.stage("deps")
    args = {i.body.partition("=")[0]: i.body.partition("=")[2] for i in deps.of("ARG")}
    assert args["TORCH_VARIANT"] == "cuda"
    assert args["TORCH_CPU_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    script = run_script(next(i for _, i in runs(["deps"]) if "TORCH_VARIANT" in i.body))
    case = script[script.index("case ") : script.index("esac") + len("esac")]
    venv = tmp_path / "venv"
    venv.mkdir()

    def run_case(variant: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ["PATH"],
            "TORCH_VARIANT": variant,
            "TORCH_CPU_INDEX_URL": args["TORCH_CPU_INDEX_URL"],
            "VIRTUAL_ENV": str(venv),
        }
        return subprocess.run(
            ["/bin/sh", "-c", "set -eu; " + case], env=env, capture_output=True, text=True
        )

    assert run_case("cuda").returncode == 0
    assert not (venv / "pip.conf").exists(), "the CUDA variant uses pip's defaults"
    assert run_case("cpu").returncode == 0
    conf = configparser.ConfigParser()
    conf.read(venv / "pip.conf")
    assert conf["global"]["extra-index-url"] == "https://download.pytorch.org/whl/cpu"
    bad = run_case("rocm")
    assert bad.returncode == 2 and "TORCH_VARIANT must be cuda or cpu, not 'rocm'" in bad.stderr
    # pip takes the CPU build because a local version satisfies the public pin and sorts
    # above it: true for every torch-family pin in pyproject.toml.
    for req in map(Requirement, CORE):
        if req.name in ("torch", "torchvision"):
            (spec,) = req.specifier
            assert spec.operator == "==", f"{req}: pin an exact public version"
            cpu = Version(f"{spec.version}+cpu")
            assert req.specifier.contains(cpu) and cpu > Version(spec.version)


# -- what the serving image contains ----------------------------------------------------------
def copied_files(stage_name: str) -> dict[str, str]:
    """{path inside WORKDIR: path in the repository} for the COPY lines of a stage."""
    ignore = DockerIgnore.load()
    files: dict[str, str] = {}
    for ins in DOCKERFILE.stage(stage_name).of("COPY"):
        assert "from" not in ins.flags, "sources come from the build context"
        sources, dest = copy_sources(ins)
        for source in sources:
            src = REPO / source
            assert src.exists(), f"line {ins.line}: COPY source {source} does not exist"
            context = ignore.context_files(REPO, source)
            assert context, f"line {ins.line}: .dockerignore leaves out {source}"
            for rel in context:
                inner = Path(rel).relative_to(source).as_posix() if src.is_dir() else Path(rel).name
                target = (dest + inner) if dest.endswith("/") else dest
                files[target.removeprefix("./")] = rel
    return files


def module_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def module_file(name: str) -> str | None:
    """Repository path of a first-party module or package, None for anything else."""
    parts = name.split(".")
    for candidate in (Path(*parts).with_suffix(".py"), Path(*parts) / "__init__.py"):
        if (REPO / candidate).is_file():
            return candidate.as_posix()
    return None


def test_every_copy_source_exists_and_reaches_the_context() -> None:
    for stage in ("deps", "serve", "train"):
        assert copied_files(stage)


def test_serving_image_holds_the_app_and_the_shared_core_it_imports() -> None:
    files = copied_files("serve")
    assert {"pyproject.toml", "README.md"} <= set(files)
    app_files = {f for f in files if f.startswith("app/")}
    assert app_files == {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "app").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts  # the browser page's files too
    }
    # Follow the static imports from app/ through first-party modules.
    needed: set[str] = set()
    todo = sorted(f for f in app_files if f.endswith(".py"))
    while todo:
        path = todo.pop()
        if path in needed:
            continue
        needed.add(path)
        for name in module_imports(REPO / path):
            for k in range(1, len(name.split(".")) + 1):
                found = module_file(".".join(name.split(".")[:k]))
                if found and found not in needed:
                    todo.append(found)
    missing = sorted(needed - set(files))
    assert not missing, f"the service imports these but the serving image lacks them: {missing}"
    for path in (f for f in files if f.endswith(".py")):
        heavy = {n.split(".")[0] for n in module_imports(REPO / path)} & TRAIN_ONLY_IMPORTS
        assert not heavy, f"{path} imports training extras {heavy}: not in the serving image"
    # No training code in the serving image: the service imports only the shared core.
    assert not any(f.startswith("training/") for f in files)


def test_training_image_holds_the_whole_training_package() -> None:
    files = copied_files("train")
    for package in ("training", "wastenet"):
        expected = DockerIgnore.load().context_files(REPO, package)
        assert sorted(v for v in files.values() if v.startswith(f"{package}/")) == expected
    assert not any(f.startswith("app/") for f in files)


# -- how the serving image runs -------------------------------------------------------------
def test_serving_image_runs_as_a_non_root_user() -> None:
    assert SERVE.user is not None
    user, _, group = SERVE.user.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert user.isdigit() and int(user) != 0 and group.isdigit() and int(group) != 0
    assert TRAIN.user is not None and not TRAIN.user.startswith("0")


def test_serving_image_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    waste = {k: v for k, v in SERVE.env.items() if k.startswith("WASTE_")}
    assert waste["WASTE_HOST"] == "0.0.0.0"
    for key in list(os.environ):
        if key.startswith("WASTE_"):
            monkeypatch.delenv(key)
    for key, value in waste.items():
        monkeypatch.setenv(key, value)
        assert key.removeprefix("WASTE_").lower() in Settings.model_fields, key
    settings = Settings()
    assert settings.bootstrap_demo is False, "models are mounted read-only; no demo bootstrap"
    assert str(settings.model_dir).startswith("/")
    assert f"{settings.port}" in SERVE.expose, "EXPOSE the port the server listens on"


def test_cmd_is_python_m_app_and_the_module_imports() -> None:
    assert SERVE.cmd == ["python", "-m", "app"]
    assert SERVE.entrypoint is None
    spec = importlib.util.find_spec("app.__main__")
    assert spec is not None and spec.origin == str(REPO / "app" / "__main__.py")
    module = importlib.import_module("app.__main__")
    assert callable(module.main)


def test_cmd_accepts_the_image_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `python -m app --check` validates settings, device and precision as the start does.
    from app.__main__ import main

    for key in list(os.environ):
        if key.startswith("WASTE_"):
            monkeypatch.delenv(key)
    for key, value in SERVE.env.items():
        if key.startswith("WASTE_"):
            monkeypatch.setenv(key, value)
    assert main(["--check"]) == 0, capsys.readouterr().err
    assert "settings are valid" in capsys.readouterr().out
    # ... and it does refuse a bad environment, so the check above means something.
    monkeypatch.setenv("WASTE_PORT", "http")
    assert main(["--check"]) == 2
    assert "WASTE_PORT='http'" in capsys.readouterr().err


def healthcheck_paths(command: list[str]) -> list[str]:
    """URL paths in a ``python -c CODE`` health check, read from the code's string literals."""
    assert command[:2] == ["python", "-c"], "slim images have no curl: check with python"
    tree = ast.parse(command[2])
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("/")
    ]


def test_healthcheck_asks_readiness_with_a_start_period_for_model_loading() -> None:
    assert SERVE.healthcheck is not None
    flags = SERVE.healthcheck.flags
    seconds = {k: int(v.removesuffix("s")) for k, v in flags.items() if v.endswith("s")}
    assert seconds["start-period"] >= 60
    assert seconds["timeout"] < seconds["interval"]
    (path,) = healthcheck_paths(healthcheck_command(SERVE.healthcheck))
    assert path == "/health/ready" and (path, "GET") in app_routes()


def test_images_use_the_nvidia_container_toolkit_when_a_gpu_is_given() -> None:
    for image in (SERVE, TRAIN):
        assert image.env["NVIDIA_VISIBLE_DEVICES"] == "all"
        assert "compute" in image.env["NVIDIA_DRIVER_CAPABILITIES"].split(",")


def test_engines_read_it_with_their_own_frontend() -> None:
    # A `# syntax=` directive makes every build pull a frontend image from a registry
    # (Engine 20.10 cannot parse the file without it). RUN --mount, the one BuildKit
    # feature used here, is in every engine's built-in frontend since 20.10.
    text = (REPO / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.M | re.I)
    mounts = [i for s in DOCKERFILE.stages for i in s.of("RUN") if i.flags]
    assert mounts and all(set(i.flags) == {"mount"} for i in mounts)
    assert all(i.flags["mount"] == "type=cache,target=/root/.cache/pip" for i in mounts)
