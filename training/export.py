"""Export a trained network to ONNX (fp32) and int8, and measure how far each file agrees
with the fp32 PyTorch model before it may be published.

- ``export_onnx``: ``torch.onnx.export`` (dynamo), one self-contained file; input ``input``
  is the normalised float32 NCHW batch with a dynamic batch dimension, output ``logits``.
- ``quantize_int8``: ONNX Runtime static quantisation (QDQ, per-channel weights),
  calibrated on images; a :class:`QuantRecipe` says which operators are quantised and which
  parts (CBAM attention, classifier, stem) stay fp32.
- ``agreement_report``: top-1 agreement and the largest probability difference against
  the PyTorch model on held-out images, overall and per class.
- ``export_files``: all of it for one version, refusing a file below the threshold.

ONNX and onnxscript (the ``train`` extra) and ONNX Runtime are imported where used, so that
``training.config`` can hold an :class:`ExportConfig` without loading the export tooling.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from training.data import DataSplits, Sample
from wastenet.schema import (
    ONNX_FILE,
    ONNX_INT8_FILE,
    AgreementReport,
    ClassAgreement,
    ExportedFile,
    Preprocessing,
    Quantization,
)

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_BATCH = 1024
# An fp32 file further than this from PyTorch's probabilities is a broken export, never
# published (measured: about 1e-6 on ResNet-18-CBAM).
FP32_TOLERANCE = 1e-4
NAME_SCOPES = "pkg.torch.onnx.name_scopes"

QuantRecipeName = Literal[
    "all",
    "conv",
    "conv-keep-stem",
    "conv-keep-attention",
    "conv-keep-attention-stem",
    "backbone",
    "backbone-keep-stem",
    "conv-s8",
]
Log = Callable[[str], None]


@dataclass(frozen=True)
class QuantRecipe:
    """Which operators ONNX Runtime quantises, and which parts of the network stay fp32."""

    description: str
    op_types: tuple[str, ...] | None = None  # None: every operator ORT can quantise
    keep_fp32: tuple[Literal["attention", "classifier", "stem"], ...] = ()
    activation_type: Literal["QUInt8", "QInt8"] = "QUInt8"


RECIPES: dict[str, QuantRecipe] = {
    "all": QuantRecipe("every operator ONNX Runtime can quantise"),
    "conv": QuantRecipe("convolutions only (CBAM MLPs, gates and classifier fp32)", ("Conv",)),
    "conv-keep-stem": QuantRecipe("convolutions except the stem", ("Conv",), keep_fp32=("stem",)),
    "conv-keep-attention": QuantRecipe(
        "convolutions outside CBAM only", ("Conv",), keep_fp32=("attention",)
    ),
    "conv-keep-attention-stem": QuantRecipe(
        "convolutions outside CBAM and the stem", ("Conv",), keep_fp32=("attention", "stem")
    ),
    "backbone": QuantRecipe(
        "every operator except CBAM and the classifier", keep_fp32=("attention", "classifier")
    ),
    "backbone-keep-stem": QuantRecipe(
        "every operator except CBAM, the classifier and the stem",
        keep_fp32=("attention", "classifier", "stem"),
    ),
    "conv-s8": QuantRecipe(
        "convolutions only, signed int8 activations", ("Conv",), activation_type="QInt8"
    ),
}
assert set(RECIPES) == set(get_args(QuantRecipeName))
DEFAULT_RECIPE: QuantRecipeName = "conv"


class ExportConfig(BaseModel):
    """Exported files to publish with a version; see ``python -m training export --help``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    onnx: bool = Field(default=False, description="also write model.onnx (fp32 ONNX)")
    int8: bool = Field(
        default=False,
        description="also write model.int8.onnx (statically quantised int8; implies --onnx)",
    )
    calibration_dir: Path | None = Field(
        default=None,
        description="calibrate int8 on the images in this folder (searched recursively) "
        "instead of the run's train and validation images",
    )
    calibration_images: int = Field(
        default=256, ge=1, description="how many images calibrate int8 (sampled per class)"
    )
    quant_recipe: QuantRecipeName = Field(
        default=DEFAULT_RECIPE,
        description="what int8 quantises: "
        + "; ".join(f"{name}: {r.description}" for name, r in RECIPES.items()),
    )
    min_agreement: float = Field(
        default=0.99,
        ge=0.0,
        le=1.0,
        description="refuse an exported file whose top-1 agreement with the fp32 PyTorch "
        "model on the test split is below this",
    )
    force: bool = Field(
        default=False,
        description="publish anyway: an exported file below --min-agreement (recorded as "
        "forced), or weights that an existing version already holds",
    )

    @property
    def precisions(self) -> tuple[str, ...]:
        """The exported files asked for: () or fp32, or fp32 and int8."""
        if self.int8:
            return ("fp32", "int8")
        return ("fp32",) if self.onnx else ()


