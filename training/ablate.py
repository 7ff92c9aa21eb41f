"""Ablation: the same data split, epochs, seed and strategy for each architecture variant."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from training.config import ConfigError, TrainConfig
from training.distributed import barrier, broadcast_object, cleanup, init_distributed
from wastenet.nets import ModelConfig, build_model, count_parameters

PLACEMENTS = ("none", "stage", "block", "block_post")
COLUMNS = (
    ("variant", "variant", "{}"),
    ("params_m", "params (M)", "{:.2f}"),
    ("best_epoch", "best epoch", "{}"),
    ("val_macro_f1", "val macro-F1", "{:.3f}"),
    ("test_accuracy", "test acc", "{:.3f}"),
    ("test_macro_f1", "test macro-F1", "{:.3f}"),
    ("train_time_s", "train time (s)", "{:.0f}"),
)


def variants(
    base: TrainConfig, placements: Sequence[str], ibn: bool, bnneck: bool
) -> list[tuple[str, dict[str, Any]]]:
    """(name, ModelConfig updates) for each variant."""
    bad = [p for p in placements if p not in PLACEMENTS]
    if bad:
        raise ConfigError(f"unknown CBAM placement(s) {bad}; choose from {list(PLACEMENTS)}")
    out: list[tuple[str, dict[str, Any]]] = [
        (f"cbam={p}", {"cbam": p, "ibn": False, "head": "linear"}) for p in placements
    ]
    # IBN and BNNeck are added on top of the configured placement (or block, the paper's).
    anchor = base.model.cbam if base.model.cbam != "none" else "block"
    if ibn:
        out.append((f"cbam={anchor}+ibn", {"cbam": anchor, "ibn": True, "head": "linear"}))
    if bnneck:
        out.append((f"cbam={anchor}+bnneck", {"cbam": anchor, "ibn": False, "head": "bnneck"}))
    if ibn and bnneck:
        out.append((f"cbam={anchor}+ibn+bnneck", {"cbam": anchor, "ibn": True, "head": "bnneck"}))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the comparison."""
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablate(
    base: TrainConfig,
    placements: Sequence[str] = PLACEMENTS,
    ibn: bool = False,
    bnneck: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every variant into ``base.out_dir/<variant>``; write ablation.md and .json there."""
    from training.trainer import load_splits, train

    say = log or print
    if base.out_dir is None:
        raise ConfigError("ablate needs out_dir")
    todo = variants(base, placements, ibn, bnneck)
    out_dir = base.out_dir
    ctx = init_distributed(base.device)  # one process group shared by all variants
    try:
        splits_file = base.splits_file
        if splits_file is None:
            splits_file = out_dir / "splits.json"
            if ctx.is_main:
                out_dir.mkdir(parents=True, exist_ok=True)
                load_splits(base, say).save(splits_file)
            barrier(ctx)
        rows: list[dict[str, Any]] = []
        for name, update in todo:
            model = ModelConfig.model_validate({**base.model.model_dump(), **update})
            config = base.model_copy(
                update={
                    "model": model,
                    "out_dir": out_dir / name.replace("=", "-").replace("+", "-"),
                    "splits_file": splits_file,
                    "publish_repo": None,
                }
            )
            if ctx.is_main:
                say(f"=== {name} ===")
            started = time.monotonic()
            result = train(config, log=say if ctx.is_main else (lambda _m: None))
            elapsed = time.monotonic() - started
            metrics = result.metrics or {}
            last = result.history["epochs"][result.best_epoch - 1]
            rows.append(
                {
                    "variant": name,
                    **update,
                    "params_m": count_parameters(build_model(config.model)) / 1e6,
                    "best_epoch": result.best_epoch,
                    "val_macro_f1": last["val_macro_f1"],
                    "val_acc": last["val_acc"],
                    "test_accuracy": metrics.get("accuracy", float("nan")),
                    "test_macro_f1": metrics.get("macro_f1", float("nan")),
                    "train_time_s": elapsed,
                    "run_dir": str(result.run_dir),
                }
            )
        rows = broadcast_object(rows, ctx)
        if ctx.is_main:
            table = format_table(rows)
            budget = (
                f"{base.total_epochs} epochs, strategy {base.strategy}, seed {base.seed}, "
                f"input {base.preprocessing.input_size}px, pretrained {base.pretrained}"
            )
            (out_dir / "ablation.md").write_text(f"# Ablation ({budget})\n\n{table}\n")
            (out_dir / "ablation.json").write_text(
                json.dumps({"budget": budget, "rows": rows}, indent=2) + "\n"
            )
            say(f"ablation ({budget}):\n{table}\nwrote {out_dir / 'ablation.md'}")
        return rows
    finally:
        cleanup(ctx)
