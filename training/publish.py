"""Publish a run's best checkpoint as the next version of a model in the model repository."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from training.checkpoint import BestCheckpoint, CheckpointError
from training.config import TrainConfig
from wastenet.artifacts import VersionRef, publish_version
from wastenet.nets import build_model


def default_description(config: TrainConfig, metrics: dict[str, Any]) -> str:
    data = config.data_dir or config.splits_file or "unknown data"
    return (
        f"{config.model.arch} with CBAM ({config.model.cbam}) "
        + ("fine-tuned from ImageNet weights" if config.pretrained else "trained from scratch")
        + f" with the {config.strategy} strategy on {data}; test accuracy "
        f"{metrics['accuracy']:.3f}, "
        f"macro-F1 {metrics['macro_f1']:.3f} on {metrics['num_samples']} images"
    )


def publish_run(
    run_dir: str | os.PathLike[str],
    repo: str | os.PathLike[str],
    name: str | None = None,
    description: str = "",
    extra: dict[str, Any] | None = None,
) -> VersionRef:
    """Write ``run_dir``'s best checkpoint, with its test evaluation, as the next version.

    ``model.json`` gets the evaluation summary (from ``metrics.json``), the preprocessing
    the network was trained with, the full resolved training config and the best epoch.
    """
    from training.reports import evaluation_summary

    run = Path(run_dir)
    best = BestCheckpoint.load(run / "checkpoints" / "best.pt")
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise CheckpointError(
            metrics_path,
            "missing: the run has no test evaluation yet (it stopped before the end); "
            f"run `python -m training evaluate {run}` first",
        )
    metrics = json.loads(metrics_path.read_text())
    config = best.config
    model = build_model(best.model_config)
    model.load_state_dict(best.model)
    model.eval()
    training_config = config.to_json_dict()
    return publish_version(
        repo,
        name or config.model_name,
        model,
        best.model_config,
        list(best.class_names),
        evaluation_summary(metrics, "test"),
        preprocessing=best.preprocessing,
        training_config=training_config,
        description=description or default_description(config, metrics),
        extra={
            "training": {
                "run_dir": str(run.resolve()),
                "best_epoch": best.epoch,
                "best": best.best.to_dict(),
                "config": training_config,
            },
            **(extra or {}),
        },
    )
