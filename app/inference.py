"""The forward pass as served: batch assembly, warm-up and top-k over a backend.

A batch is stacked into one preallocated uint8 buffer (pinned on CUDA) in the serving
layout ``(n, H, W, 3)``, the backend (app.backends) normalises it once into what its
network reads, and the logits come back to the host once per batch for softmax and
top-k. CPU: one intra-op thread per usable core; the event loop and decode threads share
those cores, which is why the inference executor has a single thread (two concurrent
forwards would oversubscribe). CUDA: a warm-up at load for every batch-size bucket.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.backends import Backend
from app.settings import Settings
from wastenet.artifacts import LoadedVersion
from wastenet.schema import Preprocessing

log = logging.getLogger("app.inference")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(settings: Settings) -> int:
    """Set torch's intra-op threads (0 = one per usable core); return the count used."""
    threads = settings.torch_threads or usable_cores()
    torch.set_num_threads(threads)
    return threads


def warmup_batch_sizes(max_batch_size: int, device: torch.device) -> list[int]:
    """CPU: 1 and the maximum. CUDA: powers of two up to the maximum, and the maximum."""
    if device.type != "cuda":
        return sorted({1, max_batch_size})
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


@dataclass(frozen=True)
class InferenceItem:
    """One image for the batcher, and how many classes to return.

    ``image`` is either what decoding produces, uint8 ``(H, W, 3)``, or the network input
    itself, already normalised: float32 ``(3, H, W)`` (the Open Inference Protocol's FP32
    input). Both kinds share one batcher, so they share its batches, queue bound and
    metrics; a batch that mixes them costs one extra row copy per normalised item.
    """

    image: np.ndarray
    top_k: int

    @property
    def normalised(self) -> bool:
        return bool(self.image.dtype == np.float32)


TopK = list[tuple[int, float]]  # (class index, probability), most likely first


def top_k(logits: np.ndarray, ks: Sequence[int]) -> list[TopK]:
    """Softmax per row (float64), then the ``ks[row]`` most likely classes of each row."""
    probs = logits.astype(np.float64)
    probs -= probs.max(axis=1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=1, keepdims=True)
    k = max(ks)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(probs, order, axis=1)
    return [
        list(zip(order[row, :n].tolist(), values[row, :n].tolist(), strict=True))
        for row, n in enumerate(ks)
    ]


class InferenceModel:
    """A loaded version served by one backend; ``predict`` runs one batch at a time."""

    def __init__(
        self,
        loaded: LoadedVersion,
        backend: Backend,
        max_batch_size: int = 1,
        fallbacks: Sequence[str] = (),
    ) -> None:
        self.ref = loaded.ref
        self.metadata = loaded.metadata
        self.preprocessing: Preprocessing = loaded.metadata.preprocessing
        self.class_names = list(loaded.metadata.class_names)
        self.backend = backend
        self.fallbacks = list(fallbacks)  # faster choices skipped for this version, and why
        self.max_batch_size = max_batch_size
        self._batch = backend.host_buffer(max_batch_size)
        size = self.preprocessing.input_size
        self._blank = np.zeros((size, size, 3), dtype=np.uint8)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def stack(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Copy the images into the batch buffer (the one copy between decode and normalise)."""
        n = len(images)
        batch = self._batch[:n] if n <= len(self._batch) else self.backend.host_buffer(n)
        np.stack(images, out=batch)
        return batch

    def predict(self, items: Sequence[InferenceItem]) -> list[TopK]:
        """Forward one batch; runs on the inference thread (the batcher's ``process``)."""
        inputs = {row: item.image for row, item in enumerate(items) if item.normalised}
        if not inputs:
            logits = self.backend.forward(self.stack([item.image for item in items]))
        else:
            # Normalised rows take a blank uint8 placeholder that forward_mixed overwrites.
            images = [self._blank if item.normalised else item.image for item in items]
            logits = self.backend.forward_mixed(self.stack(images), inputs)
        return top_k(logits, [item.top_k for item in items])

    def warmup(self, batch_sizes: list[int]) -> None:
        self.backend.warm(batch_sizes)
