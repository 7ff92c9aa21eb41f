"""How CBAM's starting point affects a pretrained backbone at step 0 and the gates' learning.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cbam_start.py --work /tmp/cbam-start

No ImageNet weights exist offline, so a stand-in "pretrained" ResNet-18 (torchvision's
own model and names) is first trained on six classes of the synthetic set (seed 1, its
own images); that file then plays the ImageNet checkpoint. Starts compared:

- ``folded`` (ours): both gates around sigmoid(0) = 0.5 (channel logit layer at zero,
  spatial BatchNorm weight 0.3), and the factor 0.25 folded into the pretrained layer next
  to each CBAM (where it cannot be folded, in block_post, that CBAM starts at 0.95);
- ``folded_constant``, ``folded_spatial1``: the same with spatial BatchNorm weight 0 (the
  official code's; both gates constant at step 0) or 1 (PyTorch's default);
- ``unfolded``: ours without the fold;
- ``near_identity``: the former start, gates at 0.95 with zero logit layers (no fold);
- ``textbook``: PyTorch's default initialisation of every CBAM layer (no fold).

Part 1 (step 0): accuracy of the stand-in's own six-class head on held-out images in eval
mode and in training mode (batch statistics, as the first training steps see it), and the
cosine similarity of the pooled features with the stand-in's, per CBAM placement.
Part 2 (learning): the trainer fine-tunes each start on the 12-class synthetic set
(seed 0) with cbam=block and reports test accuracy and the gate statistics before and
after training (``training.ablate.measure_gates``), at the default and a 10x attention LR.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import trainer
from training.ablate import load_test_images, measure_gates, trained_network
from training.config import TrainConfig
from training.synth import generate_synthetic_dataset, render_image
from wastenet.classes import CLASS_NAMES
from wastenet.nets import CBAM, ModelConfig, ResNet, build_model, load_pretrained
from wastenet.nets.cbam import NEAR_IDENTITY_START
from wastenet.schema import IMAGENET_MEAN, IMAGENET_STD

STARTS = ("folded", "folded_constant", "folded_spatial1", "unfolded", "near_identity", "textbook")
SPATIAL_WEIGHT = {"folded_constant": 0.0, "folded_spatial1": 1.0}
PRETRAIN_CLASSES = CLASS_NAMES[:6]


def _batch(images: list[Any]) -> Tensor:
    arr = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pretrain_data(
    size: int, per_class: int, held_out: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train x, train y, held-out x, held-out y) for the six stand-in classes, seed 1."""
    xs, ys, hx, hy = [], [], [], []
    for label, name in enumerate(PRETRAIN_CLASSES):
        for i in range(per_class + held_out):
            img = render_image(name, i, size=size, seed=1)
            (xs if i < per_class else hx).append(img)
            (ys if i < per_class else hy).append(label)
    return _batch(xs), torch.tensor(ys), _batch(hx), torch.tensor(hy)


def pretrain_standin(path: Path, data: tuple[Tensor, ...], epochs: int) -> None:
    x, y, hx, hy = data
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(PRETRAIN_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, 2e-3, total_steps=epochs * math.ceil(len(x) / 32)
    )
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for idx in order.split(32):
            xb = x[idx]
            flip = torch.rand(len(idx)) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"stand-in epoch {epoch + 1}/{epochs}: held-out acc {accuracy(model, hx, hy):.3f}")
    torch.save(model.state_dict(), path)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, train_mode: bool = False) -> float:
    """Top-1 accuracy; ``train_mode`` normalises with the batch's statistics (on a copy)."""
    if train_mode:
        model = copy.deepcopy(model).train()
    else:
        model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@contextmanager
def start(name: str) -> Iterator[None]:
    """Make ``load_pretrained`` (and the trainer's use of it) fold only for ``folded``."""
    fold = ResNet.fold_attention_start
    if not name.startswith("folded"):
        ResNet.fold_attention_start = lambda self: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        ResNet.fold_attention_start = fold  # type: ignore[method-assign]


