"""Training checkpoints: everything needed to resume exactly, or to evaluate and publish.

Two payloads, each a dataclass with one writer (``save``) and one reader (``load``):

- :class:`LastCheckpoint` (``last.pt``, written after every epoch): the model, optimizer,
  scheduler, gradient scaler, EMA, epoch, stage, history and RNG states.
- :class:`BestCheckpoint` (``best.pt``): the weights of the best epoch: with EMA on, the
  raw or the averaged weights, whichever validated better (``best.weights`` says which).

Both also carry the resolved training config, and, for readers that do not parse it, the
network config, class names and preprocessing as plain keys. On disk each is a dict with a
``kind`` key ("best" or "last"); the keys are those of the first format, so checkpoints of
earlier runs still load. Files are written atomically and load with ``weights_only=True``
(no pickled code).
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
from pydantic import ValidationError

from training.config import TrainConfig, format_validation_error
from wastenet.nets import ModelConfig
from wastenet.schema import Preprocessing

FORMAT = "waste-training-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or not one of ours; names the file."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states in types ``weights_only`` can load."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states. Tensors are read on the CPU: torch and numpy
    accept only CPU byte tensors, wherever the checkpoint was mapped to."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npst["bit_generator"],
            "state": {"key": npst["key"].cpu().numpy().astype(np.uint32), "pos": npst["pos"]},
            "has_gauss": npst["has_gauss"],
            "gauss": npst["gauss"],
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a reader (or a crash mid-write) never sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(path, f"not a readable checkpoint ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(path, "not a training checkpoint of this project")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"checkpoint format {data.get('format_version')} is not supported "
            f"(this version reads {FORMAT_VERSION})",
        )
    return data


StateDict = dict[str, Any]


WeightsKind = Literal["raw", "ema"]


@dataclass(frozen=True)
class BestEpoch:
    """The best epoch so far by ``config.best_metric``; epoch 0 means none yet.

    ``weights`` says which weights scored it and are kept in best.pt: the trained network
    (``raw``) or its moving average (``ema``); None in checkpoints that predate the choice.
    """

    epoch: int = 0
    value: float | None = None
    stage: int = 0
    val_loss: float | None = None
    val_acc: float | None = None
    val_macro_f1: float | None = None
    weights: WeightsKind | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BestEpoch:
        # Until an epoch improves, only epoch, value and stage are set.
        return cls(
            epoch=int(data["epoch"]),
            value=data["value"],
            stage=int(data["stage"]),
            val_loss=data.get("val_loss"),
            val_acc=data.get("val_acc"),
            val_macro_f1=data.get("val_macro_f1"),
            weights=data.get("weights"),
        )


# eq=False: the state dicts hold tensors, which do not compare to a single bool.
@dataclass(frozen=True, eq=False)
class _Checkpoint:
    """What both payloads hold: the run's config, its classes, the epoch and weights."""

    KIND: ClassVar[str]

    config: TrainConfig
    class_names: tuple[str, ...]
    epoch: int
    model: StateDict
    best: BestEpoch

    @property
    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def preprocessing(self) -> Preprocessing:
        return self.config.preprocessing

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.KIND,
            "config": self.config.to_json_dict(),
            "model_config": self.model_config.model_dump(mode="json"),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.model_dump(mode="json"),
            "model": self.model,
            "epoch": self.epoch,
            "best": self.best.to_dict(),
        }

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.to_dict())

    @classmethod
    def load(cls, path: Path, map_location: str | torch.device = "cpu") -> Self:
        return cls.from_dict(load_checkpoint(path, map_location), path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path) -> Self:
        if data.get("kind") != cls.KIND:
            raise CheckpointError(
                path, f"a {data.get('kind')!r} checkpoint where a {cls.KIND!r} one is needed"
            )
        try:
            return cls(**cls._fields(data))
        except KeyError as exc:
            raise CheckpointError(path, f"incomplete {cls.KIND} checkpoint: no {exc}") from None
        except ValidationError as exc:
            raise CheckpointError(path, format_validation_error(exc, "the checkpoint")) from exc

    @classmethod
    def _fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "config": TrainConfig.model_validate(data["config"]),
            "class_names": tuple(data["class_names"]),
            "epoch": int(data["epoch"]),
            "model": data["model"],
            "best": BestEpoch.from_dict(data["best"]),
        }

    def inference_weights(self) -> StateDict:
        """The weights that validation saw."""
        return self.model


@dataclass(frozen=True, eq=False)
class BestCheckpoint(_Checkpoint):
    """``best.pt``: the weights of the best epoch (raw or EMA, as ``best.weights`` says)."""

    KIND: ClassVar[str] = "best"


@dataclass(frozen=True, eq=False)
class LastCheckpoint(_Checkpoint):
    """``last.pt``: the state after the last completed epoch, enough to resume exactly."""

    KIND: ClassVar[str] = "last"

    stage: int
    ema: StateDict | None
    optimizer: StateDict
    scheduler: StateDict
    scaler: StateDict | None
    history: dict[str, Any]
    rng: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "stage": self.stage,
            "ema": self.ema,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "history": self.history,
            "rng": self.rng,
        }

    @classmethod
    def _fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **super()._fields(data),
            "stage": int(data["stage"]),
            "ema": data["ema"],
            "optimizer": data["optimizer"],
            "scheduler": data["scheduler"],
            "scaler": data["scaler"],
            "history": data["history"],
            "rng": data["rng"],
        }

    def inference_weights(self) -> StateDict:
        """The weights that scored better in the last epoch's validation: the EMA weights
        when EMA is on, unless that epoch's record says the raw weights won."""
        epochs = self.history.get("epochs") or [{}]
        if not self.ema or epochs[-1].get("weights") == "raw":
            return self.model
        # AveragedModel's state: the network under "module.", plus its counter.
        prefix = "module."
        return {k[len(prefix) :]: v for k, v in self.ema.items() if k.startswith(prefix)}


def load_trained(
    path: Path, map_location: str | torch.device = "cpu"
) -> BestCheckpoint | LastCheckpoint:
    """Either checkpoint, by its ``kind``: to predict or evaluate with its weights."""
    data = load_checkpoint(path, map_location)
    if data.get("kind") == LastCheckpoint.KIND:
        return LastCheckpoint.from_dict(data, path)
    return BestCheckpoint.from_dict(data, path)
