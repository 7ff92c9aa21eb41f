"""Inference backends: a uint8 batch in the serving layout in, float32 logits out.

The serving layout is what decoding produces: ``(n, H, W, 3)`` uint8, stacked by the
caller into the backend's :meth:`Backend.host_buffer` (pinned memory on CUDA). Each
backend normalises it once, straight into the dtype and layout its network wants (and
:meth:`Backend.forward_mixed` takes some rows already normalised, for clients that send the
network input itself):

- :class:`TorchBackend`: a preallocated channels_last float buffer, which *is* NHWC in
  memory, so normalising is one pass over contiguous rows (scale and bias tiled across a
  row) with no transpose; fp32 on CPU, bf16 via ``torch.autocast`` on CPUs with native
  bf16, fp32/fp16/bf16 weights on CUDA, optionally replayed from CUDA graphs.
- :class:`OrtBackend`: ONNX Runtime on an exported file (``model.onnx`` fp32 or
  ``model.int8.onnx``), whose input is the normalised float32 NCHW batch: one strided
  copy into a preallocated contiguous buffer, then scale and bias per channel plane.

:func:`open_backend` tries a version's candidate choices in order (app.selection) and
says why each one it skipped could not serve.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from app.selection import (
    ORT_CUDA,
    ORT_TENSORRT,
    BackendName,
    Capabilities,
    Choice,
    PrecisionName,
)
from wastenet.artifacts import ArtifactError, LoadedVersion, read_export
from wastenet.schema import ExportedFile, Preprocessing

log = logging.getLogger("app.backends")

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BackendUnavailable(Exception):
    """This choice cannot serve this version; the message says why."""


class NotShipped(BackendUnavailable):
    """The version does not offer this choice at all (no such exported file listed).

    Not a fallback worth reporting when a later choice serves: most versions ship no
    exports. It still counts among the reasons when no choice can serve.
    """


def scale_and_bias(p: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: ``uint8 * scale + bias`` equals ``(uint8 / 255 - mean) / std``."""
    std = np.asarray(p.std, dtype=np.float64)
    mean = np.asarray(p.mean, dtype=np.float64)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


class Backend(ABC):
    """One version's network, ready to run a batch on one device."""

    name: BackendName
    precision: PrecisionName
    device: torch.device

    def __init__(self, preprocessing: Preprocessing, num_classes: int) -> None:
        self.preprocessing = preprocessing
        self.num_classes = num_classes
        self.size = preprocessing.input_size

    def host_buffer(self, batch_size: int) -> np.ndarray:
        """Where the caller stacks a batch: uint8 ``(batch_size, H, W, 3)``."""
        return np.empty((batch_size, self.size, self.size, 3), dtype=np.uint8)

    @abstractmethod
    def forward(self, batch: np.ndarray) -> np.ndarray:
        """uint8 ``(n, H, W, 3)`` -> float32 logits ``(n, classes)``; one batch at a time."""

    @abstractmethod
    def forward_mixed(self, batch: np.ndarray, inputs: Mapping[int, np.ndarray]) -> np.ndarray:
        """``forward(batch)``, except that row ``i`` of the network input is ``inputs[i]``.

        ``inputs`` holds rows that arrive already normalised (float32 ``(3, H, W)``, the
        network input itself); their rows of ``batch`` are normalised and then overwritten,
        which costs less than a second code path for a batch that mixes both kinds.
        """

    def warm(self, batch_sizes: list[int]) -> None:
        """Run every batch size once, so that the first requests do not pay set-up costs."""
        for size in batch_sizes:
            self.forward(np.zeros((size, self.size, self.size, 3), dtype=np.uint8))

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device}"


