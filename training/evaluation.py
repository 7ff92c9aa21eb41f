"""Evaluate a run, checkpoint or published version on a data split: metrics and plots.

An evaluation is only worth its number when its images were held out. So before anything
runs, the model's training files are looked up (:func:`training_data`): a run directory
has its ``splits.json``; a published version records where its data came from
(``model.json``'s ``data``: source folder, seed, fractions and a digest of each split)
and the run directory it came from. Evaluation images that were training images stop the
evaluation, unless ``allow_overlap`` says to go on, and then the metrics say
``held_out: false``. When the training files cannot be found, the evaluation runs with a
warning and ``held_out: null``.

Evaluating a run directory writes into ``<run>/eval-<split>/``: the run's own
``metrics.json`` (test metrics of the best epoch, with ``best_epoch``) is never replaced.
Only a run that stopped before its test evaluation gets its ``metrics.json`` written (its
own test split), so that it can be published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from training.config import ConfigError
from training.data import SPLITS, DataSplits, prepare_splits
from training.distributed import resolve_device
from training.engine import evaluate
from training.predict import load_predictor
from wastenet.preprocess import eval_transform
from wastenet.schema import METADATA_FILE

SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class TrainingData:
    """What a model was trained on, as far as its source tells.

    ``train`` and ``val`` hold file paths relative to the data root (None: unknown);
    ``seed`` and the fractions are those training split its data with, when recorded.
    """

    train: frozenset[str] | None
    val: frozenset[str]
    seed: int | None
    val_fraction: float
    test_fraction: float
    how: str  # where the file lists came from, or why they are unknown


def _known(splits: DataSplits, fractions: tuple[float, float], how: str) -> TrainingData:
    return TrainingData(
        frozenset(splits.relative_paths("train")),
        frozenset(splits.relative_paths("val")),
        splits.seed,
        *fractions,
        how,
    )


def _run_dir_of(source: Path) -> Path | None:
    """The run directory of a run directory or of a checkpoint inside its checkpoints/."""
    for candidate in (source, source.parent.parent):
        if (candidate / SPLITS_FILE).is_file() and (candidate / "config.json").is_file():
            return candidate
    return None


def training_data(source: Path) -> TrainingData:
    """The training and validation files of ``source`` (run, checkpoint or version)."""
    if (source / METADATA_FILE).is_file():
        return _version_training_data(source)
    run_dir = _run_dir_of(source)
    if run_dir is None:
        return TrainingData(None, frozenset(), None, 0.15, 0.15, f"{source} has no splits.json")
    config = json.loads((run_dir / "config.json").read_text())
    fractions = (config.get("val_fraction", 0.15), config.get("test_fraction", 0.15))
    return _known(DataSplits.load(run_dir / SPLITS_FILE), fractions, f"{run_dir / SPLITS_FILE}")


def _version_training_data(version: Path) -> TrainingData:
    """From the run's splits.json when it is still there, else rebuilt from the recorded
    data folder and seed; either is used only when its train digest is the recorded one."""
    from wastenet.artifacts import read_metadata

    meta = read_metadata(version)
    prov = meta.data
    training = (meta.model_extra or {}).get("training") or {}
    config = training.get("config") or {}
    seed = prov.seed if prov is not None else config.get("seed")
    fractions: tuple[float, float] = (
        (prov.val_fraction, prov.test_fraction)
        if prov is not None
        else (config.get("val_fraction", 0.15), config.get("test_fraction", 0.15))
    )
    candidates = [Path(prov.splits_file)] if prov is not None and prov.splits_file else []
    if training.get("run_dir"):
        candidates.append(Path(training["run_dir"]) / SPLITS_FILE)
    for path in candidates:
        if path.is_file():
            splits = DataSplits.load(path)
            if prov is None or splits.digest("train") == prov.split_digests.get("train"):
                return _known(splits, fractions, str(path))
    if prov is not None and Path(prov.root).is_dir():
        verify = bool(config.get("verify_images", True))
        val, test = fractions
        splits = prepare_splits(Path(prov.root), val, test, seed=prov.seed, verify_images=verify)
        if splits.digest("train") == prov.split_digests.get("train"):
            return _known(splits, fractions, f"{prov.root} split again with seed {prov.seed}")
    why = (
        "it records no data provenance and its run directory is gone"
        if prov is None
        else f"neither its splits file nor {prov.root} gives the recorded train split"
    )
    return TrainingData(None, frozenset(), seed, *fractions, f"{version}: {why}")


def _evaluation_splits(
    source: Path,
    data_dir: Path | None,
    splits_file: Path | None,
    seed: int | None,
    trained: TrainingData,
    log: Any,
) -> tuple[DataSplits, str]:
    """(the splits to evaluate on, a description of where they came from)."""
    if splits_file is not None:
        return DataSplits.load(splits_file), str(splits_file)
    if data_dir is not None:
        # By default the training seed and fractions: the same data then gives the test
        # split that training held out.
        seed = seed if seed is not None else trained.seed if trained.seed is not None else 0
        fractions = (trained.val_fraction, trained.test_fraction)
        return prepare_splits(data_dir, *fractions, seed=seed, log=log), f"{data_dir} seed {seed}"
    run_dir = _run_dir_of(source)
    if run_dir is not None:
        return DataSplits.load(run_dir / SPLITS_FILE), str(run_dir / SPLITS_FILE)
    raise ConfigError(f"no data to evaluate {source} on: pass --data DIR or --splits FILE")


def check_held_out(
    files: list[str], trained: TrainingData, source: Path, allow_overlap: bool, log: Any
) -> dict[str, Any]:
    """``held_out`` (True, False, or None when unknown) and the overlap counts; raises
    ConfigError when evaluation files were training files and ``allow_overlap`` is False."""
    if trained.train is None:
        log(
            f"WARNING: cannot tell whether these {len(files)} images were held out: "
            f"{trained.how}. Treat the numbers with care."
        )
        return {"held_out": None, "overlap": None, "training_files": trained.how}
    in_train = [f for f in files if f in trained.train]
    in_val = sum(1 for f in files if f in trained.val)
    record = {
        "held_out": not in_train,
        "overlap": {"train": len(in_train), "val": in_val},
        "training_files": trained.how,
    }
    if in_train and not allow_overlap:
        examples = ", ".join(in_train[:3]) + (", ..." if len(in_train) > 3 else "")
        seed = f" --seed {trained.seed}" if trained.seed is not None else ""
        raise ConfigError(
            f"{len(in_train)} of the {len(files)} evaluation images were training images of "
            f"{source} ({examples}; training files: {trained.how}). Evaluate on held-out "
            f"images (with --data, the training split is{seed}), or pass --allow-overlap "
            "to evaluate anyway (metrics.json then says held_out: false)"
        )
    if in_train:
        log(
            f"WARNING: NOT HELD OUT: {len(in_train)} of the {len(files)} evaluation images "
            f"were training images of {source}; the metrics overstate the model"
        )
    elif in_val:
        log(f"note: {in_val} evaluation images were the validation images that chose the epoch")
    return record


def _output_dir(
    source: Path, out_dir: Path | None, split: str, own_test_split: bool
) -> tuple[Path, str]:
    """(folder, file name) for the metrics; never a training run's own metrics.json. A run
    that stopped before its test evaluation gets it: its own test split, into its own
    metrics.json (what ``publish`` reads)."""
    run_dir = _run_dir_of(source)
    name = "metrics.json" if split == "test" else f"metrics-{split}.json"
    completes_run = out_dir is None and run_dir is not None and own_test_split
    if completes_run and run_dir is not None and not (run_dir / name).is_file():
        return run_dir, name
    out = out_dir or (run_dir / f"eval-{split}" if run_dir is not None else Path("eval"))
    existing = out / name
    if existing.is_file() and "best_epoch" in json.loads(existing.read_text()):
        raise ConfigError(
            f"{existing} holds a training run's test metrics; choose another --out folder"
        )
    return out, name


def _best_epoch(run_dir: Path) -> dict[str, Any]:
    from training.checkpoint import BestCheckpoint

    best = BestCheckpoint.load(run_dir / "checkpoints" / "best.pt")
    return {"best_epoch": best.epoch, "weights": best.best.weights}


def evaluate_source(
    source: Path,
    data_dir: Path | None = None,
    splits_file: Path | None = None,
    split: str = "test",
    out_dir: Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    seed: int | None = None,
    log: Any = print,
    allow_overlap: bool = False,
) -> dict[str, Any]:
    """Metrics of ``source`` on ``split``; writes metrics.json (or metrics-<split>.json) and plots.

    Data, in order of preference: ``splits_file``; ``data_dir`` (split the way training
    split it: ``seed`` defaults to the training seed); a run directory's own splits.json.
    """
    from training.data import ImageDataset
    from training.reports import classification_metrics, format_metrics_table, write_plots

    trained = training_data(source)
    splits, data_source = _evaluation_splits(source, data_dir, splits_file, seed, trained, log)
    names = list(SPLITS) if split == "all" else [split]
    samples = [s for name in names for s in splits.split(name)]
    if not samples:
        raise ConfigError(f"the {split} split has no images")
    files = [f for name in names for f in splits.relative_paths(name)]
    held_out = check_held_out(files, trained, source, allow_overlap, log)
    own_test_split = data_dir is None and splits_file is None and split == "test"
    out, name = _output_dir(source, out_dir, split, own_test_split)

    dev = resolve_device(device)
    predictor = load_predictor(source, dev)
    if list(predictor.class_names) != list(splits.class_names):
        raise ConfigError(
            f"{source} predicts {predictor.class_names} but the data has {list(splits.class_names)}"
        )
    log(f"evaluating {predictor.source} on {len(samples)} {split} images from {data_source}")
    loader = DataLoader(
        ImageDataset(samples, eval_transform(predictor.preprocessing)),
        batch_size=batch_size,
        pin_memory=dev.type == "cuda",
    )
    result = evaluate(predictor.model, loader, dev, len(predictor.class_names), progress=True)
    metrics = classification_metrics(result["targets"], result["probs"], predictor.class_names)
    digest = splits.digest(split) if split != "all" else splits.digest()
    data = {"source": data_source, "root": splits.root, "seed": splits.seed, "digest": digest}
    metrics.update(split=split, source=str(source), data=data, **held_out)
    if out == _run_dir_of(source) and name == "metrics.json":
        metrics.update(_best_epoch(out))  # as training would have written it

    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(metrics, indent=2) + "\n")
    run_dir = _run_dir_of(source)
    history_file = (run_dir or out) / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else {}
    write_plots(out, history, result["targets"], result["probs"], metrics, splits)
    log(format_metrics_table(metrics))
    log(
        f"{split}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
        f"({metrics['num_samples']} images); wrote {out / name} and {out / 'plots'}"
    )
    return metrics
