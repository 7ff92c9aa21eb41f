"""Command line: ``python -m training {train,evaluate,predict,synth,ablate,publish,export}``.

Every TrainConfig setting is also a flag of ``train`` and ``ablate``, generated from the
config's own field descriptions, so the help text and the defaults cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from training.config import ConfigError, TrainConfig, load_config, merge, read_config
from training.export import ExportConfig

# Settings that may change when a run is resumed; everything else must stay as it was.
RESUMABLE = frozenset(
    {
        "device",
        "num_workers",
        "plots",
        "progress",
        "log_every",
        "time_limit_s",
        "eval_batch_size",
        "publish_repo",
        "publish_name",
        "description",
    }
    | {f"export.{name}" for name in ExportConfig.model_fields}
)
MODEL_HELP = {
    "arch": "backbone",
    "cbam": "CBAM placement: none, stage (after each stage), block (in every residual "
    "block, on the branch), block_post (after each block's addition)",
    "cbam_stages": "which of layer1..4 get attention, e.g. --cbam-stages 3 4",
    "cbam_reduction": "channel-gate MLP reduction ratio",
    "cbam_kernel_size": "spatial-gate convolution size (odd)",
    "ibn": "IBN-a normalisation in layers 1-3",
    "head": "classifier head: linear, or bnneck (BatchNorm before a bias-free linear)",
}
# Preprocessing fields that are flags, named as in the config; interpolation stays a
# config-file setting.
PREPROCESSING_HELP = {
    "input_size": "network input size in pixels",
    "resize_size": "evaluation resizes the short side to this, then center-crops input_size",
    "mean": "normalisation mean (match the pretrained weights)",
    "std": "normalisation std (match the pretrained weights)",
}
SKIP_FIELDS = {"model", "augment", "pretrained", "pretrained_path", "export"}
ALIASES = {
    "data_dir": ["--data", "--data-dir"],
    "out_dir": ["--out-dir", "--out"],
    "publish_repo": ["--publish", "--publish-repo"],
}
EXPORT_FLAGS = {"calibration_dir": ["--calibration"]}

TRAIN_EPILOG = """\
examples:
  # 1. a dataset folder with one sub-folder per class (brown-glass or brown_glass both work)
  python -m training train --data data/garbage_classification --out runs/r18-cbam \\
      --pretrained ~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth --publish models/

  # 2. settings from a file (TOML or JSON with the same keys; flags override it;
  #    a run's config.json is such a file)
  python -m training train --config my-run.toml --epochs 5

  # 3. several GPUs on one machine (or nodes: see torchrun --help)
  torchrun --nproc_per_node 4 -m training train --config my-run.toml

  # 4. continue an interrupted run from its last checkpoint
  python -m training train --resume runs/r18-cbam

