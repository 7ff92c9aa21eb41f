"""One training run: data, network, stage plan, epochs, checkpoints, reports, publishing.

A run has three parts: :func:`setup_run` builds what the run is made of (run directory,
splits, loaders, network, loss, EMA, mixed precision) as a :class:`RunSetup`;
:func:`run_epochs` is the stage/epoch loop, which changes only a :class:`RunState`
(history, best epoch; restored from ``last.pt`` on resume); :func:`finish_run` evaluates
the best checkpoint on the test split, writes the reports and publishes.

Run directory::

    config.json          the resolved TrainConfig (pass it back as --config to repeat)
    splits.json          file lists of train/val/test (evaluation is reproducible)
    class_index.json     class name -> index
    history.json         per epoch and per step (see the training contract)
    metrics.json         test split, best checkpoint: accuracy, macro-F1, per class, confusion
    checkpoints/best.pt  weights of the best epoch by config.best_metric
    checkpoints/last.pt  everything needed to resume (--resume RUN_DIR)
    plots/*.png          curves, confusion matrix, PR/ROC, class distribution, samples
    train.log            the console log
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from training.augment import batch_transform, train_transform
from training.checkpoint import (
    BestCheckpoint,
    BestEpoch,
    CheckpointError,
    LastCheckpoint,
    rng_state,
    set_rng_state,
)
from training.config import ConfigError, TrainConfig, save_config
from training.data import DataSplits, ImageDataset, class_weights, sample_weights
from training.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    cleanup,
    convert_sync_batchnorm,
    init_distributed,
    wrap_model,
)
from training.early_stop import improves, stage_exhausted
from training.engine import BatchTransform, build_ema, evaluate, train_one_epoch
from training.loaders import (
    auto_num_workers,
    build_eval_loader,
    build_train_loader,
    set_loader_epoch,
)
from training.strategies import (
    Scheduler,
    Stage,
    apply_stage,
    build_optimizer,
    build_scheduler,
    current_lrs,
    is_per_step,
    plan_stages,
    stage_at,
)
from wastenet.artifacts import VersionRef
from wastenet.nets import build_model, find_pretrained, load_pretrained
from wastenet.preprocess import eval_transform

Log = Callable[[str], None]
EpochCallback = Callable[[dict[str, Any]], None]
# history key (without "val_") -> its key in evaluate()'s result; best_metric is one of them
_VAL_KEYS = {"loss": "loss", "acc": "accuracy", "macro_f1": "macro_f1"}
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


@dataclass
class RunResult:
    """What a run produced. ``model`` is this process's network with its final weights."""

    run_dir: Path
    best_epoch: int
    best_value: float
    history: dict[str, Any]
    metrics: dict[str, Any] | None
    version: VersionRef | None
    stopped_early: bool
    model: nn.Module


