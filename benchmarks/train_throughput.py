"""Training throughput: the train step alone vs. the full loop with JPEG loading, one run.

    .venv/bin/python benchmarks/train_throughput.py               # CPU or CUDA, auto
    .venv/bin/python benchmarks/train_throughput.py --device cuda --input-size 224 --batch-size 128

Both figures use the same ``training.engine.train_one_epoch``; only the data source differs:
(a) pre-made batches already on the device, (b) the training DataLoader decoding and
augmenting synthetic JPEG files (``training.synth``) with the trainer's sampler, seeding
and worker settings. Rounds alternate a/b and the median is reported, so a shared or
noisy machine affects both alike. The target on a 2-core CPU is full/step >= 0.80.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.augment import train_transform
from training.config import TrainConfig
from training.data import ImageDataset, prepare_splits
from training.distributed import DistContext, resolve_device
from training.engine import train_one_epoch
from training.loaders import auto_num_workers, build_train_loader, set_loader_epoch
from training.synth import generate_synthetic_dataset
from training.trainer import amp_settings
from wastenet.nets import ModelConfig, build_model
from wastenet.schema import Preprocessing


def _r(values: list[float]) -> list[float]:
    return [round(v, 1) for v in values]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--cbam", default="block")
    ap.add_argument("--input-size", type=int, default=64, help="network input (default 64)")
    ap.add_argument("--image-size", type=int, default=160, help="JPEG side on disk (default 160)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds of each")
    ap.add_argument("--num-workers", default="auto", help="DataLoader workers or 'auto'")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    args = ap.parse_args()

    device = resolve_device(args.device)
    ctx = DistContext(0, 1, 0, device, None)
    workers = auto_num_workers(device) if args.num_workers == "auto" else int(args.num_workers)
    amp_dtype, use_scaler = amp_settings(args.amp, device)
    channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n_images = args.steps * args.batch_size
    per_class = -(-n_images // 12) + 2

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data = Path(tmp) / "data"
        generate_synthetic_dataset(data, images_per_class=per_class, size=args.image_size, seed=0)
        splits = prepare_splits(data, val_fraction=0.01, test_fraction=0.01, log=lambda _m: None)
        config = TrainConfig(
            preprocessing=Preprocessing(input_size=args.input_size, resize_size=args.input_size)
        )
        dataset = ImageDataset(
            splits.train[:n_images], train_transform(config.preprocessing, config.augment)
        )
        loader = build_train_loader(dataset, args.batch_size, 0, ctx, workers)

        model = build_model(ModelConfig(arch=args.arch, cbam=args.cbam)).to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None

        images, targets = next(iter(loader))
        premade = [(images.to(device), targets.to(device))] * args.steps

        def run(source: object, epoch: int) -> float:
            if source is loader:
                set_loader_epoch(loader, epoch)
            stats = train_one_epoch(
                model,
                source,
                criterion,
                optimizer,
                device,  # type: ignore[arg-type]
                scaler=scaler,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            return float(stats["images_per_s"])

        # Warm-up: kernels, allocator, and the persistent loader workers.
        run(premade[:2], 0)
        run(list(itertools.islice(iter(loader), 2)), 0)
        step_rates, full_rates = [], []
        for r in range(args.rounds):
            step_rates.append(run(premade, r))
            full_rates.append(run(loader, r))
        load_start = time.perf_counter()
        seen = sum(int(t.numel()) for _, t in loader)
        load_rate = seen / (time.perf_counter() - load_start)

    step = statistics.median(step_rates)
    full = statistics.median(full_rates)
    # Adjacent rounds share the machine's load at that moment; their ratio is the robust one.
    pair_ratio = statistics.median(f / s for s, f in zip(step_rates, full_rates, strict=True))
    spread = max(step_rates) / min(step_rates)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {device} ({name}); {args.arch} cbam={args.cbam}; input {args.input_size}px "
        f"from {args.image_size}px JPEGs; batch {args.batch_size}; {workers} loader workers; "
        f"amp {amp_dtype or 'off'}"
    )
    print(
        f"train step alone (tensors on device): {step:7.1f} img/s median, rounds {_r(step_rates)}"
    )
    print(
        f"full loop (JPEG decode + augment):    {full:7.1f} img/s median, rounds {_r(full_rates)}"
    )
    print(f"data loading alone:                   {load_rate:8.1f} images/s")
    print(
        f"best rounds: step {max(step_rates):.1f}, full {max(full_rates):.1f} images/s "
        f"(ratio {max(full_rates) / max(step_rates):.3f})"
    )
    print(f"noise: fastest/slowest train-step round = {spread:.2f}x")
    print(f"ratio full / step (median of adjacent rounds): {pair_ratio:.3f} (target >= 0.80)")


if __name__ == "__main__":
    main()
