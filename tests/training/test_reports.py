"""Metrics against hand-computed values, and the report plots as real, non-empty PNGs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from training import reports
from training.data import DataSplits, Sample
from training.reports import (
    classification_metrics,
    evaluation_summary,
    format_metrics_table,
    plot_confusion_matrix,
    plot_epoch_curves,
    plot_pr_curves,
    plot_sample_grid,
    write_plots,
)
from training.synth import generate_synthetic_dataset
from wastenet.schema import Evaluation

NAMES = ("a", "b", "c")
# True labels 0 0 1 1 2 2; predictions (argmax) 0 1 1 1 2 0.
Y = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.6, 0.3, 0.1],
        [0.4, 0.5, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.8, 0.1],
        [0.1, 0.2, 0.7],
        [0.5, 0.2, 0.3],
    ]
)


def test_metrics_equal_hand_computed_values() -> None:
    m = classification_metrics(Y, PROBS, NAMES)
    assert m["num_samples"] == 6
    assert m["class_names"] == ["a", "b", "c"]
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_class"][n] for n in NAMES)
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((0.5, 0.5, 0.5, 2))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # equal supports
    # Class a: positives score 0.6 and 0.4, negatives 0.2 0.1 0.1 0.5 -> 7 of 8 pairs ordered.
    assert a["roc_auc"] == pytest.approx(7 / 8)
    assert b["roc_auc"] == pytest.approx(1.0)
    # Class a ranked: 0.6 (pos) 0.5 (neg) 0.4 (pos) -> AP = 0.5 * 1 + 0.5 * 2/3.
    assert a["average_precision"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert c["average_precision"] == pytest.approx(1.0)
    assert m["macro_roc_auc"] == pytest.approx((7 / 8 + 1 + 1) / 3)
    json.dumps(m, allow_nan=False)


def test_absent_classes_give_none_and_no_warnings() -> None:
    names = (*NAMES, "d", "e")
    probs = np.hstack([PROBS, np.zeros((6, 2))])
    probs[5] = [0.1, 0.1, 0.1, 0.0, 0.7]  # an absent class that is predicted once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(Y, probs, names)
    d, e = m["per_class"]["d"], m["per_class"]["e"]
    assert d == {
        "precision": None,
        "recall": None,
        "f1": None,
        "support": 0,
        "roc_auc": None,
        "average_precision": None,
    }
    assert (e["precision"], e["recall"], e["f1"], e["support"]) == (0.0, None, 0.0, 0)
    assert e["roc_auc"] is None and e["average_precision"] is None
    # Predictions are now 0 1 1 1 2 4: a has precision 1, recall 1/2 (F1 2/3), b 0.8,
    # c precision 1, recall 1/2 (2/3), e 0. Macro-F1 averages the classes present or
    # predicted (a, b, c, e), not the absent, never-predicted d.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3 + 0.0) / 4)
    json.dumps(m, allow_nan=False)


def test_single_class_split_has_undefined_auc() -> None:
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ("x", "y"))
    assert m["per_class"]["y"]["roc_auc"] is None
    assert m["per_class"]["y"]["average_precision"] == pytest.approx(1.0)
    assert m["macro_roc_auc"] is None
    assert m["accuracy"] == 0.5


def test_accepts_tensors() -> None:
    m = classification_metrics(torch.tensor(Y), torch.tensor(PROBS, dtype=torch.float32), NAMES)
    assert m["accuracy"] == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    ("y", "probs", "message"),
    [
        (Y, PROBS[:, :2], r"probs must have shape \(N, 3\) for 3 classes, got \(6, 2\)"),
        (Y[:5], PROBS, r"5 labels but 6 rows of probs"),
        (np.array([0, 0, 1, 1, 2, 3]), PROBS, r"label 3 is outside 0..2"),
        (Y[:0], PROBS[:0], r"no samples to evaluate"),
        (Y + 0.5, PROBS, r"y_true must hold integer class indices"),
        (Y, np.where(PROBS > 0.65, np.nan, PROBS), r"NaN"),
    ],
)
def test_rejects_bad_inputs(y: np.ndarray, probs: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, probs, NAMES)


def test_evaluation_summary_fits_the_artifact_model() -> None:
    names = (*NAMES, "d")
    m = classification_metrics(Y, np.hstack([PROBS, np.zeros((6, 1))]), names)
    summary = evaluation_summary(m, "val")
    assert summary == {
        "split": "val",
        "num_samples": 6,
        "accuracy": pytest.approx(4 / 6),
        "macro_f1": pytest.approx(m["macro_f1"]),
        "per_class_f1": {"a": 0.5, "b": pytest.approx(0.8), "c": pytest.approx(2 / 3)},
    }
    assert Evaluation.model_validate(summary).per_class_f1["a"] == 0.5


def test_format_metrics_table() -> None:
    names = (*NAMES, "d")
    table = format_metrics_table(
        classification_metrics(Y, np.hstack([PROBS, np.zeros((6, 1))]), names)
    )
    lines = table.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support", "roc_auc", "AP"]
    assert lines[2].split() == ["a", "0.500", "0.500", "0.500", "2", "0.875", "0.833"]
    assert lines[5].split() == ["d", "-", "-", "-", "0", "-", "-"]
    assert "accuracy 0.667  macro-F1 0.656" in lines[-1]
    assert "(6 images)" in lines[-1]


# ---------------------------------------------------------------- plots


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _n_colours(pixels: np.ndarray) -> int:
    packed = pixels.astype(np.uint32)
    return len(np.unique((packed[..., 0] << 16) | (packed[..., 1] << 8) | packed[..., 2]))


def _has_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> bool:
    return bool((np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tol).any())


TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)


@pytest.fixture(scope="module")
def data_report_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("reports")
    classes = ("battery", "paper", "shoes")
    generate_synthetic_dataset(root / "data", 4, size=32, class_names=classes)
    samples = [
        Sample(str(root / "data" / c / f"{c}_{i:04d}.jpg"), k)
        for k, c in enumerate(classes)
        for i in range(4)
    ]
    splits = DataSplits(
        root=str(root / "data"),
        class_names=classes,
        train=samples[0:2] + samples[4:6] + samples[8:10],
        val=samples[2:3] + samples[6:7] + samples[10:11],
        test=samples[3:4] + samples[7:8] + samples[11:12],
        skipped={},
        seed=0,
        presplit=False,
    )
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    logits = rng.normal(size=(60, 3))
    logits[np.arange(60), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    history = {
        "epochs": [
            {
                "epoch": e,
                "stage": 1 if e <= 2 else 2,
                "trainable_params": 1000 * e,
                "lr": {"head": 1e-3 / e, "backbone": 1e-5},
                "train_loss": 2.0 / e,
                "train_acc": 0.2 * e,
                "val_loss": 2.2 / e,
                "val_acc": 0.18 * e,
                "val_macro_f1": 0.15 * e,
                "time_s": 1.0,
            }
            for e in range(1, 5)
        ],
        "iterations": [
            {"step": i + 1, "epoch": i // 25 + 1, "loss": 2.5 * np.exp(-i / 40) + 0.1}
            for i in range(100)
        ],
    }
    return {
        "root": root,
        "splits": splits,
        "y": y,
        "probs": probs,
        "metrics": classification_metrics(y, probs, classes),
        "history": history,
    }


def test_write_plots_writes_every_plot(data_report_inputs: dict, tmp_path: Path) -> None:
    d = data_report_inputs
    paths = write_plots(tmp_path, d["history"], d["y"], d["probs"], d["metrics"], d["splits"])
    names = sorted(p.name for p in paths)
    assert names == [
        "class_distribution.png",
        "confusion_matrix.png",
        "confusion_matrix_counts.png",
        "epoch_curves.png",
        "loss_per_iteration.png",
        "pr_curves.png",
        "roc_curves.png",
        "samples_train.png",
    ]
    assert all(p.parent == tmp_path / "plots" for p in paths)
    pixels = {p.name: _png(p) for p in paths}
    for name, px in pixels.items():
        assert px.shape[0] >= 200 and px.shape[1] >= 400, name
        assert _n_colours(px) > 30, name
    # The data is drawn, not only the axes: line and bar colours are present.
    assert _has_colour(pixels["loss_per_iteration.png"], TAB_BLUE)
    assert _has_colour(pixels["epoch_curves.png"], TAB_ORANGE)
    assert _has_colour(pixels["pr_curves.png"], TAB_BLUE)
    assert _has_colour(pixels["roc_curves.png"], TAB_ORANGE)
    assert _has_colour(pixels["class_distribution.png"], TAB_BLUE)
    # The sample grid shows photos: far more colours than a chart.
    assert _n_colours(pixels["samples_train.png"]) > 2000
    assert not np.array_equal(pixels["confusion_matrix.png"], pixels["confusion_matrix_counts.png"])


def test_plots_survive_empty_history_and_absent_classes(
    data_report_inputs: dict, tmp_path: Path
) -> None:
    d = data_report_inputs
    y = np.array([0, 0, 1, 1])  # class 2 absent from this split
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    metrics = classification_metrics(y, probs, d["splits"].class_names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = write_plots(
            tmp_path, {"epochs": [], "iterations": []}, y, probs, metrics, d["splits"]
        )
    assert len(paths) == 8
    for p in paths:
        _png(p)


def test_confusion_matrix_cells_are_drawn(data_report_inputs: dict, tmp_path: Path) -> None:
    perfect = classification_metrics(np.array([0, 1, 2]), np.eye(3), ("x", "y", "z"))
    px = _png(plot_confusion_matrix(perfect, tmp_path / "cm.png", normalize=True))
    # A perfect row-normalised matrix has three cells at the darkest blue of the colour map.
    darkest = (8, 48, 107)
    assert (np.abs(px.astype(int) - darkest).max(axis=-1) <= 6).sum() > 3 * 500


def test_sample_grid_marks_unreadable_files(data_report_inputs: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    samples = [*data_report_inputs["splits"].train[:2], Sample(str(broken), 1)]
    path = plot_sample_grid(samples, ("battery", "paper", "shoes"), tmp_path / "grid.png", n=3)
    assert _png(path).shape[1] >= 400


def _drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions save, in order."""
    figures: list[Any] = []
    save = reports._save

    def keep(fig: Any, path: Path) -> Path:
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(reports, "_save", keep)
    return figures


