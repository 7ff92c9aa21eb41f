"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Where a fresh gate starts. Both gates start around sigmoid(0) = 0.5, where a sigmoid is
# steepest (slope 0.25), so they can move. The channel MLP's second linear layer starts
# at zero weight and bias, so the channel gate is exactly 0.5 for every image at step 0
# and gradients still reach every gate parameter after the first step (as with zero-init
# residual BNs). The spatial BatchNorm starts at weight SPATIAL_START_WEIGHT, bias 0: with
# weight 0 (the official code's choice) its 7x7 convolution gets no gradient and the gate
# stayed constant in fine-tuning runs of a few hundred steps; with PyTorch's weight 1 the
# gate varies enough at step 0 to cost a pretrained backbone accuracy in training mode.
# A fresh CBAM therefore scales its input by START_SCALE on average; loading pretrained
# weights folds 1 / START_SCALE into the pretrained layer next to each CBAM (see
# ``wastenet.nets.pretrained``), so a pretrained backbone keeps its function at step 0.
# Starting the gates near 1 instead (0.95) keeps that function without the fold, but the
# sigmoids then sit where their slope is 0.05 and the gates barely learn.
# Measurements: benchmarks/cbam_start.py and the README ("Initialisation").
GATE_START = 0.5
START_SCALE = GATE_START * GATE_START
SPATIAL_START_WEIGHT = 0.3
# Where a CBAM starts whose factor cannot be folded (its input is a sum with an identity
# path, as in block_post): 0.95 per gate, 0.9 in all. Measured with the stand-in pretrained
# ResNet-18 of benchmarks/cbam_start.py and block_post: held-out accuracy at step 0 was
# 0.167 (chance) at 0.5, 0.36 at 0.8, 0.63 at 0.9, 0.68 at 0.95 and 0.73 (the stand-in's)
# at 0.98; 0.95 keeps most of the function and a sigmoid slope of 0.05.
NEAR_IDENTITY_START = 0.95
# The official code's spatial BatchNorm momentum is 0.01; we keep PyTorch's 0.1 (see
# SpatialGate).
SPATIAL_BN_MOMENTUM = 0.1


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class ChannelGate(nn.Module):
    """One shared MLP over the average- and max-pooled descriptors, summed, sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels),
        )
        self.sigmoid = nn.Sigmoid()  # a module, so a hook can read Mc(F)

    def reset_gate(self, start: float = GATE_START) -> None:
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        # The MLP runs twice (avg and max) and the two logits are summed.
        nn.init.constant_(last.bias, _logit(start) / 2)

    def forward(self, x: Tensor) -> Tensor:
        avg_desc = F.adaptive_avg_pool2d(x, 1).flatten(1)
        max_desc = F.adaptive_max_pool2d(x, 1).flatten(1)
        logits = self.mlp(avg_desc) + self.mlp(max_desc)
        scale = self.sigmoid(logits)[:, :, None, None]
        return x * scale


class SpatialGate(nn.Module):
    """Channel-wise max and mean maps, a k x k convolution, BatchNorm, sigmoid.

    The BatchNorm keeps PyTorch's momentum 0.1, not the official code's 0.01: fine-tuning
    runs are hundreds to a few thousand steps, and with 0.01 the running statistics (the
    ones evaluation and the service use) need about 460 steps to reach 99% of the batch
    statistics, against 46 with 0.1. The official code trained 90 ImageNet epochs.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, momentum=SPATIAL_BN_MOMENTUM)
        self.sigmoid = nn.Sigmoid()  # a module, so a hook can read Ms(F')

    def reset_gate(self, start: float = GATE_START) -> None:
        nn.init.constant_(self.bn.weight, SPATIAL_START_WEIGHT)
        nn.init.constant_(self.bn.bias, _logit(start))

    def forward(self, x: Tensor) -> Tensor:
        max_map = x.amax(dim=1, keepdim=True)
        mean_map = x.mean(dim=1, keepdim=True)
        pooled = torch.cat([max_map, mean_map], dim=1)
        logits = self.bn(self.conv(pooled))
        scale = self.sigmoid(logits)
        return x * scale


