"""Raw speed of every serving backend and precision on the same version, in one run.

Publishes a randomly initialised ResNet-18-CBAM (224 px) into a temporary repository,
exports it to ``model.onnx`` (``torch.onnx.export``) and ``model.int8.onnx`` (ONNX
Runtime's static QDQ quantisation, calibrated on random images: fine for speed, not for
accuracy), then opens each choice through the service's own code (``app.backends``) and
times ``forward`` on one fixed uint8 batch: normalisation, the network and the copy of
the logits, nothing else. Rounds alternate between the choices; the median round is
printed with the CPU time per image (all threads), which shifts less than wall time
when other work shares the machine.

    python benchmarks/backends_raw.py                         # batch 8, 3 rounds of 5 s
    python benchmarks/backends_raw.py --batch 32 --rounds 5 --threads 2

Needs the ``train`` extra (onnx, onnxscript) for the export.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as python -m app does

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

import numpy as np
import torch

from app.backends import Backend, open_backend
from app.inference import usable_cores
from app.selection import Choice, probe_capabilities
from wastenet.artifacts import load_version, publish_version, read_metadata, sha256_file
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import (
    METADATA_FILE,
    ONNX_FILE,
    ONNX_INT8_FILE,
    AgreementReport,
    ClassAgreement,
    ExportedFile,
    Preprocessing,
    Quantization,
)

MODEL = "bench-resnet18-cbam"


def publish_random(repo: Path, name: str, prep: Preprocessing) -> Path:
    """Publish a randomly initialised ResNet-18-CBAM (seed 0): speed only, no accuracy."""
    torch.manual_seed(0)
    config = ModelConfig()
    evaluation = {
        "split": "none",
        "num_samples": 0,
        "accuracy": 0.0,
        "macro_f1": 0.0,
        "per_class_f1": dict.fromkeys(CLASS_NAMES, 0.0),
    }
    ref = publish_version(
        repo, name, build_model(config), config, CLASS_NAMES, evaluation, prep,
        description="randomly initialised, for benchmarks only",
    )  # fmt: skip
    return ref.path


def publish(repo: Path, input_size: int) -> Path:
    prep = Preprocessing(resize_size=input_size * 8 // 7, input_size=input_size)
    return publish_random(repo, MODEL, prep)


def export(version_dir: Path, input_size: int, calibration_images: int = 16) -> None:
    """Write model.onnx and model.int8.onnx into the version and list them in model.json."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = load_version(version_dir).model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(2, 3, input_size, input_size),),
        str(version_dir / ONNX_FILE),
        dynamo=True,
        external_data=False,
        opset_version=18,
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}},
        input_names=["input"],
        output_names=["logits"],
        verbose=False,
    )
    rng = np.random.default_rng(0)
    shape = (1, 3, input_size, input_size)
    batches = iter(
        [{"input": rng.normal(0, 1, shape).astype(np.float32)} for _ in range(calibration_images)]
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(version_dir / ONNX_FILE), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(version_dir / ONNX_INT8_FILE),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    _record_exports(version_dir, calibration_images)


def _record_exports(version_dir: Path, calibration_images: int) -> None:
    common = {"opset": 18, "input_name": "input", "output_name": "logits"}
    fp32 = ExportedFile(
        file=ONNX_FILE, precision="fp32", sha256=sha256_file(version_dir / ONNX_FILE), **common
    )
    unmeasured = ClassAgreement(num_samples=0, top1_agreement=0.0, max_prob_diff=0.0)
    int8 = ExportedFile(
        file=ONNX_INT8_FILE,
        precision="int8",
        sha256=sha256_file(version_dir / ONNX_INT8_FILE),
        quantization=Quantization(
            method="onnxruntime static QDQ, per-channel",
            activation_type="QUInt8",
            weight_type="QInt8",
            calibration_source="random normal images (speed benchmark only)",
            calibration_images=calibration_images,
        ),
        agreement=AgreementReport(  # not measured: random weights, speed only
            split="none",
            num_samples=1,
            top1_agreement=0.0,
            max_prob_diff=0.0,
            per_class=dict.fromkeys(CLASS_NAMES, unmeasured),
            threshold=0.0,
        ),
        **common,
    )
    metadata = read_metadata(version_dir).model_copy(update={"exports": [fp32, int8]})
    (version_dir / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n")


def measure(
    backend: Backend, batch: np.ndarray, seconds: float, warmup_s: float
) -> tuple[float, float]:
    """(images per wall second, CPU milliseconds per image) of ``backend.forward``."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        backend.forward(batch)
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        backend.forward(batch)
        count += batch.shape[0]
    wall = time.perf_counter() - start
    return count / wall, (time.process_time() - cpu) / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = cores)")
    args = parser.parse_args()
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    caps = probe_capabilities(torch.device("cpu"))
    choices = [
        Choice("torch", "fp32"),
        Choice("onnxruntime", "fp32"),
        Choice("onnxruntime", "int8"),
    ]
    if caps.cpu_bf16:
        choices.insert(1, Choice("torch", "bf16"))
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    worker = ThreadPoolExecutor(1)  # a worker thread, like the service's inference thread
    with tempfile.TemporaryDirectory() as tmp:
        version_dir = publish(Path(tmp) / "models", args.size)
        print(f"exporting {version_dir} ...", file=sys.stderr)
        export(version_dir, args.size)
        backends = {}
        for choice in choices:
            loaded = load_version(version_dir)
            backends[str(choice)], _ = open_backend(
                [choice], loaded, caps, threads=threads, max_batch_size=args.batch
            )
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
        for round_ in range(args.rounds):
            for name, backend in backends.items():
                job = worker.submit(measure, backend, batch, args.seconds, args.warmup)
                results[name].append(job.result())
                print(
                    f"round {round_ + 1}: {name}: {results[name][-1][0]:.1f} img/s", file=sys.stderr
                )
    base = statistics.median(r[0] for r in results["torch fp32"])
    print(
        f"batch {args.batch}, {args.size} px, {threads} threads, {usable_cores()} usable cores, "
        f"torch {torch.__version__}, median of {args.rounds} rounds of {args.seconds:g} s"
    )
    print(f"{'backend':<18} {'img/s':>8} {'vs torch fp32':>14} {'CPU ms/img':>11}  rounds (img/s)")
    for name, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        per_round = ", ".join(f"{r[0]:.1f}" for r in runs)
        print(f"{name:<18} {rate:8.1f} {rate / base:14.2f} {cpu:11.2f}  {per_round}")


if __name__ == "__main__":
    main()
