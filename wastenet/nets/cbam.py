"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# What a fresh gate does to pretrained features at step 0. With the usual initialisation
# the gate logits sit near 0, so each sigmoid gate outputs about 0.5 and the channel gate
# times the spatial gate scales every attended feature map by about a quarter. Dropped into
# a pretrained ResNet that shrinks every residual branch (or, for `stage`, every stage
# output) 4x and the pretrained function is lost before training starts. We therefore
# start each gate near identity instead: the last layer that produces a gate's logits
# starts at zero weight (the MLP's second linear layer, the spatial BatchNorm's scale),
# and its bias puts the sigmoid at GATE_INIT. The block then passes features through
# almost unchanged (0.95 x 0.95 ~ 0.9 of the input), gradients still reach every gate
# parameter after the first step (as with zero-init residual BNs), and the sigmoid is far
# enough from saturation (slope 0.045) for the gates to learn.
GATE_INIT = 0.95
_GATE_INIT_LOGIT = math.log(GATE_INIT / (1.0 - GATE_INIT))


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

    def reset_gate(self) -> None:
        last = self.mlp[2]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        # The MLP runs twice (avg and max) and the two logits are summed.
        nn.init.constant_(last.bias, _GATE_INIT_LOGIT / 2)

    def forward(self, x: Tensor) -> Tensor:
        avg_desc = F.adaptive_avg_pool2d(x, 1).flatten(1)
        max_desc = F.adaptive_max_pool2d(x, 1).flatten(1)
        logits = self.mlp(avg_desc) + self.mlp(max_desc)
        scale = torch.sigmoid(logits)[:, :, None, None]
        return x * scale


class SpatialGate(nn.Module):
    """Channel-wise max and mean maps, a k x k convolution, BatchNorm, sigmoid."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def reset_gate(self) -> None:
        nn.init.zeros_(self.bn.weight)
        nn.init.constant_(self.bn.bias, _GATE_INIT_LOGIT)

    def forward(self, x: Tensor) -> Tensor:
        max_map = x.amax(dim=1, keepdim=True)
        mean_map = x.mean(dim=1, keepdim=True)
        pooled = torch.cat([max_map, mean_map], dim=1)
        logits = self.bn(self.conv(pooled))
        scale = torch.sigmoid(logits)
        return x * scale


class CBAM(nn.Module):
    """Channel attention, then spatial attention: x' = Mc(x) * x; x'' = Ms(x') * x'."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel_gate = ChannelGate(channels, reduction)
        self.spatial_gate = SpatialGate(kernel_size)
        self.reset_gates()

    def reset_gates(self) -> None:
        """Near-identity start (see GATE_INIT); call again after any model-wide init loop."""
        self.channel_gate.reset_gate()
        self.spatial_gate.reset_gate()

    def forward(self, x: Tensor) -> Tensor:
        out = self.channel_gate(x)
        out = self.spatial_gate(out)
        return out