class RunLog:
    """Rank 0 prints and appends to ``train.log``; other ranks stay quiet."""

    def __init__(self, ctx: DistContext, sink: Log | None) -> None:
        self.enabled = ctx.is_main
        self.sink = sink or print
        self.file: Path | None = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        self.sink(message)
        if self.file is not None:
            with self.file.open("a") as f:
                f.write(message + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_settings(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed). CPU runs float32.

    bf16 only on compute capability 8.0+: ``torch.cuda.is_bf16_supported()`` also says yes
    on a T4 (7.5), where bfloat16 is emulated and slower than fp16 with a scaler.
    """
    if device.type != "cuda" or mode == "off":
        return None, False
    capability = torch.cuda.get_device_capability(device)
    native_bf16 = capability >= (8, 0)
    if mode == "bf16" and not native_bf16:
        raise ConfigError(
            f"amp='bf16' but {torch.cuda.get_device_name(device)} (compute capability "
            f"{capability[0]}.{capability[1]}) has no native bfloat16 (needs 8.0+); use "
            "--amp fp16 or auto"
        )
    if mode == "bf16" or (mode == "auto" and native_bf16):
        return torch.bfloat16, False
    return torch.float16, True


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.model_name}"


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    # "head" and "head/no_decay" share one LR; report it once per group.
    return {name.split("/")[0]: lr for name, lr in current_lrs(optimizer).items()}


def _epoch_line(rec: dict[str, Any], total: int, best: bool) -> str:
    lrs = " ".join(f"{k} {v:.1e}" for k, v in rec["lr"].items())
    return (
        f"epoch {rec['epoch']}/{total} stage {rec['stage']} | "
        f"train loss {rec['train_loss']:.3f} acc {rec['train_acc']:.3f} | "
        f"val loss {rec['val_loss']:.3f} acc {rec['val_acc']:.3f} "
        f"macro-F1 {rec['val_macro_f1']:.3f}"
        + (f" ({rec['weights']} weights)" if "ema_val_loss" in rec else "")
        + f" | lr {lrs} | {rec['time_s']:.1f}s"
        + (" *best*" if best else "")
    )


def load_splits(config: TrainConfig, log: Callable[[str], None]) -> DataSplits:
    """The run's data: a saved split file if given, else a fresh stratified split of data_dir."""
    from training.data import prepare_splits

    if config.splits_file is not None:
        return DataSplits.load(config.splits_file)
    if config.data_dir is None:
        raise ConfigError("no data: give data_dir (--data DIR) or splits_file")
    return prepare_splits(
        config.data_dir,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        verify_images=config.verify_images,
        log=log,
    )


def train(
    config: TrainConfig,
    *,
    resume: Path | None = None,
    log: Log | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> RunResult:
    """Train, evaluate on the test split, write the run directory, publish if configured.

    ``resume`` is a run directory or its ``last.pt``; the run continues after the last
    completed epoch with the same optimizer, scheduler, EMA, RNG and sampler state.
    ``on_epoch_end`` receives each epoch's history record (rank 0 only).
    """
    ctx = init_distributed(config.device)
    try:
        run_log = RunLog(ctx, log)
        setup = setup_run(config, ctx, resume, run_log)
        state = initial_state(setup, run_log)
        run_epochs(setup, state, run_log, on_epoch_end)
        return finish_run(setup, state, run_log)
    finally:
        cleanup(ctx)


# ------------------------------------------------------------------------- run setup


@dataclass
class RunSetup:
    """What a run is made of, built once before its first epoch, alike on every rank."""

    config: TrainConfig  # out_dir is the run directory
    ctx: DistContext
    run_dir: Path
    resume_from: Path | None  # last.pt of the run being continued
    splits: DataSplits
    workers: int
    eval_batch_size: int
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    model: nn.Module  # not DDP-wrapped: each stage wraps it anew
    ema: AveragedModel | None
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    channels_last: bool
    batch_transform: BatchTransform | None  # mixup/cutmix, on the device

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def num_classes(self) -> int:
        return len(self.splits.class_names)

    def weights_of(self, kind: str) -> nn.Module:
        """The trained network (``raw``) or its moving average (``ema``)."""
        if kind == "ema":
            assert self.ema is not None
            return self.ema.module
        return self.model

    @property
    def progress(self) -> bool:
        return self.config.progress and self.ctx.is_main


def setup_run(config: TrainConfig, ctx: DistContext, resume: Path | None, log: RunLog) -> RunSetup:
    """Run directory, splits, loaders, network, loss, EMA and AMP; weights still fresh."""
    device = ctx.device
    _configure_torch(config, device)
    # Fail before touching the data when the pretrained weights are not on disk.
    pretrained_file = (
        find_pretrained(config.model.arch, config.pretrained_path) if config.pretrained else None
    )
    if config.sync_bn and ctx.distributed and device.type != "cuda":
        raise ConfigError("sync_bn needs CUDA: SyncBatchNorm does not run on CPU (drop --sync-bn)")
    config, resume_from, splits = _open_run_dir(config, ctx, resume, log)
    run_dir = config.out_dir
    assert run_dir is not None  # _open_run_dir sets it
    workers = (
        config.num_workers
        if isinstance(config.num_workers, int)
        else auto_num_workers(device, ctx.world_size)
    )
    eval_batch_size = config.eval_batch_size or 2 * config.batch_size
    train_loader, val_loader = _build_loaders(config, ctx, splits, workers, eval_batch_size)
    channels_last = config.channels_last and device.type == "cuda"
    model, ema = _build_network(config, ctx, pretrained_file, channels_last, log)
    loss_weights = (
        class_weights(splits.train, len(splits.class_names)).to(device)
        if config.weighted_loss
        else None
    )
    criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)
    amp_dtype, use_scaler = amp_settings(config.amp, device)
    log(
        f"model {config.model.arch} cbam={config.model.cbam} ibn={config.model.ibn} "
        f"head={config.model.head}; strategy {config.strategy}; {config.total_epochs} epochs "
        f"x {len(train_loader)} steps of {config.batch_size}"
        + (f" x {ctx.world_size} processes" if ctx.distributed else "")
        + f"; amp {amp_dtype or 'off'}; {workers} loader workers"
    )
    return RunSetup(
        config=config,
        ctx=ctx,
        run_dir=run_dir,
        resume_from=resume_from,
        splits=splits,
        workers=workers,
        eval_batch_size=eval_batch_size,
        train_loader=train_loader,
        val_loader=val_loader,
        model=model,
        ema=ema,
        criterion=criterion,
        amp_dtype=amp_dtype,
        scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
        channels_last=channels_last,
        batch_transform=batch_transform(config.augment, len(splits.class_names)),
    )


def _configure_torch(config: TrainConfig, device: torch.device) -> None:
    seed_everything(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _prepare_run_dir(config: TrainConfig, resume: Path | None) -> tuple[Path, Path | None]:
    """(run directory, last checkpoint to resume from or None)."""
    if resume is not None:
        last = resume if resume.is_file() else resume / CHECKPOINTS / LAST
        if not last.is_file():
            raise ConfigError(f"nothing to resume: {last} does not exist")
        return last.parent.parent, last
    run_dir = config.out_dir or default_run_dir(config)
    if (run_dir / CHECKPOINTS / LAST).exists():
        raise ConfigError(
            f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another --out-dir"
        )
    return run_dir, None


def _open_run_dir(
    config: TrainConfig, ctx: DistContext, resume: Path | None, log: RunLog
) -> tuple[TrainConfig, Path | None, DataSplits]:
    """Rank 0 picks the run directory and writes config, splits and class index; all ranks
    get the config with ``out_dir`` set, the checkpoint to resume from, and the splits."""
    run_dir, last_path = _prepare_run_dir(config, resume) if ctx.is_main else (Path(), None)
    run_dir, last_path = broadcast_object((run_dir, last_path), ctx)
    config = config.model_copy(update={"out_dir": run_dir})
    splits_path = run_dir / "splits.json"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.file = run_dir / "train.log"
        log(f"run directory: {run_dir}")
        log(
            f"device: {ctx.device}"
            + (f", {ctx.world_size} processes ({ctx.backend})" if ctx.distributed else "")
        )
        splits = DataSplits.load(splits_path) if last_path is not None else load_splits(config, log)
        splits.save(splits_path)
        save_config(config, run_dir / "config.json")
        (run_dir / "class_index.json").write_text(
            json.dumps({name: i for i, name in enumerate(splits.class_names)}, indent=2) + "\n"
        )
    barrier(ctx)
    if not ctx.is_main:
        splits = DataSplits.load(splits_path)
    if len(splits.class_names) != config.model.num_classes:
        raise ConfigError(
            f"the data has {len(splits.class_names)} classes but model.num_classes is "
            f"{config.model.num_classes}"
        )
    log(
        "images: "
        + ", ".join(f"{split} {sum(c)}" for split, c in splits.counts().items())
        + (f"; skipped {splits.skipped}" if splits.skipped else "")
    )
    return config, last_path, splits


def _build_loaders(
    config: TrainConfig, ctx: DistContext, splits: DataSplits, workers: int, eval_batch_size: int
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """(augmented, optionally class-balanced train loader; validation loader)."""
    pre, num_classes = config.preprocessing, len(splits.class_names)
    balance = sample_weights(splits.train, num_classes) if config.weighted_sampler else None
    train_loader = build_train_loader(
        ImageDataset(splits.train, train_transform(pre, config.augment)),
        config.batch_size,
        config.seed,
        ctx,
        workers,
        weights=balance,
    )
    val_set = ImageDataset(splits.val, eval_transform(pre))
    val_loader = build_eval_loader(val_set, eval_batch_size, ctx, workers, persistent=True)
    return train_loader, val_loader


def _build_network(
    config: TrainConfig,
    ctx: DistContext,
    pretrained_file: Path | None,
    channels_last: bool,
    log: RunLog,
) -> tuple[nn.Module, AveragedModel | None]:
    """(network on the device, its EMA or None); pretrained weights loaded when given."""
    torch.manual_seed(config.seed)
    model: nn.Module = build_model(config.model)
    if pretrained_file is not None:
        report = load_pretrained(
            model, config.model, pretrained_file, allow_partial=config.allow_partial_pretrained
        )
        log(report.summary())
    elif config.strategy != "differential":
        log(
            f"note: no pretrained weights; strategy {config.strategy} starts with a frozen, "
            "randomly initialised backbone"
        )
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if config.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx)
    if config.ema_decay is None:
        return model, None
    return model, build_ema(model, config.ema_decay)


# ------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """What the epochs change: saved in last.pt after each one, restored on resume."""

    history: dict[str, Any] = field(default_factory=lambda: {"epochs": [], "iterations": []})
    best: BestEpoch = field(default_factory=BestEpoch)
    epochs_done: int = 0
    # The checkpoint resumed from: its RNG, optimizer and scheduler state are restored
    # once the loop reaches the point where they were saved.
    resumed: LastCheckpoint | None = None
    stopped_early: bool = False

    def add_epoch(
        self, record: dict[str, Any], iteration_losses: list[float], value: float, metric: str
    ) -> bool:
        """Append the epoch to the history; True when it is the best so far by ``metric``."""
        step0 = len(self.history["iterations"])
        self.history["epochs"].append(record)
        self.history["iterations"].extend(
            {"step": step0 + i + 1, "epoch": record["epoch"], "loss": loss}
            for i, loss in enumerate(iteration_losses)
        )
        self.epochs_done = record["epoch"]
        if not improves(value, self.best.value, metric):
            return False
        self.best = BestEpoch(
            epoch=record["epoch"],
            value=value,
            stage=record["stage"],
            val_loss=record["val_loss"],
            val_acc=record["val_acc"],
            val_macro_f1=record["val_macro_f1"],
            weights=record["weights"],
        )
        return True


def _losses(config: TrainConfig) -> dict[str, str]:
    """What history's train_loss and val_loss are, for the plots' labels."""
    train = ["cross-entropy"]
    if config.label_smoothing > 0:
        train.append(f"label smoothing {config.label_smoothing:g}")
    if config.weighted_loss:
        train.append("class-weighted")
    if config.augment.mixup_alpha > 0 or config.augment.cutmix_alpha > 0:
        train.append("mixed targets")
    return {"train": ", ".join(train), "val": "cross-entropy"}


def initial_state(setup: RunSetup, log: RunLog) -> RunState:
    """A fresh state, or the one in ``last.pt`` with the weights, EMA and scaler it saved."""
    path = setup.resume_from
    if path is None:
        return RunState(history={"epochs": [], "iterations": [], "losses": _losses(setup.config)})
    # On the CPU: the RNG states must stay there (torch.set_rng_state and numpy take CPU
    # tensors only); load_state_dict copies the weights onto the device.
    last = LastCheckpoint.load(path, map_location="cpu")
    setup.model.load_state_dict(last.model)
    if setup.ema is not None:
        if last.ema is None:
            raise CheckpointError(path, "holds no EMA weights, but the run keeps an EMA")
        setup.ema.load_state_dict(last.ema)
    if setup.scaler is not None and last.scaler:
        setup.scaler.load_state_dict(last.scaler)
    log(f"resuming from {path} after epoch {last.epoch}")
    return RunState(history=last.history, best=last.best, epochs_done=last.epoch, resumed=last)


# ------------------------------------------------------------------------- the loop


@dataclass
class StageRun:
    """One stage in progress: the network as trained (DDP-wrapped when distributed) and
    an optimizer and scheduler over exactly the stage's trainable parameters."""

    stage: Stage
    trainable: int
    net: nn.Module
    optimizer: Optimizer
    scheduler: Scheduler


def run_epochs(
    setup: RunSetup, state: RunState, log: RunLog, on_epoch_end: EpochCallback | None
) -> None:
    """Train and validate epoch by epoch, keep the best, checkpoint; stop on the time limit
    or when early stopping ends the last stage."""
    config = setup.config
    total = config.total_epochs
    stages = plan_stages(config)
    deadline = None if config.time_limit_s is None else time.monotonic() + config.time_limit_s
    if state.resumed is not None:
        set_rng_state(state.resumed.rng)
    current: StageRun | None = None
    epoch = _next_epoch(setup, state, stages, log)
    try:
        while epoch < total:
            if current is None or stage_at(stages, epoch) is not current.stage:
                current = _start_stage(setup, state, stage_at(stages, epoch), epoch, log)
            tr = _train_epoch(setup, current, epoch, deadline)
            va = _validate(setup)
            value = va[config.best_metric]
            if not is_per_step(current.scheduler):
                current.scheduler.step(value)
            record = _epoch_record(epoch, current, tr, va)
            improved = state.add_epoch(record, tr["iteration_losses"], value, config.best_metric)
            if setup.ctx.is_main:
                _save_checkpoints(setup, state, current, improved)
                log(_epoch_line(record, total, improved))
                if on_epoch_end is not None:
                    on_epoch_end(record)
            out_of_time = deadline is not None and time.monotonic() > deadline
            if broadcast_object(out_of_time, setup.ctx) and epoch + 1 < total:
                log(
                    f"time limit {config.time_limit_s:.0f}s reached in epoch {epoch + 1} "
                    f"(after {tr['steps']} of {len(setup.train_loader)} steps); stopping"
                )
                state.stopped_early = True
                break
            epoch = _next_epoch(setup, state, stages, log)
    except KeyboardInterrupt:
        log(f"interrupted; continue with: python -m training train --resume {setup.run_dir}")
        raise


def _next_epoch(setup: RunSetup, state: RunState, stages: list[Stage], log: RunLog) -> int:
    """The 0-based epoch to run next: the one after the last, or the first of the next stage
    when early stopping ends the current one (``total_epochs`` when the run is over)."""
    config, epoch = setup.config, state.epochs_done
    if epoch == 0 or epoch >= config.total_epochs:
        return epoch
    stage = stage_at(stages, epoch - 1)
    patience, min_delta = config.early_stop_patience, config.early_stop_min_delta
    if epoch == stage.end_epoch or not stage_exhausted(
        state.history["epochs"], stage.index, config.best_metric, patience, min_delta
    ):
        return epoch
    ends = "the run" if stage.end_epoch >= config.total_epochs else f"stage {stage.index}"
    log(
        f"early stopping: {config.best_metric} has not improved by more than {min_delta:g} "
        f"for {patience} epochs; {ends} ends after epoch {epoch}"
    )
    state.stopped_early = stage.end_epoch >= config.total_epochs
    return stage.end_epoch


def _start_stage(
    setup: RunSetup, state: RunState, stage: Stage, epoch: int, log: RunLog
) -> StageRun:
    """Freeze and unfreeze for ``stage``; a new optimizer and scheduler over what trains."""
    trainable = apply_stage(setup.model, stage)
    net = wrap_model(setup.model, setup.ctx)
    optimizer = build_optimizer(setup.model, stage, setup.config)
    scheduler = build_scheduler(optimizer, stage, setup.config, len(setup.train_loader))
    resumed = state.resumed
    if resumed is not None and epoch == resumed.epoch and epoch > stage.first_epoch:
        # Resuming inside a stage: continue its optimizer and schedule.
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
    log(
        f"stage {stage.index} ({stage.name}): epochs {stage.first_epoch + 1}-"
        f"{stage.end_epoch}, {trainable:,} trainable parameters, LR "
        + ", ".join(f"{k} {v:.1e}" for k, v in stage.lrs.items())
    )
    return StageRun(stage, trainable, net, optimizer, scheduler)


def _train_epoch(
    setup: RunSetup, current: StageRun, epoch: int, deadline: float | None
) -> dict[str, Any]:
    config = setup.config
    set_loader_epoch(setup.train_loader, epoch)
    lr_start = _group_lrs(current.optimizer)
    result = train_one_epoch(
        current.net,
        setup.train_loader,
        setup.criterion,
        current.optimizer,
        setup.device,
        scheduler=current.scheduler if is_per_step(current.scheduler) else None,
        scaler=setup.scaler,
        amp_dtype=setup.amp_dtype,
        ema=setup.ema,
        grad_clip_norm=config.grad_clip_norm,
        channels_last=setup.channels_last,
        freeze_bn_stats=config.freeze_bn_stats,
        ctx=setup.ctx,
        progress=setup.progress,
        desc=f"epoch {epoch + 1}/{config.total_epochs}",
        log_every=config.log_every,
        # Ranks must run the same number of steps, so DDP stops only between epochs.
        deadline=None if setup.ctx.distributed else deadline,
        batch_transform=setup.batch_transform,
    )
    return {**result, "lr_start": lr_start}


def _validate(setup: RunSetup) -> dict[str, Any]:
    """Validation metrics keyed like the history (``val_loss``, ``val_acc``,
    ``val_macro_f1``) of the better of the raw and the EMA weights, and ``weights``: which.
    With EMA on, both are validated and recorded (``raw_val_*``, ``ema_val_*``): a short
    run's average can trail the trained network, and then the trained network is kept."""
    kinds = ["raw", "ema"] if setup.ema is not None else ["raw"]
    scores: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        va = evaluate(
            setup.weights_of(kind),
            setup.val_loader,
            setup.device,
            setup.num_classes,
            amp_dtype=setup.amp_dtype,
            channels_last=setup.channels_last,
            ctx=setup.ctx,
            progress=setup.progress,
            desc=f"validate {kind}" if len(kinds) > 1 else "validate",
        )
        scores[kind] = {f"val_{k}": va[v] for k, v in _VAL_KEYS.items()}
    metric = setup.config.best_metric
    # The average wins ties: it is the smoother of the two.
    raw_wins = "ema" not in scores or improves(scores["raw"][metric], scores["ema"][metric], metric)
    kept = "raw" if raw_wins else "ema"
    both = {f"{k}_{key}": v for k in scores for key, v in scores[k].items()}
    return {**scores[kept], "weights": kept, **(both if len(kinds) > 1 else {})}


def _epoch_record(
    epoch: int, current: StageRun, tr: dict[str, Any], va: dict[str, Any]
) -> dict[str, Any]:
    """The epoch's entry in history.json (``lr_start``: at the first step, ``lr``: after the
    last; the per-step schedule moves in between)."""
    return {
        "epoch": epoch + 1,
        "stage": current.stage.index,
        "trainable_params": current.trainable,
        "lr_start": tr["lr_start"],
        "lr": _group_lrs(current.optimizer),
        "train_loss": tr["loss"],
        "train_acc": tr["accuracy"],
        **va,
        "steps": tr["steps"],
        "time_s": tr["time_s"],
        "train_images_per_s": tr["images_per_s"],
    }


def _save_checkpoints(setup: RunSetup, state: RunState, current: StageRun, improved: bool) -> None:
    """best.pt when the epoch improved, last.pt and history.json always (rank 0 only)."""
    config, names, epoch = setup.config, setup.splits.class_names, state.epochs_done
    ckpt_dir = setup.run_dir / CHECKPOINTS
    if improved:
        weights = setup.weights_of(state.best.weights or "raw").state_dict()
        BestCheckpoint(config, names, epoch, weights, state.best).save(ckpt_dir / BEST)
    LastCheckpoint(
        config=config,
        class_names=names,
        epoch=epoch,
        model=setup.model.state_dict(),
        best=state.best,
        stage=current.stage.index,
        ema=setup.ema.state_dict() if setup.ema is not None else None,
        optimizer=current.optimizer.state_dict(),
        scheduler=current.scheduler.state_dict(),
        scaler=setup.scaler.state_dict() if setup.scaler is not None else None,
        history=state.history,
        rng=rng_state(),
    ).save(ckpt_dir / LAST)
    (setup.run_dir / "history.json").write_text(json.dumps(state.history) + "\n")


# ------------------------------------------------------------------------- finishing


def finish_run(setup: RunSetup, state: RunState, log: RunLog) -> RunResult:
    """Test the best checkpoint; rank 0 writes metrics and plots and publishes if asked."""
    barrier(setup.ctx)  # rank 0 has finished writing best.pt
    best_path = setup.run_dir / CHECKPOINTS / BEST
    if not best_path.is_file():
        raise RuntimeError(
            f"no epoch produced a finite {setup.config.best_metric} (did the loss diverge? try "
            "a lower learning rate); nothing to evaluate or publish"
        )
    test = _evaluate_best(setup, best_path)
    metrics: dict[str, Any] | None = None
    version = None
    if setup.ctx.is_main:
        metrics = _write_reports(setup, state, test, log)
        version = _publish(setup, log)
    barrier(setup.ctx)
    assert state.best.value is not None  # best.pt exists, so some epoch improved
    return RunResult(
        run_dir=setup.run_dir,
        best_epoch=state.best.epoch,
        best_value=float(state.best.value),
        history=state.history,
        metrics=metrics,
        version=version,
        stopped_early=state.stopped_early,
        model=setup.model,
    )


def _provenance(setup: RunSetup) -> dict[str, Any]:
    from training.publish import run_provenance

    return run_provenance(setup.config, setup.run_dir, setup.splits)


def _publish(setup: RunSetup, log: RunLog) -> VersionRef | None:
    config, run_dir = setup.config, setup.run_dir
    if config.publish_repo is None:
        return None
    from training.publish import publish_run

    version = publish_run(
        run_dir,
        config.publish_repo,
        config.publish_name,
        config.description,
        export=config.export,
        progress=config.progress,
        log=log,
    )
    log(f"published {version.name} version {version.version} at {version.path}")
    return version


def _evaluate_best(setup: RunSetup, best_path: Path) -> dict[str, Any]:
    """The test split through a fresh network with best.pt's weights (every rank a shard)."""
    best = BestCheckpoint.load(best_path, map_location=setup.device)
    model = build_model(setup.config.model).to(setup.device)
    model.load_state_dict(best.model)
    dataset = ImageDataset(setup.splits.test, eval_transform(setup.config.preprocessing))
    loader = build_eval_loader(
        dataset, setup.eval_batch_size, setup.ctx, setup.workers, persistent=False
    )
    return evaluate(
        model,
        loader,
        setup.device,
        setup.num_classes,
        amp_dtype=setup.amp_dtype,
        ctx=setup.ctx,
        progress=setup.progress,
        desc="test",
    )


def _write_reports(
    setup: RunSetup, state: RunState, test: dict[str, Any], log: RunLog
) -> dict[str, Any]:
    """metrics.json, the per-class table, the plots and the closing summary line."""
    from training.reports import classification_metrics, format_metrics_table, write_plots

    run_dir, best = setup.run_dir, state.best
    metrics = classification_metrics(test["targets"], test["probs"], setup.splits.class_names)
    metrics["split"] = "test"
    metrics["best_epoch"] = best.epoch
    metrics["weights"] = best.weights  # raw or ema: the weights in best.pt and published
    metrics["data"] = _provenance(setup)
    metrics["held_out"] = True  # the run's own test split
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(format_metrics_table(metrics))
    if setup.config.plots:
        plots = write_plots(
            run_dir, state.history, test["targets"], test["probs"], metrics, setup.splits
        )
        plots.append(_attention_figure(setup))
        log(f"wrote {len(plots)} plots to {run_dir / 'plots'}")
    log(
        f"best epoch {best.epoch} (stage {best.stage}, {best.weights} weights): val macro-F1 "
        f"{best.val_macro_f1:.3f}, val acc {best.val_acc:.3f}, val loss "
        f"{best.val_loss:.3f}; test accuracy {metrics['accuracy']:.3f}, macro-F1 "
        f"{metrics['macro_f1']:.3f} ({metrics['num_samples']} images)"
    )
    return metrics


def _attention_figure(setup: RunSetup) -> Path:
    """plots/attention_maps.png: test images with the best checkpoint's CBAM spatial
    attention and Grad-CAM (``training.reports.plot_attention_maps``)."""
    from training.reports import PLOTS_DIR, plot_attention_maps

    best = BestCheckpoint.load(setup.run_dir / CHECKPOINTS / BEST)
    model = build_model(setup.config.model)
    model.load_state_dict(best.inference_weights())
    path = setup.run_dir / PLOTS_DIR / "attention_maps.png"
    splits = setup.splits
    return plot_attention_maps(
        model.eval(), splits.test, splits.class_names, setup.config.preprocessing, path
    )
