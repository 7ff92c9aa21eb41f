"""train_one_epoch / evaluate, the samplers, and per-sample seeding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from tests.training.train_helpers import make_data, one_thread
from training.augment import AugmentConfig, train_transform
from training.data import ImageDataset, prepare_splits
from training.distributed import DistContext
from training.engine import build_ema, evaluate, train_one_epoch
from training.loaders import EpochSampler, ShardSampler, build_train_loader, set_loader_epoch
from wastenet.schema import Preprocessing

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _data(n: int = 20) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_train_one_epoch_reports_losses_and_updates_ema() -> None:
    torch.manual_seed(0)
    model = Tiny()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    before = model.fc.weight.detach().clone()
    out = train_one_epoch(
        model,
        DataLoader(_data(20), batch_size=8),
        nn.CrossEntropyLoss(),
        optimizer,
        CPU,
        scheduler=scheduler,
        ema=ema,
        grad_clip_norm=1.0,
    )
    assert out["num_samples"] == 20 and len(out["iteration_losses"]) == 3
    assert 0.0 <= out["accuracy"] <= 1.0 and out["loss"] > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 / 4)  # stepped once per step
    assert not torch.equal(model.fc.weight, before)
    # The average lags behind the live weights.
    ema_w = ema.module.fc.weight
    assert not torch.equal(ema_w, model.fc.weight) and not torch.equal(ema_w, before)


def _ema_after(steps: int, decay: float) -> float:
    """The EMA of a weight that equals k after the k-th update (k = 1..steps)."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = build_ema(model, decay)
    ema.update_parameters(model)  # the first update copies the start
    for k in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(float(k))
        ema.update_parameters(model)
    return float(ema.module.weight.detach())


def _reference_ema(steps: int, decay: float) -> float:
    value = 0.0
    for k in range(1, steps + 1):
        d = min(decay, (1 + k) / (10 + k))  # k updates already averaged (the first: the copy)
        value = d * value + (1 - d) * k
    return value


def test_ema_decay_warms_up_so_short_runs_average_recent_weights() -> None:
    # A fixed decay of 0.999 would still sit at 0.05 after 10 updates (and at 19 after
    # 200): the start would dominate what validation sees. With min(decay, (1+n)/(10+n))
    # the average trails the live weight by a fraction of the steps so far.
    assert _ema_after(10, 0.999) == pytest.approx(_reference_ema(10, 0.999), rel=1e-5)
    assert _ema_after(10, 0.999) > 8.5
    assert 175 < _ema_after(200, 0.999) == pytest.approx(_reference_ema(200, 0.999), rel=1e-5)
    # Once (1+n)/(10+n) passes the configured decay, the decay is the configured one.
    assert _ema_after(200, 0.5) == pytest.approx(199.0, abs=1e-3)


def test_train_one_epoch_mixes_batches_but_counts_accuracy_on_true_labels() -> None:
    torch.manual_seed(0)
    model = Tiny()
    seen: list[torch.Tensor] = []

    class Recording(nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            seen.append(target)
            return nn.functional.cross_entropy(logits, target)

    def mix(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        onehot = nn.functional.one_hot(y, 3).float()
        return 0.7 * x + 0.3 * x.flip(0), 0.7 * onehot + 0.3 * onehot.flip(0)

    data = _data(16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay: accuracy known
    out = train_one_epoch(
        model, DataLoader(data, batch_size=8), Recording(), optimizer, CPU,
        batch_transform=mix,
    )  # fmt: skip
    x, y = data.tensors
    with torch.no_grad():  # the mixed images' predictions against the images' own labels
        mixed = torch.cat([mix(x[i : i + 8], y[i : i + 8])[0] for i in (0, 8)])
        expected = (model(mixed).argmax(1) == y).float().mean().item()
        wrong = (model(mixed).argmax(1) == y.flip(0)).float().mean().item()
    assert out["accuracy"] == pytest.approx(expected) and expected != wrong
    # The mixed soft targets, not the labels, reached the loss.
    assert len(seen) == 2
    for i, target in zip((0, 8), seen, strict=True):
        assert torch.equal(target, mix(x[i : i + 8], y[i : i + 8])[1])


def test_evaluate_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    model = Tiny()
    data = _data(30)
    out = evaluate(model, DataLoader(data, batch_size=7), CPU, num_classes=3)
    x, y = data.tensors
    with torch.no_grad():
        logits = model(x)
    assert out["num_samples"] == 30
    assert out["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert out["probs"].shape == (30, 3)
    assert (out["targets"] == y.numpy()).all()


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_disjointly() -> None:
    s = EpochSampler(10, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(0)
    assert list(s) == e0 and e0 != e1
    assert sorted(i for i, _ in e0) == list(range(10))
    shards = []
    for rank in range(3):
        r = EpochSampler(10, seed=3, rank=rank, world_size=3)
        r.set_epoch(0)
        shards.append([i for i, _ in r])
    assert [len(x) for x in shards] == [4, 4, 4]  # padded so every rank runs the same steps
    assert set().union(*map(set, shards)) == set(range(10))
    assert list(ShardSampler(10, 1, 3)) == [1, 4, 7]


def test_weighted_sampler_balances_classes() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = 1.0 / torch.bincount(labels)[labels].double()
    s = EpochSampler(100, seed=0, weights=weights)
    draws = torch.tensor([labels[i] for e in range(5) for i, _ in (s.set_epoch(e) or s)])
    share = (draws == 1).float().mean().item()
    assert 0.4 < share < 0.6


def test_augmentation_is_the_same_with_or_without_workers(tmp_path: Path) -> None:
    data = make_data(tmp_path, images_per_class=2, size=40)
    splits = prepare_splits(data, val_fraction=0.0, test_fraction=0.0, log=lambda _m: None)
    p = Preprocessing(resize_size=36, input_size=32)
    dataset = ImageDataset(splits.train, train_transform(p, AugmentConfig()))
    ctx = DistContext(0, 1, 0, CPU, None)
    batches = {}
    for workers in (0, 2):
        loader = build_train_loader(dataset, 8, seed=5, ctx=ctx, num_workers=workers)
        set_loader_epoch(loader, 1)
        batches[workers] = [x for x, _ in loader]
    assert len(batches[0]) == 3
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a, b)
