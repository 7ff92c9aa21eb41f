"""Evaluate a run, checkpoint or published version on a data split: metrics and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from training.config import ConfigError
from training.distributed import resolve_device
from training.engine import evaluate
from training.predict import load_predictor
from wastenet.preprocess import eval_transform


def evaluate_source(
    source: Path,
    data_dir: Path | None = None,
    splits_file: Path | None = None,
    split: str = "test",
    out_dir: Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    seed: int = 0,
    log: Any = print,
) -> dict[str, Any]:
    """Metrics of ``source`` on ``split``; writes metrics.json (or metrics-<split>.json) and plots.

    Data, in order of preference: ``splits_file``; ``data_dir`` (split with ``seed`` the
    way training splits it, so the same seed gives the same test split); a run
    directory's own ``splits.json``.
    """
    from training.data import DataSplits, ImageDataset, prepare_splits
    from training.reports import classification_metrics, format_metrics_table, write_plots

    run_dir = source if (source / "splits.json").is_file() else None
    if splits_file is not None:
        splits = DataSplits.load(splits_file)
    elif data_dir is not None:
        splits = prepare_splits(data_dir, seed=seed, log=log)
    elif run_dir is not None:
        splits = DataSplits.load(run_dir / "splits.json")
    else:
        raise ConfigError(f"no data to evaluate {source} on: pass --data DIR or --splits FILE")
    samples = [*splits.train, *splits.val, *splits.test] if split == "all" else splits.split(split)
    if not samples:
        raise ConfigError(f"the {split} split has no images")

    dev = resolve_device(device)
    predictor = load_predictor(source, dev)
    if list(predictor.class_names) != list(splits.class_names):
        raise ConfigError(
            f"{source} predicts {predictor.class_names} but the data has {list(splits.class_names)}"
        )
    log(f"evaluating {predictor.source} on {len(samples)} {split} images")
    loader = DataLoader(
        ImageDataset(samples, eval_transform(predictor.preprocessing)),
        batch_size=batch_size,
        pin_memory=dev.type == "cuda",
    )
    result = evaluate(predictor.model, loader, dev, len(predictor.class_names), progress=True)
    metrics = classification_metrics(result["targets"], result["probs"], predictor.class_names)
    metrics["split"] = split
    metrics["source"] = str(source)

    out = out_dir or run_dir or Path("eval")
    out.mkdir(parents=True, exist_ok=True)
    name = "metrics.json" if split == "test" else f"metrics-{split}.json"
    (out / name).write_text(json.dumps(metrics, indent=2) + "\n")
    history: dict[str, Any] = {"epochs": [], "iterations": []}
    history_file = out / "history.json"
    if history_file.is_file():
        history = json.loads(history_file.read_text())
    write_plots(out, history, result["targets"], result["probs"], metrics, splits)
    log(format_metrics_table(metrics))
    log(
        f"{split}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
        f"({metrics['num_samples']} images); wrote {out / name} and {out / 'plots'}"
    )
    return metrics
