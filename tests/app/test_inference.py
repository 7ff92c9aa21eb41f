"""The served forward pass: per-item top-k in a mixed batch, warm-up sizes per device,
and items that arrive already normalised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.inference import InferenceItem, top_k, warmup_batch_sizes
from tests.app.conftest import MODEL, torch_model
from wastenet.preprocess import normalize


def test_each_item_gets_its_own_top_k_and_batching_does_not_change_results(
    template_repo: Path,
) -> None:
    model = torch_model(template_repo / MODEL / "1", max_batch_size=4)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
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


def test_top_k_is_the_softmax_of_each_row_in_order() -> None:
    logits = np.array([[0.0, 2.0, 1.0], [3.0, -1.0, 3.5]], dtype=np.float32)
    rows = top_k(logits, [3, 1])
    expected = torch.tensor(logits).double().softmax(dim=1)
    assert [i for i, _ in rows[0]] == [1, 2, 0]
    assert [p for _, p in rows[0]] == pytest.approx(expected[0, [1, 2, 0]].tolist(), abs=1e-12)
    assert rows[1] == [(2, pytest.approx(float(expected[1, 2]), abs=1e-12))]


def test_a_batch_larger_than_the_buffer_still_runs(template_repo: Path) -> None:
    model = torch_model(template_repo / MODEL / "1", max_batch_size=2)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    together = model.predict([InferenceItem(image, 2) for image in images])
    alone = [model.predict([InferenceItem(image, 2)])[0] for image in images]
    for got, want in zip(together, alone, strict=True):
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)


def _normalised(image: np.ndarray, model_dir: Path) -> np.ndarray:
    """Training's normalisation of one uint8 (H, W, 3) image: float32 (3, H, W)."""
    prep = torch_model(model_dir).preprocessing
    tensor = normalize(torch.from_numpy(image).permute(2, 0, 1), prep)
    return np.ascontiguousarray(tensor.numpy(), dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_normalised_item_equals_its_image_in_a_mixed_batch(
    template_repo: Path, seed: int
) -> None:
    model_dir = template_repo / MODEL / "1"
    model = torch_model(model_dir, max_batch_size=4)
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    images[1][:10, :5] = (255, 0, 0)  # asymmetric, so a transposed row would show
    as_uint8 = model.predict([InferenceItem(image, 12) for image in images])
    # Rows 1 and 3 arrive normalised, rows 0 and 2 as pixels, in one batch.
    mixed_items = [
        InferenceItem(_normalised(image, model_dir) if row % 2 else image, 12)
        for row, image in enumerate(images)
    ]
    assert [item.normalised for item in mixed_items] == [False, True, False, True]
    mixed = model.predict(mixed_items)
    for got, want in zip(mixed, as_uint8, strict=True):
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)


def test_a_batch_of_only_normalised_items_runs(template_repo: Path) -> None:
    model_dir = template_repo / MODEL / "1"
    model = torch_model(model_dir, max_batch_size=2)
    rng = np.random.default_rng(7)
    tensors = [rng.normal(0, 1, (3, 32, 32)).astype(np.float32) for _ in range(3)]
    together = model.predict([InferenceItem(t, 12) for t in tensors])
    alone = [model.predict([InferenceItem(t, 12)])[0] for t in tensors]
    assert together[0] != together[1]  # different inputs, different answers
    for got, want in zip(together, alone, strict=True):
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)
