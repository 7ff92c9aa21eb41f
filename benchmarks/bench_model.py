"""The trained model that the serving benchmarks measure, built once and cached.

A ResNet-18-CBAM (CBAM in every block, the default architecture) trained from random
weights at 224 px on the synthetic set, and published with ``model.onnx`` and
``model.int8.onnx`` by the product's own commands, so that the int8 file's agreement with
fp32 PyTorch is measured on a trained model's held-out test split:

    python -m training synth --out WORK/KEY/synth --images-per-class 60 --size 256
    python -m training train --data WORK/KEY/synth --out WORK/KEY/run --no-pretrained \\
        --epochs 8 --label-smoothing 0 --test-fraction 0.25 --publish WORK/KEY/models --int8 --force

``KEY`` names the training recipe (``synth60-256px-e8-in224-s0``), so a different one trains
into its own folder and the same one is reused; a run stopped part way is continued from its
last checkpoint (``train --resume``). Another ``--quant-recipe`` is exported from the trained
version's weights (``python -m training export VERSION --int8 --quant-recipe R --force``) as
a derived version, without training again. ``--force`` keeps an int8 file below the 99%
agreement threshold (recorded as forced) so that its speed can still be measured; the
report says whether the threshold was met. Label smoothing is off because it trains the
network to hedge: with near-tied classes, quantisation noise flips more answers.

Cost on a quiet 2-core CPU: training runs at about 8-10 images/s at 224 px, so the default
(432 training images x 8 epochs, 108 validation images per epoch, then calibration on 256
images and agreement on 180 test images) takes about 10-15 minutes. It is a weak model
(a few hundred drawn images), which is the hard case for int8 agreement.

    python benchmarks/bench_model.py --work runs/bench-serve       # train or reuse, print report
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without install

from wastenet.artifacts import list_versions, read_metadata
from wastenet.schema import ExportedFile

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench-resnet18-cbam"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """What the benchmark model is trained on and how; ``key`` names its cache folder."""

    images_per_class: int = 60
    image_size: int = 256  # side of the synthetic images, before resize 256 / crop 224
    epochs: int = 8
    input_size: int = 224
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    quant_recipe: str = "conv"  # the product's default

    @property
    def model_key(self) -> str:
        """Names the trained network; every int8 recipe is exported from the same one."""
        return (
            f"synth{self.images_per_class}-{self.image_size}px-e{self.epochs}-"
            f"in{self.input_size}-s{self.seed}"
        )

    @property
    def key(self) -> str:
        key = self.model_key
        return key if self.quant_recipe == "conv" else f"{key}-{self.quant_recipe}"

    def train_args(self, data: Path, run: Path, repo: Path, device: str) -> list[str]:
        resize = round(self.input_size * 256 / 224)
        return [
            *("--data", str(data), "--out", str(run), "--no-pretrained"),
            *("--epochs", str(self.epochs), "--label-smoothing", "0"),
            *("--input-size", str(self.input_size), "--resize-size", str(resize)),
            *("--val-fraction", str(self.val_fraction)),
            *("--test-fraction", str(self.test_fraction), "--seed", str(self.seed)),
            *("--device", device, "--no-progress", "--no-plots"),
            *("--publish", str(repo), "--publish-name", MODEL_NAME),
            *("--int8", "--quant-recipe", self.quant_recipe, "--force"),
            *("--description", f"serving benchmark model ({self.model_key}); synthetic images"),
        ]


def _int8_recipe(version_dir: Path) -> str | None:
    int8 = next((e for e in read_metadata(version_dir).exports if e.precision == "int8"), None)
    if int8 is None or int8.quantization is None:
        return None
    return getattr(int8.quantization, "recipe", None)


def published_version(repo: Path, quant_recipe: str | None = None) -> Path | None:
    """The newest version of the benchmark model that ships both ONNX files (with its int8
    file quantised by ``quant_recipe``, when given), if any."""
    model_dir = repo / MODEL_NAME
    for version in reversed(list_versions(model_dir)):
        path = model_dir / str(version)
        if {e.precision for e in read_metadata(path).exports} >= {"fp32", "int8"} and (
            quant_recipe is None or _int8_recipe(path) == quant_recipe
        ):
            return path
    return None


def _python(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, check=True)


def _train(root: Path, recipe: Recipe, device: str, log: Log) -> None:
    """Train and publish with the default int8 recipe; an interrupted run is continued from
    its last checkpoint (``train --resume``: the same result as an uninterrupted run)."""
    data, run, repo = root / "synth", root / "run", root / "models"
    publish = Recipe(**{**recipe.__dict__, "quant_recipe": Recipe.quant_recipe})
    args = publish.train_args(data, run, repo, device)
    if (run / "checkpoints" / "last.pt").exists() and data.is_dir():
        log(f"continuing the interrupted training run {run}")
        # Only settings that do not change the result may be given with --resume.
        keep = args[args.index("--device") :]
        _python("train", "--resume", str(run), *keep)
        return
    log(f"training the benchmark model into {root} (about 10-15 min on 2 quiet CPU cores)")
    synth = ("--images-per-class", str(recipe.images_per_class), "--size", str(recipe.image_size))
    _python("synth", "--out", str(data), *synth, "--seed", str(recipe.seed), "--overwrite")
    if run.exists():  # a run that never checkpointed: start over
        shutil.rmtree(run)
    _python("train", *args)


def trained_version(work: Path, recipe: Recipe, device: str, log: Log = print) -> Path:
    """The benchmark model with ``recipe.quant_recipe``'s int8 file, from the cache under
    ``work/recipe.model_key``: trained (or continued) once; another int8 recipe is exported
    from the same weights as a derived version (``training export``)."""
    root = work / recipe.model_key
    repo = root / "models"
    found = published_version(repo, recipe.quant_recipe)
    if found is not None:
        log(f"reusing the trained benchmark model {found}")
        return found
    if published_version(repo) is None:
        _train(root, recipe, device, log)
    found = published_version(repo, recipe.quant_recipe)
    if found is None:
        # The trained version itself, not one derived from it.
        base = published_version(repo, Recipe.quant_recipe) or published_version(repo)
        if base is None:
            raise RuntimeError(f"training finished but {repo} holds no version with ONNX files")
        log(f"exporting {base} with the int8 recipe {recipe.quant_recipe}")
        _python("export", str(base), "--int8", "--quant-recipe", recipe.quant_recipe, "--force")
        found = published_version(repo, recipe.quant_recipe)
    if found is None:
        raise RuntimeError(f"{repo} holds no version with a {recipe.quant_recipe} int8 file")
    return found


def _export_line(exported: ExportedFile) -> str:
    report = exported.agreement
    if report is None or report.split == "none":
        return f"  {exported.file} ({exported.precision}): agreement not measured"
    agreed = round(report.top1_agreement * report.num_samples)
    verdict = "meets" if report.top1_agreement >= report.threshold else "BELOW"
    forced = ", published with --force" if report.forced else ""
    worst = sorted(report.per_class.items(), key=lambda item: item[1].top1_agreement)
    changed = ", ".join(
        f"{name} {round((1 - c.top1_agreement) * c.num_samples)}/{c.num_samples}"
        for name, c in worst
        if c.top1_agreement < 1.0
    )
    return (
        f"  {exported.file} ({exported.precision}): top-1 agreement {report.top1_agreement:.4f} "
        f"({agreed}/{report.num_samples} {report.split} images), largest probability "
        f"difference {report.max_prob_diff:.2g}; {verdict} the threshold "
        f"{report.threshold:.2f}{forced}" + (f"; changed: {changed}" if changed else "")
    )


def agreement_report(version_dir: Path) -> str:
    """The version's test accuracy and every exported file's agreement, as printed text."""
    metadata = read_metadata(version_dir)
    ev = metadata.evaluation
    lines = [
        f"model {version_dir}: {metadata.architecture.arch}, "
        f"cbam={metadata.architecture.cbam}, {metadata.preprocessing.input_size} px; "
        f"{ev.split} accuracy {ev.accuracy:.3f}, macro-F1 {ev.macro_f1:.3f} "
        f"({ev.num_samples} images)"
    ]
    for exported in metadata.exports:
        lines.append(_export_line(exported))
        if exported.quantization is not None:
            q = exported.quantization
            recipe = getattr(q, "recipe", None)
            lines.append(
                f"    {q.method}"
                + (f", recipe {recipe}" if recipe else "")
                + f"; calibrated on {q.calibration_images} images ({q.calibration_source})"
            )
    return "\n".join(lines)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Recipe()
    group = parser.add_argument_group("benchmark model (trained once, cached under --work)")
    group.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serve")
    group.add_argument("--images-per-class", type=int, default=defaults.images_per_class)
    group.add_argument("--epochs", type=int, default=defaults.epochs)
    group.add_argument("--quant-recipe", default=defaults.quant_recipe)


def recipe_from(args: argparse.Namespace) -> Recipe:
    return Recipe(
        images_per_class=args.images_per_class,
        epochs=args.epochs,
        quant_recipe=args.quant_recipe,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser)
    parser.add_argument("--device", default="cpu", help="training device (cpu, cuda, ...)")
    args = parser.parse_args()
    version = trained_version(args.work, recipe_from(args), args.device)
    print(agreement_report(version))


if __name__ == "__main__":
    main()
