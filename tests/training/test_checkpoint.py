"""Checkpoints and exact resume."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training.train_helpers import make_data, one_thread, tiny_config
from training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import ConfigError
from training.trainer import train


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), images_per_class=6, size=40)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_checkpoint_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    # Interrupt inside stage 2 (optimizer, cosine schedule and EMA mid-way), resume, and
    # compare with a run that was never interrupted.
    settings = {
        "strategy": "three_stage",
        "stage_epochs": (0, 2, 1),
        "ema_decay": 0.9,
        "lr_backbone": 1e-3,
        "lr_attention": 1e-3,
        "lr_head": 1e-3,
        "weighted_sampler": True,
    }
    full = train(tiny_config(data, tmp_path / "full", **settings), log=lambda _m: None)

    def stop_after_one(record: dict[str, object]) -> None:
        if record["epoch"] == 1:
            raise Interrupt

    cut = tiny_config(data, tmp_path / "cut", **settings)
    with pytest.raises(Interrupt):
        train(cut, log=lambda _m: None, on_epoch_end=stop_after_one)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "cut" / "metrics.json").exists()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cut, log=lambda _m: None)
    resumed = train(cut, resume=tmp_path / "cut", log=lambda _m: None)

    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for key in ("model", "ema", "optimizer"):
        flat_a, flat_b = _tensors(a[key]), _tensors(b[key])
        assert flat_a.keys() == flat_b.keys()
        for name in flat_a:
            torch.testing.assert_close(flat_b[name], flat_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert b["scheduler"]["last_epoch"] == a["scheduler"]["last_epoch"]
    losses_a = [it["loss"] for it in full.history["iterations"]]
    losses_b = [it["loss"] for it in resumed.history["iterations"]]
    assert losses_b == pytest.approx(losses_a, rel=1e-5)
    assert [e["stage"] for e in resumed.history["epochs"]] == [2, 2, 3]
    assert resumed.metrics is not None and full.metrics is not None
    assert resumed.metrics["accuracy"] == pytest.approx(full.metrics["accuracy"])
    saved = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert len(saved["epochs"]) == 3


def _tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}.{i}"))
    return out
