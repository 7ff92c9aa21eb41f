"""Which backend and precision may serve, on this device: the rules in one place.

Two steps. At start-up, :func:`candidates` turns ``WASTE_DEVICE``/``WASTE_BACKEND``/
``WASTE_PRECISION`` and what the machine can do (:class:`Capabilities`, probed once) into
the ordered list of (backend, precision) choices to try, fastest first, or a
:class:`~app.settings.SettingsError` naming the variables of an impossible combination.
At load, every version tries that list in order (:func:`app.backends.open_backend`): a
choice the version cannot take (no exported file, a tampered one) is skipped with its
reason, and when nothing is left the version fails with all the reasons.

Order, measured on a 2-core AVX-512 CPU (README, Serving): ONNX Runtime int8 before ONNX
Runtime fp32 before torch fp32. torch bf16 is faster than ONNX Runtime fp32 there, but no
agreement with fp32 is recorded for it, so it runs only when asked. On CUDA, torch in
half precision (bf16 from compute capability 8.0, else fp16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from app.settings import Settings, SettingsError

log = logging.getLogger("app.selection")

BackendName = Literal["torch", "onnxruntime"]
PrecisionName = Literal["fp32", "fp16", "bf16", "int8"]

ORT_CUDA = "CUDAExecutionProvider"
ORT_TENSORRT = "TensorrtExecutionProvider"
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags, aarch64 feature


@dataclass(frozen=True)
class Choice:
    """One way to serve: a backend at a precision.

    ``vetted``: taken only when the exported file's recorded agreement with fp32 met its
    threshold (an int8 file published with ``--force`` below it is skipped by ``auto``).
    """

    backend: BackendName
    precision: PrecisionName
    vetted: bool = False

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass(frozen=True)
class Capabilities:
    """What the device can run, probed once at start-up (tests build their own)."""

    device: torch.device
    cpu_bf16: bool = False
    cuda_capability: tuple[int, int] | None = None
    ort_providers: tuple[str, ...] = field(default_factory=tuple)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def cuda_bf16(self) -> bool:
        return self.cuda_capability is not None and self.cuda_capability >= (8, 0)


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


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, aarch64 ``Features``); empty when unknown."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16, AMX-BF16 or Arm BF16).

    oneDNN also runs bf16 on plain AVX-512 by emulation, slower than fp32, which is why
    torch's own check (mkldnn bf16 "supported") is not used here.
    """
    return bool(cpu_flags() & BF16_CPU_FLAGS)


def ort_providers() -> tuple[str, ...]:
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


def probe_capabilities(device: torch.device) -> Capabilities:
    capability = None
    if device.type == "cuda":  # CUDA-only probe
        capability = torch.cuda.get_device_capability(device)
    return Capabilities(
        device=device,
        cpu_bf16=cpu_has_native_bf16(),
        cuda_capability=capability,
        ort_providers=ort_providers(),
    )


def candidates(settings: Settings, caps: Capabilities) -> list[Choice]:
    """The choices every version tries, in order; SettingsError for impossible settings."""
    backend, precision = settings.backend, settings.precision
    if backend == "torch" and precision == "int8":
        raise SettingsError(
            "WASTE_PRECISION=int8 needs WASTE_BACKEND=onnxruntime or auto "
            "(int8 is served from a version's model.int8.onnx); WASTE_BACKEND=torch serves "
            "fp32, bf16 or fp16"
        )
    if backend == "onnxruntime" and precision in ("fp16", "bf16"):
        raise SettingsError(
            f"WASTE_BACKEND=onnxruntime with WASTE_PRECISION={precision}: ONNX Runtime serves "
            "the exported fp32 and int8 files; use WASTE_BACKEND=torch (or auto) for "
            f"{precision}"
        )
    choices = _cuda_choices(settings, caps) if caps.cuda else _cpu_choices(settings, caps)
    if settings.cuda_graphs:
        _check_cuda_graphs(caps, choices)
    return choices