Pretrained weights are never downloaded. By default torchvision's cache
($TORCH_HOME/hub/checkpoints) is searched; --pretrained PATH names a file and
--no-pretrained trains from random weights.
"""


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(args) < len(get_args(annotation))
        if len(args) == 1:
            return args[0], optional
        return Union[tuple(args)], optional  # noqa: UP007
    return annotation, False


def _parse_optional(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _add_field(
    group: argparse._ArgumentGroup,
    name: str,
    info: FieldInfo,
    dest: str,
    flags: list[str],
    help_text: str,
) -> None:
    annotation, optional = _unwrap_optional(info.annotation)
    default = info.get_default(call_default_factory=True)
    if default is None:
        help_text = f"{help_text} (default: unset; 'none' unsets a value from --config)"
    else:
        shown = " ".join(str(v) for v in default) if isinstance(default, tuple) else default
        help_text = f"{help_text} (default: {shown})"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    origin = get_origin(annotation)
    if annotation is bool:
        group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if origin is Literal:
        group.add_argument(*flags, choices=[str(a) for a in get_args(annotation)], **kwargs)
        return
    if origin is tuple:
        args = get_args(annotation)
        item = args[0]
        nargs: int | str = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
        group.add_argument(*flags, nargs=nargs, type=item, metavar=item.__name__.upper(), **kwargs)
        return
    if origin in (Union, types.UnionType):  # int | Literal["auto"]
        group.add_argument(*flags, type=_int_or_auto, metavar="N|auto", **kwargs)
        return
    convert = annotation if annotation in (int, float, str, Path) else str
    metavar = {int: "N", float: "X", Path: "PATH"}.get(convert, "TEXT")
    if name.startswith("lr_"):
        metavar = "LR"
    if name.endswith("_dir"):
        metavar = "DIR"
    if optional:
        convert = _parse_optional(convert)
    group.add_argument(*flags, type=convert, metavar=metavar, **kwargs)


def _add_preprocessing_flags(group: argparse._ArgumentGroup) -> None:
    from wastenet.schema import Preprocessing

    for name, help_text in PREPROCESSING_HELP.items():
        info = Preprocessing.model_fields[name]
        flags = ["--" + name.replace("_", "-")]
        _add_field(group, name, info, f"preprocessing.{name}", flags, help_text)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig setting (dest ``name``, or ``table.name`` for a nested one)."""
    from training.augment import AugmentConfig
    from wastenet.nets import ModelConfig

    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML or JSON file with settings (a run's config.json works); flags override it",
    )
    groups = {
        "data": parser.add_argument_group("data"),
        "network": parser.add_argument_group("network"),
        "strategy": parser.add_argument_group("strategy and optimisation"),
        "hardware": parser.add_argument_group("hardware"),
        "outputs": parser.add_argument_group("outputs"),
    }
    section = "data"
    boundaries = {
        "model": "network",
        "strategy": "strategy",
        "device": "hardware",
        "out_dir": "outputs",
    }
    for name, info in TrainConfig.model_fields.items():
        section = boundaries.get(name, section)
        if name in SKIP_FIELDS:
            continue
        if name == "preprocessing":
            _add_preprocessing_flags(groups[section])
            continue
        flags = ALIASES.get(name, ["--" + name.replace("_", "-")])
        _add_field(groups[section], name, info, name, flags, info.description or name)
    net = groups["network"]
    net.add_argument(
        "--pretrained",
        dest="pretrained_path",
        type=Path,
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="torchvision state dict of --arch to start from (default: look in torchvision's "
        "cache, and stop with instructions when it is not there)",
    )
    net.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        default=argparse.SUPPRESS,
        help="train from random weights (no ImageNet initialisation); the strategy then "
        "defaults to differential and the backbone and attention LRs to 1e-3",
    )
    for name, info in ModelConfig.model_fields.items():
        if name == "num_classes":
            continue
        _add_field(
            net,
            name,
            info,
            f"model.{name}",
            ["--" + name.replace("_", "-")],
            MODEL_HELP.get(name, name),
        )
    aug = parser.add_argument_group("augmentation (training only)")
    for name, info in AugmentConfig.model_fields.items():
        flag = "--aug-" + name.replace("_", "-")
        _add_field(aug, name, info, f"augment.{name}", [flag], info.description or name)
    add_export_flags(parser.add_argument_group("exported files (with --publish)"))


def add_export_flags(group: argparse._ArgumentGroup, skip: tuple[str, ...] = ()) -> None:
    """One flag per ExportConfig setting, dest ``export.<name>``."""
    for name, info in ExportConfig.model_fields.items():
        if name in skip:
            continue
        flags = EXPORT_FLAGS.get(name, ["--" + name.replace("_", "-")])
        _add_field(group, name, info, f"export.{name}", flags, info.description or name)


def export_config_from_args(args: argparse.Namespace) -> ExportConfig:
    """The ExportConfig of the export flags given (defaults for the rest)."""
    from pydantic import ValidationError

    try:
        return ExportConfig.model_validate(overrides_from_args(args).get("export", {}))
    except ValidationError as exc:
        problems = [
            f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        ]
        raise ConfigError("invalid export flags: " + "; ".join(problems)) from exc


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Nested dict of the flags the user actually gave."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in ("command", "config", "resume", "func") or dest.startswith("_"):
            continue
        if dest not in TrainConfig.model_fields and "." not in dest:
            continue
        target = out
        *parents, leaf = dest.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = str(value) if isinstance(value, Path) else value
    if "pretrained_path" in out and out["pretrained_path"] is not None:
        out.setdefault("pretrained", True)
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return load_config(args.config, overrides_from_args(args))


