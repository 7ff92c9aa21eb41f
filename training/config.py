"""TrainConfig: the one typed source of training defaults.

A run's settings come from three layers, later ones winning: the defaults below, a config
file (TOML or JSON, same keys, ``[model]``, ``[preprocessing]`` and ``[augment]`` as
tables), and command-line flags. The resolved config is saved as ``config.json`` in the run
directory, and that file can be passed back as ``--config`` to repeat the run. Older configs
that give input_size, resize_size, mean and std at the top level still load: those keys
move into ``preprocessing``.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.augment import AugmentConfig
from training.export import ExportConfig
from wastenet.nets import ModelConfig
from wastenet.schema import Preprocessing

Strategy = Literal["frozen", "differential", "three_stage"]
SchedulerName = Literal["cosine", "plateau", "constant"]
OptimizerName = Literal["adamw", "sgd"]
BestMetric = Literal["val_macro_f1", "val_acc", "val_loss"]
AmpMode = Literal["auto", "bf16", "fp16", "off"]


# Top-level keys of configs written before preprocessing became its own table, as in the
# config.json of older run directories and the config inside their checkpoints.
FLAT_PREPROCESSING_KEYS = ("input_size", "resize_size", "mean", "std")


# Defaults that differ when training from random weights (pretrained = false). A random
# backbone must train from the first epoch and as fast as the head: with the fine-tuning
# defaults (three_stage, backbone LR 1e-5) a from-scratch run on the synthetic set reached
# 0.12 test accuracy, with these 0.45 (README, "Measured on a 2-core CPU"). Values given
# in a config file or as flags still win.
FROM_SCRATCH_DEFAULTS: dict[str, Any] = {
    "strategy": "differential",
    "lr_backbone": 1e-3,
    "lr_attention": 1e-3,
}


class ConfigError(ValueError):
    """A config file or flag is invalid; the message names the file, key and value."""


def nest_preprocessing(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the flat keys input_size, resize_size, mean and std moved into
    ``preprocessing``. A key given both ways is an error (which one was meant is unknown)."""
    flat = {key: data[key] for key in FLAT_PREPROCESSING_KEYS if key in data}
    if not flat:
        return data
    nested = data.get("preprocessing", {})
    if isinstance(nested, BaseModel):
        nested = nested.model_dump()
    if not isinstance(nested, dict):
        return data  # validation names the bad preprocessing value
    both = [key for key in flat if key in nested]
    if both:
        raise ValueError(
            f"{', '.join(both)} given both at the top level and in preprocessing; "
            "keep the preprocessing table only"
        )
    rest = {key: value for key, value in data.items() if key not in flat}
    return {**rest, "preprocessing": {**nested, **flat}}


