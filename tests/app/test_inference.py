"""The served forward pass: per-item top-k in a mixed batch, warm-up sizes per device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.inference import InferenceItem, InferenceModel, warmup_batch_sizes
from tests.app.conftest import MODEL
from wastenet.artifacts import load_version


def test_each_item_gets_its_own_top_k_and_batching_does_not_change_results(
    template_repo: Path,
) -> None:
    model = InferenceModel(load_version(template_repo / MODEL / "1"), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(3)
    ]
    batch = model.predict(
        [InferenceItem(images[0], 1), InferenceItem(images[1], 5), InferenceItem(images[2], 12)]
    )
    assert [len(top) for top in batch] == [1, 5, 12]
    assert sorted(i for i, _ in batch[2]) == list(range(12))
    assert sum(p for _, p in batch[2]) == pytest.approx(1.0, abs=1e-5)
    for image, top in zip(images, batch, strict=True):
        alone = model.predict([InferenceItem(image, 12)])[0]
        assert [i for i, _ in top] == [i for i, _ in alone][: len(top)]
        for (_, p_batch), (_, p_alone) in zip(top, alone, strict=False):
            assert abs(p_batch - p_alone) < 1e-5


def test_warmup_batch_sizes_per_device() -> None:
    assert warmup_batch_sizes(8, torch.device("cpu")) == [1, 8]
    assert warmup_batch_sizes(1, torch.device("cpu")) == [1]
    assert warmup_batch_sizes(8, torch.device("cuda")) == [1, 2, 4, 8]
    assert warmup_batch_sizes(6, torch.device("cuda")) == [1, 2, 4, 6]
