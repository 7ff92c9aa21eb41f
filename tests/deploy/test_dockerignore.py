""".dockerignore: the build context holds the sources and nothing heavy or secret."""

from __future__ import annotations

import pytest

from tests.deploy.specs import REPO, DockerIgnore

IGNORE = DockerIgnore.load()


@pytest.mark.parametrize(
    ("rules", "path", "excluded"),
    [
        # Examples of Docker's documentation for .dockerignore.
        ("*/temp*", "somedir/temporary.txt", True),
        ("*/temp*", "temp", False),
        ("*/*/temp*", "somedir/subdir/temporary.txt", True),
        ("temp?", "tempa", True),
        ("temp?", "tempab", False),
        ("**/*.go", "a/b/c.go", True),
        ("**/*.go", "c.go", True),
        ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", True),
        ("*.md\n!README*.md\nREADME-secret.md", "README.md", False),
        ("*.md\nREADME-secret.md\n!README*.md", "README-secret.md", False),
        # A pattern that matches a directory leaves out everything below it.
        ("models", "models/a/1/weights.safetensors", True),
        ("/models/", "models/README.md", True),
        # Allow-list: everything, then exceptions; the last matching rule wins.
        ("*\n!app/\n**/__pycache__", "app/main.py", False),
        ("*\n!app/\n**/__pycache__", "app/__pycache__/main.cpython-311.pyc", True),
        ("*\n!app/", "apps/x.py", True),
    ],
)
def test_rules_read_as_docker_reads_them(rules: str, path: str, excluded: bool) -> None:
    assert DockerIgnore.parse(rules).excludes(path) is excluded


@pytest.mark.parametrize(
    "path",
    [
        "models/waste-resnet18-cbam/1/weights.safetensors",
        "models/README.md",
        "runs/20260101-000000-waste-resnet18-block/checkpoints/best.pt",
        "data/garbage_classification/battery/battery1.jpg",
        ".venv/bin/python",
        "venv/lib/python3.11/site-packages/torch/__init__.py",
        ".mypy_cache/3.11/app/main.data.json",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/content",
        "app/__pycache__/main.cpython-311.pyc",
        "wastenet/nets/__pycache__/resnet.cpython-311.pyc",
        "waste_classifier.egg-info/PKG-INFO",
        "tests/deploy/test_dockerignore.py",
        "benchmarks/service_throughput.py",
        ".git/HEAD",
        ".env",
        "Dockerfile",
        "docker-compose.yml",
    ],
)
def test_heavy_secret_and_test_files_stay_out(path: str) -> None:
    assert IGNORE.excludes(path), f"{path} would be sent to the Docker daemon"


def test_the_context_is_the_packages_and_their_metadata_only() -> None:
    files = IGNORE.context_files(REPO)
    assert {"pyproject.toml", "README.md", "app/main.py", "wastenet/artifacts.py"} <= set(files)
    outside = [f for f in files if not f.startswith(("app/", "training/", "wastenet/"))]
    assert sorted(outside) == ["README.md", "pyproject.toml"]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    # Every tracked source file of the packages is sent (nothing needed is left out).
    sources = sorted(
        p.relative_to(REPO).as_posix()
        for package in ("app", "training", "wastenet")
        for p in (REPO / package).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    assert [f for f in files if f.endswith(".py")] == sources
