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
    BestCheckpoint,
    BestEpoch,
    CheckpointError,
    LastCheckpoint,
    load_checkpoint,
    load_trained,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import ConfigError, TrainConfig
from training.trainer import train
from wastenet.classes import CLASS_NAMES
from wastenet.schema import Preprocessing


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


# The keys of the first checkpoint format; earlier runs' files have exactly these.
BEST_KEYS = {"format", "format_version", "kind", "config", "model_config", "class_names",
             "preprocessing", "model", "epoch", "best"}  # fmt: skip
LAST_KEYS = BEST_KEYS | {"stage", "ema", "optimizer", "scheduler", "scaler", "history", "rng"}
CONFIG = TrainConfig(preprocessing=Preprocessing(input_size=40, resize_size=48), ema_decay=0.9)
WEIGHTS = {"fc.weight": torch.arange(6.0).view(2, 3), "fc.bias": torch.tensor([1.0, -1.0])}


def _last(best: BestEpoch) -> LastCheckpoint:
    return LastCheckpoint(
        config=CONFIG,
        class_names=CLASS_NAMES,
        epoch=3,
        model=WEIGHTS,
        best=best,
        stage=2,
        ema={"module.fc.weight": torch.ones(2, 3), "n_averaged": torch.tensor(7)},
        optimizer={"state": {}, "param_groups": [{"lr": 0.5}]},
        scheduler={"last_epoch": 11},
        scaler=None,
        history={"epochs": [{"epoch": 1}], "iterations": [{"step": 1, "loss": 2.5}]},
        rng=rng_state(),
    )


def test_payloads_round_trip_with_the_first_format_keys(tmp_path: Path) -> None:
    best = BestEpoch(epoch=2, value=0.75, stage=2, val_loss=0.5, val_acc=0.8, val_macro_f1=0.75)
    BestCheckpoint(CONFIG, CLASS_NAMES, 2, WEIGHTS, best).save(tmp_path / "best.pt")
    _last(best).save(tmp_path / "last.pt")
    raw_best = load_checkpoint(tmp_path / "best.pt")
    raw_last = load_checkpoint(tmp_path / "last.pt")
    assert set(raw_best) == BEST_KEYS and set(raw_last) == LAST_KEYS
    assert (raw_best["kind"], raw_last["kind"]) == ("best", "last")
    assert raw_best["preprocessing"]["input_size"] == 40
    assert raw_best["model_config"] == CONFIG.model.model_dump(mode="json")

    read = BestCheckpoint.load(tmp_path / "best.pt")
    assert read.config == CONFIG and read.best == best and read.epoch == 2
    assert read.preprocessing == Preprocessing(input_size=40, resize_size=48)
    assert torch.equal(read.model["fc.weight"], WEIGHTS["fc.weight"])
    last = LastCheckpoint.load(tmp_path / "last.pt")
    assert (last.epoch, last.stage, last.scheduler, last.scaler) == (3, 2, {"last_epoch": 11}, None)
    assert last.history["iterations"][0]["loss"] == 2.5
    # With EMA, predicting from last.pt uses the averaged weights, without the counter.
    weights = last.inference_weights()
    assert set(weights) == {"fc.weight"} and torch.equal(weights["fc.weight"], torch.ones(2, 3))
    assert isinstance(load_trained(tmp_path / "last.pt"), LastCheckpoint)
    assert isinstance(load_trained(tmp_path / "best.pt"), BestCheckpoint)


def test_predicting_from_last_pt_uses_the_weights_that_validated_better() -> None:
    last = _last(BestEpoch())
    assert torch.equal(last.inference_weights()["fc.weight"], torch.ones(2, 3))  # EMA
    history = {"epochs": [{"epoch": 3, "weights": "raw"}], "iterations": []}
    raw_won = LastCheckpoint(**{**last.__dict__, "history": history})
    assert raw_won.inference_weights() is WEIGHTS


def test_first_format_checkpoints_with_a_flat_config_still_load(tmp_path: Path) -> None:
    config = CONFIG.to_json_dict()
    config.update(config.pop("preprocessing"))
    del config["interpolation"]  # the flat layout had no interpolation key
    raw = _last(BestEpoch()).to_dict()
    raw["config"] = config
    raw["best"] = {"epoch": 0, "value": None, "stage": 0}  # before any epoch improved
    save_checkpoint(tmp_path / "last.pt", raw)
    last = LastCheckpoint.load(tmp_path / "last.pt")
    assert last.config == CONFIG and last.best == BestEpoch()
    assert last.preprocessing.resize_size == 48


def test_typed_readers_name_a_wrong_or_incomplete_checkpoint(tmp_path: Path) -> None:
    _last(BestEpoch()).save(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt: a 'last' checkpoint where a 'best'"):
        BestCheckpoint.load(tmp_path / "last.pt")
    raw = load_checkpoint(tmp_path / "last.pt")
    del raw["optimizer"]
    save_checkpoint(tmp_path / "cut.pt", raw)
    with pytest.raises(CheckpointError, match=r"cut.pt: incomplete last checkpoint: no 'optim"):
        LastCheckpoint.load(tmp_path / "cut.pt")
    raw = load_checkpoint(tmp_path / "last.pt")
    raw["config"]["lr_head"] = -1.0
    save_checkpoint(tmp_path / "bad.pt", raw)
    with pytest.raises(CheckpointError, match=r"bad.pt: invalid training config .*lr_head: Input"):
        LastCheckpoint.load(tmp_path / "bad.pt")


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