def _cpu_choices(settings: Settings, caps: Capabilities) -> list[Choice]:
    backend, precision = settings.backend, settings.precision
    if precision == "fp16":
        raise SettingsError(
            f"WASTE_PRECISION=fp16 needs a CUDA device (WASTE_DEVICE={settings.device} "
            f"resolves to {caps.device}); on CPU use auto, fp32, int8 or bf16"
        )
    if precision == "bf16":
        if not caps.cpu_bf16:
            raise SettingsError(
                f"WASTE_PRECISION=bf16 on CPU (WASTE_DEVICE={settings.device}) needs native "
                "bf16 (AVX512-BF16, AMX or Arm BF16), which this CPU lacks (it would be "
                "emulated, slower than fp32); use auto or fp32"
            )
        return [Choice("torch", "bf16")]
    int8 = Choice("onnxruntime", "int8", vetted=precision == "auto")
    ort_fp32, torch_fp32 = Choice("onnxruntime", "fp32"), Choice("torch", "fp32")
    if precision == "int8":
        return [int8]
    if backend == "torch":
        return [torch_fp32]
    ort = [ort_fp32] if precision == "fp32" else [int8, ort_fp32]
    return ort if backend == "onnxruntime" else [*ort, torch_fp32]


def _cuda_choices(settings: Settings, caps: Capabilities) -> list[Choice]:
    backend, precision = settings.backend, settings.precision
    if precision == "bf16" and not caps.cuda_bf16:
        raise SettingsError(
            f"WASTE_PRECISION=bf16 needs a GPU of compute capability 8.0 or newer; "
            f"{caps.device} has {_capability_text(caps)}: use fp16, fp32 or auto"
        )
    has_trt = ORT_TENSORRT in caps.ort_providers
    if backend == "onnxruntime" or precision == "int8":
        if precision == "int8" and not has_trt:
            raise SettingsError(
                "WASTE_PRECISION=int8 on CUDA needs ONNX Runtime's TensorrtExecutionProvider "
                f"(available: {', '.join(caps.ort_providers) or 'none'}); use auto, fp16, bf16 "
                "or fp32, or WASTE_DEVICE=cpu"
            )
        if not (has_trt or ORT_CUDA in caps.ort_providers):
            raise SettingsError(
                "WASTE_BACKEND=onnxruntime on CUDA needs onnxruntime-gpu with the CUDA or "
                "TensorRT execution provider (available: "
                f"{', '.join(caps.ort_providers) or 'none'}); use WASTE_BACKEND=auto or torch"
            )
        int8 = Choice("onnxruntime", "int8", vetted=precision == "auto")
        fp32 = Choice("onnxruntime", "fp32")
        if precision == "int8":
            return [int8]
        if precision == "fp32" or not has_trt:
            return [fp32]
        return [int8, fp32]
    if precision == "auto":
        return [Choice("torch", "bf16" if caps.cuda_bf16 else "fp16")]
    return [Choice("torch", precision)]


def _check_cuda_graphs(caps: Capabilities, choices: list[Choice]) -> None:
    if not caps.cuda:
        raise SettingsError(
            f"WASTE_CUDA_GRAPHS=true needs a CUDA device (the device is {caps.device})"
        )
    if any(c.backend != "torch" for c in choices):
        raise SettingsError(
            "WASTE_CUDA_GRAPHS=true is for the torch backend; set WASTE_BACKEND=torch or auto "
            "and a precision other than int8"
        )


def _capability_text(caps: Capabilities) -> str:
    if caps.cuda_capability is None:
        return "an unknown compute capability"
    major, minor = caps.cuda_capability
    return f"compute capability {major}.{minor}"


def resolve(settings: Settings) -> tuple[Capabilities, list[Choice]]:
    """Device, probes and candidate list for these settings (SettingsError when impossible)."""
    device = resolve_device(settings.device)
    caps = probe_capabilities(device)
    choices = candidates(settings, caps)
    log.debug("capabilities %s; candidates %s", caps, ", ".join(map(str, choices)))
    return caps, choices
