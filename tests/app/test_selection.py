"""Backend and precision selection: the candidate order per device, impossible settings,
and the capability probes (CUDA and CPU features are injected, so this runs on any CPU)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.backends import ort_providers_for
from app.main import create_app
from app.selection import (
    ORT_CUDA,
    ORT_TENSORRT,
    Capabilities,
    Choice,
    candidates,
    cpu_flags,
    cpu_has_native_bf16,
    probe_capabilities,
)
from app.settings import SettingsError, load_settings

CPU_EP = "CPUExecutionProvider"
CPU = Capabilities(torch.device("cpu"), cpu_bf16=False, ort_providers=(CPU_EP,))
CPU_BF16 = replace(CPU, cpu_bf16=True)
AMPERE = Capabilities(torch.device("cuda:0"), cuda_capability=(8, 0), ort_providers=(CPU_EP,))
TURING = replace(AMPERE, cuda_capability=(7, 5))
AMPERE_ORT = replace(AMPERE, ort_providers=(ORT_CUDA, CPU_EP))
AMPERE_TRT = replace(AMPERE, ort_providers=(ORT_TENSORRT, ORT_CUDA, CPU_EP))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("WASTE_"):
            monkeypatch.delenv(name)


def chosen(caps: Capabilities, **settings: object) -> list[str]:
    return [str(c) for c in candidates(load_settings(**settings), caps)]


@pytest.mark.parametrize(
    ("caps", "backend", "precision", "expected"),
    [
        # CPU: int8 > ONNX Runtime fp32 > torch fp32; bf16 only when asked.
        (CPU_BF16, "auto", "auto", ["onnxruntime int8", "onnxruntime fp32", "torch fp32"]),
        (CPU, "auto", "fp32", ["onnxruntime fp32", "torch fp32"]),
        (CPU, "auto", "int8", ["onnxruntime int8"]),
        (CPU_BF16, "auto", "bf16", ["torch bf16"]),
        (CPU, "torch", "auto", ["torch fp32"]),
        (CPU, "torch", "fp32", ["torch fp32"]),
        (CPU_BF16, "torch", "bf16", ["torch bf16"]),
        (CPU, "onnxruntime", "auto", ["onnxruntime int8", "onnxruntime fp32"]),
        (CPU, "onnxruntime", "fp32", ["onnxruntime fp32"]),
        (CPU, "onnxruntime", "int8", ["onnxruntime int8"]),
        # CUDA: torch half precision unless told otherwise; bf16 from compute capability 8.0.
        (AMPERE, "auto", "auto", ["torch bf16"]),
        (TURING, "auto", "auto", ["torch fp16"]),
        (AMPERE_TRT, "auto", "auto", ["torch bf16"]),
        (AMPERE, "auto", "fp32", ["torch fp32"]),
        (TURING, "torch", "fp16", ["torch fp16"]),
        (AMPERE, "torch", "bf16", ["torch bf16"]),
        (AMPERE_ORT, "onnxruntime", "auto", ["onnxruntime fp32"]),
        (AMPERE_TRT, "onnxruntime", "auto", ["onnxruntime int8", "onnxruntime fp32"]),
        (AMPERE_TRT, "onnxruntime", "fp32", ["onnxruntime fp32"]),
        (AMPERE_TRT, "auto", "int8", ["onnxruntime int8"]),
    ],
)
def test_candidates_in_order(
    caps: Capabilities, backend: str, precision: str, expected: list[str]
) -> None:
    assert chosen(caps, backend=backend, precision=precision) == expected


def test_only_auto_precision_vets_int8_agreement() -> None:
    auto = candidates(load_settings(), CPU)
    assert auto[0] == Choice("onnxruntime", "int8", vetted=True)
    assert not any(c.vetted for c in auto[1:])
    explicit = candidates(load_settings(precision="int8"), CPU)
    assert explicit == [Choice("onnxruntime", "int8", vetted=False)]


@pytest.mark.parametrize(
    ("caps", "settings", "fragments"),
    [
        (
            CPU,
            {"backend": "torch", "precision": "int8"},
            ["WASTE_PRECISION=int8 needs WASTE_BACKEND=onnxruntime"],
        ),
        (
            CPU,
            {"precision": "fp16"},
            ["WASTE_PRECISION=fp16 needs a CUDA device", "WASTE_DEVICE=auto"],
        ),
        (
            CPU,
            {"backend": "onnxruntime", "precision": "fp16"},
            ["WASTE_BACKEND=onnxruntime", "fp32 and int8"],
        ),
        (
            CPU_BF16,
            {"backend": "onnxruntime", "precision": "bf16"},
            ["WASTE_BACKEND=onnxruntime", "WASTE_PRECISION=bf16"],
        ),
        (CPU, {"precision": "bf16"}, ["WASTE_PRECISION=bf16 on CPU", "native bf16"]),
        (CPU, {"backend": "torch", "precision": "bf16"}, ["WASTE_PRECISION=bf16 on CPU"]),
        (TURING, {"precision": "bf16"}, ["WASTE_PRECISION=bf16", "8.0", "compute capability 7.5"]),
        (AMPERE, {"precision": "int8"}, ["WASTE_PRECISION=int8 on CUDA", ORT_TENSORRT]),
        (AMPERE_ORT, {"precision": "int8"}, ["WASTE_PRECISION=int8 on CUDA", ORT_TENSORRT]),
        (
            AMPERE,
            {"backend": "onnxruntime"},
            ["WASTE_BACKEND=onnxruntime on CUDA", "onnxruntime-gpu"],
        ),
        (CPU, {"cuda_graphs": True}, ["WASTE_CUDA_GRAPHS=true needs a CUDA device"]),
        (
            AMPERE_ORT,
            {"cuda_graphs": True, "backend": "onnxruntime"},
            ["WASTE_CUDA_GRAPHS", "torch backend"],
        ),
    ],
)
def test_impossible_combinations_name_the_variables(
    caps: Capabilities, settings: dict[str, object], fragments: list[str]
) -> None:
    with pytest.raises(SettingsError) as info:
        candidates(load_settings(**settings), caps)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_cuda_graphs_are_allowed_with_torch_on_cuda() -> None:
    assert chosen(AMPERE, cuda_graphs=True) == ["torch bf16"]


def test_execution_providers_only_those_installed_and_cpu_last() -> None:
    fp32, int8 = Choice("onnxruntime", "fp32"), Choice("onnxruntime", "int8")
    assert ort_providers_for(fp32, CPU) == [CPU_EP]
    assert ort_providers_for(fp32, AMPERE_ORT) == [(ORT_CUDA, {"device_id": 0}), CPU_EP]
    trt = ort_providers_for(int8, replace(AMPERE_TRT, device=torch.device("cuda:1")))
    assert trt == [(ORT_TENSORRT, {"device_id": 1, "trt_int8_enable": True}), CPU_EP]
    names = [p if isinstance(p, str) else p[0] for p in ort_providers_for(fp32, AMPERE_TRT)]
    assert names == [ORT_TENSORRT, ORT_CUDA, CPU_EP]


@pytest.mark.parametrize(
    ("line", "native"),
    [
        ("flags\t\t: fpu sse avx512f avx512_vnni avx512_bf16 amx_tile", True),
        ("flags\t\t: fpu sse avx512f avx512bw avx512_vnni", False),  # AVX-512 without BF16
        ("flags\t\t: fpu sse avx2 amx_bf16 amx_tile", True),
        ("Features\t: fp asimd bf16 i8mm", True),  # aarch64
        ("Features\t: fp asimd", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, native: bool
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\n{line}\n\nprocessor\t: 1\n")
    flags = cpu_flags(str(cpuinfo))
    assert ("avx512_bf16" in flags or "amx_bf16" in flags or "bf16" in flags) is native
    monkeypatch.setattr("app.selection.cpu_flags", lambda: flags)
    assert cpu_has_native_bf16() is native


def test_unreadable_cpuinfo_means_no_native_bf16(tmp_path: Path) -> None:
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_probes_on_cpu_and_a_patched_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = probe_capabilities(torch.device("cpu"))
    assert caps.cuda_capability is None and not caps.cuda
    assert CPU_EP in caps.ort_providers
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    gpu = probe_capabilities(torch.device("cuda:0"))
    assert gpu.cuda and gpu.cuda_capability == (7, 5) and not gpu.cuda_bf16


def test_the_service_refuses_to_start_with_bf16_on_a_cpu_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.selection.cpu_has_native_bf16", lambda: False)
    settings = load_settings(model_dir=tmp_path, device="cpu", precision="bf16")
    with pytest.raises(SettingsError, match="WASTE_PRECISION=bf16 on CPU"):
        create_app(settings)
    monkeypatch.setattr("app.selection.cpu_has_native_bf16", lambda: True)
    create_app(settings)  # the same settings start on a CPU with native bf16
