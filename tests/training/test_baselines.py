"""The tutorials' baselines train, publish and load the way the service loads a version."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.training.train_helpers import make_data, one_thread, tiny_config
from training.checkpoint import load_trained
from training.finetune import named_parts, param_groups
from training.trainer import train
from wastenet.artifacts import load_version, publish_version
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


@pytest.mark.slow
def test_mobilenet_v2_trains_publishes_and_serves(tmp_path: Path) -> None:
    data = make_data(tmp_path, 4, 32)
    config = tiny_config(
        data,
        tmp_path / "run",
        model={"arch": "mobilenet_v2", "cbam": "block"},
        strategy="differential",
        epochs=2,
        publish_repo=str(tmp_path / "models"),
    )
    result = train(config, log=lambda _m: None)
    assert result.version is not None and result.version.name == "waste-mobilenet_v2-block"

    loaded = load_version(result.version.path)
    assert loaded.metadata.architecture.arch == "mobilenet_v2"
    best = build_model(config.model)
    best.load_state_dict(load_trained(result.run_dir / "checkpoints/best.pt").inference_weights())
    best.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), best(x))
    torch.manual_seed(config.seed)
    fresh = build_model(config.model)
    gate = "features.5.attn.spatial_gate.bn.weight"
    assert not torch.equal(loaded.model.state_dict()[gate], fresh.state_dict()[gate])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16_bn", "alexnet"])
def test_vgg_and_alexnet_learn_publish_and_load(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, cbam="stage")
    model = build_model(config)
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6)
    lrs = {"backbone": 1e-4, "attention": 1e-3, "head": 1e-3}
    optimizer = torch.optim.AdamW(param_groups(model, lrs))
    attention = [p.detach().clone() for _, p in named_parts(model)["attention"]]
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = [p for _, p in named_parts(model)["attention"]]
    assert all(not torch.equal(p, old) for p, old in zip(after, attention, strict=True))

    evaluation = {"num_samples": 6, "accuracy": 0.5, "macro_f1": 0.5, "per_class_f1": {}}
    ref = publish_version(tmp_path, f"waste-{arch}", model, config, CLASS_NAMES, evaluation)
    loaded = load_version(ref.path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
