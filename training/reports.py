"""Evaluation metrics (scikit-learn) and report plots (matplotlib) for a training run.

Training-only: needs the ``train`` extra. Plots are drawn on ``matplotlib.figure.Figure``
objects and saved with the Agg renderer, never through ``pyplot``, so nothing here opens a
window, depends on the user's backend, or keeps figures alive between calls.

Per-class values that are undefined are ``None`` rather than 0 or NaN: precision of a class
that was never predicted, recall of a class absent from the split, ROC-AUC of a class with
no positive (or no negative) sample, average precision of a class with no positive sample.
The dicts are JSON-serialisable as they are.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from training.data import SPLITS, DataSplits, Sample
from wastenet.preprocess import to_rgb
from wastenet.schema import Evaluation

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS_DIR = "plots"
_DPI = 100


# ---------------------------------------------------------------- metrics


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _checked_inputs(
    y_true: Any, probs: Any, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    y = _as_numpy(y_true).reshape(-1)
    p = _as_numpy(probs).astype(np.float64, copy=False)
    k = len(class_names)
    if p.ndim != 2 or p.shape[1] != k:
        raise ValueError(f"probs must have shape (N, {k}) for {k} classes, got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {p.shape[0]} rows of probs")
    if y.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    bad = y[(y < 0) | (y >= k)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is outside 0..{k - 1}")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    return y.astype(np.int64), p


def _float_or_none(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return float(value)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1/support/ROC-AUC/AP, confusion.

    ``probs`` is (N, K) class scores (softmax probabilities); the prediction is the argmax.
    Macro and weighted F1 average over the classes present in ``y_true`` or predicted
    (scikit-learn's default), so a class missing from a small split does not count as 0.
    ``macro_roc_auc`` and ``macro_average_precision`` average the defined per-class values.
    """
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y, p = _checked_inputs(y_true, probs, class_names)
    k = len(class_names)
    labels = list(range(k))
    y_pred = p.argmax(axis=1)
    cm = confusion_matrix(y, y_pred, labels=labels)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    # zero_division=0 keeps scikit-learn quiet; undefined entries become None below.
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, y_pred, labels=labels, zero_division=0.0
    )
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        positives = y == c
        n_pos = int(positives.sum())
        roc_auc = float(roc_auc_score(positives, p[:, c])) if 0 < n_pos < len(y) else None
        ap = float(average_precision_score(positives, p[:, c])) if n_pos > 0 else None
        per_class[name] = {
            "precision": float(precision[c]) if predicted[c] > 0 else None,
            "recall": float(recall[c]) if support[c] > 0 else None,
            "f1": float(f1[c]) if support[c] > 0 or predicted[c] > 0 else None,
            "support": int(support[c]),
            "roc_auc": _float_or_none(roc_auc),
            "average_precision": _float_or_none(ap),
        }
    return {
        "num_samples": len(y),
        "accuracy": float(accuracy_score(y, y_pred)),
        "macro_f1": float(f1_score(y, y_pred, average="macro", zero_division=0.0)),
        "weighted_f1": float(f1_score(y, y_pred, average="weighted", zero_division=0.0)),
        "macro_roc_auc": _mean_defined([v["roc_auc"] for v in per_class.values()]),
        "macro_average_precision": _mean_defined(
            [v["average_precision"] for v in per_class.values()]
        ),
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "class_names": list(class_names),
    }