class AgreementError(ValueError):
    """An exported file disagrees with the PyTorch model more than the threshold allows."""


@dataclass(frozen=True)
class ExportImages:
    """Where agreement is measured (labelled, held out) and what int8 is calibrated on."""

    test: list[Sample]
    test_source: str
    calibration: list[str]
    calibration_source: str


# ------------------------------------------------------------------------- images


def sample_per_class(samples: Sequence[Sample], count: int, seed: int = 0) -> list[Sample]:
    """Up to ``count`` samples, taken in turn from each class (seeded, so reproducible)."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    queues = [rng.sample(items, len(items)) for _, items in sorted(by_class.items())]
    picked: list[Sample] = []
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop())
    return picked


def calibration_from_dir(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Up to ``count`` images under ``folder`` (recursive; a seeded sample when there are more)."""
    from training.predict import find_images

    if not folder.is_dir():
        raise ValueError(f"calibration folder {folder} does not exist or is not a folder")
    paths = [str(p) for p in find_images(folder)]
    if not paths:
        raise ValueError(f"calibration folder {folder} holds no images")
    return sorted(random.Random(seed).sample(paths, min(count, len(paths))))


def images_from_splits(splits: DataSplits, source: str, options: ExportConfig) -> ExportImages:
    """Agreement on the splits' test images; calibration on train + val, or on --calibration."""
    if not splits.test:
        raise ValueError(f"{source} has no test images to measure the exported files on")
    missing = [s.path for s in splits.test if not Path(s.path).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} test image(s) of {source} no longer exist (e.g. {missing[0]}); "
            "pass --data DIR to measure agreement on other labelled images"
        )
    if options.calibration_dir is not None:
        calibration = calibration_from_dir(options.calibration_dir, options.calibration_images)
        calibration_source = str(options.calibration_dir)
    else:
        pool = sample_per_class([*splits.train, *splits.val], options.calibration_images)
        calibration = [s.path for s in pool]
        calibration_source = f"train and val split of {source}"
    return ExportImages(
        list(splits.test), f"test split of {source}", calibration, calibration_source
    )


# ------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, input_size: int, path: Path) -> None:
    """Write ``model`` (eval mode, CPU, fp32) as one self-contained ONNX file at ``path``."""
    model = model.eval().float().cpu()
    example = torch.randn(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        external_data=False,
        opset_version=OPSET,
        dynamic_shapes=({0: batch},),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        verbose=False,
    )


def module_names(model: nn.Module) -> dict[str, list[str]]:
    """Names of the modules a recipe may keep in fp32: the CBAM blocks and the classifier
    (the last Linear layer)."""
    from wastenet.nets import CBAM

    named = list(model.named_modules())
    linears = [name for name, m in named if isinstance(m, nn.Linear)]
    return {
        "attention": [name for name, m in named if isinstance(m, CBAM)],
        "classifier": linears[-1:],
    }


def _scopes(node: Any) -> list[str]:
    """The module path the exporter recorded for an ONNX node ([] when unknown)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, list) else []
    return []


def excluded_nodes(onnx_path: Path, model: nn.Module, recipe: QuantRecipe) -> list[str]:
    """ONNX node names that ``recipe`` keeps in fp32, found by the module path the exporter
    records on every node. The stem is the graph's first convolution (the exporter names it
    after the BatchNorm folded into it)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = module_names(model)
    modules = {m for part in recipe.keep_fp32 if part != "stem" for m in names[part]}
    keep = [n.name for n in graph.node if modules.intersection(_scopes(n))]
    if "stem" in recipe.keep_fp32:
        keep += [next(n.name for n in graph.node if n.op_type == "Conv")]
    return keep


# ------------------------------------------------------------------------- int8


def eval_loader(
    samples: Sequence[Sample], preprocessing: Preprocessing, batch_size: int = 32
) -> torch.utils.data.DataLoader[tuple[torch.Tensor, int]]:
    """Batches of the serving preprocessing (resize, centre crop, normalise) with labels."""
    from training.data import ImageDataset
    from wastenet.preprocess import eval_transform

    dataset = ImageDataset(samples, eval_transform(preprocessing))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)


