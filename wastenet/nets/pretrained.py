"""Load ImageNet-pretrained torchvision weights from disk; never from the network."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from wastenet.nets.cbam import CBAM, NEAR_IDENTITY_START
from wastenet.nets.common import Classifier
from wastenet.nets.ibn import IBN
from wastenet.schema import ModelConfig


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for and could not be found or do not fit."""


@dataclass(frozen=True)
class PretrainedReport:
    """What loading a backbone state dict did.

    ``new`` are the network's own additions that the file cannot hold (attention, IBN
    instance-norm statistics, the re-initialised head); ``missing`` are backbone tensors
    the file should have had; ``unexpected`` are file tensors the network has no place for
    (both empty unless a partial load was allowed); ``unfolded`` are the CBAM modules whose
    start factor could not be folded into a pretrained layer (see
    ``Classifier.fold_attention_start``); they start near identity instead.
    """

    path: Path
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unfolded: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"pretrained {self.path}: {self.loaded} tensors loaded, {len(self.new)} new "
            f"(attention/head), {len(self.missing)} missing, {len(self.unexpected)} unexpected"
        )
        if self.missing or self.unexpected:
            text += f" (partial load allowed; missing: {_names(self.missing)}; "
            text += f"unexpected: {_names(self.unexpected)})"
        if self.unfolded:
            text += (
                f"; {len(self.unfolded)} CBAM modules start near identity (gates "
                f"{NEAR_IDENTITY_START}): their input is a sum with an identity path"
            )
        return text


def _names(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return (shown + more) or "none"


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


def _new_parameter_names(model: Classifier, own: Mapping[str, Tensor]) -> set[str]:
    """State-dict keys that a plain torchvision network cannot provide."""
    new: set[str] = set()
    for name, _module in model.cbam_modules():
        new.update(k for k in own if k.startswith(f"{name}."))
    new.update(k for k in own if k.startswith(f"{model.head_name}."))
    return new


def _read_state_dict(file: Path) -> Mapping[str, Tensor]:
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"cannot read pretrained weights {file}: {exc}") from exc
    if isinstance(raw, Mapping) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise PretrainedWeightsError(f"{file} is not a state dict of tensors")
    return raw


def load_pretrained(
    model: nn.Module,
    config: ModelConfig,
    path: str | os.PathLike[str] | None = None,
    allow_partial: bool = False,
) -> PretrainedReport:
    """Load a torchvision state dict of ``config.arch`` into ``model``'s backbone.

    The head keeps its fresh ``num_classes`` initialisation, IBN-a layers take their halves
    of ``bn1``, and each fresh CBAM's start factor is folded into the pretrained layer next
    to it, so that the network computes the pretrained function at step 0 (a CBAM whose
    factor cannot be folded starts near identity instead). Raises
    PretrainedWeightsError when the file is missing, unreadable or built for another
    architecture (naming the first tensor whose shape disagrees), and, unless
    ``allow_partial``, when backbone tensors are missing from the file or the file holds
    tensors the network has no place for (naming them).
    """
    if not isinstance(model, Classifier):
        raise TypeError(f"expected a network from build_model, got {type(model).__name__}")
    file = find_pretrained(config.arch, path)
    head = f"{model.head_name}."
    raw = _read_state_dict(file)
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    state = _split_ibn(model, {k: v for k, v in state.items() if not k.startswith(head)})

    own = model.state_dict()
    new = _new_parameter_names(model, own)
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise PretrainedWeightsError(
                f"{file} does not fit {config.arch}: {key} has shape {tuple(tensor.shape)}, "
                f"the network expects {tuple(own[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    # BatchNorm's step counters only matter with momentum=None; older files lack them.
    missing = sorted(
        k for k in result.missing_keys if k not in new and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(result.unexpected_keys)
    loaded = len(state) - len(unexpected)
    if loaded == 0:
        raise PretrainedWeightsError(f"{file} shares no tensor names with {config.arch}")
    if (missing or unexpected) and not allow_partial:
        raise PretrainedWeightsError(
            f"{file} does not fully fit {config.arch}: {len(missing)} network tensors are "
            f"missing from it ({_names(missing)}) and {len(unexpected)} of its tensors have "
            f"no place in the network ({_names(unexpected)}). Use the torchvision file for "
            f"{config.arch}, or allow a partial load (--allow-partial-pretrained) to train "
            "the missing tensors from random initialisation"
        )
    unfolded = model.fold_attention_start()
    for name in unfolded:
        cbam = model.get_submodule(name)
        assert isinstance(cbam, CBAM)
        cbam.reset_gates(NEAR_IDENTITY_START)
    return PretrainedReport(
        path=file,
        loaded=loaded,
        missing=missing,
        unexpected=unexpected,
        new=sorted(new),
        unfolded=unfolded,
    )