class TrainConfig(BaseModel):
    """Every setting of a training run. See ``python -m training train --help``."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    # --- data -----------------------------------------------------------------------------
    data_dir: Path | None = Field(
        default=None,
        description="image folder: one sub-folder per class, or train/ val/ test/ of those",
    )
    splits_file: Path | None = Field(
        default=None,
        description="reuse the file lists of an earlier run (its splits.json) instead of "
        "splitting data_dir again",
    )
    val_fraction: float = Field(
        default=0.15, gt=0.0, lt=1.0, description="share of each class for validation"
    )
    test_fraction: float = Field(
        default=0.15, gt=0.0, lt=1.0, description="share of each class for the test split"
    )
    verify_images: bool = Field(
        default=True,
        description="open every image once before training and skip unreadable ones",
    )
    preprocessing: Preprocessing = Field(
        default_factory=Preprocessing,
        description="how an image becomes the network's input (input_size, resize_size, mean, "
        "std); evaluation and the published model.json use exactly this",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    batch_size: int = Field(default=32, ge=1, description="images per step and per process")
    eval_batch_size: int | None = Field(
        default=None, ge=1, description="images per evaluation batch (default: 2 x batch_size)"
    )
    num_workers: int | Literal["auto"] = Field(
        default="auto",
        description="data-loading worker processes per training process; auto: 0 on a CPU "
        "with 2 or fewer cores, else up to 8 leaving cores for the training threads",
    )
    weighted_sampler: bool = Field(
        default=False,
        description="draw training images with probability inversely proportional to their "
        "class size (balances classes per epoch)",
    )
    weighted_loss: bool = Field(
        default=False,
        description="weight the loss of each class by its inverse frequency in the train split",
    )

    # --- network ---------------------------------------------------------------------------
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrained: bool = Field(
        default=True,
        description="start from ImageNet weights (local file or torchvision cache; never "
        "downloaded); --no-pretrained trains from random initialisation, and then the "
        "strategy defaults to differential and the backbone and attention LRs to 1e-3",
    )
    pretrained_path: Path | None = Field(
        default=None,
        description="torchvision state dict of the arch to load (default: torchvision's cache)",
    )
    allow_partial_pretrained: bool = Field(
        default=False,
        description="accept a pretrained file that lacks some of the network's backbone "
        "tensors or holds tensors it has no place for (they are listed in the log); by "
        "default such a file stops the run with the names of those tensors",
    )

    # --- strategy and optimisation -----------------------------------------------------------
    strategy: Strategy = Field(
        default="three_stage",
        description="frozen: train head + attention only; differential: everything, one LR "
        "per group; three_stage: head + attention, then the last unfreeze_stages stages, "
        "then everything (from scratch the default is differential)",
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        description="epochs for frozen/differential (default 10); three_stage uses "
        "stage_epochs and accepts epochs only when it equals their sum",
    )
    stage_epochs: tuple[int, int, int] = Field(
        default=(2, 4, 4), description="three_stage: epochs of stage 1, 2 and 3 (0 skips one)"
    )
    unfreeze_stages: int = Field(
        default=2,
        ge=1,
        le=4,
        description="three_stage: stage 2 also trains the last N of layer1..layer4",
    )
    stage_lr_scale: tuple[float, float, float] = Field(
        default=(1.0, 0.5, 0.1),
        description="three_stage: every group's LR is multiplied by this in stage 1, 2, 3",
    )
    lr_backbone: float = Field(
        default=1e-5, gt=0, description="LR of stem and layer1..4 (from scratch: 1e-3)"
    )
    lr_attention: float = Field(
        default=1e-3,
        gt=0,
        description="LR of the CBAM modules (new layers, like the head: at 1e-4 the gates "
        "barely moved in a few hundred steps)",
    )
    lr_head: float = Field(default=1e-3, gt=0, description="LR of the classifier head")
    optimizer: OptimizerName = Field(default="adamw", description="adamw or sgd (nesterov)")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd momentum")
    weight_decay: float = Field(
        default=0.01, ge=0, description="weight decay (not applied to biases and norm scales)"
    )
    scheduler: SchedulerName = Field(
        default="cosine",
        description="cosine: per-step cosine decay after a linear warm-up, restarted at each "
        "stage; plateau: divide LRs when the validation metric stalls; constant",
    )
    warmup_epochs: float = Field(
        default=1.0, ge=0, description="cosine: linear warm-up length at the start of each stage"
    )
    min_lr_ratio: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="cosine and plateau: the LR never goes below this x start LR",
    )
    plateau_factor: float = Field(default=0.1, gt=0, lt=1, description="plateau: LR multiplier")
    plateau_patience: int = Field(
        default=2, ge=0, description="plateau: epochs without improvement before reducing"
    )
    label_smoothing: float = Field(default=0.1, ge=0, lt=1, description="cross-entropy smoothing")
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights (e.g. 0.999), its "
        "decay warmed up as min(decay, (1+n)/(10+n)) after n steps; every epoch validates "
        "the raw and the averaged weights and keeps whichever scores better",
    )
    grad_clip_norm: float | None = Field(
        default=None, gt=0, description="clip the global gradient norm to this"
    )
    freeze_bn_stats: bool = Field(
        default=True,
        description="keep the running statistics of frozen BatchNorm layers fixed",
    )
    best_metric: BestMetric = Field(
        default="val_macro_f1", description="validation metric that picks the best checkpoint"
    )
    early_stop_patience: int | None = Field(
        default=None,
        ge=1,
        description="end a stage after this many epochs without improving best_metric (by "
        "more than early_stop_min_delta); the next stage follows, or the run ends",
    )
    early_stop_min_delta: float = Field(
        default=0.0,
        ge=0,
        description="early stopping: the smallest change of best_metric that counts as better",
    )
    seed: int = Field(default=0, ge=0, description="seed for splitting, initialisation and order")
    deterministic: bool = Field(
        default=False, description="ask for deterministic kernels (slower on GPU)"
    )
    time_limit_s: float | None = Field(
        default=None,
        gt=0,
        description="stop training once this many seconds have passed (the current epoch is "
        "cut short, validated and checkpointed; then the run finishes as usual)",
    )

    # --- hardware ------------------------------------------------------------------------
    device: str = Field(default="auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    amp: AmpMode = Field(
        default="auto",
        description="mixed precision on CUDA: auto picks bf16 on compute capability 8.0+ "
        "(Ampere and newer), else fp16 with a gradient scaler; CPU always runs float32",
    )
    channels_last: bool = Field(
        default=True, description="channels-last memory layout on CUDA (ignored on CPU)"
    )
    sync_bn: bool = Field(
        default=False, description="SyncBatchNorm across processes (multi-GPU only)"
    )

    # --- outputs -------------------------------------------------------------------------
    out_dir: Path | None = Field(
        default=None, description="run directory (default: runs/<timestamp>)"
    )
    log_every: int = Field(
        default=10, ge=1, description="refresh the progress bar's loss every N steps"
    )
    progress: bool = Field(default=True, description="show a progress bar per epoch")
    plots: bool = Field(default=True, description="write the PNG plots at the end of the run")
    publish_repo: Path | None = Field(
        default=None,
        description="after training, publish the best checkpoint into this model repository",
    )
    publish_name: str | None = Field(
        default=None, description="model name to publish under (default: waste-<arch>-<cbam>)"
    )
    description: str = Field(default="", description="description stored with the version")
    export: ExportConfig = Field(
        default_factory=ExportConfig,
        description="ONNX files published with the version (onnx, int8, calibration, "
        "agreement threshold)",
    )

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_preprocessing(cls, data: Any) -> Any:
        return nest_preprocessing(data) if isinstance(data, dict) else data

    @model_validator(mode="before")
    @classmethod
    def _from_scratch_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pretrained") is False:
            return {**FROM_SCRATCH_DEFAULTS, **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:.2f} "
                "leaves too little for training (must be < 0.9)"
            )
        if any(e < 0 for e in self.stage_epochs):
            raise ValueError(f"stage_epochs must be >= 0, got {list(self.stage_epochs)}")
        if any(not s > 0 for s in self.stage_lr_scale):
            raise ValueError(f"stage_lr_scale must be > 0, got {list(self.stage_lr_scale)}")
        if self.strategy == "three_stage":
            if sum(self.stage_epochs) < 1:
                raise ValueError("stage_epochs must add up to at least 1 epoch")
            if self.epochs is not None and self.epochs != sum(self.stage_epochs):
                raise ValueError(
                    f"epochs={self.epochs} disagrees with stage_epochs "
                    f"{list(self.stage_epochs)} (sum {sum(self.stage_epochs)}); three_stage "
                    "takes its length from stage_epochs"
                )
        if self.export.precisions and self.publish_repo is None:
            raise ValueError(
                "export.onnx/int8 write files into the published version, but publish_repo "
                "is unset: add --publish REPO"
            )
        if self.publish_name is not None:
            from wastenet.schema import validate_model_name

            validate_model_name(self.publish_name)
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self

    @property
    def total_epochs(self) -> int:
        if self.strategy == "three_stage":
            return sum(self.stage_epochs)
        return self.epochs if self.epochs is not None else 10

    @property
    def model_name(self) -> str:
        return self.publish_name or f"waste-{self.model.arch}-{self.model.cbam.replace('_', '-')}"

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON types (paths as strings), as saved in ``config.json``."""
        return self.model_dump(mode="json")


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or JSON config file into a dict (not yet validated)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} is unreadable: {exc.strerror}") from exc
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml or .json")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    return data


def read_config(path: Path) -> dict[str, Any]:
    """A config file as a dict in today's layout (flat preprocessing keys nested)."""
    try:
        return nest_preprocessing(read_config_file(path))
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``override`` wins; nested tables merge key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def format_validation_error(exc: ValidationError, source: str) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<config>"
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        problems.append(f"{loc}: {err['msg']}{shown}")
    return f"invalid training config from {source}: " + "; ".join(problems)


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file at ``path``, then ``overrides`` (nested dicts for tables)."""
    source = f"{path} and flags" if path is not None else "flags"
    data = read_config(path) if path is not None else {}
    try:
        # Each layer is nested on its own, so that a flag still wins over a flat key in a file.
        data = merge(data, nest_preprocessing(overrides or {}))
    except ValueError as exc:
        raise ConfigError(f"invalid training config from {source}: {exc}") from exc
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
