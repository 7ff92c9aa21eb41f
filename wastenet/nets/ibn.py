"""IBN-a normalisation (Pan et al., ECCV 2018): instance norm on part of the channels."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class IBN(nn.Module):
    """Instance norm on the first ``ratio`` of the channels, batch norm on the rest.

    Instance norm removes per-image appearance (lighting, colour cast, background tone),
    which is what changes between sorting lines and cameras; batch norm keeps the content.
    """

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.instance_channels = int(planes * ratio)
        self.instance = nn.InstanceNorm2d(self.instance_channels, affine=True)
        self.batch = nn.BatchNorm2d(planes - self.instance_channels)

    def forward(self, x: Tensor) -> Tensor:
        # Keep the input's memory layout: a channels_last network (faster convolutions on
        # CUDA) would otherwise convert back and forth at every IBN block.
        layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        first, rest = torch.split(
            x, [self.instance_channels, x.size(1) - self.instance_channels], dim=1
        )
        first = self.instance(first.contiguous(memory_format=layout))
        rest = self.batch(rest.contiguous(memory_format=layout))
        out = torch.cat([first, rest], dim=1)
        return out.contiguous(memory_format=layout)