def evaluation_summary(metrics: Mapping[str, Any], split: str = "test") -> dict[str, Any]:
    """The fields of ``wastenet.artifacts.Evaluation`` for ``model.json``.

    ``per_class_f1`` leaves out classes whose F1 is undefined (absent and never predicted).
    """
    per_class_f1 = {
        name: float(v["f1"]) for name, v in metrics["per_class"].items() if v["f1"] is not None
    }
    summary = Evaluation(
        split=split,
        num_samples=int(metrics["num_samples"]),
        accuracy=float(metrics["accuracy"]),
        macro_f1=float(metrics["macro_f1"]),
        per_class_f1=per_class_f1,
    )
    return summary.model_dump()


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """A per-class table with the overall numbers underneath, for the console and logs."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    names = list(metrics["per_class"])
    width = max(len("class"), *(len(n) for n in names))
    header = f"{'class':<{width}}  precision  recall      f1  support  roc_auc      AP"
    lines = [header, "-" * len(header)]
    for name in names:
        v = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}  {cell(v['precision']):>9}  {cell(v['recall']):>6}  "
            f"{cell(v['f1']):>6}  {v['support']:>7}  {cell(v['roc_auc']):>7}  "
            f"{cell(v['average_precision']):>6}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
        f"weighted-F1 {metrics['weighted_f1']:.3f}  macro ROC-AUC "
        f"{cell(metrics.get('macro_roc_auc'))}  ({metrics['num_samples']} images)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- plotting helpers


def _figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A figure outside pyplot. Constrained layout costs about a second on a 12-panel grid,
    so the grids lay themselves out with fixed margins instead."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained" if constrained else None)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _no_data(ax: Axes, text: str, keep_ticks: bool = False) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    if not keep_ticks:
        ax.set_xticks([])
        ax.set_yticks([])


def _grid(n: int, ncols: int = 4) -> tuple[int, int]:
    ncols = min(ncols, max(n, 1))
    return math.ceil(max(n, 1) / ncols), ncols


def _stage_starts(epochs: Sequence[Mapping[str, Any]]) -> list[tuple[float, Any]]:
    """(x position, stage) where a new stage begins after the first epoch."""
    starts = []
    for prev, cur in itertools.pairwise(epochs):
        if cur.get("stage") != prev.get("stage"):
            starts.append((float(cur["epoch"]) - 0.5, cur.get("stage")))
    return starts


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if value is not None:
            xs.append(float(r["epoch"]))
            ys.append(float(value))
    return xs, ys


# ---------------------------------------------------------------- plots


def plot_loss_per_iteration(history: Mapping[str, Any], path: Path) -> Path:
    """Training loss at every step, with a moving average and epoch boundaries."""
    from matplotlib.ticker import MaxNLocator

    iterations = history.get("iterations") or []
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    if not iterations:
        _no_data(ax, "no iterations recorded")
    else:
        steps = np.array([float(it["step"]) for it in iterations])
        loss = np.array([float(it["loss"]) for it in iterations])
        window = max(1, len(loss) // 30)
        alpha = 0.35 if window > 1 else 1.0
        ax.plot(steps, loss, color="tab:blue", alpha=alpha, linewidth=0.8, label="loss")
        if window > 1:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(
                steps[window - 1 :],
                smooth,
                color="tab:blue",
                linewidth=1.8,
                label=f"moving average ({window} steps)",
            )
        epochs = [it.get("epoch") for it in iterations]
        boundaries = [steps[i] - 0.5 for i in range(1, len(epochs)) if epochs[i] != epochs[i - 1]]
        if len(boundaries) <= 60:
            for x in boundaries:
                ax.axvline(x, color="0.85", linewidth=0.8, zorder=0)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss")
        ax.legend(loc="upper right")
    ax.set_title("Loss per iteration")
    return _save(fig, path)


# What the losses in a history are, when the history does not say (runs before it did).
DEFAULT_LOSSES = {"train": "the training objective", "val": "cross-entropy"}


def plot_epoch_curves(history: Mapping[str, Any], path: Path) -> Path:
    """Loss and accuracy per epoch, train vs val (plus learning rates), stages marked.

    The two losses are labelled with what they are (``history["losses"]``): the training
    loss is the optimised one (label smoothing, class weights, mixed targets) and the
    validation loss plain cross-entropy, so their levels need not match.
    """
    from matplotlib.ticker import MaxNLocator

    epochs = history.get("epochs") or []
    has_lr = any(isinstance(r.get("lr"), Mapping) and r["lr"] for r in epochs)
    panels = 3 if has_lr else 2
    fig = _figure(5 * panels, 4)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if not epochs:
        for ax in axes:
            _no_data(ax, "no epochs recorded")
        return _save(fig, path)
    losses = {**DEFAULT_LOSSES, **(history.get("losses") or {})}
    plan: list[tuple[Axes, str, list[tuple[str, str]]]] = [
        (
            axes[0],
            "loss (train and val differ in kind)" if losses["train"] != losses["val"] else "loss",
            [("train_loss", f"train: {losses['train']}"), ("val_loss", f"val: {losses['val']}")],
        ),
        (
            axes[1],
            "accuracy",
            [("train_acc", "train acc"), ("val_acc", "val acc"), ("val_macro_f1", "val macro-F1")],
        ),
    ]
    for ax, ylabel, keys in plan:
        for key, label in keys:
            xs, ys = _series(epochs, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_ylabel(ylabel)
    axes[1].set_ylim(0.0, 1.02)
    if has_lr:
        _plot_lrs(axes[2], epochs)
    starts = _stage_starts(epochs)
    for ax in axes:
        for x, stage in starts:
            ax.axvline(x, color="0.5", linestyle="--", linewidth=0.9)
            ax.text(
                x,
                1.0,
                f" stage {stage}",
                transform=ax.get_xaxis_transform(),
                va="top",
                ha="left",
                fontsize=8,
                color="0.35",
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_lines():
            ax.legend(loc="best", fontsize=8)
    fig.suptitle("Per-epoch curves")
    return _save(fig, path)


def _lr_points(records: Sequence[Mapping[str, Any]], group: str) -> list[tuple[float, float]]:
    """(x, LR) of ``group``: at x = e - 1 the LR of epoch e's first step (``lr_start``) and at
    x = e the LR after its last step (``lr``), so that each epoch is a segment; histories
    without ``lr_start`` give the after-epoch values only."""
    points = []
    for r in records:
        start, end = (r.get("lr_start") or {}).get(group), (r.get("lr") or {}).get(group)
        if start is not None:
            points.append((float(r["epoch"]) - 1.0, float(start)))
        if end is not None:
            points.append((float(r["epoch"]), float(end)))
    return points


def _plot_lrs(ax: Axes, epochs: Sequence[Mapping[str, Any]]) -> None:
    groups = sorted({g for r in epochs for g in (r.get("lr") or {})})
    positive = False
    for g in groups:
        points = _lr_points(epochs, g)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=g)
            positive = positive or min(lr for _, lr in points) > 0
    if positive:
        ax.set_yscale("log")
    with_start = any(r.get("lr_start") for r in epochs)
    ax.set_ylabel(
        "learning rate (first and last step of each epoch)"
        if with_start
        else "learning rate (after each epoch)"
    )


def plot_confusion_matrix(metrics: Mapping[str, Any], path: Path, normalize: bool = True) -> Path:
    """Rows: true class; columns: predicted. ``normalize`` shows each row as fractions (recall)."""
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.float64)
    names = list(metrics["class_names"])
    k = len(names)
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(totals > 0, cm / totals, np.nan)
    else:
        values = cm
    side = max(5.0, 0.55 * k + 2.5)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(values)
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    top = 1.0 if normalize else max(float(np.nanmax(values)), 1.0)
    for i in range(k):
        for j in range(k):
            v = values[i, j]
            if np.isnan(v):
                continue
            if normalize and v < 0.005 and i != j:
                continue  # keep the picture readable: empty cells stay blank
            text = f"{v:.2f}" if normalize else f"{int(v)}"
            colour = "white" if v > 0.5 * top else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    kind = "row-normalised" if normalize else "counts"
    ax.set_title(f"Confusion matrix ({kind}); accuracy {metrics.get('accuracy', float('nan')):.3f}")
    return _save(fig, path)


def pr_curve_points(positives: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every score threshold, as drawn.

    scikit-learn ends its curve with a point at recall 0 and precision 1 that belongs to no
    threshold; drawn, it is a spike to precision 1 on every curve, even for a class whose
    highest score is a wrong one. It is left out.
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(positives, scores)
    return recall[:-1], precision[:-1]


def _per_class_curves(
    y_true: Any, probs: Any, class_names: Sequence[str], path: Path, kind: str
) -> Path:
    from sklearn.metrics import auc, average_precision_score, roc_curve

    y, p = _checked_inputs(y_true, probs, class_names)
    rows, cols = _grid(len(class_names))
    fig = _figure(2.8 * cols, 2.6 * rows + 0.6, constrained=False)
    grid = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    fig.subplots_adjust(
        left=0.07,
        right=0.98,
        bottom=0.08,
        top=1 - 0.6 / fig.get_figheight(),
        wspace=0.12,
        hspace=0.35,
    )
    axes = grid.ravel()
    for c, name in enumerate(class_names):
        ax = axes[c]
        positives = y == c
        n_pos = int(positives.sum())
        if kind == "pr":
            if n_pos == 0:
                _no_data(ax, "no samples of this class", keep_ticks=True)
            else:
                recall, precision = pr_curve_points(positives, p[:, c])
                ap = average_precision_score(positives, p[:, c])
                ax.step(recall, precision, where="post", color="tab:blue")
                ax.axhline(n_pos / len(y), color="0.7", linestyle=":", linewidth=1)
                name = f"{name}  AP {ap:.2f}"
            xlabel, ylabel = "recall", "precision"
        else:
            if n_pos == 0 or n_pos == len(y):
                _no_data(ax, "ROC undefined: one class only", keep_ticks=True)
            else:
                fpr, tpr, _ = roc_curve(positives, p[:, c])
                ax.plot(fpr, tpr, color="tab:orange")
                ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
                name = f"{name}  AUC {auc(fpr, tpr):.2f}"
            xlabel, ylabel = "false positive rate", "true positive rate"
        if c + cols >= len(class_names):
            ax.set_xlabel(xlabel, fontsize=8)
        if c % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(f"{name}  (n={n_pos})", fontsize=9)
    ticks = [0.0, 0.5, 1.0]
    axes[0].set_xticks(ticks)
    axes[0].set_yticks(ticks)
    axes[0].set_xlim(-0.02, 1.02)
    axes[0].set_ylim(-0.02, 1.02)
    for ax in axes:
        ax.tick_params(labelsize=7)
    for ax in axes[len(class_names) :]:
        ax.set_axis_off()
    fig.suptitle(
        "Precision-recall per class (one vs rest)"
        if kind == "pr"
        else "ROC per class (one vs rest)"
    )
    return _save(fig, path)


def plot_pr_curves(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path
) -> Path:
    """One precision-recall panel per class; the dotted line is the class's prevalence."""
    return _per_class_curves(y_true, probs, class_names, path, "pr")


