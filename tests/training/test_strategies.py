"""Each strategy trains exactly the parameters it should; stage boundaries rebuild cleanly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.utils.data import DataLoader, TensorDataset

from training.config import TrainConfig
from training.engine import train_one_epoch
from training.finetune import PARTS, named_parts
from training.strategies import (
    WarmupCosine,
    apply_stage,
    build_optimizer,
    build_scheduler,
    check_optimizer_covers,
    plan_stages,
    stage_at,
)
from wastenet.nets import ModelConfig, build_model

SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # These tests run many tiny steps; on shared cores two spinning OpenMP threads slow
    # them down several times, one thread does not.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**kw: object) -> TrainConfig:
    # The fine-tuning LRs, not the from-scratch ones: these tests check how LRs are applied.
    base: dict[str, object] = {"pretrained": False, "weight_decay": 0.0, "warmup_epochs": 0.0,
                               "lr_backbone": 1e-5, "lr_attention": 1e-4}  # fmt: skip
    base.update(kw)
    return TrainConfig.model_validate(base)


def _loader(steps: int = 2, batch: int = 4, seed: int = 0) -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 12, (steps * batch,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed_by_part(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, set[bool]]:
    """part -> {changed?} over its parameter tensors."""
    out: dict[str, set[bool]] = {}
    for part, params in named_parts(model).items():
        for name, p in params:
            out.setdefault(part, set()).add(not torch.equal(p.detach(), before[name]))
    return out


def _run_stage(config: TrainConfig, stage_index: int, steps: int = 2) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = build_model(config.model)
    stage = plan_stages(config)[stage_index]
    apply_stage(model, stage)
    optimizer = build_optimizer(model, stage, config)
    before = _snapshot(model)
    train_one_epoch(
        model,
        _loader(steps),
        nn.CrossEntropyLoss(),
        optimizer,
        torch.device("cpu"),
        freeze_bn_stats=config.freeze_bn_stats,
    )
    return model, before


def test_frozen_trains_head_and_attention_only_and_keeps_backbone_statistics() -> None:
    config = _config(strategy="frozen", epochs=1)
    model, before = _run_stage(config, 0)
    changed = _changed_by_part(model, before)
    assert changed["head"] == {True} and changed["attention"] == {True}
    for part in ("stem", "layer1", "layer2", "layer3", "layer4"):
        assert changed[part] == {False}, part
    # Frozen BatchNorm layers stay in eval mode: pretrained running statistics survive.
    for name, value in model.state_dict().items():
        if name.startswith(("bn1.", "layer")) and "running_" in name and ".attn" not in name:
            assert torch.equal(value, before[name]), name


def test_frozen_bn_statistics_move_when_asked() -> None:
    config = _config(strategy="frozen", epochs=1, freeze_bn_stats=False)
    model, before = _run_stage(config, 0, steps=1)
    assert not torch.equal(model.state_dict()["bn1.running_mean"], before["bn1.running_mean"])
    assert torch.equal(model.conv1.weight, before["conv1.weight"])


def test_differential_lrs_step_each_group_by_its_own_lr() -> None:
    # AdamW's first step moves every element by about lr (|m/sqrt(v)| = 1): the largest
    # change in each group reveals the LR that group really got.
    lrs = {"lr_backbone": 1e-5, "lr_attention": 1e-4, "lr_head": 1e-3}
    config = _config(strategy="differential", epochs=1, **lrs)
    model, before = _run_stage(config, 0, steps=1)
    changed = _changed_by_part(model, before)
    assert all(changed[p] == {True} or p == "attention" for p in PARTS)
    expect = {"backbone": 1e-5, "attention": 1e-4, "head": 1e-3}
    for part, params in named_parts(model).items():
        group = "head" if part == "head" else "attention" if part == "attention" else "backbone"
        largest = max((p.detach() - before[n]).abs().max().item() for n, p in params)
        assert largest == pytest.approx(expect[group], rel=0.02), part


def test_three_stage_unfreezes_last_stages_then_everything() -> None:
    config = _config(strategy="three_stage", stage_epochs=(1, 1, 1), unfreeze_stages=2)
    model, before = _run_stage(config, 1)
    changed = _changed_by_part(model, before)
    assert {p for p, c in changed.items() if c == {True}} == {
        "layer3",
        "layer4",
        "attention",
        "head",
    }
    assert {p for p, c in changed.items() if c == {False}} == {"stem", "layer1", "layer2"}
    model, before = _run_stage(config, 2)
    assert all(c == {True} for c in _changed_by_part(model, before).values())


def test_plans() -> None:
    assert [s.trainable for s in plan_stages(_config(strategy="frozen", epochs=3))] == [
        ("attention", "head")
    ]
    assert plan_stages(_config(strategy="differential", epochs=3))[0].trainable == PARTS
    stages = plan_stages(_config(strategy="three_stage", stage_epochs=(2, 0, 3), unfreeze_stages=1))
    assert [(s.index, s.first_epoch, s.epochs) for s in stages] == [(1, 0, 2), (3, 2, 3)]
    assert [stage_at(stages, e).index for e in range(5)] == [1, 1, 3, 3, 3]
    with pytest.raises(ValueError, match="outside the plan"):
        stage_at(stages, 5)


def test_stage_boundaries_rebuild_optimizer_and_scheduler_exactly() -> None:
    config = _config(
        strategy="three_stage",
        stage_epochs=(1, 1, 1),
        stage_lr_scale=(1.0, 0.5, 0.1),
        weight_decay=0.05,
        warmup_epochs=0.5,
    )
    model = build_model(ModelConfig(cbam="stage", cbam_stages=(3, 4)))
    steps = 4
    previous = None
    for stage in plan_stages(config):
        trainable = apply_stage(model, stage)
        optimizer = build_optimizer(model, stage, config)
        scheduler = build_scheduler(optimizer, stage, config, steps_per_epoch=steps)
        assert scheduler.optimizer is optimizer and optimizer is not previous
        in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
        # Exactly the trainable parameters, each once; no frozen one.
        assert len({id(p) for p in in_optimizer}) == len(in_optimizer)
        assert {id(p) for p in in_optimizer} == {
            id(p) for p in model.parameters() if p.requires_grad
        }
        assert sum(p.numel() for p in in_optimizer) == trainable
        scale = config.stage_lr_scale[stage.index - 1]
        want = {"backbone": 1e-5 * scale, "attention": 1e-4 * scale, "head": 1e-3 * scale}
        for group in optimizer.param_groups:
            base = group["name"].split("/")[0]
            assert group["initial_lr"] == pytest.approx(want[base])
            assert group["weight_decay"] == (0.0 if group["name"].endswith("/no_decay") else 0.05)
        assert isinstance(scheduler, LambdaLR)
        assert scheduler.base_lrs == pytest.approx(
            [g["initial_lr"] for g in optimizer.param_groups]
        )
        # Warm-up starts low again at every stage, reaches the stage's LR, then decays.
        first = [g["lr"] for g in optimizer.param_groups]
        assert first == pytest.approx([lr / 3 for lr in scheduler.base_lrs])
        for _ in range(2):
            optimizer.step()
            scheduler.step()
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(scheduler.base_lrs)
        previous = optimizer
    names = {g["name"] for g in optimizer.param_groups}
    assert names == {
        "backbone",
        "backbone/no_decay",
        "attention",
        "attention/no_decay",
        "head",
        "head/no_decay",
    }


def test_optimizer_check_catches_frozen_and_missing_parameters() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    frozen = nn.Parameter(torch.zeros(1), requires_grad=False)
    with pytest.raises(RuntimeError, match="frozen parameter"):
        check_optimizer_covers(model, [{"name": "head", "params": [frozen]}])


def test_warmup_cosine_shape() -> None:
    f = WarmupCosine(total_steps=10, warmup_steps=4, min_ratio=0.1)
    values = [f(s) for s in range(12)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))
    assert values[10] == pytest.approx(0.1) and values[11] == pytest.approx(0.1)
    assert values[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))


def test_plateau_reduces_lr_when_the_metric_stalls() -> None:
    config = _config(
        strategy="differential",
        epochs=5,
        scheduler="plateau",
        plateau_patience=1,
        plateau_factor=0.5,
    )
    model = build_model(ModelConfig(cbam="none"))
    stage = plan_stages(config)[0]
    optimizer = build_optimizer(model, stage, config)
    scheduler = build_scheduler(optimizer, stage, config, steps_per_epoch=3)
    assert isinstance(scheduler, ReduceLROnPlateau)
    for value in (0.5, 0.5, 0.5):
        scheduler.step(value)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(5e-4) and lrs["backbone"] == pytest.approx(5e-6)