def _changed_keys(base: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            keys += _changed_keys(base[key], value, f"{prefix}{key}.")
        elif base.get(key) != value:
            keys.append(prefix + key)
    return keys


def resume_config(run_dir: Path, args: argparse.Namespace) -> TrainConfig:
    """The run's saved config; only settings that do not change the result may be overridden."""
    # Resolved, so that a config.json from an older version compares in today's layout.
    base = load_config(run_dir / "config.json").to_json_dict()
    overrides = overrides_from_args(args)
    if args.config is not None:
        overrides = merge(read_config(args.config), overrides)
    candidate = load_config(None, merge(base, overrides)).to_json_dict()
    changed = [k for k in _changed_keys(base, candidate) if k not in RESUMABLE]
    if changed:
        raise ConfigError(
            f"cannot change {', '.join(changed)} when resuming {run_dir}; only "
            f"{', '.join(sorted(RESUMABLE))} may differ (start a new run instead)"
        )
    return load_config(None, candidate)


# ------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from training.trainer import train

    if args.resume is not None:
        run_dir = args.resume if args.resume.is_dir() else args.resume.parent.parent
        config = resume_config(run_dir, args)
    else:
        config = config_from_args(args)
    train(config, resume=args.resume)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluation import evaluate_source

    evaluate_source(
        args.source,
        data_dir=args.data,
        splits_file=args.splits,
        split=args.split,
        out_dir=args.out,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        allow_overlap=args.allow_overlap,
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from training.distributed import resolve_device
    from training.predict import (
        check_output_path,
        find_images,
        load_predictor,
        predict_images,
        write_predictions,
    )

    check_output_path(args.out)  # before minutes of inference, not after
    predictor = load_predictor(args.source, resolve_device(args.device))
    paths = find_images(args.images)
    if not paths:
        raise ConfigError(f"no images found under {args.images}")
    print(f"{predictor.source}: predicting {len(paths)} images")
    rows = predict_images(predictor, paths, top_k=args.top_k, batch_size=args.batch_size)
    write_predictions(rows, args.out, top_k=min(args.top_k, len(predictor.class_names)))
    failed = sum(1 for r in rows if r["error"])
    print(f"wrote {args.out} ({len(rows) - failed} predicted, {failed} unreadable)")
    if args.cam is not None:
        from training.predict import write_cams

        cams = write_cams(predictor, paths, args.images, args.cam, batch_size=args.batch_size)
        print(f"wrote {len(cams)} attention overlays to {args.cam}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from training.synth import generate_synthetic_dataset

    counts = generate_synthetic_dataset(
        args.out,
        images_per_class=args.images_per_class,
        size=args.size,
        seed=args.seed,
        image_format=args.format,
        progress=True,
        overwrite=args.overwrite,
    )
    print(f"wrote {sum(counts.values())} synthetic images ({len(counts)} classes) to {args.out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from training.ablate import ablate

    config = config_from_args(args)
    if config.out_dir is None:
        raise ConfigError("ablate needs --out-dir DIR for its runs and comparison table")
    ablate(
        config,
        placements=args.placements,
        ibn=args.with_ibn,
        bnneck=args.with_bnneck,
        seeds=args.seeds,
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from training.publish import publish_run

    options = export_config_from_args(args)
    ref = publish_run(
        args.run_dir, args.repo, args.name, args.description or "", export=options, progress=True
    )
    print(f"published {ref.name} version {ref.version} at {ref.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.publish import export_version

    options = export_config_from_args(args)
    ref = export_version(args.version_dir, options, args.data, progress=True)
    print(
        f"published {ref.name} version {ref.version} at {ref.path} (derived from version "
        f"{args.version_dir.name}: same weights, with ONNX files)"
    )
    return 0


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on an image folder (writes a run directory)",
        description="Fine-tune ResNet-CBAM on an image folder. Writes config.json, splits.json, "
        "history.json, metrics.json, checkpoints/ and plots/ into the run directory, and with "
        "--publish a new model version.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG,
    )
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (or a last.pt) after its last completed epoch",
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a run, checkpoint or model version on a data split",
        description="Compute test metrics (accuracy, macro-F1, per-class precision/recall/F1/"
        "ROC-AUC/AP, confusion matrix) and plots. For a run directory the default data is "
        "the run's own test split and the results go into RUN/eval-<split>/ (the run's own "
        "metrics.json stays). Images that were training images of SOURCE stop the "
        "evaluation unless --allow-overlap is given.",
    )
    p.add_argument(
        "source", type=Path, help="run directory, .pt checkpoint, or models/<name>/<version>"
    )
    p.add_argument("--data", type=Path, help="image folder to evaluate on (split with --seed)")
    p.add_argument("--splits", type=Path, help="a splits.json to take the file lists from")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="which split to evaluate (default: test; 'all' uses every image)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="split seed for --data (default: the seed SOURCE was trained with, so that its "
        "test split is the held-out one; 0 when unknown)",
    )
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="evaluate even when some images were training images of SOURCE (metrics.json "
        "then says held_out: false)",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default: RUN/eval-<split> for a run, else ./eval)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "predict",
        help="classify every image in a folder, write CSV or JSON with top-k classes",
        description="Batch inference over a folder (recursive). Unreadable files get an error "
        "entry instead of stopping the run.",
    )
    p.add_argument(
        "source", type=Path, help="models/<name>/<version>, run directory, or .pt checkpoint"
    )
    p.add_argument("images", type=Path, help="folder of images")
    p.add_argument("--out", type=Path, required=True, help="output file: .csv or .json")
    p.add_argument("--top-k", type=int, default=3, help="classes per image (default: 3)")
    p.add_argument(
        "--cam",
        type=Path,
        metavar="DIR",
        help="also write, per image, DIR/<image path>.gradcam.png (Grad-CAM of the predicted "
        "class) and, for CBAM networks, .attention.png (the last CBAM's spatial attention)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.set_defaults(func=cmd_predict)


def _add_synth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "synth",
        help="generate a SYNTHETIC 12-class image set (for tests, CI and demos)",
        description="Draw a synthetic, learnable-but-not-trivial 12-class image set: one "
        "folder per class. These are not photos of waste.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--images-per-class", type=int, default=100, help="(default: 100)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="(default: jpg)")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    p.set_defaults(func=cmd_synth)


def _add_ablate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ablate",
        help="train the same budget with each CBAM placement and compare",
        description="Train one run per variant (CBAM none/stage/block/block_post, optionally "
        "with IBN-a and BNNeck) and seed on the same split and epochs; print and save a "
        "comparison table with mean ± std over seeds and the CBAM gate statistics before "
        "and after training (ablation.md, ablation.json) in --out-dir.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m training ablate --data data/synth --out-dir runs/ablation "
        "--no-pretrained --strategy differential --epochs 5 --seeds 0 1 2 --with-ibn",
    )
    p.add_argument(
        "--placements",
        nargs="+",
        default=None,
        choices=["none", "stage", "block", "block_post"],
        help="CBAM placements to compare (default: every placement --arch has: all four for "
        "ResNet and MobileNetV2, none and stage for VGG and AlexNet)",
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="N",
        help="train every variant once per seed and report mean ± std (default: --seed); "
        "all runs share the split made with --seed",
    )
    p.add_argument(
        "--with-ibn", action="store_true", help="add a variant: the base placement with IBN-a"
    )
    p.add_argument(
        "--with-bnneck", action="store_true", help="add a variant: the base placement with BNNeck"
    )
    add_config_flags(p)
    p.set_defaults(func=cmd_ablate)


def _add_publish(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "publish",
        help="publish a run's best checkpoint as the next model version",
        description="Write RUN_DIR's best checkpoint with its test metrics as the next version "
        "of a model: REPO/<name>/<version>/ (weights.safetensors + model.json).",
    )
    p.add_argument(
        "run_dir", type=Path, help="run directory (with checkpoints/best.pt and metrics.json)"
    )
    p.add_argument(
        "--repo", type=Path, default=Path("models"), help="model repository (default: models)"
    )
    p.add_argument(
        "--name", help="model name (default: from the run's config, e.g. waste-resnet18-block)"
    )
    p.add_argument("--description", help="free text stored in model.json")
    add_export_flags(p.add_argument_group("exported files"))
    p.set_defaults(func=cmd_publish)


EXPORT_EPILOG = """\
examples:
  # add an fp32 and an int8 ONNX file to version 3 (published as a new version)
  python -m training export models/waste-resnet18-block/3 --int8

  # the training run is gone: measure agreement on another copy of the data
  python -m training export models/waste-resnet18-block/3 --int8 --data data/garbage

Agreement is measured on the held-out test split of the version's training run (its
splits.json), or of --data DIR split with the seed and fractions the version was trained
with. int8 is calibrated on that run's train and val images, or on --calibration DIR.
"""


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="publish a new version with ONNX files (fp32, int8) from an existing one",
        description="Export VERSION_DIR's network to ONNX (model.onnx, and model.int8.onnx "
        "with --int8), measure each file against the fp32 PyTorch model on held-out images, "
        "and publish the same weights plus the files as the next version, recording "
        "derived_from. The source version is not changed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXPORT_EPILOG,
    )
    p.add_argument("version_dir", type=Path, help="models/<name>/<version> to export")
    p.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="labelled images (one sub-folder per class) when the training run's splits.json "
        "is gone; split like the version's training run",
    )
    add_export_flags(p.add_argument_group("exported files"), skip=("onnx",))
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train, evaluate and publish the waste-image classifier (12 classes). "
        "Start with `python -m training train --help`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="typical path: synth (or your dataset) -> train -> evaluate -> publish -> "
        "the service serves models/<name>/<version>",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_synth(sub)
    _add_ablate(sub)
    _add_publish(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from training.checkpoint import CheckpointError
    from training.data import DatasetError
    from wastenet.artifacts import ArtifactError
    from wastenet.nets import PretrainedWeightsError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (
        ConfigError,
        DatasetError,
        PretrainedWeightsError,
        CheckpointError,
        ArtifactError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
