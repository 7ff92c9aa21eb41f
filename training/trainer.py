"""One training run: data, network, stage plan, epochs, checkpoints, reports, publishing.

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
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from training.checkpoint import (
    BestCheckpoint,
    BestEpoch,
    LastCheckpoint,
    rng_state,
    set_rng_state,
)
from training.config import ConfigError, TrainConfig, save_config
from training.distributed import (
    DistContext,
    barrier,
    broadcast_object,
    cleanup,
    convert_sync_batchnorm,
    init_distributed,
    wrap_model,
)
from training.engine import evaluate, train_one_epoch
from training.loaders import (
    auto_num_workers,
    build_eval_loader,
    build_train_loader,
    set_loader_epoch,
)
from training.strategies import (
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

if TYPE_CHECKING:
    from training.data import DataSplits

Log = Callable[[str], None]
EpochCallback = Callable[[dict[str, Any]], None]
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
    """(autocast dtype or None, whether a GradScaler is needed). CPU runs float32."""
    if device.type != "cuda" or mode == "off":
        return None, False
    bf16_ok = torch.cuda.is_bf16_supported()
    if mode == "bf16" and not bf16_ok:
        raise ConfigError(f"amp='bf16' but {torch.cuda.get_device_name(device)} lacks bfloat16")
    if mode == "bf16" or (mode == "auto" and bf16_ok):
        return torch.bfloat16, False
    return torch.float16, True


def default_run_dir(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.model_name}"


def _group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    # "head" and "head/no_decay" share one LR; report it once per group.
    return {name.split("/")[0]: lr for name, lr in current_lrs(optimizer).items()}


def _is_better(value: float, best: float | None, metric: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if metric == "val_loss" else value > best


def _epoch_line(rec: dict[str, Any], total: int, best: bool) -> str:
    lrs = " ".join(f"{k} {v:.1e}" for k, v in rec["lr"].items())
    return (
        f"epoch {rec['epoch']}/{total} stage {rec['stage']} | "
        f"train loss {rec['train_loss']:.3f} acc {rec['train_acc']:.3f} | "
        f"val loss {rec['val_loss']:.3f} acc {rec['val_acc']:.3f} "
        f"macro-F1 {rec['val_macro_f1']:.3f} | lr {lrs} | {rec['time_s']:.1f}s"
        + (" *best*" if best else "")
    )


def load_splits(config: TrainConfig, log: Callable[[str], None]) -> DataSplits:
    """The run's data: a saved split file if given, else a fresh stratified split of data_dir."""
    from training.data import DataSplits, prepare_splits

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
        return _train(config, ctx, resume, RunLog(ctx, log), on_epoch_end)
    finally:
        cleanup(ctx)


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


