"""The flat training and evaluation loops; each returns a dict of plain numbers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from training.distributed import DistContext, all_gather_objects, all_reduce_sum, unwrap
from training.strategies import set_train_mode

SINGLE = DistContext(0, 1, 0, torch.device("cpu"), None)
BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
ParamList = list[Tensor] | tuple[Tensor, ...]


class WarmupEMA:
    """``AveragedModel``'s update with the decay warmed up: ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates (the ``num_updates`` rule of TensorFlow's ExponentialMovingAverage).

    A fixed decay of 0.999 needs thousands of steps before the average forgets the random
    or pretrained start; short runs would validate and publish weights that barely
    trained. With the warm-up the average spans about the last ``n / 9`` steps until the
    decay reaches its configured value (0.999 after about 9,000 steps). The decay stays a
    device tensor, so the update never waits for the GPU.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def rate(self, num_averaged: Tensor | int) -> Tensor:
        """Weight of the current parameters in the update after ``num_averaged`` updates."""
        n = torch.as_tensor(num_averaged, dtype=torch.float64)
        return 1.0 - torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)

    @torch.no_grad()
    def __call__(self, ema: ParamList, current: ParamList, num_averaged: Tensor | int) -> None:
        weight = self.rate(num_averaged)
        if torch.is_floating_point(ema[0]):
            same = weight.to(ema[0].dtype)
            torch._foreach_lerp_(ema, current, [same] * len(ema))
            return
        for e, c in zip(ema, current, strict=True):  # integer buffers (BatchNorm counters)
            e.copy_(e + ((c - e) * weight).to(e.dtype))


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers, decay warmed up."""
    return AveragedModel(model, multi_avg_fn=WarmupEMA(decay), use_buffers=True)


def _to_device(
    images: Tensor, targets: Tensor, device: torch.device, channels_last: bool
) -> tuple[Tensor, Tensor]:
    # non_blocking overlaps the copy from pinned memory with compute; a no-op on CPU.
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    criterion: nn.Module,
    optimizer: Optimizer,
    device: torch.device,
    *,
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    ema: AveragedModel | None = None,
    grad_clip_norm: float | None = None,
    channels_last: bool = False,
    freeze_bn_stats: bool = True,
    ctx: DistContext = SINGLE,
    progress: bool = False,
    desc: str = "train",
    log_every: int = 10,
    deadline: float | None = None,
    batch_transform: BatchTransform | None = None,
) -> dict[str, Any]:
    """One pass over ``loader``; ``scheduler`` (if given) steps after every optimizer step.

    ``batch_transform`` (mixup/cutmix) turns a batch and its labels into mixed images and
    soft targets for the loss; accuracy still counts against the original labels.

    ``deadline`` (a ``time.monotonic()`` value) cuts the epoch short after the step that
    passes it; ``steps`` in the result says how many ran.

    Returns loss and accuracy averaged over all ranks' samples, the per-step losses of
    this rank, and timing. Per-step losses stay on the device until the end of the epoch:
    reading them every step would force a host-device sync each step.
    """
    set_train_mode(model, freeze_bn_stats)
    start = time.perf_counter()
    step_losses: list[Tensor] = []
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        images, targets = _to_device(images, targets, device, channels_last)
        soft = targets
        if batch_transform is not None:
            images, soft = batch_transform(images, targets)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits, soft)

        _optimizer_step(loss, model, optimizer, scaler, grad_clip_norm)
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(unwrap(model))

        batch = targets.size(0)
        step_losses.append(loss.detach())
        loss_sum += loss.detach() * batch
        correct += (logits.argmax(dim=1) == targets).sum()
        seen += batch
        if progress and step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")  # a sync point, every log_every steps
        if deadline is not None and time.monotonic() > deadline:
            break
    bar.close()
    return _epoch_summary(step_losses, loss_sum, correct, seen, start, ctx)


def _optimizer_step(
    loss: Tensor,
    model: nn.Module,
    optimizer: Optimizer,
    scaler: torch.amp.GradScaler | None,
    grad_clip_norm: float | None,
) -> None:
    """Backward and step; with a scaler, gradients are unscaled before clipping."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        return
    loss.backward()
    if grad_clip_norm is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()


def _epoch_summary(
    step_losses: list[Tensor],
    loss_sum: Tensor,
    correct: Tensor,
    seen: int,
    start: float,
    ctx: DistContext,
) -> dict[str, Any]:
    """Totals over all ranks, with one host-device sync for the whole epoch."""
    iteration_losses = torch.stack(step_losses).float().cpu().tolist() if step_losses else []
    local = [loss_sum.float(), correct.float(), torch.tensor(float(seen), device=loss_sum.device)]
    total_loss, total_correct, total_seen = all_reduce_sum(torch.stack(local), ctx).tolist()
    # After the sync, so that queued GPU work counts.
    elapsed = time.perf_counter() - start
    return {
        "loss": total_loss / max(total_seen, 1.0),
        "accuracy": total_correct / max(total_seen, 1.0),
        "num_samples": int(total_seen),
        "iteration_losses": iteration_losses,
        "steps": len(step_losses),
        "time_s": elapsed,
        "images_per_s": total_seen / elapsed if elapsed > 0 else 0.0,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    num_classes: int,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    ctx: DistContext = SINGLE,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Loss, accuracy and macro-F1 over every rank's shard, plus targets and probabilities.

    The loss is plain cross-entropy (no label smoothing or class weights), so validation
    losses compare across configurations. Pass the unwrapped model, not DDP: shards may
    differ in length and DDP's forward would wait for the other ranks.
    """
    from sklearn.metrics import f1_score

    model.eval()
    all_targets: list[Tensor] = []
    all_probs: list[Tensor] = []
    loss_sum = torch.zeros((), device=device)
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, targets = _to_device(images, targets, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum")
        all_targets.append(targets)
        all_probs.append(logits.softmax(dim=1))
    local_targets = torch.cat(all_targets).cpu().numpy() if all_targets else np.zeros(0, np.int64)
    local_probs = (
        torch.cat(all_probs).cpu().numpy() if all_probs else np.zeros((0, num_classes), np.float32)
    )
    gathered = all_gather_objects((local_targets, local_probs), ctx)
    y_true = np.concatenate([t for t, _ in gathered])
    probs = np.concatenate([p for _, p in gathered])
    total_loss = float(all_reduce_sum(loss_sum.float(), ctx).item())
    n = len(y_true)
    y_pred = probs.argmax(axis=1) if n else np.zeros(0, np.int64)
    return {
        "loss": total_loss / max(n, 1),
        "accuracy": float((y_pred == y_true).mean()) if n else 0.0,
        "macro_f1": float(
            f1_score(
                y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0
            )
        )
        if n
        else 0.0,
        "num_samples": n,
        "targets": y_true,
        "probs": probs,
    }
