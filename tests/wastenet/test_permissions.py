"""Published files get the modes of a plain open()/mkdir(): 0666/0777 less the umask.

The service image runs as its own user (UID 10001) over a read-only mount of the model
repository, so a version published by another user must be readable by others whenever
the publisher's umask allows it, and stay private when the umask says so.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from wastenet.artifacts import _umask, publish_version, write_aliases
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import Preprocessing

NAME = "waste-resnet18"
EVALUATION = {
    "split": "test",
    "num_samples": 12,
    "accuracy": 0.5,
    "macro_f1": 0.5,
    "per_class_f1": dict.fromkeys(CLASS_NAMES, 0.5),
}


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask: int = request.param
    old = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def publish(repo: Path) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(arch="resnet18", cbam="none")
    ref = publish_version(
        repo,
        NAME,
        build_model(config).eval(),
        config,
        CLASS_NAMES,
        EVALUATION,
        preprocessing=Preprocessing(resize_size=36, input_size=32),
    )
    return ref.path


# 0o022 and 0o002 are the usual defaults; 0o077 keeps everything private; 0o027 shares with
# the group only. Without the fix, weights.safetensors stayed 0600 and the folder 0755.
@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o027, 0o640, 0o750), (0o077, 0o600, 0o700)],
    indirect=["umask"],
    ids=["umask022", "umask002", "umask027", "umask077"],
)
def test_published_version_modes_follow_the_umask(
    tmp_path: Path, umask: int, file_mode: int, dir_mode: int
) -> None:
    version = publish(tmp_path)
    files = sorted(p.name for p in version.iterdir())
    assert files == ["model.json", "weights.safetensors"]
    assert {name: oct(mode(version / name)) for name in files} == dict.fromkeys(
        files, oct(file_mode)
    )
    assert oct(mode(version)) == oct(dir_mode)
    assert oct(mode(version.parent)) == oct(dir_mode)  # models/<name>/, made by mkdir
    assert os.umask(umask) == umask, "publishing leaves the process umask as it was"


@pytest.mark.parametrize(
    ("umask", "file_mode"),
    [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)],
    indirect=["umask"],
    ids=["umask022", "umask002", "umask077"],
)
def test_aliases_file_mode_follows_the_umask(tmp_path: Path, umask: int, file_mode: int) -> None:
    write_aliases(tmp_path, {"production": 1})
    assert oct(mode(tmp_path / "aliases.json")) == oct(file_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True, ids=oct)
def test_umask_is_read_without_changing_it(umask: int) -> None:
    assert _umask() == umask
    assert _umask() == umask
