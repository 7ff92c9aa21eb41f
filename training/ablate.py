"""Ablation: the same data split, epochs and strategy for each architecture variant, over
several seeds, with the CBAM gate statistics before and after training."""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from training.config import ConfigError, TrainConfig
from training.distributed import barrier, broadcast_object, cleanup, init_distributed
from wastenet.nets import (
    ModelConfig,
    build_model,
    count_parameters,
    find_pretrained,
    load_pretrained,
    record_gates,
)
from wastenet.nets.cbam import SpatialGate, gate_statistics
from wastenet.schema import cbam_placements

PLACEMENTS = ("none", "stage", "block", "block_post")
# (row key, column title, decimals)
COLUMNS = (
    ("params_m", "params (M)", 2),
    ("best_epoch", "best epoch", 1),
    ("val_macro_f1", "val macro-F1", 3),
    ("test_accuracy", "test acc", 3),
    ("test_macro_f1", "test macro-F1", 3),
    ("train_time_s", "train time (s)", 0),
)
# (gate kind, statistic, column title): spread of the gates, before -> after training.
GATE_COLUMNS = (
    ("channel", "mean", "channel mean"),
    ("channel", "std", "channel std"),
    ("channel", "image_std", "channel spread over images"),
    ("spatial", "mean", "spatial mean"),
    ("spatial", "std", "spatial std"),
    ("spatial", "image_std", "spatial spread over images"),
    ("spatial", "position_std", "spatial spread within an image"),
    ("spatial", "bn_weight", "spatial BN weight"),
)

Log = Callable[[str], None]


def variants(
    base: TrainConfig, placements: Sequence[str] | None, ibn: bool, bnneck: bool
) -> list[tuple[str, dict[str, Any]]]:
    """(name, ModelConfig updates) for each variant; ``placements=None``: every placement
    that ``base.model.arch`` has a place for."""
    arch = base.model.arch
    possible = cbam_placements(arch)
    wanted = list(possible if placements is None else placements)
    bad = [p for p in wanted if p not in PLACEMENTS]
    if bad:
        raise ConfigError(f"unknown CBAM placement(s) {bad}; choose from {list(PLACEMENTS)}")
    impossible = [p for p in wanted if p not in possible]
    if impossible:
        raise ConfigError(
            f"{arch} has no place for CBAM placement(s) {impossible} (no residual blocks); "
            f"choose from {list(possible)}"
        )
    out: list[tuple[str, dict[str, Any]]] = [
        (f"cbam={p}", {"cbam": p, "ibn": False, "head": "linear"}) for p in wanted
    ]
    # IBN and BNNeck are added on top of the configured placement (or block, the paper's).
    anchor = base.model.cbam if base.model.cbam != "none" else possible[min(2, len(possible) - 1)]
    if ibn:
        out.append((f"cbam={anchor}+ibn", {"cbam": anchor, "ibn": True, "head": "linear"}))
    if bnneck:
        out.append((f"cbam={anchor}+bnneck", {"cbam": anchor, "ibn": False, "head": "bnneck"}))
    if ibn and bnneck:
        out.append((f"cbam={anchor}+ibn+bnneck", {"cbam": anchor, "ibn": True, "head": "bnneck"}))
    for name, update in out:
        try:
            ModelConfig.model_validate({**base.model.model_dump(), **update})
        except ValidationError as exc:
            raise ConfigError(f"variant {name}: {exc.errors()[0]['msg']}") from exc
    return out


def load_test_images(splits_file: Path, config: TrainConfig) -> Tensor:
    """The test split as one evaluation-transformed batch (for gate statistics)."""
    from training.data import DataSplits, ImageDataset
    from wastenet.preprocess import eval_transform

    splits = DataSplits.load(splits_file)
    dataset = ImageDataset(splits.test, eval_transform(config.preprocessing))
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@torch.no_grad()
def measure_gates(model: nn.Module, images: Tensor, batch_size: int = 64) -> dict[str, Any]:
    """CBAM gate statistics (``wastenet.nets.cbam.gate_statistics``) over ``images``, plus
    the mean spatial BatchNorm weight (how strongly the spatial map modulates).

    A copy of ``model`` runs in eval mode, except that each spatial gate's BatchNorm
    normalises with the statistics of the batch: before the first training step its
    running statistics are still (0, 1), which says nothing about the gate the training
    sees, and comparing before with after would credit training with their update.
    """
    probe = copy.deepcopy(model).eval()
    weights = []
    for m in probe.modules():
        if isinstance(m, SpatialGate):
            m.bn.train()
            weights.append(float(m.bn.weight))
    device = next(probe.parameters()).device
    with record_gates(probe) as record:
        for chunk in images.split(batch_size):
            probe(chunk.to(device))
    stats = gate_statistics(record)
    if weights:
        stats["spatial"]["bn_weight"] = statistics.fmean(weights)
    return stats


