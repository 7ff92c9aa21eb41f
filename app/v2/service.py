"""The Open Inference Protocol's use cases over the same service parts as ``/v1``.

Health and readiness are :class:`~app.health.Health`'s; versions resolve with the
registry's rule (number, ``latest``, alias; none: the model's default); inference goes
through :class:`~app.tensor_prediction.TensorPredictor`, so through the version's one
batcher, the same limits, and the same request, latency and image metrics as ``/v1``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata

from starlette.requests import Request

from app.errors import Unavailable
from app.health import Health
from app.lifecycle import Lifecycle
from app.metrics import Metrics, counted
from app.prediction import overloaded
from app.registry import ModelRegistry, ServedVersion, VersionEntry
from app.tensor_prediction import TensorPredictor
from app.uploads import UploadMemory, hold_body_memory, limits_from
from app.v2 import codec
from app.v2.schemas import (
    InferenceResponse,
    MetadataTensor,
    ModelMetadataResponse,
    ModelReady,
    ServerMetadataResponse,
    ServerReady,
)

SERVER_NAME = "waste-classifier"
EXTENSIONS = ["binary_tensor_data", "classification"]
PLATFORMS = {"torch": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}
PARSE_INLINE_BYTES = 256 * 1024  # larger bodies are parsed on a decode thread


def server_version() -> str:
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


class OpenInference:
    def __init__(
        self,
        lifecycle: Lifecycle,
        metrics: Metrics,
        health: Health,
        tensors: TensorPredictor,
        memory: UploadMemory,
    ) -> None:
        self._lifecycle = lifecycle
        self._metrics = metrics
        self._health = health
        self._tensors = tensors
        self._memory = memory
        self._limits = limits_from(lifecycle.settings)
        self._metadata = ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS
        )

    def server_metadata(self) -> ServerMetadataResponse:
        return self._metadata

    def server_ready(self) -> ServerReady:
        """Ready as ``/health/ready`` is (503 with the reasons otherwise)."""
        self._health.ready()
        return ServerReady()

    def model_ready(self, name: str, spec: str | None) -> ModelReady:
        """200 when the version can answer now; 404 unknown, 503 with the reason."""
        self._registry(name).resolve(name, spec)
        return ModelReady(name=name)

    async def model_metadata(self, name: str, spec: str | None) -> ModelMetadataResponse:
        """Inputs, outputs and versions of a version in any state (read from model.json)."""
        registry = self._registry(name)
        model, entry = registry.find_version(name, spec)
        try:
            metadata = await registry.metadata(entry)
        except Exception as exc:
            raise Unavailable(
                f"the model.json of {entry.label} cannot be read: {exc}",
                code="metadata_unreadable",
                retry_after_s=30,
            ) from None
        size = metadata.preprocessing.input_size
        served = entry.served
        backend = served.model.backend.name if served is not None else "torch"
        return ModelMetadataResponse(
            name=name,
            versions=[str(v) for v in sorted(model.versions)],
            platform=PLATFORMS[backend],
            inputs=[
                MetadataTensor(name=codec.IMAGES, datatype="BYTES", shape=[-1]),
                MetadataTensor(name=codec.INPUT, datatype="FP32", shape=[-1, 3, size, size]),
            ],
            outputs=[
                MetadataTensor(
                    name=codec.PROBABILITIES,
                    datatype="FP32",
                    shape=[-1, len(metadata.class_names)],
                )
            ],
        )

    async def infer(
        self, request: Request, name: str, spec: str | None, header_length: str | None
    ) -> codec.InferenceAnswer:
        """One inference request, counted in the request and latency metrics like /v1's."""
        with counted(self._metrics.requests, self._metrics.latency) as labels:
            entry, served = self._lifecycle.resolve(name, spec, labels)
            if not served.batcher.has_room(1):
                # Refuse before reading the body: overload costs us almost nothing.
                raise overloaded(entry, served.batcher.retry_after_s())
            # The body is held (FP32 data is used in place) until the answer is encoded.
            with hold_body_memory(request, self._limits, self._memory, multipart=False) as hold:
                body = await codec.read_body(request, self._limits, hold)
                return await self._answer(body, entry, served, header_length)

    async def _answer(
        self, body: bytearray, entry: VersionEntry, served: ServedVersion, header_length: str | None
    ) -> codec.InferenceAnswer:
        model = served.model
        parse = functools.partial(
            codec.parse_request,
            body,
            header_length,
            model.preprocessing.input_size,
            model.num_classes,
            self._limits,
        )
        if len(body) <= PARSE_INLINE_BYTES:
            parsed = parse()
        else:  # e.g. 4 images as JSON FP32 (12 MB) take 130 ms: not on the event loop
            pool = self._lifecycle.decode_pool
            parsed = await asyncio.get_running_loop().run_in_executor(pool, parse)
        probs = await self._tensors.probabilities(entry, served, parsed.batch)
        response = InferenceResponse(
            model_name=entry.name,
            model_version=str(entry.version),
            id=parsed.id,
            parameters={"backend": model.backend.name, "precision": model.backend.precision},
            outputs=[],
        )
        return codec.answer(response, probs, model.class_names, parsed.output)

    def _registry(self, name: str) -> ModelRegistry:
        return self._lifecycle.registry_for(name)