class TorchBackend(Backend):
    name: BackendName = "torch"

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        precision: PrecisionName,
        preprocessing: Preprocessing,
        num_classes: int,
        max_batch_size: int,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__(preprocessing, num_classes)
        self.device = device
        self.precision = precision
        self.dtype = _TORCH_DTYPES[precision]
        # CPU bf16 keeps fp32 weights and lets autocast run the convolutions in bf16.
        self.autocast = device.type == "cpu" and precision == "bf16"
        weights = torch.float32 if self.autocast else self.dtype
        module.eval()
        module.requires_grad_(False)
        module.to(device=device, dtype=weights)
        self.module = module.to(memory_format=torch.channels_last)
        self._x = self._empty_input(max_batch_size)
        scale, bias = scale_and_bias(preprocessing)
        # Tiled across one image row (W * 3 values): contiguous rows vectorise well, a
        # broadcast over an innermost dimension of 3 does not (measured 10x slower).
        self._scale_row = torch.from_numpy(np.tile(scale, self.size)).to(device)
        self._bias_row = torch.from_numpy(np.tile(bias, self.size)).to(device)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self._graphs: dict[int, tuple[Any, Tensor, Tensor]] = {}

    def _empty_input(self, batch_size: int) -> Tensor:
        shape = (batch_size, 3, self.size, self.size)
        return torch.empty(shape, device=self.device, memory_format=torch.channels_last)

    def host_buffer(self, batch_size: int) -> np.ndarray:
        if self.device.type != "cuda":
            return super().host_buffer(batch_size)
        # Pinned, so the copy to the GPU is asynchronous; reuse is safe because forward()
        # ends with a device->host copy that waits for everything before it.
        shape = (batch_size, self.size, self.size, 3)
        return torch.empty(shape, dtype=torch.uint8).pin_memory().numpy()

    def normalise(self, batch: np.ndarray) -> Tensor:
        """uint8 NHWC -> the float32 input, NCHW shape in channels_last memory."""
        n, size = batch.shape[0], self.size
        u8 = torch.from_numpy(batch)
        if self.device.type == "cuda":
            u8 = u8.to(self.device, non_blocking=True)
        if n > self._x.shape[0]:  # larger than the batcher sends (direct callers): grow
            self._x = self._empty_input(n)
        x = self._x[:n]
        rows = x.permute(0, 2, 3, 1).view(n * size, size * 3)  # NHWC memory, never a copy
        rows.copy_(u8.reshape(n * size, size * 3))
        torch.addcmul(self._bias_row, rows, self._scale_row, out=rows)
        return x

    def forward(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.run_network(self.normalise(batch))
        return logits

    def forward_mixed(self, batch: np.ndarray, inputs: Mapping[int, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            x = self.normalise(batch)
            for row, values in inputs.items():
                x[row].copy_(torch.from_numpy(values))  # strided copy into channels_last
            return self.run_network(x)

    def run_network(self, x: Tensor) -> np.ndarray:
        if self._graphs and x.shape[0] <= max(self._graphs):
            return self._replay(x)
        context = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with context:
            logits = self.module(x if self.autocast else x.to(self.dtype))
        result: np.ndarray = logits.float().cpu().numpy()
        return result

    def warm(self, batch_sizes: list[int]) -> None:
        super().warm(batch_sizes)
        if self.cuda_graphs:
            self._capture(batch_sizes)
            super().warm(batch_sizes)
            torch.cuda.synchronize(self.device)

    # -- CUDA graphs (CUDA only) -----------------------------------------------------------
    def _capture(self, batch_sizes: list[int]) -> None:
        """One graph per batch size; a batch replays the smallest graph that holds it."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for size in batch_sizes:
                shape = (size, 3, self.size, self.size)
                static_in = torch.zeros(shape, dtype=self.dtype, device=self.device)
                static_in = static_in.contiguous(memory_format=torch.channels_last)
                self.module(static_in)  # allocations happen before the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self.module(static_in)
                self._graphs[size] = (graph, static_in, static_out)
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _replay(self, x: Tensor) -> np.ndarray:
        n = x.shape[0]
        size = min(s for s in self._graphs if s >= n)
        graph, static_in, static_out = self._graphs[size]
        static_in[:n].copy_(x)  # rows past n keep old values; their outputs are dropped
        graph.replay()
        result: np.ndarray = static_out[:n].float().cpu().numpy()
        return result


class OrtBackend(Backend):
    name: BackendName = "onnxruntime"

    def __init__(
        self,
        model: bytes,
        exported: ExportedFile,
        device: torch.device,
        providers: list[Any],
        threads: int,
        preprocessing: Preprocessing,
        num_classes: int,
        max_batch_size: int,
    ) -> None:
        import onnxruntime as ort

        super().__init__(preprocessing, num_classes)
        self.device = device
        self.precision = exported.precision
        self.file = exported.file
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle pool threads sleep instead of spinning on the cores that decoding needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:
            reason = f"{exported.file}: ONNX Runtime cannot load it: {exc}"
            raise BackendUnavailable(reason) from exc
        self.input_name, self.output_name = self._check_io(exported)
        shape = (max_batch_size, 3, self.size, self.size)
        self._x = torch.empty(shape)  # contiguous NCHW, shared with numpy
        self._scale, self._bias = (v.tolist() for v in scale_and_bias(preprocessing))
        self._check_output()

    def _check_io(self, exported: ExportedFile) -> tuple[str, str]:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = ([i.name for i in inputs], [o.name for o in outputs])
        if names != ([exported.input_name], [exported.output_name]):
            raise BackendUnavailable(
                f"{exported.file}: inputs/outputs {names[0]}/{names[1]} are not the "
                f"[{exported.input_name}]/[{exported.output_name}] that model.json records"
            )
        shape = inputs[0].shape
        expected = [3, self.size, self.size]
        if len(shape) != 4 or list(shape[1:]) != expected:
            raise BackendUnavailable(
                f"{exported.file}: input shape {shape} is not [batch, 3, {self.size}, "
                f"{self.size}] (the version's input_size)"
            )
        return exported.input_name, exported.output_name

    def _check_output(self) -> None:
        logits = self.forward(np.zeros((2, self.size, self.size, 3), dtype=np.uint8))
        if logits.shape != (2, self.num_classes):
            raise BackendUnavailable(
                f"{self.file}: answers {list(logits.shape)} for a batch of 2, expected "
                f"[2, {self.num_classes}]"
            )

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, contiguous (what ONNX Runtime reads without a copy)."""
        n = batch.shape[0]
        if n > self._x.shape[0]:  # larger than the batcher sends (direct callers): grow
            self._x = torch.empty((n, *self._x.shape[1:]))
        x = self._x[:n]
        x.copy_(torch.from_numpy(batch).permute(0, 3, 1, 2))
        for c in range(3):
            x[:, c].mul_(self._scale[c]).add_(self._bias[c])
        array: np.ndarray = x.numpy()
        return array

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.run_network(self.normalise(batch))

    def forward_mixed(self, batch: np.ndarray, inputs: Mapping[int, np.ndarray]) -> np.ndarray:
        x = self.normalise(batch)
        for row, values in inputs.items():
            x[row] = values
        return self.run_network(x)

    def run_network(self, x: np.ndarray) -> np.ndarray:
        logits: np.ndarray = self.session.run([self.output_name], {self.input_name: x})[0]
        return logits


def ort_providers_for(choice: Choice, caps: Capabilities) -> list[Any]:
    """Execution providers, best first; CPU always last so unsupported nodes still run."""
    providers: list[Any] = []
    if caps.cuda:  # CUDA-only providers, only those the installed onnxruntime lists
        index = caps.device.index or 0
        if ORT_TENSORRT in caps.ort_providers:
            trt = {"device_id": index, "trt_int8_enable": choice.precision == "int8"}
            providers.append((ORT_TENSORRT, trt))
        if ORT_CUDA in caps.ort_providers and choice.precision != "int8":
            providers.append((ORT_CUDA, {"device_id": index}))
    providers.append("CPUExecutionProvider")
    return providers


def _check_agreement(choice: Choice, exported: ExportedFile) -> None:
    agreement = exported.agreement
    if not choice.vetted or agreement is None:
        return
    if agreement.top1_agreement < agreement.threshold:
        raise BackendUnavailable(
            f"{exported.file}: top-1 agreement with {agreement.reference} is "
            f"{agreement.top1_agreement:.2%}, below its threshold {agreement.threshold:.2%} "
            "(published with --force); WASTE_PRECISION=int8 serves it anyway"
        )


def _open_ort(
    choice: Choice, loaded: LoadedVersion, caps: Capabilities, threads: int, max_batch: int
) -> OrtBackend:
    metadata = loaded.metadata
    exported = metadata.export(choice.precision)
    if exported is None:
        raise NotShipped(
            f"model.json lists no {choice.precision} ONNX export (export the version with "
            "python -m training export)"
        )
    _check_agreement(choice, exported)
    try:
        data = read_export(loaded.ref.path, exported)
    except ArtifactError as exc:
        raise BackendUnavailable(f"{Path(exc.path).name}: {exc.problem}") from None
    return OrtBackend(
        data,
        exported,
        caps.device,
        ort_providers_for(choice, caps),
        threads,
        metadata.preprocessing,
        len(metadata.class_names),
        max_batch,
    )


def open_backend(
    choices: list[Choice],
    loaded: LoadedVersion,
    caps: Capabilities,
    *,
    threads: int,
    max_batch_size: int,
    cuda_graphs: bool = False,
) -> tuple[Backend, list[str]]:
    """The first choice that can serve this version, and why earlier ones could not.

    The reasons returned leave out choices the version does not ship (NotShipped).
    Raises BackendUnavailable with every reason when no choice can serve.
    """
    reasons: list[str] = []
    skipped: list[str] = []
    for choice in choices:
        try:
            if choice.backend == "onnxruntime":
                return _open_ort(choice, loaded, caps, threads, max_batch_size), skipped
            backend = TorchBackend(
                loaded.model,
                caps.device,
                choice.precision,
                loaded.metadata.preprocessing,
                len(loaded.metadata.class_names),
                max_batch_size,
                cuda_graphs=cuda_graphs,
            )
            return backend, skipped
        except BackendUnavailable as exc:
            reasons.append(f"{choice}: {exc}")
            if isinstance(exc, NotShipped):
                continue
            skipped.append(reasons[-1])
            log.warning("%s v%d: not %s: %s", loaded.ref.name, loaded.ref.version, choice, exc)
    raise BackendUnavailable("; ".join(reasons))
