"""Fine-tuning helpers: named parts, freezing, and parameter groups for differential LRs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from torch import nn

from wastenet.nets import CBAM, Classifier

PARTS: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4", "attention", "head")
BACKBONE_PARTS: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
GroupName = Literal["backbone", "attention", "head"]
GROUPS: tuple[GroupName, ...] = ("backbone", "attention", "head")
_TOP_LEVEL_PART = {"conv1": "stem", "bn1": "stem", "fc": "head"}  # any other ResNet-like


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and torch.compile wrap the network; parts are named on it.
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _part_of(name: str, prefixes: dict[str, str]) -> str:
    """The part of the longest module-name prefix of parameter ``name``."""
    head, _, rest = name.partition(".")
    part = prefixes.get(head, head)
    while rest:
        step, _, rest = rest.partition(".")
        head = f"{head}.{step}"
        part = prefixes.get(head, part)
    return part


def named_parts(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter of ``model`` by part (see PARTS), frozen ones included.

    Attention is its own part wherever it sits (after a stage or inside a block), so a
    CBAM inside ``layer3`` belongs to ``attention``, not to ``layer3``. The network says
    which of its modules form the other parts (``Classifier.module_parts``).
    """
    model = _unwrap(model)
    attention_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, CBAM):
            attention_ids.update(id(p) for p in module.parameters())
    prefixes = model.module_parts() if isinstance(model, Classifier) else _TOP_LEVEL_PART
    parts: dict[str, list[tuple[str, nn.Parameter]]] = {part: [] for part in PARTS}
    for name, param in model.named_parameters():
        part = "attention" if id(param) in attention_ids else _part_of(name, prefixes)
        if part not in parts:
            raise ValueError(f"parameter {name!r} belongs to no known part ({', '.join(PARTS)})")
        parts[part].append((name, param))
    return parts


def _check_parts(parts: Iterable[str]) -> list[str]:
    wanted = list(parts)
    unknown = [p for p in wanted if p not in PARTS and p != "backbone"]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; choose from {list(PARTS)} or 'backbone'")
    out: list[str] = []
    for p in wanted:
        out.extend(BACKBONE_PARTS if p == "backbone" else (p,))
    return out


def set_trainable(model: nn.Module, parts: Iterable[str], trainable: bool) -> int:
    """Freeze or unfreeze the named parts ('backbone' means stem + layer1-4).

    Returns how many parameters changed. Frozen BatchNorm layers still update their running
    statistics in train mode; training decides whether to put them in eval mode.
    """
    by_part = named_parts(model)
    changed = 0
    for part in _check_parts(parts):
        for _name, param in by_part[part]:
            if param.requires_grad != trainable:
                param.requires_grad_(trainable)
                changed += 1
    return changed


def freeze(model: nn.Module, parts: Iterable[str]) -> int:
    return set_trainable(model, parts, False)


def unfreeze(model: nn.Module, parts: Iterable[str]) -> int:
    return set_trainable(model, parts, True)


def trainable_parts(model: nn.Module) -> list[str]:
    """Parts with at least one trainable parameter."""
    return [part for part, ps in named_parts(model).items() if any(p.requires_grad for _, p in ps)]


def group_of(part: str) -> GroupName:
    if part == "attention":
        return "attention"
    if part == "head":
        return "head"
    return "backbone"


def param_groups(
    model: nn.Module,
    lrs: Mapping[str, float],
    weight_decay: float = 0.0,
    decay_norm_and_bias: bool = False,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for differential learning rates.

    ``lrs`` gives one LR per group: ``backbone``, ``attention``, ``head``. Only trainable
    parameters are included and each lands in exactly one group. Unless
    ``decay_norm_and_bias``, biases and normalisation scales (1-D tensors) get no weight
    decay and go to a ``<group>/no_decay`` twin. Each dict carries ``name`` and
    ``initial_lr`` so schedulers and logs can tell the groups apart.
    """
    missing = [g for g in GROUPS if g not in lrs]
    extra = [g for g in lrs if g not in GROUPS]
    if missing or extra:
        raise ValueError(
            f"lrs needs exactly the keys {list(GROUPS)}; missing {missing}, extra {extra}"
        )
    for g, lr in lrs.items():
        if not lr > 0:
            raise ValueError(f"learning rate for {g!r} must be > 0, got {lr}")
    buckets: dict[str, list[nn.Parameter]] = {}
    for part, params in named_parts(model).items():
        group = group_of(part)
        for _name, param in params:
            if not param.requires_grad:
                continue
            no_decay = param.ndim <= 1 and not decay_norm_and_bias
            key = f"{group}/no_decay" if no_decay and weight_decay > 0 else group
            buckets.setdefault(key, []).append(param)
    groups: list[dict[str, Any]] = []
    for key in sorted(buckets, key=lambda k: (GROUPS.index(k.split("/")[0]), k)):
        base = key.split("/")[0]
        lr = float(lrs[base])
        groups.append(
            {
                "name": key,
                "params": buckets[key],
                "lr": lr,
                "initial_lr": lr,
                "weight_decay": 0.0 if key.endswith("/no_decay") else weight_decay,
            }
        )
    return groups
