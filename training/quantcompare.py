"""Compare the int8 quantisation recipes on trained runs: agreement with PyTorch and speed.

    python -m training.quantcompare RUN_DIR [RUN_DIR ...] [--recipes all conv ...]

For every run (its best checkpoint and splits.json): export the fp32 ONNX once, quantise it
with each recipe (calibrated on the run's train and val images), measure top-1 agreement and
the largest probability difference against PyTorch fp32 on the test split (``--with-val``:
on the val and test splits, calibrating on the train split alone), and time one
ONNX Runtime thread on a batch of 8 (timing rounds alternate between the files). Prints one
row per recipe: agreement mean ± std over the runs, the worst run, the images whose top-1
changed, the largest probability difference and the median speed. Speeds on a shared
machine are a rough indicator only.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
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


def _runner(path: Path | None, model: torch.nn.Module, x: np.ndarray) -> Callable[[], Any]:
    """One forward pass of a batch: ONNX Runtime on one thread, or PyTorch when no path."""
    import onnxruntime as ort

    if path is None:
        tensor = torch.from_numpy(x)

        def run_torch() -> Any:
            with torch.no_grad():
                return model(tensor)

        return run_torch
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {INPUT_NAME: x})


def images_per_second(
    files: dict[str, Path | None], model: torch.nn.Module, size: int, rounds: int
) -> dict[str, float]:
    """Median img/s of each file over ``rounds`` of 20 batches of 8, rounds alternating
    between the files so that a busy moment of a shared machine hits them all alike."""
    x = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    runners = {name: _runner(path, model, x) for name, path in files.items()}
    rates: dict[str, list[float]] = {name: [] for name in files}
    for run in runners.values():
        for _ in range(3):
            run()
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(20):
                run()
            rates[name].append(160 / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def held_out(run: Path, with_val: bool) -> DataSplits:
    """The run's splits; ``with_val`` measures on val + test and calibrates on train alone
    (twice the images to tell recipes apart, none of them seen by the calibration)."""
    splits = DataSplits.load(run / "splits.json")
    if with_val:
        return dataclasses.replace(splits, test=[*splits.val, *splits.test], val=[])
    return splits


def compare_run(
    run: Path, recipes: Sequence[str], calibration_images: int, rounds: int, with_val: bool
) -> dict[str, dict[str, float]]:
    """recipe (plus 'torch fp32' and 'ORT fp32') -> agreement, max_prob_diff, img_s."""
    best = BestCheckpoint.load(run / "checkpoints" / "best.pt")
    model = build_model(best.model_config)
    model.load_state_dict(best.model)
    model.eval()
    splits = held_out(run, with_val)
    options = ExportConfig(int8=True, calibration_images=calibration_images)
    images = images_from_splits(splits, f"run {run}", options)
    size, pre, names = best.preprocessing.input_size, best.preprocessing, best.class_names
    torch.set_num_threads(1)
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_onnx(model, size, fp32)
        files: dict[str, Path] = {"ORT fp32": fp32}
        for name in recipes:
            files[name] = Path(tmp) / f"{name}.onnx"
            batches = calibration_batches(images.calibration, pre)
            quantize_int8(fp32, files[name], batches, model, RECIPES[name])
        reports = measure_agreement(model, files, images.test, pre, names, 0.99)
        speeds = images_per_second({"torch fp32": None, **files}, model, size, rounds)
    rows["torch fp32"] = {"agreement": 1.0, "max_prob_diff": 0.0, "img_s": speeds["torch fp32"]}
    for name, report in reports.items():
        rows[name] = {
            "agreement": report.top1_agreement,
            "max_prob_diff": report.max_prob_diff,
            "img_s": speeds[name],
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
    parser.add_argument(
        "--with-val",
        action="store_true",
        help="measure on the val and test splits, calibrate on the train split alone",
    )
    args = parser.parse_args(argv)
    results, tests = [], []
    for run in args.runs:
        print(f"{run}: exporting, quantising {len(args.recipes)} recipes, measuring", flush=True)
        rows = compare_run(run, args.recipes, args.calibration_images, args.rounds, args.with_val)
        tests.append(len(held_out(run, args.with_val).test))
        for name, row in rows.items():
            print(f"  {name}: agreement {row['agreement']:.4f}, max prob diff "
                  f"{row['max_prob_diff']:.3g}, {row['img_s']:.0f} img/s", flush=True)  # fmt: skip
        results.append(rows)
    print(format_table(results, tests))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
