"""What every network here shares: the injected attention layer, the head, the fine-tuning
parts, and the fold that keeps a pretrained function when fresh attention is inserted."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from wastenet.nets.cbam import CBAM, START_SCALE
from wastenet.nets.heads import BNNeck
from wastenet.nets.ibn import IBN
from wastenet.schema import ModelConfig

AttnLayer = Callable[[int], nn.Module]
NormLayer = Callable[[int], nn.Module]


class Classifier(nn.Module):
    """A backbone with a classification head, as every builder here returns it.

    - ``head_name``: the module that maps features to class logits; pretrained files'
      tensors under it are not loaded (the class count differs).
    - ``module_parts()``: module-name prefix -> fine-tuning part (stem, layer1..layer4,
      head); CBAM modules are the ``attention`` part wherever they sit.
    - ``fold_attention_start()``: see ``fold_attention_start`` below.
    """

    head_name: str = "fc"

    def module_parts(self) -> dict[str, str]:
        raise NotImplementedError

    def fold_attention_start(self) -> list[str]:
        """Fold 1 / START_SCALE into the pretrained layers next to each fresh CBAM.

        A fresh CBAM multiplies its input by exactly START_SCALE (see ``cbam.py``). Where
        the layer feeding it is a BatchNorm or convolution (possibly through a ReLU),
        scaling that layer's output by 1 / START_SCALE cancels the factor; where the next
        layer is a convolution followed by BatchNorm and nothing else reads the CBAM's
        output, scaling that BatchNorm's running statistics does. Returns the names of the
        CBAM modules that neither applies to (their inputs are sums with an identity path,
        as in ``block_post``); ``load_pretrained`` starts those near identity instead.
        """
        raise NotImplementedError

    def cbam_modules(self) -> list[tuple[str, CBAM]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, CBAM)]


class WithAttention(nn.Module):
    """A parameter-free layer (ReLU, pooling) followed by attention, in that layer's slot.

    Inserting attention into a torchvision ``features`` Sequential would shift the index
    of every later layer and with it every pretrained tensor name; taking the slot of a
    layer without parameters keeps them all.
    """

    def __init__(self, layer: nn.Module, attn: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.attn = attn

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer(x)
        out = self.attn(out)
        return out


def attention_layer(config: ModelConfig) -> AttnLayer:
    """The CBAM factory ``channels -> CBAM`` that ``config`` describes."""
    return partial(CBAM, reduction=config.cbam_reduction, kernel_size=config.cbam_kernel_size)


def make_head(in_features: int, num_classes: int, head: str) -> nn.Module:
    if head == "bnneck":
        return BNNeck(in_features, num_classes)
    return nn.Linear(in_features, num_classes)


def reset_own_modules(model: nn.Module) -> None:
    """Every CBAM and BNNeck back to its own initialisation, after a network's model-wide
    init loop reached into them."""
    for m in model.modules():
        if isinstance(m, CBAM | BNNeck):
            m.reset_parameters()


@torch.no_grad()
def scale_output(layer: nn.Module, factor: float) -> None:
    """Multiply what an affine ``layer`` (BatchNorm, Conv2d, Linear) outputs by ``factor``."""
    weight = getattr(layer, "weight", None)
    bias = getattr(layer, "bias", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"cannot scale the output of {type(layer).__name__}")
    weight.mul_(factor)
    if isinstance(bias, Tensor):
        bias.mul_(factor)


@torch.no_grad()
def scale_input_stats(norm: nn.Module, factor: float) -> None:
    """Make a BatchNorm (in eval mode) give the same output for its input times ``factor``.

    Instance norm, and BatchNorm in training mode, normalise with the statistics of the
    input itself and are unaffected by a constant factor already.
    """
    if isinstance(norm, IBN):
        norm = norm.batch
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"expected a BatchNorm, got {type(norm).__name__}")
    assert norm.running_mean is not None and norm.running_var is not None
    norm.running_mean.mul_(factor)
    norm.running_var.mul_(factor * factor)


def fold_into_input(layer: nn.Module) -> None:
    """Cancel a fresh CBAM's START_SCALE through the affine ``layer`` that feeds it."""
    scale_output(layer, 1.0 / START_SCALE)


def fold_after_relu(features: nn.Sequential) -> list[str]:
    """Fold each fresh CBAM of a plain conv stack into the layer before it.

    In ``conv (-> BatchNorm) -> ReLU -> CBAM`` the ReLU passes a positive factor on, so the
    layer feeding it takes the factor. Returns the CBAMs left unfolded: none.
    """
    for i, layer in enumerate(features):
        if isinstance(layer, WithAttention) and isinstance(layer.attn, CBAM):
            fold_into_input(features[i - 1])
    return []


def fold_into_successor(norms: list[nn.Module]) -> None:
    """Cancel a fresh CBAM's START_SCALE in the BatchNorms right after the convolutions
    that read its output (and nothing else reads it)."""
    for norm in norms:
        scale_input_stats(norm, START_SCALE)
