"""A demo model for an empty model repository, trained in about a minute on synthetic images.

The service calls ``bootstrap_demo`` when it finds no model, so that a fresh install
answers requests. The result is a DEMO: a small ResNet-18-CBAM trained from random
weights on drawn (synthetic) images, and its description says so.

The version ships both ONNX exports, so that the service's fastest backend serves it.
An int8 file below the agreement threshold is left out rather than forced (the log says
why, and the fp32 ONNX file still serves): the service would not pick a forced file by
itself anyway, and the demo should not ship a number it would refuse elsewhere.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sklearn.metrics  # noqa: F401  (import-time check: the training extras are installed)
import torch

from training.config import TrainConfig
from training.export import ExportConfig
from training.publish import publish_run
from training.synth import generate_synthetic_dataset
from training.trainer import train
from wastenet.artifacts import VersionRef
from wastenet.schema import Preprocessing

DEMO_DESCRIPTION = (
    "DEMO model: a small ResNet-18-CBAM trained for about a minute from random weights on "
    "SYNTHETIC drawn images (not photos of waste), so that the service has something to "
    "serve. Its predictions on real photos are meaningless. Train a real model with "
    "`python -m training train --data <dataset> --publish models/`."
)
# The stem convolution stays fp32: on three runs with the demo's settings (48 px, barely
# trained, so near-ties everywhere) no test image changed its top-1 class with
# conv-keep-stem, against 3 of 216 with the default conv recipe (README, "Export and
# quantisation"). With 72 test images one changed image is already below 0.99.
DEMO_EXPORT = ExportConfig(int8=True, calibration_images=128, quant_recipe="conv-keep-stem")
# Exporting, quantising and measuring the demo network take about 15 s on 2 cores (mostly
# torch.onnx.export's tracing); the training time limit leaves room for them.
EXPORT_S = 15.0


def _seconds_per_epoch(config: TrainConfig, train_images: int) -> float:
    """Time two training steps of the demo network on random tensors (after one warm-up)."""
    from wastenet.nets import build_model

    model = build_model(config.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    size = config.preprocessing.input_size
    x = torch.randn(config.batch_size, 3, size, size)
    y = torch.randint(0, config.model.num_classes, (config.batch_size,))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    per_image = min(times[1:]) / config.batch_size
    # Data loading, validation and checkpoints add roughly a third.
    return 1.35 * per_image * train_images


def bootstrap_demo(
    repo: Path,
    name: str = "waste-resnet18-cbam",
    log: Callable[[str], None] = print,
    *,
    budget_s: float = 60.0,
    images_per_class: int = 40,
    image_size: int = 64,
    input_size: int = 48,
    seed: int = 0,
    export: ExportConfig | None = DEMO_EXPORT,
) -> VersionRef:
    """Generate synthetic data, train for about ``budget_s`` seconds, evaluate, publish
    (with the ONNX files of ``export``, leaving out one below its agreement threshold).

    Returns the published version. Needs only the training extras (no pretrained weights,
    no dataset, no network access); importing this module fails with ImportError when they
    are missing, which is what the service checks.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="waste-demo-") as tmp:
        data = Path(tmp) / "data"
        log(f"demo: drawing {images_per_class * 12} synthetic images ({image_size}px)")
        generate_synthetic_dataset(
            data, images_per_class=images_per_class, size=image_size, seed=seed
        )
        base = TrainConfig(
            data_dir=data,
            out_dir=Path(tmp) / "run",
            pretrained=False,
            strategy="differential",
            epochs=2,
            lr_backbone=2e-3,
            lr_attention=2e-3,
            lr_head=2e-3,
            warmup_epochs=0.5,
            label_smoothing=0.0,
            preprocessing=Preprocessing(
                input_size=input_size, resize_size=round(input_size * 8 / 7)
            ),
            batch_size=32,
            num_workers=0,
            verify_images=False,
            progress=False,
            plots=False,
            seed=seed,
            device="cpu",
        )
        train_images = round(images_per_class * 12 * (1 - base.val_fraction - base.test_fraction))
        reserve = EXPORT_S if export is not None and export.precisions else 0.0
        remaining = budget_s - reserve - (time.monotonic() - started)
        epochs = int(max(2, min(40, (remaining - 5.0) / _seconds_per_epoch(base, train_images))))
        # Test evaluation and publishing take a few seconds after the time limit.
        limit = max(5.0, remaining - 5.0)
        config = base.model_copy(update={"epochs": epochs, "time_limit_s": limit})
        log(f"demo: training resnet18-cbam from scratch for {epochs} epochs at {input_size}px")
        result = train(config, log=lambda m: log(f"demo: {m}"))
        ref = publish_run(
            result.run_dir,
            repo,
            name,
            DEMO_DESCRIPTION,
            extra={"demo": True},
            export=export,
            drop_refused=True,
            log=lambda m: log(f"demo: {m}"),
        )
    acc = (result.metrics or {}).get("accuracy", float("nan"))
    log(
        f"demo: published {ref.name} version {ref.version} (synthetic test accuracy {acc:.2f}, "
        f"{time.monotonic() - started:.0f}s)"
    )
    return ref
