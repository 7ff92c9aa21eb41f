"""Run by torchrun in test_distributed.py: train with DDP, then compare the replicas."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.training.train_helpers import tiny_config
from training.trainer import train


def main() -> None:
    data, out, report = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    # Joining the group here keeps it alive after train() for the replica comparison.
    dist.init_process_group("gloo")
    config = tiny_config(
        data,
        out,
        strategy="three_stage",
        stage_epochs=(1, 1, 1),
        unfreeze_stages=1,
        lr_backbone=1e-3,
        lr_attention=1e-3,
        lr_head=1e-3,
        batch_size=8,
        ema_decay=0.9,
        weighted_loss=True,
    )
    result = train(config)
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        report.write_text(
            json.dumps(
                {
                    "world_size": dist.get_world_size(),
                    "max_replica_difference": float((gathered[0] - gathered[1]).abs().max()),
                    "changed_from_init": bool(result.history["epochs"]),
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
