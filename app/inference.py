"""The forward pass as served: device and precision, batch assembly, warm-up, top-k.

CPU: channels_last weights and inputs (oneDNN's fast layout) and one torch thread per
usable core; the event loop and decode threads share those cores, which is why the
inference executor has a single thread (two concurrent forwards would oversubscribe).
CUDA: a pinned host buffer per version, non-blocking copies, optional fp16/bf16, and a
warm-up at load for every batch size bucket in use.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from app.settings import Settings, SettingsError
from wastenet.artifacts import LoadedVersion
from wastenet.preprocess import normalize
from wastenet.schema import Preprocessing

log = logging.getLogger("app.inference")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_device(setting: str) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a device that exists, or SettingsError."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SettingsError(
            f"WASTE_DEVICE={setting!r} but CUDA is not available to torch {torch.__version__} "
            "(no GPU, driver or CUDA build); use WASTE_DEVICE=auto or cpu"
        )
    device = torch.device(setting)
    index = device.index if device.index is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise SettingsError(f"WASTE_DEVICE={setting!r} but only {count} CUDA device(s) exist")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision != "fp32" and device.type != "cuda":
        raise SettingsError(
            f"WASTE_PRECISION={precision} needs a CUDA device (the device is {device}); "
            "use fp32 on CPU"
        )
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise SettingsError("WASTE_PRECISION=bf16 but this GPU does not support bfloat16")
    return _DTYPES[precision]


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
    """One image for the batcher: uint8 (3, H, W) and how many classes to return."""

    image: Tensor
    top_k: int


TopK = list[tuple[int, float]]  # (class index, probability), most likely first


class InferenceModel:
    """A loaded version prepared for serving on one device; ``predict`` runs one batch."""

    def __init__(
        self,
        loaded: LoadedVersion,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 1,
    ) -> None:
        self.ref = loaded.ref
        self.metadata = loaded.metadata
        self.preprocessing: Preprocessing = loaded.metadata.preprocessing
        self.class_names = list(loaded.metadata.class_names)
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.model = prepare_model(loaded.model, device, dtype)
        size = self.preprocessing.input_size
        self._pinned: Tensor | None = None
        if device.type == "cuda":
            # Reused for every batch: the .cpu() at the end of predict() syncs before reuse.
            self._pinned = torch.empty(
                (max_batch_size, 3, size, size), dtype=torch.uint8
            ).pin_memory()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def inputs(self, images: list[Tensor]) -> Tensor:
        """Stack uint8 images and normalise them on the device, in the serving layout."""
        if self._pinned is not None and len(images) <= self._pinned.shape[0]:
            host = torch.stack(images, out=self._pinned[: len(images)])
            batch = host.to(self.device, non_blocking=True)
        else:
            batch = torch.stack(images).to(self.device)
        # channels_last while still uint8 (a 1-byte copy); normalize keeps the layout.
        batch = batch.contiguous(memory_format=torch.channels_last)
        x = normalize(batch, self.preprocessing).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last)

    def predict(self, items: list[InferenceItem]) -> list[TopK]:
        """Forward one batch; runs on the inference thread (the batcher's ``process``)."""
        k = max(item.top_k for item in items)
        with torch.inference_mode():
            x = self.inputs([item.image for item in items])
            logits = self.model(x)
            probs = logits.float().softmax(dim=1)
            values, indices = probs.topk(k, dim=1)
            # The one device->host sync per batch.
            top_values = values.cpu().tolist()
            top_indices = indices.cpu().tolist()
        return [
            list(zip(top_indices[row][: item.top_k], top_values[row][: item.top_k], strict=True))
            for row, item in enumerate(items)
        ]

    def warmup(self, batch_sizes: list[int]) -> None:
        size = self.preprocessing.input_size
        for batch_size in batch_sizes:
            image = torch.zeros((3, size, size), dtype=torch.uint8)
            self.predict([InferenceItem(image, 1)] * batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def prepare_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Eval mode, no grads, on the device in ``dtype``, channels_last."""
    model.eval()
    model.requires_grad_(False)
    model.to(device=device, dtype=dtype)
    return model.to(memory_format=torch.channels_last)
