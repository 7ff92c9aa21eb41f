"""Fixtures for the tests that start the service as a real process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.deploy.serving import DEFAULT_MODEL
from wastenet.artifacts import publish_version
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import Preprocessing


@pytest.fixture(scope="session")
def tiny_model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with one randomly initialised version of the default model.

    ResNet-18 without attention at 32 px: the smallest network the builders make, so
    loading and warm-up take well under a second.
    """
    repo = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = ModelConfig(arch="resnet18", cbam="none")
    publish_version(
        repo,
        DEFAULT_MODEL,
        build_model(config).eval(),
        config,
        CLASS_NAMES,
        {
            "split": "test",
            "num_samples": 12,
            "accuracy": 1 / 12,
            "macro_f1": 1 / 12,
            "per_class_f1": dict.fromkeys(CLASS_NAMES, 1 / 12),
        },
        preprocessing=Preprocessing(resize_size=36, input_size=32),
        description="random weights, for deployment tests",
    )
    return repo