def test_epoch_curves_say_what_each_loss_is_and_when_each_lr_applied(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    figures = _drawn(monkeypatch)
    epochs = [
        {"epoch": 1, "stage": 1, "lr_start": {"head": 1e-4}, "lr": {"head": 1e-3},
         "train_loss": 1.9, "val_loss": 2.2, "train_acc": 0.2, "val_acc": 0.2, "val_macro_f1": 0.1},
        {"epoch": 2, "stage": 1, "lr_start": {"head": 1e-3}, "lr": {"head": 2e-4},
         "train_loss": 1.5, "val_loss": 1.4, "train_acc": 0.4, "val_acc": 0.5, "val_macro_f1": 0.4},
        {"epoch": 3, "stage": 2, "lr_start": {"head": 5e-4}, "lr": {"head": 5e-5},
         "train_loss": 1.2, "val_loss": 1.0, "train_acc": 0.6, "val_acc": 0.6, "val_macro_f1": 0.6},
    ]  # fmt: skip
    losses = {"train": "cross-entropy, label smoothing 0.1", "val": "cross-entropy"}
    plot_epoch_curves({"epochs": epochs, "losses": losses}, tmp_path / "e.png")
    loss_ax, _, lr_ax = figures[-1].axes
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert labels == ["train: cross-entropy, label smoothing 0.1", "val: cross-entropy"]
    assert "differ" in loss_ax.get_ylabel()
    # Each epoch is a segment from its first step's LR (at e - 1) to its last one's (at e);
    # the jump at the stage boundary shows between 2e-4 and 5e-4 at x = 2.
    (line,) = lr_ax.get_lines()[:1]
    assert list(line.get_xdata()) == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0]
    assert list(line.get_ydata()) == [1e-4, 1e-3, 1e-3, 2e-4, 5e-4, 5e-5]
    assert lr_ax.get_ylabel() == "learning rate (first and last step of each epoch)"

    # A history that does not say which loss is which, nor the start LRs, still says so.
    old = [{k: v for k, v in e.items() if k != "lr_start"} for e in epochs]
    plot_epoch_curves({"epochs": old}, tmp_path / "old.png")
    loss_ax, _, lr_ax = figures[-1].axes
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert labels == ["train: the training objective", "val: cross-entropy"]
    assert list(lr_ax.get_lines()[0].get_xdata()) == [1.0, 2.0, 3.0]
    assert lr_ax.get_ylabel() == "learning rate (after each epoch)"


def test_pr_curves_have_no_spike_to_precision_1_at_recall_0(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    figures = _drawn(monkeypatch)
    # Class a's highest score belongs to a class-b image: at the first threshold precision
    # is 0, and nothing reaches precision 1 before recall 0.5.
    y = np.array([1, 0, 0, 1, 2, 2])
    probs = np.array(
        [[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1],
         [0.2, 0.1, 0.7], [0.1, 0.1, 0.8]]
    )  # fmt: skip
    plot_pr_curves(y, probs, NAMES, tmp_path / "pr.png")
    curve = figures[-1].axes[0].get_lines()[0]
    drawn = sorted(zip(curve.get_xdata(), curve.get_ydata(), strict=True))
    # Precision and recall of "score >= t" for every distinct score t, by hand.
    scores, positive = probs[:, 0], y == 0
    expected = []
    for t in np.unique(scores):
        picked = scores >= t
        hits = (picked & positive).sum()
        expected.append((hits / positive.sum(), hits / picked.sum()))
    np.testing.assert_allclose(np.array(drawn), np.array(sorted(expected)))
    assert drawn[0] == (0.0, 0.0) and (0.0, 1.0) not in drawn
