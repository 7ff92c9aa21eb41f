"""serve_load.py's arithmetic: pooled ratios, the targets' verdicts and the plan of runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks.serve_load import (
    EAGER,
    Run,
    aggregate,
    plan_runs,
    single_version_repo,
    target_lines,
)


def _row(round_index: int, served: float, raw: float, cpu: float, raw_cpu: float) -> dict[str, Any]:
    return {
        "round": round_index,
        "images_per_s": served,
        "raw_images_per_s": raw,
        "server_cpu_s_per_image": cpu,
        "raw_cpu_s_per_image": raw_cpu,
        "mean_batch_size": 4.0 + round_index,
        "statuses": {"200": 10},
        "errors": {},
        "ok_latencies": [0.010, 0.020, 0.030],
    }


def test_aggregate_pools_rounds_as_a_ratio_of_sums_against_each_rounds_raw_rates() -> None:
    # Round ratios 0.8 and 0.4: their mean (0.6) differs from the pooled ratio (100 / 200).
    rows = [_row(0, 40.0, 50.0, 0.04, 0.01), _row(1, 60.0, 150.0, 0.06, 0.03)]
    result = aggregate(rows, eager_by_round={0: 200.0, 1: 50.0})
    assert result["images_per_s"] == pytest.approx(50.0)
    assert result["raw_images_per_s"] == pytest.approx(100.0)
    assert result["ratio"] == pytest.approx(0.5)
    assert result["round_ratios"] == pytest.approx([0.8, 0.4])
    assert result["vs_eager"] == pytest.approx(100.0 / 250.0)
    assert result["server_cpu_ms_per_image"] == pytest.approx(50.0)
    assert result["raw_cpu_ms_per_image"] == pytest.approx(20.0)
    assert result["cpu_ratio"] == pytest.approx(0.4)
    assert result["mean_batch_size"] == pytest.approx(4.5)
    assert result["statuses"] == {"200": 20}
    assert result["latency"]["p50_ms"] == pytest.approx(20.0)


def test_aggregate_without_eager_rounds_reports_no_eager_ratio() -> None:
    assert "vs_eager" not in aggregate([_row(0, 40.0, 50.0, 0.04, 0.01)], {})


def _served(images_per_s: float, ratio: float, cpu_ms: float = 10.0) -> dict[str, Any]:
    return {"images_per_s": images_per_s, "ratio": ratio, "server_cpu_ms_per_image": cpu_ms}


def test_targets_compare_figures_of_the_same_run_with_their_goals() -> None:
    args = argparse.Namespace(clients=16, multi=32)
    runs = plan_runs([EAGER, "ort-int8"], ["ort-int8"], False, args)
    rows = {
        Run("service", EAGER, "480", 16, 1): _served(100.0, 0.90),
        Run("service", EAGER, "2mp", 16, 1): _served(80.0, 0.69),
        Run("service", "ort-int8", "480", 16, 1): _served(250.0, 0.79, 4.0),
        Run("service", "ort-int8", "2mp", 16, 1): _served(160.0, 0.71),
        Run("litserve", "ort-int8", "480", 16, 1): _served(200.0, 0.6, 5.0),
        Run("litserve", "ort-int8", "2mp", 16, 1): _served(200.0, 0.6),
    }
    report = {
        "served": {run.label: row for run, row in rows.items()},
        "model": {"int8_agreement": 0.9889},
    }
    lines = target_lines(report, runs, args)
    verdicts = {}
    for line in lines:
        name, verdict = re.fullmatch(r"\s*(.*?): (\S+ \(target >= \S+ \w+\)).*", line).groups()  # type: ignore[union-attr]
        verdicts[name] = verdict
    assert verdicts["served int8 / served eager fp32, 480x360"] == "2.50 (target >= 2.5: met)"
    assert verdicts["served int8 / served eager fp32, 2 MP"] == "2.00 (target >= 2.5: MISSED)"
    # 0.79 misses 480-px's 0.8; 0.71 meets 2 MP's 0.7; 0.69 misses it.
    own = "served / own raw"
    assert (
        verdicts[f"service onnxruntime int8, 16 x 1 480x360: {own}"]
        == "0.79 (target >= 0.8: MISSED)"
    )
    assert verdicts[f"service onnxruntime int8, 16 x 1 2 MP: {own}"] == "0.71 (target >= 0.7: met)"
    assert verdicts[f"service torch fp32, 16 x 1 2 MP: {own}"] == "0.69 (target >= 0.7: MISSED)"
    assert verdicts[f"service torch fp32, 16 x 1 480x360: {own}"] == "0.90 (target >= 0.8: met)"
    litserve = [line for line in lines if "LitServe" in line]
    assert len(litserve) == 2
    assert "1.25 (target >= 1: met); CPU per image 4.0 ms vs 5.0 ms" in litserve[0]
    assert "0.80 (target >= 1: MISSED)" in litserve[1]
    assert lines[-1].endswith("0.9889 (target >= 0.99: MISSED)")
    # No served-vs-raw target for the 32-image request.
    assert not any("1 x 32" in line for line in lines)


def test_plan_runs_serves_every_spec_and_litserve_only_where_asked() -> None:
    args = argparse.Namespace(clients=16, multi=32)
    runs = plan_runs([EAGER, "ort-fp32", "ort-int8"], [EAGER], True, args)
    keys = [(r.server, r.spec, r.images, r.clients, r.per_request) for r in runs]
    assert keys == [
        ("service", EAGER, "480", 16, 1),
        ("service", EAGER, "2mp", 16, 1),
        ("service", EAGER, "480", 1, 32),
        ("litserve", EAGER, "480", 16, 1),
        ("litserve", EAGER, "2mp", 16, 1),
        ("naive", EAGER, "480", 16, 1),
        ("service", "ort-fp32", "480", 16, 1),
        ("service", "ort-fp32", "2mp", 16, 1),
        ("service", "ort-fp32", "480", 1, 32),
        ("service", "ort-int8", "480", 16, 1),
        ("service", "ort-int8", "2mp", 16, 1),
        ("service", "ort-int8", "480", 1, 32),
    ]
    assert not any(
        r.per_request > 1
        for r in plan_runs([EAGER], [], False, argparse.Namespace(clients=4, multi=0))
    )


def test_the_service_is_given_a_repository_with_only_the_measured_version(tmp_path: Path) -> None:
    model = tmp_path / "models" / "bench-model"
    for version in (1, 5, 8):  # 8 is newest: the service would answer with it
        (model / str(version)).mkdir(parents=True)
        (model / str(version) / "model.json").write_text(str(version))
    repo = single_version_repo(model / "5", tmp_path / "tmp")
    assert [p.name for p in (repo / "bench-model").iterdir()] == ["5"]
    assert (repo / "bench-model" / "5" / "model.json").read_text() == "5"