@torch.no_grad()
def apply_start(model: nn.Module, name: str) -> None:
    for m in model.modules():
        if not isinstance(m, CBAM):
            continue
        last, bn = m.channel_gate.mlp[2], m.spatial_gate.bn
        if name in SPATIAL_WEIGHT:
            nn.init.constant_(bn.weight, SPATIAL_WEIGHT[name])
        elif name == "near_identity":
            m.reset_gates(NEAR_IDENTITY_START)
        elif name == "textbook":
            for layer in (m.channel_gate.mlp[0], last, m.spatial_gate.conv, bn):
                layer.reset_parameters()


def load_with_start(model: nn.Module, config: ModelConfig, file: Path, name: str) -> None:
    with start(name):
        load_pretrained(model, config, file)
    apply_start(model, name)


@torch.no_grad()
def step0(file: Path, hx: Tensor, hy: Tensor) -> list[dict[str, Any]]:
    standin = torchvision.models.resnet18(num_classes=len(PRETRAIN_CLASSES))
    standin.load_state_dict(torch.load(file, weights_only=True))
    standin.eval()
    plain = nn.Sequential(*list(standin.children())[:-1])(hx).flatten(1)
    rows = [
        {
            "placement": "(stand-in)",
            "start": "-",
            "accuracy": accuracy(standin, hx, hy),
            "train_mode_accuracy": accuracy(standin, hx, hy, train_mode=True),
        }
    ]
    for placement in ("block", "stage", "block_post"):
        for name in STARTS:
            config = ModelConfig(cbam=placement, num_classes=len(PRETRAIN_CLASSES))
            torch.manual_seed(0)
            model = build_model(config)
            load_with_start(model, config, file, name)
            model.fc.load_state_dict(standin.fc.state_dict())  # its own head, to score it
            model.eval()
            cos = nn.functional.cosine_similarity(model.forward_features(hx), plain)
            rows.append(
                {
                    "placement": placement,
                    "start": name,
                    "accuracy": accuracy(model, hx, hy),
                    "train_mode_accuracy": accuracy(model, hx, hy, train_mode=True),
                    "cos_min": float(cos.min()),
                    "cos_mean": float(cos.mean()),
                }
            )
            print(rows[-1])
    return rows


def finetune(work: Path, file: Path, epochs: int, lr_attention: float, name: str) -> dict[str, Any]:
    data = work / "target"
    config = TrainConfig.model_validate(
        {
            "data_dir": str(data),
            "out_dir": str(work / f"runs/{name}-lr{lr_attention:g}"),
            "pretrained_path": str(file),
            "input_size": 64,
            "resize_size": 72,
            "batch_size": 16,
            "num_workers": 0,
            "verify_images": False,
            "progress": False,
            "plots": False,
            "device": "cpu",
            "strategy": "differential",
            "epochs": epochs,
            "lr_attention": lr_attention,
            "model": {"cbam": "block"},
        }
    )
    real_load = trainer.load_pretrained

    def load(model: nn.Module, cfg: ModelConfig, path: Path, **kw: Any) -> Any:
        with start(name):
            report = real_load(model, cfg, path, **kw)
        apply_start(model, name)
        return report

    trainer.load_pretrained = load  # type: ignore[assignment]
    try:
        result = trainer.train(config, log=lambda _m: None)
    finally:
        trainer.load_pretrained = real_load
    images = load_test_images(result.run_dir / "splits.json", config)
    torch.manual_seed(config.seed)
    before = build_model(config.model)
    load_with_start(before, config.model, file, name)
    metrics = result.metrics or {}
    row = {
        "start": name,
        "lr_attention": lr_attention,
        "test_accuracy": metrics.get("accuracy"),
        "test_macro_f1": metrics.get("macro_f1"),
        "gates_before": measure_gates(before, images),
        "gates_after": measure_gates(trained_network(config, result.run_dir), images),
    }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data, weights, runs")
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--skip-step0", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    file = args.work / "standin-resnet18.pth"
    _, _, hx, hy = data = pretrain_data(64, per_class=80, held_out=30)
    if not file.is_file():
        pretrain_standin(file, data, args.pretrain_epochs)
    results: dict[str, Any] = {}
    if not args.skip_step0:
        results["step0"] = step0(file, hx, hy)
    if not args.skip_finetune:
        generate_synthetic_dataset(args.work / "target", images_per_class=40, size=72, seed=0)
        results["finetune"] = [
            finetune(args.work, file, args.finetune_epochs, lr, name)
            for lr in args.lrs
            for name in args.starts
        ]
    out = args.work / "cbam_start.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
