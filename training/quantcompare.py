"""Compare the int8 quantisation recipes on trained runs: agreement with PyTorch and speed.

    python -m training.quantcompare RUN_DIR [RUN_DIR ...] [--recipes all conv ...]

For every run (its best checkpoint and splits.json): export the fp32 ONNX once, quantise it
with each recipe (calibrated on the run's train and val images), measure top-1 agreement and
the largest probability difference against PyTorch fp32 on the test split, and time one
ONNX Runtime thread on a batch of 8. Prints one row per recipe: agreement mean ± std over
the runs, the worst run, the largest probability difference and the median speed. Speeds on
a shared machine are a rough indicator only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.checkpoint import BestCheckpoint
from training.data import DataSplits
from training.export import (
    INPUT_NAME,
    RECIPES,
    ExportConfig,
    calibration_batches,
    export_onnx,
    images_from_splits,
    measure_agreement,
    quantize_int8,
)
from wastenet.nets import build_model


def images_per_second(path: Path | None, model: torch.nn.Module, size: int, rounds: int) -> float:
    """Median img/s over ``rounds`` of 20 batches of 8 on one thread (ORT, or torch if no path)."""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    if path is None:
        tensor = torch.from_numpy(x)

        def run() -> Any:
            with torch.no_grad():
                return model(tensor)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run() -> Any:
            return session.run(None, {INPUT_NAME: x})

    for _ in range(3):
        run()
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(20):
            run()
        rates.append(160 / (time.perf_counter() - start))
    return statistics.median(rates)


def compare_run(
    run: Path, recipes: Sequence[str], calibration_images: int, rounds: int
) -> dict[str, dict[str, float]]:
    """recipe (plus 'torch fp32' and 'ORT fp32') -> agreement, max_prob_diff, img_s."""
    best = BestCheckpoint.load(run / "checkpoints" / "best.pt")
    model = build_model(best.model_config)
    model.load_state_dict(best.model)
    model.eval()
    splits = DataSplits.load(run / "splits.json")
    options = ExportConfig(int8=True, calibration_images=calibration_images)
    images = images_from_splits(splits, f"run {run}", options)
    size, pre, names = best.preprocessing.input_size, best.preprocessing, best.class_names
    torch.set_num_threads(1)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(model, size, fp32)
        files = {"ORT fp32": fp32}
        for name in recipes:
            files[name] = Path(tmp) / f"{name}.onnx"
            batches = calibration_batches(images.calibration, pre)
            quantize_int8(fp32, files[name], batches, model, RECIPES[name])
        reports = measure_agreement(model, files, images.test, pre, names, 0.99)
        rows["torch fp32"] = {"agreement": 1.0, "max_prob_diff": 0.0}
        rows["torch fp32"]["img_s"] = images_per_second(None, model, size, rounds)
        for name, path in files.items():
            report = reports[name]
            rows[name] = {
                "agreement": report.top1_agreement,
                "max_prob_diff": report.max_prob_diff,
                "img_s": images_per_second(path, model, size, rounds),
            }
    return rows


def format_table(results: list[dict[str, dict[str, float]]], tests: list[int]) -> str:
    lines = [
        "| variant | top-1 agreement (mean ± std) | worst run | top-1 changed | max prob diff "
        "| img/s, 1 thread |",
        "|---|---|---|---|---|---|",
    ]
    for name in results[0]:
        agree = [r[name]["agreement"] for r in results]
        std = statistics.stdev(agree) if len(agree) > 1 else 0.0
        changed = sum(round((1 - a) * n) for a, n in zip(agree, tests, strict=True))
        diff = max(r[name]["max_prob_diff"] for r in results)
        speed = statistics.median(r[name]["img_s"] for r in results)
        lines.append(
            f"| {name} | {statistics.mean(agree):.4f} ± {std:.4f} | {min(agree):.4f} | "
            f"{changed}/{sum(tests)} | {diff:.2g} | {speed:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.quantcompare", description=__doc__)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (trained)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (median)")
    args = parser.parse_args(argv)
    results, tests = [], []
    for run in args.runs:
        print(f"{run}: exporting, quantising {len(args.recipes)} recipes, measuring", flush=True)
        rows = compare_run(run, args.recipes, args.calibration_images, args.rounds)
        tests.append(len(DataSplits.load(run / "splits.json").test))
        for name, row in rows.items():
            print(f"  {name}: agreement {row['agreement']:.4f}, max prob diff "
                  f"{row['max_prob_diff']:.3g}, {row['img_s']:.0f} img/s", flush=True)  # fmt: skip
        results.append(rows)
    print(format_table(results, tests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
