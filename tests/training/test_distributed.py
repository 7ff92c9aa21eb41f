"""DDP on CPU: torchrun, two processes, gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.train_helpers import make_data
from training.checkpoint import load_checkpoint
from training.data import DataSplits

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_process_gloo_run_keeps_replicas_identical_and_writes_once(tmp_path: Path) -> None:
    data = make_data(tmp_path, images_per_class=6, size=40)
    out, report = tmp_path / "run", tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "tests.training.ddp_worker", str(data), str(out), str(report)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["world_size"] == 2
    # Every stage re-wraps DDP after unfreezing; parameters unfrozen later are averaged too,
    # so the replicas, which saw different shards, end identical.
    assert result["max_replica_difference"] == 0.0

    splits = DataSplits.load(out / "splits.json")
    history = json.loads((out / "history.json").read_text())
    # Each rank takes half of every epoch (padded), so the steps per epoch halve.
    per_rank = -(-len(splits.train) // 2)
    assert len(history["iterations"]) == 3 * (per_rank // 8)
    assert [e["stage"] for e in history["epochs"]] == [1, 2, 3]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 3
    assert (out / "metrics.json").is_file()
    # Only rank 0 logs: one line per epoch, not two.
    assert proc.stdout.count("epoch 1/3 stage 1") == 1
    assert (out / "train.log").read_text().count("epoch 1/3 stage 1") == 1
