"""Load ImageNet-pretrained torchvision ResNet weights from disk; never from the network."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from wastenet.nets.cbam import CBAM
from wastenet.nets.ibn import IBN
from wastenet.schema import ModelConfig


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be found or do not fit."""


@dataclass(frozen=True)
class PretrainedReport:
    """What loading a backbone state dict did.

    ``new`` are the network's own additions that the file cannot hold (attention, IBN
    instance-norm statistics, the re-initialised head); ``missing`` are backbone tensors
    the file should have had; ``unexpected`` are file tensors the network has no place for.
    """

    path: Path
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"pretrained {self.path}: {self.loaded} tensors loaded, {len(self.new)} new "
            f"(attention/head), {len(self.missing)} missing, {len(self.unexpected)} unexpected"
        )


def torchvision_weight_files(arch: str) -> list[tuple[str, str]]:
    """(file name, download URL) of every torchvision ImageNet weight set for ``arch``."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch)
    return [(w.url.rsplit("/", 1)[-1], w.url) for w in weights]


def _hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_pretrained(arch: str, path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file to use: ``path`` if given, else torchvision's cache for ``arch``.

    Raises PretrainedWeightsError saying where to put the file; nothing is downloaded.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise PretrainedWeightsError(f"pretrained weights file {p} does not exist")
        return p
    cache = _hub_checkpoint_dir()
    files = torchvision_weight_files(arch)
    for name, _url in files:
        candidate = cache / name
        if candidate.is_file():
            return candidate
    name, url = files[0]
    raise PretrainedWeightsError(
        f"no pretrained {arch} weights found, and nothing is downloaded at run time. "
        f"Put torchvision's file at {cache / name} (fetch {url} on a machine with "
        f"internet access), or pass the path of a torchvision {arch} state dict explicitly "
        f"(--pretrained PATH). Set TORCH_HOME to use another cache folder."
    )


def _split_ibn(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map torchvision's ``bn1`` tensors onto IBN-a's instance/batch halves."""
    out = dict(state)
    for name, module in model.named_modules():
        if not isinstance(module, IBN):
            continue
        half = module.instance_channels
        for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            src = out.pop(f"{name}.{key}", None)
            if src is None:
                continue
            if key == "num_batches_tracked":
                out[f"{name}.batch.{key}"] = src
                continue
            if key in ("weight", "bias"):
                out[f"{name}.instance.{key}"] = src[:half]
            out[f"{name}.batch.{key}"] = src[half:]
    return out


def _new_parameter_names(model: nn.Module, own: Mapping[str, Tensor]) -> set[str]:
    """State-dict keys that a plain torchvision ResNet cannot provide."""
    new: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, CBAM):
            new.update(k for k in own if k.startswith(f"{name}."))
    new.update(k for k in own if k.startswith("fc."))
    return new


def load_pretrained(
    model: nn.Module, config: ModelConfig, path: str | os.PathLike[str] | None = None
) -> PretrainedReport:
    """Load a torchvision ResNet state dict into ``model``'s backbone.

    Attention modules keep their near-identity start, the head keeps its fresh
    ``num_classes`` initialisation, and IBN-a layers take their halves of ``bn1``.
    Raises PretrainedWeightsError when the file is missing, unreadable or built for another
    architecture (naming the first tensor whose shape disagrees).
    """
    file = find_pretrained(config.arch, path)
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"cannot read pretrained weights {file}: {exc}") from exc
    if isinstance(raw, Mapping) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise PretrainedWeightsError(f"{file} is not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in raw.items() if not k.startswith("fc.")}
    state = _split_ibn(model, state)

    own = model.state_dict()
    new = _new_parameter_names(model, own)
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise PretrainedWeightsError(
                f"{file} does not fit {config.arch}: {key} has shape {tuple(tensor.shape)}, "
                f"the network expects {tuple(own[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    missing = sorted(k for k in result.missing_keys if k not in new)
    loaded = len(state) - len(result.unexpected_keys)
    if loaded == 0:
        raise PretrainedWeightsError(f"{file} shares no tensor names with {config.arch}")
    return PretrainedReport(
        path=file,
        loaded=loaded,
        missing=missing,
        unexpected=sorted(result.unexpected_keys),
        new=sorted(new),
    )