def initial_network(config: TrainConfig) -> nn.Module:
    """The network as the trainer starts it: seeded, pretrained weights loaded if configured."""
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    if config.pretrained:
        file = find_pretrained(config.model.arch, config.pretrained_path)
        load_pretrained(model, config.model, file, allow_partial=config.allow_partial_pretrained)
    return model


def trained_network(config: TrainConfig, run_dir: Path) -> nn.Module:
    """The run's best checkpoint (the weights its test metrics come from)."""
    from training.checkpoint import load_trained

    model = build_model(config.model)
    model.load_state_dict(load_trained(run_dir / "checkpoints" / "best.pt").inference_weights())
    return model


def run_variant(
    config: TrainConfig, name: str, images: Tensor | None, log: Log, is_main: bool
) -> dict[str, Any]:
    """Train one variant at one seed; its row of the ablation (rank 0 measures the gates)."""
    from training.trainer import train

    gates_before = measure_gates(initial_network(config), images) if images is not None else {}
    started = time.monotonic()
    result = train(config, log=log if is_main else (lambda _m: None))
    elapsed = time.monotonic() - started
    gates_after = {}
    if images is not None:
        gates_after = measure_gates(trained_network(config, result.run_dir), images)
    metrics = result.metrics or {}
    best = result.history["epochs"][result.best_epoch - 1]
    return {
        "variant": name,
        "seed": config.seed,
        **config.model.model_dump(include={"arch", "cbam", "ibn", "head"}),
        "params_m": count_parameters(build_model(config.model)) / 1e6,
        "best_epoch": result.best_epoch,
        "val_macro_f1": best["val_macro_f1"],
        "val_acc": best["val_acc"],
        "test_accuracy": metrics.get("accuracy", float("nan")),
        "test_macro_f1": metrics.get("macro_f1", float("nan")),
        "train_time_s": elapsed,
        "gates_before": gates_before,
        "gates_after": gates_after,
        "run_dir": str(result.run_dir),
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan")}
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per variant: mean and std over seeds of every column and gate statistic."""
    out: list[dict[str, Any]] = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == name]
        entry: dict[str, Any] = {"variant": name, "seeds": [r["seed"] for r in runs]}
        for key, _title, _decimals in COLUMNS:
            entry[key] = _mean_std([float(r[key]) for r in runs])
        for when in ("gates_before", "gates_after"):
            entry[when] = {
                f"{kind}.{stat}": _mean_std(
                    [r[when].get(kind, {}).get(stat, math.nan) for r in runs]
                )
                for kind, stat, _title in GATE_COLUMNS
            }
        out.append(entry)
    return out


def _cell(value: dict[str, float], decimals: int, seeds: int) -> str:
    if math.isnan(value["mean"]):
        return "-"
    text = f"{value['mean']:.{decimals}f}"
    return f"{text} ± {value['std']:.{decimals}f}" if seeds > 1 else text


def format_table(summary: list[dict[str, Any]]) -> str:
    """Markdown table of the comparison: mean ± std over seeds."""
    lines = [
        "| variant | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|---|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for entry in summary:
        n = len(entry["seeds"])
        cells = [_cell(entry[key], decimals, n) for key, _title, decimals in COLUMNS]
        lines.append(f"| {entry['variant']} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_gate_table(summary: list[dict[str, Any]]) -> str:
    """Markdown table of the gate statistics, before -> after training, mean over seeds."""
    lines = [
        "| variant | " + " | ".join(title for _, _, title in GATE_COLUMNS) + " |",
        "|---|" + "|".join("---" for _ in GATE_COLUMNS) + "|",
    ]
    for entry in summary:
        if math.isnan(entry["gates_after"]["channel.mean"]["mean"]):
            continue  # no CBAM
        n = len(entry["seeds"])
        cells = []
        for kind, stat, _title in GATE_COLUMNS:
            key = f"{kind}.{stat}"
            before = _cell(entry["gates_before"][key], 3, 1)
            cells.append(f"{before} → {_cell(entry['gates_after'][key], 3, n)}")
        lines.append(f"| {entry['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_report(
    out_dir: Path, base: TrainConfig, seeds: list[int], rows: list[dict[str, Any]], log: Log
) -> None:
    summary = summarize(rows)
    budget = (
        f"{base.model.arch}, {base.total_epochs} epochs, strategy {base.strategy}, "
        f"seeds {' '.join(map(str, seeds))}, input {base.preprocessing.input_size}px, "
        f"pretrained {base.pretrained_path or base.pretrained}"
    )
    results, gates = format_table(summary), format_gate_table(summary)
    text = (
        f"# Ablation ({budget})\n\nMean ± std over seeds (one data split, test split "
        f"metrics of each run's best checkpoint).\n\n{results}\n\n## CBAM gates on the test "
        f"images, before → after training\n\nstd: over all gate values; spread over "
        f"images: std over images of each channel's (position's) gate, averaged; spread "
        f"within an image: std over positions of the spatial map, averaged; spatial BN "
        f"weight: the spatial BatchNorm's scale, averaged over CBAM modules. Spatial "
        f"BatchNorms normalise with the test batch's statistics (see measure_gates)."
        f"\n\n{gates}\n"
    )
    (out_dir / "ablation.md").write_text(text)
    payload = {"budget": budget, "seeds": seeds, "summary": summary, "rows": rows}
    (out_dir / "ablation.json").write_text(json.dumps(payload, indent=2) + "\n")
    log(f"ablation ({budget}):\n{results}\n\n{gates}\nwrote {out_dir / 'ablation.md'}")


def ablate(
    base: TrainConfig,
    placements: Sequence[str] | None = None,
    ibn: bool = False,
    bnneck: bool = False,
    seeds: Sequence[int] | None = None,
    log: Log | None = None,
) -> list[dict[str, Any]]:
    """Train every variant at every seed into ``base.out_dir/<variant>-seed<N>``; write
    ablation.md and ablation.json there. All runs share one split (made with base.seed)."""
    say = log or print
    if base.out_dir is None:
        raise ConfigError("ablate needs out_dir")
    todo = variants(base, placements, ibn, bnneck)
    run_seeds = list(seeds) if seeds else [base.seed]
    out_dir = base.out_dir
    ctx = init_distributed(base.device)  # one process group shared by all runs
    try:
        splits_file = _shared_splits(base, out_dir, ctx.is_main, say)
        barrier(ctx)
        images = load_test_images(splits_file, base) if ctx.is_main else None
        rows: list[dict[str, Any]] = []
        for seed in run_seeds:
            for name, update in todo:
                model = ModelConfig.model_validate({**base.model.model_dump(), **update})
                slug = name.replace("=", "-").replace("+", "-")
                config = base.model_copy(
                    update={
                        "model": model,
                        "seed": seed,
                        "out_dir": out_dir / f"{slug}-seed{seed}",
                        "splits_file": splits_file,
                        "publish_repo": None,
                    }
                )
                if ctx.is_main:
                    say(f"=== {name}, seed {seed} ===")
                rows.append(run_variant(config, name, images, say, ctx.is_main))
        rows = broadcast_object(rows, ctx)
        if ctx.is_main:
            _write_report(out_dir, base, run_seeds, rows, say)
        return rows
    finally:
        cleanup(ctx)


def _shared_splits(base: TrainConfig, out_dir: Path, is_main: bool, log: Log) -> Path:
    """The split every run uses: base.splits_file, or one made now and saved in out_dir."""
    if base.splits_file is not None:
        return base.splits_file
    from training.trainer import load_splits

    splits_file = out_dir / "splits.json"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        load_splits(base, log).save(splits_file)
    return splits_file