def plot_roc_curves(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path
) -> Path:
    """One ROC panel per class; the dotted diagonal is a random classifier."""
    return _per_class_curves(y_true, probs, class_names, path, "roc")


def plot_class_distribution(splits: DataSplits, path: Path) -> Path:
    """Images per class in each split, with the train imbalance ratio in the title."""
    counts = splits.counts()
    names = list(splits.class_names)
    k = len(names)
    fig = _figure(max(7.0, 0.8 * k + 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(SPLITS)
    x = np.arange(k)
    for i, split in enumerate(SPLITS):
        bars = ax.bar(x + (i - 1) * width, counts[split], width, label=split)
        ax.bar_label(bars, fontsize=6, padding=1)
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.legend()
    train = [c for c in counts["train"] if c > 0]
    ratio = f"; train imbalance {max(train) / min(train):.1f}x" if train else ""
    ax.set_title(f"Class distribution ({sum(sum(v) for v in counts.values())} images{ratio})")
    return _save(fig, path)


def _pick_round_robin(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """Up to n samples, taking one class after another so that every class shows up."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    queues = []
    for label in sorted(by_class):
        group = by_class[label]
        queues.append([group[i] for i in rng.permutation(len(group))])
    picked: list[Sample] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(picked) < n:
                picked.append(q[depth])
        depth += 1
    return picked


def plot_sample_grid(
    samples: Sequence[Sample],
    class_names: Sequence[str],
    path: Path,
    n: int = 24,
    seed: int = 0,
) -> Path:
    """A grid of up to ``n`` images with their labels, drawn across all classes."""
    picked = _pick_round_robin(samples, n, seed)
    rows, cols = _grid(len(picked), ncols=6)
    fig = _figure(2.0 * cols, 2.2 * rows, constrained=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.25)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    if not picked:
        _no_data(axes[0], "no images")
    for ax, sample in zip(axes, picked, strict=False):
        try:
            with Image.open(sample.path) as img:
                thumb = to_rgb(img)
                thumb.thumbnail((192, 192))
            ax.imshow(np.asarray(thumb))
            ax.set_xticks([])
            ax.set_yticks([])
        except (OSError, SyntaxError, ValueError):
            _no_data(ax, "unreadable")
        ax.set_title(class_names[sample.label], fontsize=9)
    for ax in axes[max(len(picked), 1) :]:
        ax.set_axis_off()
    return _save(fig, path)


def write_plots(
    run_dir: Path,
    history: Mapping[str, Any],
    y_true: np.ndarray,
    probs: np.ndarray,
    metrics: Mapping[str, Any],
    splits: DataSplits,
) -> list[Path]:
    """All report plots into ``run_dir/plots/``; returns the files written."""
    out = Path(run_dir) / PLOTS_DIR
    names = list(metrics["class_names"])
    return [
        plot_loss_per_iteration(history, out / "loss_per_iteration.png"),
        plot_epoch_curves(history, out / "epoch_curves.png"),
        plot_confusion_matrix(metrics, out / "confusion_matrix.png", normalize=True),
        plot_confusion_matrix(metrics, out / "confusion_matrix_counts.png", normalize=False),
        plot_pr_curves(y_true, probs, names, out / "pr_curves.png"),
        plot_roc_curves(y_true, probs, names, out / "roc_curves.png"),
        plot_class_distribution(splits, out / "class_distribution.png"),
        plot_sample_grid(splits.train, names, out / "samples_train.png"),
    ]
