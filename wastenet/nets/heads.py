"""Classification heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BNNeck(nn.Module):
    """BatchNorm1d with a frozen (zero) bias, then a bias-free linear classifier.

    From the re-identification literature (Luo et al., 2019): normalising the pooled
    features before the classifier separates the feature space from the decision
    boundaries. The bias is a buffer, not a parameter, so no optimizer or unfreeze can
    move it. Logits come out in eval mode too.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.bottleneck = nn.BatchNorm1d(in_features)
        del self.bottleneck.bias
        self.bottleneck.register_buffer("bias", torch.zeros(in_features))
        self.classifier = nn.Linear(in_features, num_classes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.bottleneck.reset_parameters()
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, features: Tensor) -> Tensor:
        normed = self.bottleneck(features)
        logits = self.classifier(normed)
        return logits
