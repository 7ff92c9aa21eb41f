"""Publish a run's best checkpoint as the next version of a model in the model repository,
optionally with exported ONNX files; or derive a new version from a published one by
adding exported files (``python -m training export``)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from training.checkpoint import BestCheckpoint, CheckpointError
from training.config import ConfigError, TrainConfig
from training.data import DataSplits
from training.export import (
    ExportConfig,
    ExportImages,
    export_files,
    export_provenance,
    images_from_splits,
)
from wastenet.artifacts import (
    LoadedVersion,
    VersionRef,
    load_version,
    publish_derived,
    publish_version,
    refuse_duplicate,
    weights_sha256,
)
from wastenet.nets import build_model
from wastenet.schema import validate_model_name

Log = Callable[[str], None]


def default_description(config: TrainConfig, metrics: dict[str, Any]) -> str:
    data = config.data_dir or config.splits_file or "unknown data"
    return (
        f"{config.model.arch} with CBAM ({config.model.cbam}) "
        + ("fine-tuned from ImageNet weights" if config.pretrained else "trained from scratch")
        + f" with the {config.strategy} strategy on {data}; test accuracy "
        f"{metrics['accuracy']:.3f}, "
        f"macro-F1 {metrics['macro_f1']:.3f} on {metrics['num_samples']} images"
    )


def _load_run(run: Path) -> tuple[BestCheckpoint, dict[str, Any], nn.Module]:
    best = BestCheckpoint.load(run / "checkpoints" / "best.pt")
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise CheckpointError(
            metrics_path,
            "missing: the run has no test evaluation yet (it stopped before the end); "
            f"run `python -m training evaluate {run}` first",
        )
    model = build_model(best.model_config)
    model.load_state_dict(best.model)
    model.eval()
    return best, json.loads(metrics_path.read_text()), model


def _check_classes(splits: DataSplits, class_names: list[str], source: str) -> None:
    if list(splits.class_names) != list(class_names):
        raise ConfigError(
            f"{source} has classes {list(splits.class_names)}, but the model predicts "
            f"{list(class_names)}"
        )


def run_provenance(config: TrainConfig, run_dir: Path, splits: DataSplits) -> dict[str, Any]:
    """Where a run's data came from (model.json's and metrics.json's ``data`` record)."""
    source = config.splits_file or config.data_dir
    return splits.provenance(
        source=str(Path(source).resolve()) if source is not None else splits.root,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        splits_file=str((run_dir / "splits.json").resolve()),
    ).model_dump()


def publish_run(
    run_dir: str | os.PathLike[str],
    repo: str | os.PathLike[str],
    name: str | None = None,
    description: str = "",
    extra: dict[str, Any] | None = None,
    export: ExportConfig | None = None,
    *,
    drop_refused: bool = False,
    progress: bool = False,
    log: Log = print,
) -> VersionRef:
    """Write ``run_dir``'s best checkpoint, with its test evaluation, as the next version.

    ``model.json`` gets the evaluation summary (from ``metrics.json``), the preprocessing
    the network was trained with, the full resolved training config and the best epoch.
    ``export`` adds ONNX files: int8 calibrated on the run's train and val images (or
    ``export.calibration_dir``), every file measured against PyTorch on the run's test
    split (see :func:`training.export.export_files`; ``drop_refused`` leaves a file below
    the threshold out instead of refusing). Weights that a version of the model already
    holds are refused unless ``export.force``.
    """
    from training.reports import evaluation_summary

    run = Path(run_dir)
    options = export or ExportConfig()
    best, metrics, model = _load_run(run)
    config = best.config
    model_name = validate_model_name(name or config.model_name)
    if not options.force:  # before the export work; publish_version checks again
        refuse_duplicate(Path(repo) / model_name, weights_sha256(model))
    training_config = config.to_json_dict()
    extra = {
        "training": {
            "run_dir": str(run.resolve()),
            "best_epoch": best.epoch,
            "best": best.best.to_dict(),
            "config": training_config,
        },
        "data": run_provenance(config, run, DataSplits.load(run / "splits.json")),
        **(extra or {}),
    }
    with tempfile.TemporaryDirectory(prefix="waste-export-") as work:
        exports = []
        if options.precisions:
            splits = DataSplits.load(run / "splits.json")
            _check_classes(splits, list(best.class_names), f"{run}/splits.json")
            images = images_from_splits(splits, f"run {run}", options)
            exports = export_files(
                model, best.preprocessing, best.class_names, options, images, Path(work),
                drop_refused=drop_refused, progress=progress, log=log,
            )  # fmt: skip
            extra["export"] = export_provenance(images)
        return publish_version(
            repo,
            model_name,
            model,
            best.model_config,
            list(best.class_names),
            evaluation_summary(metrics, "test"),
            preprocessing=best.preprocessing,
            training_config=training_config,
            description=description or default_description(config, metrics),
            extra=extra,
            exports=exports,
            force=options.force,
        )


def images_for_version(
    loaded: LoadedVersion, options: ExportConfig, data_dir: Path | None = None, log: Log = print
) -> ExportImages:
    """Agreement and calibration images for exporting a published version: ``data_dir``
    split the way the version's training split its data, else the training run's splits."""
    from training.data import prepare_splits

    meta, source = loaded.metadata, loaded.ref.path
    training = (meta.model_extra or {}).get("training") or {}
    if data_dir is not None:
        recorded = training.get("config") or {}
        splits = prepare_splits(
            data_dir,
            val_fraction=recorded.get("val_fraction", 0.15),
            test_fraction=recorded.get("test_fraction", 0.15),
            seed=recorded.get("seed", 0),
            log=log,
        )
        origin = str(data_dir)
    else:
        run_dir = training.get("run_dir")
        splits_file = Path(run_dir) / "splits.json" if run_dir else None
        if splits_file is None or not splits_file.is_file():
            why = (
                f"its training run {run_dir} no longer has splits.json"
                if run_dir
                else "its model.json names no training run"
            )
            raise ConfigError(
                f"cannot export {source}: {why}, so there are no held-out images to measure "
                "the exported files on. Pass --data DIR (one sub-folder per class): its test "
                "split (same seed and fractions as training) measures agreement, and its "
                "train and val images calibrate int8 unless --calibration DIR is given"
            )
        splits, origin = DataSplits.load(splits_file), f"run {run_dir}"
    _check_classes(splits, meta.class_names, origin)
    return images_from_splits(splits, origin, options)


def export_version(
    version_dir: str | os.PathLike[str],
    options: ExportConfig,
    data_dir: Path | None = None,
    *,
    progress: bool = False,
    log: Log = print,
) -> VersionRef:
    """Publish the next version of the model in ``version_dir``: the same weights plus an
    fp32 ONNX file (and int8 when ``options.int8``), with ``derived_from`` recorded. The
    source version is not touched. Refused when a version with these weights already ships
    the same exported files, unless ``options.force``."""
    loaded = load_version(version_dir)
    options = options.model_copy(update={"onnx": True})
    meta = loaded.metadata
    if not options.force:
        model_dir = loaded.ref.path.parent
        refuse_duplicate(model_dir, meta.weights_sha256, options.precisions, derived=True)
    images = images_for_version(loaded, options, data_dir, log)
    with tempfile.TemporaryDirectory(prefix="waste-export-") as work:
        exports = export_files(
            loaded.model, meta.preprocessing, meta.class_names, options, images, Path(work),
            progress=progress, log=log,
        )  # fmt: skip
        provenance = {"export": export_provenance(images)}
        return publish_derived(loaded, exports, force=options.force, extra=provenance)