def _train(
    config: TrainConfig,
    ctx: DistContext,
    resume: Path | None,
    log: RunLog,
    on_epoch_end: EpochCallback | None,
) -> RunResult:
    from training.augment import train_transform
    from training.data import DataSplits, ImageDataset, class_weights, sample_weights
    from wastenet.preprocess import eval_transform

    device = ctx.device
    seed_everything(config.seed)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest kernels once.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Fail before touching the data when the pretrained weights are not on disk.
    pretrained_file = (
        find_pretrained(config.model.arch, config.pretrained_path) if config.pretrained else None
    )
    if config.sync_bn and ctx.distributed and device.type != "cuda":
        raise ConfigError("sync_bn needs CUDA: SyncBatchNorm does not run on CPU (drop --sync-bn)")

    run_dir, last_path = _prepare_run_dir(config, resume) if ctx.is_main else (Path(), None)
    run_dir, last_path = broadcast_object((run_dir, last_path), ctx)
    config = config.model_copy(update={"out_dir": run_dir})
    splits_path = run_dir / "splits.json"
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log.file = run_dir / "train.log"
        log(f"run directory: {run_dir}")
        log(
            f"device: {device}"
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
    class_names = list(splits.class_names)
    num_classes = len(class_names)
    if num_classes != config.model.num_classes:
        raise ConfigError(
            f"the data has {num_classes} classes but model.num_classes is "
            f"{config.model.num_classes}"
        )
    counts = splits.counts()
    log(
        "images: "
        + ", ".join(f"{split} {sum(c)}" for split, c in counts.items())
        + (f"; skipped {splits.skipped}" if splits.skipped else "")
    )

    # --- data -------------------------------------------------------------------------
    pre = config.preprocessing
    workers = (
        config.num_workers
        if isinstance(config.num_workers, int)
        else auto_num_workers(device, ctx.world_size)
    )
    train_labels_weights = (
        sample_weights(splits.train, num_classes) if config.weighted_sampler else None
    )
    train_loader = build_train_loader(
        ImageDataset(splits.train, train_transform(pre, config.augment)),
        config.batch_size,
        config.seed,
        ctx,
        workers,
        weights=train_labels_weights,
    )
    eval_bs = config.eval_batch_size or 2 * config.batch_size
    val_loader = build_eval_loader(
        ImageDataset(splits.val, eval_transform(pre)), eval_bs, ctx, workers, persistent=True
    )
    steps_per_epoch = len(train_loader)

    # --- network ----------------------------------------------------------------------
    torch.manual_seed(config.seed)
    model: nn.Module = build_model(config.model)
    if pretrained_file is not None:
        report = load_pretrained(model, config.model, pretrained_file)
        log(report.summary())
    elif config.strategy != "differential":
        log(
            f"note: no pretrained weights; strategy {config.strategy} starts with a frozen, "
            "randomly initialised backbone"
        )
    model.to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if config.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model, ctx)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        if config.ema_decay is not None
        else None
    )
    loss_weights = (
        class_weights(splits.train, num_classes).to(device) if config.weighted_loss else None
    )
    criterion = nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=config.label_smoothing)
    amp_dtype, use_scaler = amp_settings(config.amp, device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    log(
        f"model {config.model.arch} cbam={config.model.cbam} ibn={config.model.ibn} "
        f"head={config.model.head}; strategy {config.strategy}; {config.total_epochs} epochs "
        f"x {steps_per_epoch} steps of {config.batch_size}"
        + (f" x {ctx.world_size} processes" if ctx.distributed else "")
        + f"; amp {amp_dtype or 'off'}; {workers} loader workers"
    )

    # --- state (fresh or resumed) -------------------------------------------------------
    history: dict[str, Any] = {"epochs": [], "iterations": []}
    best = BestEpoch()
    start_epoch = 0
    state: LastCheckpoint | None = None
    if last_path is not None:
        state = LastCheckpoint.load(last_path, map_location=device)
        model.load_state_dict(state.model)
        if ema is not None:
            assert state.ema is not None
            ema.load_state_dict(state.ema)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        history, best, start_epoch = state.history, state.best, state.epoch
        log(f"resuming from {last_path} after epoch {start_epoch}")

    stages = plan_stages(config)
    total = config.total_epochs
    started = time.monotonic()
    deadline = started + config.time_limit_s if config.time_limit_s is not None else None
    stopped_early = False
    stage = None
    net: nn.Module = model
    optimizer: torch.optim.Optimizer | None = None
    scheduler = None
    if state is not None:
        set_rng_state(state.rng)
    try:
        for epoch in range(start_epoch, total):
            if stage is None or stage_at(stages, epoch) is not stage:
                stage = stage_at(stages, epoch)
                trainable = apply_stage(model, stage)
                net = wrap_model(model, ctx)
                optimizer = build_optimizer(model, stage, config)
                scheduler = build_scheduler(optimizer, stage, config, steps_per_epoch)
                if state is not None and epoch == start_epoch and epoch > stage.first_epoch:
                    # Resuming inside a stage: continue its optimizer and schedule.
                    optimizer.load_state_dict(state.optimizer)
                    scheduler.load_state_dict(state.scheduler)
                log(
                    f"stage {stage.index} ({stage.name}): epochs {stage.first_epoch + 1}-"
                    f"{stage.end_epoch}, {trainable:,} trainable parameters, LR "
                    + ", ".join(f"{k} {v:.1e}" for k, v in stage.lrs.items())
                )
            assert optimizer is not None and scheduler is not None
            set_loader_epoch(train_loader, epoch)
            tr = train_one_epoch(
                net,
                train_loader,
                criterion,
                optimizer,
                device,
                scheduler=scheduler if is_per_step(scheduler) else None,
                scaler=scaler,
                amp_dtype=amp_dtype,
                ema=ema,
                grad_clip_norm=config.grad_clip_norm,
                channels_last=channels_last,
                freeze_bn_stats=config.freeze_bn_stats,
                ctx=ctx,
                progress=config.progress and ctx.is_main,
                desc=f"epoch {epoch + 1}/{total}",
                log_every=config.log_every,
                # Ranks must run the same number of steps, so DDP stops only between epochs.
                deadline=None if ctx.distributed else deadline,
            )
            eval_model = ema.module if ema is not None else model
            va = evaluate(
                eval_model,
                val_loader,
                device,
                num_classes,
                amp_dtype=amp_dtype,
                channels_last=channels_last,
                ctx=ctx,
                progress=config.progress and ctx.is_main,
                desc="validate",
            )
            record = {
                "epoch": epoch + 1,
                "stage": stage.index,
                "trainable_params": trainable,
                "lr": _group_lrs(optimizer),
                "train_loss": tr["loss"],
                "train_acc": tr["accuracy"],
                "val_loss": va["loss"],
                "val_acc": va["accuracy"],
                "val_macro_f1": va["macro_f1"],
                "steps": tr["steps"],
                "time_s": tr["time_s"],
                "train_images_per_s": tr["images_per_s"],
            }
            value = {
                "val_loss": va["loss"],
                "val_acc": va["accuracy"],
                "val_macro_f1": va["macro_f1"],
            }[config.best_metric]
            if not is_per_step(scheduler):
                scheduler.step(value)
            step0 = len(history["iterations"])
            history["epochs"].append(record)
            history["iterations"].extend(
                {"step": step0 + i + 1, "epoch": epoch + 1, "loss": loss}
                for i, loss in enumerate(tr["iteration_losses"])
            )
            improved = _is_better(value, best.value, config.best_metric)
            if improved:
                best = BestEpoch(
                    epoch=epoch + 1,
                    value=value,
                    stage=stage.index,
                    val_loss=va["loss"],
                    val_acc=va["accuracy"],
                    val_macro_f1=va["macro_f1"],
                )
            if ctx.is_main:
                ckpt_dir = run_dir / CHECKPOINTS
                if improved:
                    BestCheckpoint(
                        config=config,
                        class_names=tuple(class_names),
                        epoch=epoch + 1,
                        model=eval_model.state_dict(),
                        best=best,
                    ).save(ckpt_dir / BEST)
                LastCheckpoint(
                    config=config,
                    class_names=tuple(class_names),
                    epoch=epoch + 1,
                    model=model.state_dict(),
                    best=best,
                    stage=stage.index,
                    ema=ema.state_dict() if ema is not None else None,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None,
                    history=history,
                    rng=rng_state(),
                ).save(ckpt_dir / LAST)
                (run_dir / "history.json").write_text(json.dumps(history) + "\n")
                log(_epoch_line(record, total, improved))
                if on_epoch_end is not None:
                    on_epoch_end(record)
            out_of_time = deadline is not None and time.monotonic() > deadline
            if broadcast_object(out_of_time, ctx) and epoch + 1 < total:
                log(
                    f"time limit {config.time_limit_s:.0f}s reached in epoch {epoch + 1} "
                    f"(after {tr['steps']} of {steps_per_epoch} steps); stopping"
                )
                stopped_early = True
                break
    except KeyboardInterrupt:
        log(f"interrupted; continue with: python -m training train --resume {run_dir}")
        raise

    # --- test split with the best weights ---------------------------------------------
    barrier(ctx)  # rank 0 has finished writing best.pt
    if not (run_dir / CHECKPOINTS / BEST).is_file():
        raise RuntimeError(
            f"no epoch produced a finite {config.best_metric} (did the loss diverge? try a "
            "lower learning rate); nothing to evaluate or publish"
        )
    best_state = BestCheckpoint.load(run_dir / CHECKPOINTS / BEST, map_location=device)
    test_model = build_model(config.model).to(device)
    test_model.load_state_dict(best_state.model)
    test_loader = build_eval_loader(
        ImageDataset(splits.test, eval_transform(pre)), eval_bs, ctx, workers, persistent=False
    )
    te = evaluate(
        test_model,
        test_loader,
        device,
        num_classes,
        amp_dtype=amp_dtype,
        ctx=ctx,
        progress=config.progress and ctx.is_main,
        desc="test",
    )
    metrics: dict[str, Any] | None = None
    version = None
    if ctx.is_main:
        from training.reports import classification_metrics, format_metrics_table, write_plots

        metrics = classification_metrics(te["targets"], te["probs"], class_names)
        metrics["split"] = "test"
        metrics["best_epoch"] = best.epoch
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log(format_metrics_table(metrics))
        if config.plots:
            plots = write_plots(run_dir, history, te["targets"], te["probs"], metrics, splits)
            log(f"wrote {len(plots)} plots to {run_dir / 'plots'}")
        log(
            f"best epoch {best.epoch} (stage {best.stage}): val macro-F1 "
            f"{best.val_macro_f1:.3f}, val acc {best.val_acc:.3f}, val loss "
            f"{best.val_loss:.3f}; test accuracy {metrics['accuracy']:.3f}, macro-F1 "
            f"{metrics['macro_f1']:.3f} ({metrics['num_samples']} images)"
        )
        if config.publish_repo is not None:
            from training.publish import publish_run

            version = publish_run(
                run_dir, config.publish_repo, config.publish_name, config.description
            )
            log(f"published {version.name} version {version.version} at {version.path}")
    barrier(ctx)
    assert best.value is not None  # best.pt exists, so some epoch improved
    return RunResult(
        run_dir=run_dir,
        best_epoch=best.epoch,
        best_value=float(best.value),
        history=history,
        metrics=metrics,
        version=version,
        stopped_early=stopped_early,
        model=model,
    )