class CBAM(nn.Module):
    """Channel attention, then spatial attention: x' = Mc(x) * x; x'' = Ms(x') * x'."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(kernel_size)
        self.reset_parameters()

    def reset_gates(self, start: float = GATE_START) -> None:
        """Both gates around ``start``: the channel gate exactly, the spatial gate on average."""
        self.channel_gate.reset_gate(start)
        self.spatial_gate.reset_gate(start)

    def reset_parameters(self) -> None:
        """PyTorch's default initialisation, then the gate start; networks call this after
        their own model-wide init loops, so that CBAM starts the same in every network."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.BatchNorm2d):
                m.reset_parameters()
        self.reset_gates()

    def forward(self, x: Tensor) -> Tensor:
        out = self.channel_gate(x)
        out = self.spatial_gate(out)
        return out


@dataclass
class GateRecord:
    """Gate maps seen while ``record_gates`` was active, per CBAM module name, one tensor
    per forward: ``channel`` Mc as (N, C), ``spatial`` Ms as (N, 1, H, W). Detached."""

    channel: dict[str, list[Tensor]] = field(default_factory=dict)
    spatial: dict[str, list[Tensor]] = field(default_factory=dict)


def _keep_in(store: dict[str, list[Tensor]], name: str, owner: int) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: tuple[Tensor, ...], output: Tensor) -> None:
        # Another thread may run the same model meanwhile (the service does); its gates
        # are not ours to record.
        if threading.get_ident() == owner:
            store.setdefault(name, []).append(output.detach())

    return hook


@contextmanager
def record_gates(model: nn.Module) -> Iterator[GateRecord]:
    """Record every CBAM gate map of the forwards that this thread runs through ``model``.

    The hooks are removed on exit, also after an error; forwards in other threads are
    neither recorded nor changed.
    """
    owner = threading.get_ident()
    record = GateRecord()
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CBAM):
            channel_hook = _keep_in(record.channel, name, owner)
            spatial_hook = _keep_in(record.spatial, name, owner)
            handles.append(module.channel_gate.sigmoid.register_forward_hook(channel_hook))
            handles.append(module.spatial_gate.sigmoid.register_forward_hook(spatial_hook))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _channel_stats(gates: Tensor) -> dict[str, float]:
    """(N, C) gates: overall mean and std, and std over images averaged over channels."""
    return {
        "mean": float(gates.mean()),
        "std": float(gates.std(correction=0)),
        "image_std": float(gates.std(dim=0, correction=0).mean()),
    }


def _spatial_stats(gates: Tensor) -> dict[str, float]:
    """(N, 1, H, W) gates: as the channel stats, plus the spread over positions within an
    image (averaged over images): how much the map singles out some places."""
    flat = gates.flatten(1)
    return {
        "mean": float(flat.mean()),
        "std": float(flat.std(correction=0)),
        "image_std": float(flat.std(dim=0, correction=0).mean()),
        "position_std": float(flat.std(dim=1, correction=0).mean()),
    }


def gate_statistics(record: GateRecord) -> dict[str, dict[str, float]]:
    """Statistics of the recorded gates, averaged over CBAM modules (each counts once):
    ``{"channel": {...}, "spatial": {...}}``; empty when nothing was recorded."""
    out: dict[str, dict[str, float]] = {}
    kinds = (
        ("channel", record.channel, _channel_stats),
        ("spatial", record.spatial, _spatial_stats),
    )
    for kind, store, stats in kinds:
        per_module = [stats(torch.cat(maps).float()) for maps in store.values()]
        if per_module:
            out[kind] = {
                key: sum(s[key] for s in per_module) / len(per_module) for key in per_module[0]
            }
    return out
