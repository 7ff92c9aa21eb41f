"""DataLoaders, samplers and per-sample seeding for reproducible, resumable epochs.

Every epoch's order and every image's augmentation are a function of (seed, epoch,
position), not of how many workers there are, whether they were restarted, or whether
the run was resumed. The train sampler yields ``(index, draw_seed)`` pairs and
``SeededDataset`` seeds the RNG from ``draw_seed`` before transforming an image.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from training.distributed import DistContext


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled (or class-weighted) draw per epoch, split across ranks like DistributedSampler.

    The draw is padded to a multiple of ``world_size`` so that every rank runs the same
    number of steps (DDP needs that). ``set_epoch`` must be called before each epoch.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: torch.Tensor | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError("cannot sample from an empty dataset")
        if weights is not None and len(weights) != num_samples:
            raise ValueError(f"{len(weights)} weights for {num_samples} samples")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.weights = weights
        self.epoch = 0
        self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.per_rank * self.world_size
        if self.weights is not None:
            order = torch.multinomial(self.weights, total, replacement=True, generator=g)
        else:
            order = torch.randperm(self.num_samples, generator=g)
            if total > self.num_samples:
                order = torch.cat([order, order[: total - self.num_samples]])
        draw_seeds = torch.randint(0, 2**62, (total,), generator=g)
        mine = slice(self.rank, total, self.world_size)
        yield from zip(order[mine].tolist(), draw_seeds[mine].tolist(), strict=True)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: evaluation shards without padding."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class SeededDataset(Dataset[Any]):
    """Seeds Python's and torch's CPU RNG from the sampler's draw seed, then reads the item."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, draw_seed = key
        # Only the CPU generator: torch.manual_seed would also reseed every CUDA device.
        torch.random.default_generator.manual_seed(draw_seed)
        random.seed(draw_seed)
        return self.dataset[index]


def auto_num_workers(device: torch.device, world_size: int = 1) -> int:
    """Worker processes per training process.

    On a small CPU machine the training step already uses every core; worker processes
    would compete with it, and decoding small JPEGs in the main process costs less than
    that contention (see benchmarks/train_throughput.py). With a GPU the CPU only feeds
    data, so give each process most of its share of the cores.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = max(1, (cpus or 1) // max(1, world_size))
    if device.type == "cuda":
        return min(8, max(1, per_process - 1))
    return 0 if per_process <= 2 else min(4, per_process // 4)


def build_train_loader(
    dataset: Dataset[Any],
    batch_size: int,
    seed: int,
    ctx: DistContext,
    num_workers: int,
    weights: torch.Tensor | None = None,
) -> DataLoader[Any]:
    sampler = EpochSampler(len(dataset), seed, ctx.rank, ctx.world_size, weights)  # type: ignore[arg-type]
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        # Equal-sized steps (and never a last batch of one image, which BatchNorm1d in the
        # BNNeck head refuses); the shuffled remainder differs every epoch. A split smaller
        # than one batch keeps its single short batch.
        drop_last=len(sampler) > batch_size,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


def build_eval_loader(
    dataset: Dataset[Any],
    batch_size: int,
    ctx: DistContext,
    num_workers: int,
    persistent: bool = False,
) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), ctx.rank, ctx.world_size),  # type: ignore[arg-type]
        num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=persistent and num_workers > 0,
    )


def set_loader_epoch(loader: DataLoader[Any], epoch: int) -> None:
    sampler = loader.sampler
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch)
