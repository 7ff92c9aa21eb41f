"""Service settings: one pydantic-settings class, read from ``WASTE_*`` environment variables.

Every field is documented in its ``description``; ``python -m app --help-settings`` prints
them with their environment variable and default. Validation happens once, at start-up:
:func:`load_settings` turns pydantic's errors into one :class:`SettingsError` whose
message names each bad variable, its value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wastenet.schema import MODEL_NAME_RE

ENV_PREFIX = "WASTE_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
MiB = 1024 * 1024

Backend = Literal["auto", "torch", "onnxruntime"]
Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]


class SettingsError(ValueError):
    """One or more settings are invalid; the message names every bad variable."""


class Settings(BaseSettings):
    """Everything the service can be told, with the default it runs on."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, validate_default=True
    )

    # --- model repository -------------------------------------------------------------
    model_dir: Path = Field(
        default=Path("models"),
        description="Model repository: models/<name>/<version>/{weights.safetensors,model.json}.",
    )
    default_model: str = Field(
        default="waste-resnet18-cbam",
        description="Model answering POST /v1/predict; also the name of the bootstrapped demo.",
    )
    bootstrap_demo: bool = Field(
        default=True,
        description=(
            "When the repository holds no model at all, train and publish a small demo model "
            "(on synthetic images) at start-up. Needs the training extras: pip install '.[train]'."
        ),
    )
    poll_interval_s: float = Field(
        default=0.0,
        ge=0.0,
        description="Rescan the repository for new versions and aliases every N seconds (0 = off).",
    )
    admin_token: str | None = Field(
        default=None,
        description="Bearer token for /v1/admin/*; unset or empty disables the admin endpoints.",
    )

    # --- inference ----------------------------------------------------------------------
    device: str = Field(
        default="auto",
        description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
    )
    backend: Backend = Field(
        default="auto",
        description=(
            "auto (per version, the fastest backend the version and the device support), "
            "torch, or onnxruntime (the version's exported ONNX files)."
        ),
    )
    precision: Precision = Field(
        default="auto",
        description=(
            "auto (CPU: int8 when the version ships it, else fp32; CUDA: bf16, or fp16 "
            "before compute capability 8.0), fp32, bf16 (torch; on CPU only where it has "
            "native bf16), fp16 (torch on CUDA) or int8 (onnxruntime, versions that ship "
            "model.int8.onnx)."
        ),
    )
    cuda_graphs: bool = Field(
        default=False,
        description=(
            "CUDA only, torch backend: capture one CUDA graph per warmed batch size and "
            "replay it (batches are padded to the next warmed size)."
        ),
    )
    jpeg_draft: bool = Field(
        default=True,
        description=(
            "Decode JPEGs at least twice the resize size at a reduced scale (much cheaper; "
            "within a few grey levels of the full decode). false = exactly training's pixels."
        ),
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        le=512,
        description=(
            "Intra-op threads of the CPU forward pass, torch or ONNX Runtime "
            "(0 = one per usable CPU core)."
        ),
    )
    decode_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Worker threads decoding and preprocessing images (0 = one per core, max 8).",
    )
    max_batch_size: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Most images merged into one forward pass.",
    )
    max_batch_delay_ms: float = Field(
        default=5.0,
        ge=0.0,
        le=10_000.0,
        description="Longest time the oldest waiting image waits for a batch to fill.",
    )
    max_queue_images: int = Field(
        default=64,
        ge=1,
        le=1_000_000,
        description=(
            "Images allowed to wait per model version; beyond it requests get 503 with "
            "Retry-After at once. Must be at least max_files_per_request."
        ),
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0.0,
        le=3600.0,
        description="Longest a prediction may wait for the model; past it the answer is 503.",
    )
    warmup: bool = Field(
        default=True,
        description="Run forward passes at load for the batch sizes in use before serving.",
    )

    # --- upload limits ------------------------------------------------------------------
    max_request_bytes: int = Field(
        default=32 * MiB,
        ge=1024,
        description="Largest request body in bytes (413 beyond it).",
    )
    max_file_bytes: int = Field(
        default=10 * MiB,
        ge=1,
        description="Largest single uploaded file in bytes (413 beyond it).",
    )
    max_files_per_request: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Most files in one request (413 beyond it).",
    )
    max_upload_memory_bytes: int = Field(
        default=256 * MiB,
        ge=1024,
        description=(
            "Bytes of request bodies held in memory at once by one worker process. A request "
            "holds its declared size before its body is read; one that does not fit gets "
            "503 upload_memory_full at once. Must be at least max_request_bytes."
        ),
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        le=3600.0,
        description="Longest a request body may take to arrive in full (408 beyond it).",
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=64,
        description=(
            "Largest decoded image in pixels (width x height), checked from the header "
            "before decoding; also Pillow's decompression-bomb limit."
        ),
    )

    # --- uncertain answers and explanations -------------------------------------------
    min_confidence: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Default of predict's min_confidence: an image whose top probability is below it "
            'is answered label "uncertain" (top-k still given). 0 = never uncertain.'
        ),
    )
    explain_concurrency: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Explanation requests computed at once (each a forward and a backward pass).",
    )
    explain_queue: int = Field(
        default=4,
        ge=0,
        le=1024,
        description=(
            "Explanation requests allowed to wait for a free slot; beyond it they get 503 "
            "with Retry-After at once."
        ),
    )
    explain_max_busy: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description=(
            "Largest share of the time an explain thread computes: after an explanation of "
            "t seconds it rests t * (1/share - 1) before the next. With the defaults, "
            "explanations take at most half a core from predictions."
        ),
    )
    explain_max_files: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Most images in one explanation request (413 beyond it).",
    )
    explain_threads: int = Field(
        default=1,
        ge=0,
        le=512,
        description=(
            "CPU intra-op threads of each explanation (0 = as many as the forward pass). "
            "Few, so that explanations leave the cores to predictions."
        ),
    )
    explain_cache_versions: int = Field(
        default=2,
        ge=1,
        le=64,
        description=(
            "Versions whose fp32 torch network is kept for explanations when the version is "
            "served by another backend or precision (each costs its weights' size in memory)."
        ),
    )

    # --- HTTP server (python -m app) --------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Address to bind; 0.0.0.0 in containers.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port to listen on.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="uvicorn worker processes; each loads its own copy of the models.",
    )
    keep_alive_s: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="Idle keep-alive timeout of HTTP connections.",
    )
    graceful_shutdown_s: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="On SIGTERM, how long in-flight requests get to finish before exit.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level of the service and uvicorn."
    )
    access_log: bool = Field(default=True, description="Log one line per HTTP request.")

    @field_validator("default_model")
    @classmethod
    def _model_name(cls, name: str) -> str:
        if not MODEL_NAME_RE.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a valid model name: use 1-64 characters a-z 0-9 . _ -, "
                "starting with a letter or digit"
            )
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        device = device.strip().lower()
        if not _DEVICE_RE.fullmatch(device):
            raise ValueError(f"{device!r} is not a device: use auto, cpu, cuda or cuda:N")
        return device

    @field_validator("admin_token")
    @classmethod
    def _token(cls, token: str | None) -> str | None:
        if token is None or token == "":
            return None
        if len(token) < 16:
            raise ValueError("the admin token must be at least 16 characters long")
        return token

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_file_bytes > self.max_request_bytes:
            raise ValueError(
                f"max_file_bytes ({self.max_file_bytes}) exceeds max_request_bytes "
                f"({self.max_request_bytes}): a file that large could never be uploaded"
            )
        if self.max_upload_memory_bytes < self.max_request_bytes:
            raise ValueError(
                f"max_upload_memory_bytes ({self.max_upload_memory_bytes}) is below "
                f"max_request_bytes ({self.max_request_bytes}): a request that large could "
                "never be read"
            )
        if self.max_queue_images < self.max_files_per_request:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) is below max_files_per_request "
                f"({self.max_files_per_request}): a full request could never be queued"
            )
        return self

    @property
    def admin_enabled(self) -> bool:
        return self.admin_token is not None


_SECRET_FIELDS = frozenset({"admin_token"})


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _unknown_variables() -> list[str]:
    """WASTE_* variables that are no setting (typos would otherwise be silently ignored)."""
    known = {env_name(field) for field in Settings.model_fields}
    problems = []
    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{name}: unknown setting{hint}")
    return problems


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (overrides win) and validate, or raise one precise SettingsError."""
    lines = _unknown_variables()
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            field = loc[0] if loc else ""
            name = env_name(field) if field in Settings.model_fields else "settings"
            raw = overrides.get(field, os.environ.get(name)) if field else None
            shown = f"={raw!r}" if raw is not None else ""
            if field in _SECRET_FIELDS and raw is not None:
                shown = f"=<{len(str(raw))} characters, not shown>"  # a secret, even if bad
            message = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"{name}{shown}: {message}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
    if lines:
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines))
    return settings


def describe_settings() -> str:
    """Every setting with its environment variable, default and meaning (for --help)."""
    rows = []
    for field, info in Settings.model_fields.items():
        default = info.default
        shown = "unset" if default is None else str(default)
        rows.append(f"  {env_name(field)} (default: {shown})\n      {info.description}")
    return "\n".join(rows)
