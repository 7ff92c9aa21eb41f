"""Shared helpers for the training-loop tests: tiny synthetic data and tiny configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from training.config import TrainConfig
from training.synth import generate_synthetic_dataset


def make_data(root: Path, images_per_class: int, size: int, seed: int = 0) -> Path:
    data = root / f"synth-{images_per_class}-{size}-{seed}"
    generate_synthetic_dataset(data, images_per_class=images_per_class, size=size, seed=seed)
    return data


def tiny_config(data: Path, out: Path, **kw: Any) -> TrainConfig:
    """A run that takes seconds: 32 px, no pretrained weights, no plots, no progress bar."""
    base: dict[str, Any] = {
        "data_dir": str(data),
        "out_dir": str(out),
        "pretrained": False,
        "input_size": 32,
        "resize_size": 36,
        "batch_size": 16,
        "num_workers": 0,
        "verify_images": False,
        "progress": False,
        "plots": False,
        "warmup_epochs": 0.5,
        "device": "cpu",
    }
    base.update(kw)
    return TrainConfig.model_validate(base)


def one_thread() -> Iterator[None]:
    """Fixture body: one intra-op thread while the test runs.

    On shared cores two spinning OpenMP threads slow tiny steps down several times; one
    thread degrades gracefully.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
