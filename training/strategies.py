"""Fine-tuning strategies as a plan of stages, and the optimizer/scheduler of each stage.

A strategy is a list of stages. Each stage names the parts that train (see
``wastenet.nets.PARTS``) and the learning rate of each parameter group. At a stage
boundary the trainer freezes/unfreezes parts, then builds a *new* optimizer over exactly
the trainable parameters and a new scheduler on that optimizer, so that no frozen
parameter sits in an optimizer and no unfrozen one is silently left out. Optimizer state
(Adam moments, momentum) restarts with each stage because the set of parameters and their
LRs changed; the LR of every group starts from the stage's configured value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from training.config import TrainConfig
from training.finetune import BACKBONE_PARTS, PARTS, named_parts, param_groups, set_trainable

NEW_PARTS: tuple[str, ...] = ("attention", "head")
Scheduler = LRScheduler | ReduceLROnPlateau


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: which parts train, at which LRs, for which epochs (0-based)."""

    index: int
    name: str
    first_epoch: int
    epochs: int
    trainable: tuple[str, ...]
    lrs: dict[str, float] = field(hash=False)

    @property
    def end_epoch(self) -> int:
        """First epoch after this stage."""
        return self.first_epoch + self.epochs


def _lrs(config: TrainConfig, scale: float = 1.0) -> dict[str, float]:
    return {
        "backbone": config.lr_backbone * scale,
        "attention": config.lr_attention * scale,
        "head": config.lr_head * scale,
    }


def plan_stages(config: TrainConfig) -> list[Stage]:
    """The stages of ``config.strategy``; stages with 0 epochs are left out."""
    if config.strategy == "frozen":
        return [Stage(1, "head+attention", 0, config.total_epochs, NEW_PARTS, _lrs(config))]
    if config.strategy == "differential":
        return [Stage(1, "all (differential LRs)", 0, config.total_epochs, PARTS, _lrs(config))]
    last = BACKBONE_PARTS[-config.unfreeze_stages :]
    specs = [
        ("head+attention", NEW_PARTS),
        (f"head+attention+{'+'.join(last)}", (*last, *NEW_PARTS)),
        ("all", PARTS),
    ]
    stages: list[Stage] = []
    first = 0
    for i, ((name, parts), epochs, scale) in enumerate(
        zip(specs, config.stage_epochs, config.stage_lr_scale, strict=True), start=1
    ):
        if epochs == 0:
            continue
        ordered = tuple(p for p in PARTS if p in parts)
        stages.append(Stage(i, name, first, epochs, ordered, _lrs(config, scale)))
        first += epochs
    return stages


def stage_at(stages: list[Stage], epoch: int) -> Stage:
    """The stage that runs 0-based ``epoch``."""
    for stage in stages:
        if stage.first_epoch <= epoch < stage.end_epoch:
            return stage
    raise ValueError(f"epoch {epoch} is outside the plan (0..{stages[-1].end_epoch - 1})")


def apply_stage(model: nn.Module, stage: Stage) -> int:
    """Make exactly the stage's parts trainable; returns the number of trainable parameters."""
    set_trainable(model, [p for p in PARTS if p not in stage.trainable], False)
    set_trainable(model, stage.trainable, True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_train_mode(model: nn.Module, freeze_bn_stats: bool) -> None:
    """``model.train()``, keeping BatchNorm layers whose parameters are all frozen in eval mode.

    A frozen BatchNorm in train mode still normalises with batch statistics and overwrites
    its pretrained running statistics, so "frozen" would not mean unchanged.
    """
    model.train()
    if not freeze_bn_stats:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def build_optimizer(model: nn.Module, stage: Stage, config: TrainConfig) -> Optimizer:
    """A fresh optimizer over exactly the trainable parameters, one group per part group."""
    groups = param_groups(model, stage.lrs, weight_decay=config.weight_decay)
    check_optimizer_covers(model, groups)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=stage.lrs["head"], momentum=config.momentum, nesterov=True
        )
    return torch.optim.AdamW(groups, lr=stage.lrs["head"])


def check_optimizer_covers(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Raise when a trainable parameter is missing, doubled, or a frozen one is included."""
    seen: dict[int, str] = {}
    for group in groups:
        for param in group["params"]:
            if id(param) in seen:
                raise RuntimeError(
                    f"a parameter is in groups {seen[id(param)]} and {group['name']}"
                )
            if not param.requires_grad:
                raise RuntimeError(f"frozen parameter in optimizer group {group['name']}")
            seen[id(param)] = group["name"]
    names = {id(p): n for ps in named_parts(model).values() for n, p in ps}
    missing = [names[id(p)] for p in model.parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise RuntimeError(f"trainable parameters missing from the optimizer: {missing[:5]}")


class WarmupCosine:
    """LR factor: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.

    A plain class (not a closure) so that LambdaLR can save and restore it in a checkpoint.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float) -> None:
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(max(0, warmup_steps), self.total_steps - 1)
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


def build_scheduler(
    optimizer: Optimizer, stage: Stage, config: TrainConfig, steps_per_epoch: int
) -> Scheduler:
    """The stage's scheduler, built on the stage's own optimizer.

    ``cosine`` and ``constant`` step once per iteration (``is_per_step``); ``plateau`` steps
    once per epoch on the validation metric.
    """
    if config.scheduler == "plateau":
        mode: Literal["min", "max"] = "min" if config.best_metric == "val_loss" else "max"
        return ReduceLROnPlateau(
            optimizer,
            mode=mode,
            factor=config.plateau_factor,
            patience=config.plateau_patience,
            min_lr=[g["lr"] * config.min_lr_ratio for g in optimizer.param_groups],
        )
    if config.scheduler == "constant":
        return LambdaLR(optimizer, WarmupCosine(1, 0, 1.0))
    total = stage.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, WarmupCosine(total, warmup, config.min_lr_ratio))


def is_per_step(scheduler: Scheduler) -> bool:
    return not isinstance(scheduler, ReduceLROnPlateau)


def current_lrs(optimizer: Optimizer) -> dict[str, float]:
    """LR of each named group (``backbone``, ``head/no_decay``, ...)."""
    return {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