def _calibration_reader(batches: Iterator[np.ndarray]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    return Reader()


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: Iterator[np.ndarray],
    model: nn.Module,
    recipe: QuantRecipe,
) -> list[str]:
    """Statically quantise ``fp32_path`` into ``out_path``; return the nodes kept in fp32.

    QDQ format, per-channel int8 weights, MinMax ranges from the ``calibration`` batches
    (normalised float32 NCHW, as the network receives them).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_name(f".prepared-{fp32_path.name}")
    # ORT's symbolic shape inference fails on CBAM's reshape; ONNX's own inference suffices.
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    try:
        keep = excluded_nodes(prepared, model, recipe)
        quantize_static(
            str(prepared),
            str(out_path),
            _calibration_reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=getattr(QuantType, recipe.activation_type),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None,
            nodes_to_exclude=keep,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": recipe.activation_type == "QInt8"},
        )
    finally:
        prepared.unlink(missing_ok=True)
    return keep


def calibration_batches(
    paths: Sequence[str], preprocessing: Preprocessing, progress: bool = False
) -> Iterator[np.ndarray]:
    from tqdm import tqdm

    loader = eval_loader([Sample(p, 0) for p in paths], preprocessing)
    for images, _ in tqdm(loader, desc="calibrating int8", disable=not progress, leave=False):
        yield images.numpy()


# ------------------------------------------------------------------------- agreement


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return out


def agreement_report(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    threshold: float,
) -> AgreementReport:
    """Compare two [N, classes] probability arrays image by image; per class by true label
    (classes without test images are left out)."""
    if reference.shape != candidate.shape or reference.shape[0] != labels.shape[0]:
        raise ValueError(
            f"shapes differ: reference {reference.shape}, candidate {candidate.shape}, "
            f"labels {labels.shape}"
        )
    same = reference.argmax(axis=1) == candidate.argmax(axis=1)
    diff = np.abs(reference - candidate).max(axis=1)
    per_class = {
        name: ClassAgreement(
            num_samples=int(mask.sum()),
            top1_agreement=float(same[mask].mean()),
            max_prob_diff=float(diff[mask].max()),
        )
        for index, name in enumerate(class_names)
        if (mask := labels == index).any()
    }
    return AgreementReport(
        num_samples=int(same.size),
        top1_agreement=float(same.mean()),
        max_prob_diff=float(diff.max()),
        per_class=per_class,
        threshold=threshold,
    )


def measure_agreement(
    model: nn.Module,
    files: dict[str, Path],
    samples: Sequence[Sample],
    preprocessing: Preprocessing,
    class_names: Sequence[str],
    threshold: float,
    progress: bool = False,
) -> dict[str, AgreementReport]:
    """Run PyTorch (fp32, CPU) and every ONNX file over ``samples`` once; one report per file."""
    import onnxruntime as ort
    from tqdm import tqdm

    sessions = {
        key: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for key, path in files.items()
    }
    model = model.eval().float().cpu()
    reference: list[np.ndarray] = []
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in files}
    labels: list[np.ndarray] = []
    loader = eval_loader(samples, preprocessing)
    for images, targets in tqdm(loader, desc="agreement", disable=not progress, leave=False):
        with torch.no_grad():
            reference.append(softmax(model(images).numpy()))
        for key, session in sessions.items():
            logits = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
            outputs[key].append(softmax(logits))
        labels.append(targets.numpy())
    ref, y = np.concatenate(reference), np.concatenate(labels)
    return {
        key: agreement_report(ref, np.concatenate(out), y, class_names, threshold)
        for key, out in outputs.items()
    }


def describe_agreement(report: AgreementReport) -> str:
    agreed = round(report.top1_agreement * report.num_samples)
    return (
        f"top-1 agreement {report.top1_agreement:.4f} ({agreed}/{report.num_samples} test "
        f"images), largest probability difference {report.max_prob_diff:.4f}"
    )


def worst_classes(report: AgreementReport, count: int = 3) -> str:
    rows = sorted(report.per_class.items(), key=lambda item: item[1].top1_agreement)
    shown = [
        f"{name} {c.top1_agreement:.3f} ({round(c.top1_agreement * c.num_samples)}/{c.num_samples})"
        for name, c in rows[:count]
        if c.top1_agreement < 1.0
    ]
    return ", ".join(shown) or "none"


def require_agreement(report: AgreementReport, file: str, force: bool) -> AgreementReport:
    """``report`` when it meets its threshold, marked forced when ``force``; else refuse."""
    if report.top1_agreement >= report.threshold:
        return report
    if force:
        return report.model_copy(update={"forced": True})
    raise AgreementError(
        f"{file}: {describe_agreement(report)} against the fp32 PyTorch model is below the "
        f"threshold {report.threshold:.4f} (--min-agreement); worst classes: "
        f"{worst_classes(report)}. Nothing was published. Try another --quant-recipe or "
        "more --calibration-images, publish without --int8, or pass --force to publish it "
        "anyway (recorded as forced)"
    )


# ------------------------------------------------------------------------- one version


def export_files(
    model: nn.Module,
    preprocessing: Preprocessing,
    class_names: Sequence[str],
    options: ExportConfig,
    images: ExportImages,
    workdir: Path,
    *,
    drop_refused: bool = False,
    progress: bool = False,
    log: Log = print,
) -> list[tuple[Path, ExportedFile]]:
    """Write the files ``options`` asks for into ``workdir``, measure them on
    ``images.test`` and return each with its model.json record.

    A file below ``options.min_agreement`` raises AgreementError, unless ``options.force``
    (recorded as forced) or ``drop_refused`` (left out, and the log says why).
    """
    if not options.precisions:
        return []
    files = {"fp32": workdir / ONNX_FILE}
    log(f"exporting {ONNX_FILE} (fp32, opset {OPSET}; takes a few seconds)")
    export_onnx(model, preprocessing.input_size, files["fp32"])
    quantization = None
    if options.int8:
        quantization = _quantize(model, preprocessing, options, images, workdir, progress, log)
        files["int8"] = workdir / ONNX_INT8_FILE
    test = images.test
    log(f"measuring agreement with PyTorch fp32 on {len(test)} images ({images.test_source})")
    reports = measure_agreement(
        model, files, images.test, preprocessing, class_names, options.min_agreement, progress
    )
    if reports["fp32"].max_prob_diff > FP32_TOLERANCE:
        raise ValueError(
            f"{ONNX_FILE} differs from PyTorch by up to {reports['fp32'].max_prob_diff:.2e} in "
            f"probability (more than {FP32_TOLERANCE:.0e}): the export is wrong, not published"
        )
    records = []
    for precision, path in files.items():
        log(f"{path.name}: {describe_agreement(reports[precision])}")
        try:
            report = require_agreement(reports[precision], path.name, options.force)
        except AgreementError:
            if not drop_refused:
                raise
            low = reports[precision]
            log(
                f"left out {path.name}: {describe_agreement(low)} is below the threshold "
                f"{low.threshold:.4f}; worst classes: {worst_classes(low)}"
            )
            continue
        if report.forced:
            log(f"{path.name} is below --min-agreement and published anyway (--force)")
        records.append((path, _record(path, precision, report, quantization)))
    return records


def _quantize(
    model: nn.Module,
    preprocessing: Preprocessing,
    options: ExportConfig,
    images: ExportImages,
    workdir: Path,
    progress: bool,
    log: Log,
) -> Quantization:
    recipe = RECIPES[options.quant_recipe]
    log(
        f"quantising {ONNX_INT8_FILE} ({options.quant_recipe}: {recipe.description}); "
        f"calibrating on {len(images.calibration)} images from {images.calibration_source}"
    )
    batches = calibration_batches(images.calibration, preprocessing, progress)
    keep = quantize_int8(workdir / ONNX_FILE, workdir / ONNX_INT8_FILE, batches, model, recipe)
    return Quantization.model_validate(
        {
            "method": "onnxruntime static quantisation, QDQ, per-channel weights, MinMax",
            "activation_type": recipe.activation_type,
            "weight_type": "QInt8",
            "calibration_source": images.calibration_source,
            "calibration_images": len(images.calibration),
            "excluded_nodes": keep,
            # extra keys (Quantization allows them): enough to repeat the choice
            "recipe": options.quant_recipe,
            "op_types": list(recipe.op_types) if recipe.op_types else "all",
            "kept_fp32": list(recipe.keep_fp32),
        }
    )


def _record(
    path: Path, precision: str, report: AgreementReport, quantization: Quantization | None
) -> ExportedFile:
    from wastenet.artifacts import sha256_file

    return ExportedFile(
        file=path.name,  # type: ignore[arg-type]  # model.onnx or model.int8.onnx
        precision=precision,  # type: ignore[arg-type]
        sha256=sha256_file(path),
        opset=OPSET,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        quantization=quantization if precision == "int8" else None,
        agreement=report,
    )


def export_provenance(images: ExportImages) -> dict[str, str]:
    """Tool versions and the agreement images, for model.json's ``export`` key."""
    import onnx
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "agreement_images": images.test_source,
    }
