"""Multi-process training with torchrun + DistributedDataParallel (NCCL on GPUs, gloo on CPU).

``torchrun --nproc_per_node N -m training train ...`` starts N processes and sets RANK,
WORLD_SIZE and LOCAL_RANK; a plain ``python -m training train`` runs one process and
none of this does anything. Only rank 0 writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when present (this process's GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for but CUDA is not available")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistContext(rank, world_size, local_rank, dev, backend, owns_group=owns)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group if ``init_distributed`` created it (callers may share one)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: T, ctx: DistContext) -> T:
    """Rank 0's ``obj`` on every rank (for values only rank 0 decides, e.g. the run folder)."""
    if not ctx.distributed:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: T, ctx: DistContext) -> list[T]:
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (in place); a sync point, so call it once per epoch, not per step."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around ``model`` when distributed.

    DDP registers gradient hooks only for parameters that require grad when it is built,
    so the trainer wraps again after every freeze/unfreeze (each stage boundary);
    otherwise newly unfrozen parameters would train on each rank's local gradients alone
    and the replicas would drift apart.
    """
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True)


def convert_sync_batchnorm(model: nn.Module, ctx: DistContext) -> nn.Module:
    """SyncBatchNorm for the backbone and attention (CUDA only; the head keeps its BN).

    The BNNeck head's BatchNorm has its bias as a buffer, which the converter cannot copy,
    and the head sees pooled features where per-GPU batches are large enough anyway.
    """
    if ctx.device.type != "cuda":
        raise RuntimeError("sync_bn needs CUDA devices: SyncBatchNorm does not run on CPU")
    for name, child in list(model.named_children()):
        if name != "fc":
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return model


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model
