"""Compare training recipes over several seeds: test accuracy and macro-F1, mean ± std.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_recipes.py --data data/synth \\
        --seeds 0 1 2 --recipe "defaults=" \\
        --recipe "differential 1e-3=--strategy differential --lr-backbone 1e-3 \\
                  --lr-attention 1e-3 --lr-head 1e-3" \\
        -- --no-pretrained --input-size 32 --resize-size 36 --epochs 10

Every recipe is ``NAME=FLAGS``: ``train`` flags added to the common flags after ``--``.
Each (recipe, seed) pair is one ordinary training run (same split for a seed, since the
split follows ``--seed``); its run directory goes under ``--out``. One line per run is
printed as it finishes, then one table row per recipe.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.cli import build_parser, config_from_args
from training.trainer import train


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def _run(flags: list[str], out: Path) -> dict[str, Any]:
    args = build_parser().parse_args(["train", *flags, "--out-dir", str(out)])
    config = config_from_args(args)
    start = time.perf_counter()
    result = train(config, log=lambda _m: None)
    assert result.metrics is not None
    record: dict[str, Any] = {
        "test_accuracy": result.metrics["accuracy"],
        "test_macro_f1": result.metrics["macro_f1"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history["epochs"]),
        "time_s": time.perf_counter() - start,
    }
    if "weights" in result.metrics:  # which weights were kept (raw or EMA)
        record["weights"] = result.metrics["weights"]
    return record


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, required=True, help="image folder (e.g. training synth)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", action="append", required=True, metavar="NAME=FLAGS")
    ap.add_argument("--out", type=Path, help="run directories go here (default: a temp folder)")
    ap.add_argument("common", nargs=argparse.REMAINDER, help="train flags shared by all recipes")
    args = ap.parse_args()
    common = [f for f in args.common if f != "--"]
    out = args.out or Path(tempfile.mkdtemp(prefix="recipes-"))
    base = ["--data", str(args.data), "--no-progress", "--no-plots", "--device", "cpu", *common]
    table = []
    for recipe in args.recipe:
        name, _, flags = recipe.partition("=")
        runs = []
        for seed in args.seeds:
            run_dir = out / f"{name.replace(' ', '_')}-seed{seed}"
            record = _run([*base, *shlex.split(flags), "--seed", str(seed)], run_dir)
            runs.append(record)
            print(json.dumps({"recipe": name, "seed": seed, **record}), flush=True)
        acc = [r["test_accuracy"] for r in runs]
        f1 = [r["test_macro_f1"] for r in runs]
        kept = ",".join(str(r.get("weights", "-")) for r in runs)
        table.append(f"| {name} | {_mean_std(acc)} | {_mean_std(f1)} | {kept} |")
    print(
        f"\n{len(args.seeds)} seeds ({' '.join(map(str, args.seeds))}); common flags: "
        f"{' '.join(common)}"
    )
    print("| recipe | test accuracy | test macro-F1 | weights kept |")
    print("|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
