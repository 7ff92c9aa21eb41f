"""The ``model.json`` contract in one place; imports no torch.

Everything a reader needs to check and rebuild a published version without loading a
network: file names, the rules for model, version and alias names, the architecture
config, the preprocessing, the evaluation summary and the metadata that holds them.
Training writes it (``wastenet.artifacts.publish_version``); the service reads it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from wastenet.classes import NUM_CLASSES

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "model.json"
ALIASES_FILE = "aliases.json"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
RESERVED_ALIASES = frozenset({"latest"})

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CBAMPlacement = Literal["none", "stage", "block", "block_post"]
Head = Literal["linear", "bnneck"]


class ModelConfig(BaseModel):
    """Everything needed to rebuild a network; saved in every artifact's ``model.json``.

    - ``cbam``: where CBAM goes. ``none``; ``stage``: one CBAM after each selected layer
      group; ``block``: inside every residual block of the selected stages, on the residual
      branch before the addition (the paper's layout); ``block_post``: after the addition,
      CBAM(F(x) + x).
    - ``cbam_stages``: which of layer1..layer4 get attention (ignored for ``none``).
    - ``ibn``: IBN-a, instance norm on the first half of ``bn1`` in every block of layers 1-3.
    - ``head``: ``linear`` or ``bnneck`` (BatchNorm1d with a frozen bias, then a bias-free
      linear classifier).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Arch = "resnet18"
    num_classes: int = Field(default=NUM_CLASSES, ge=2)
    cbam: CBAMPlacement = "block"
    cbam_stages: tuple[int, ...] = (1, 2, 3, 4)
    cbam_reduction: int = Field(default=16, ge=1)
    cbam_kernel_size: int = Field(default=7, ge=1)
    ibn: bool = False
    head: Head = "linear"

    @field_validator("cbam_stages")
    @classmethod
    def _check_stages(cls, stages: tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"cbam_stages must be a subset of 1-4, got {list(stages)}")
        if len(set(stages)) != len(stages):
            raise ValueError(f"cbam_stages has duplicates: {list(stages)}")
        return tuple(sorted(stages))

    @field_validator("cbam_kernel_size")
    @classmethod
    def _check_kernel(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"cbam_kernel_size must be odd, got {k}")
        return k

    @model_validator(mode="after")
    def _check_placement(self) -> ModelConfig:
        if self.cbam != "none" and not self.cbam_stages:
            raise ValueError(f"cbam={self.cbam!r} needs at least one stage in cbam_stages")
        return self

    @property
    def attention_stages(self) -> frozenset[int]:
        """Stages that actually carry attention (empty for ``cbam='none'``)."""
        return frozenset() if self.cbam == "none" else frozenset(self.cbam_stages)


class Preprocessing(BaseModel):
    """How the service must turn an image into the network's input tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize_size: int = Field(default=256, ge=8)
    input_size: int = Field(default=224, ge=8)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        return std

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.input_size > self.resize_size:
            raise ValueError(f"input_size {self.input_size} exceeds resize_size {self.resize_size}")
        return self


class Evaluation(BaseModel):
    """Evaluation summary of a version on a held-out split."""

    model_config = ConfigDict(frozen=True, extra="allow")

    split: str = "test"
    num_samples: int = Field(ge=0)
    accuracy: float = Field(ge=0.0, le=1.0)
    macro_f1: float = Field(ge=0.0, le=1.0)
    per_class_f1: dict[str, float]


class ClassAgreement(BaseModel):
    """How one class's test images fare in an exported file against the fp32 PyTorch model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_samples: int = Field(ge=0)
    top1_agreement: float = Field(ge=0.0, le=1.0)
    max_prob_diff: float = Field(ge=0.0)


class AgreementReport(BaseModel):
    """An exported file's predictions against the fp32 PyTorch model on held-out images.

    ``top1_agreement`` is the share of images whose top-1 class is the same;
    ``max_prob_diff`` the largest absolute difference of any class probability.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: str = "torch fp32"
    split: str = "test"
    num_samples: int = Field(ge=1)
    top1_agreement: float = Field(ge=0.0, le=1.0)
    max_prob_diff: float = Field(ge=0.0)
    per_class: dict[str, ClassAgreement]
    threshold: float = Field(ge=0.0, le=1.0)
    forced: bool = False


class Quantization(BaseModel):
    """How an int8 file was quantised, so that the choice can be reproduced and judged."""

    model_config = ConfigDict(frozen=True, extra="allow")

    method: str  # e.g. "onnxruntime static QDQ, per-channel"
    activation_type: str
    weight_type: str
    calibration_source: str
    calibration_images: int = Field(ge=1)
    excluded_nodes: list[str] = Field(default_factory=list)


class ExportedFile(BaseModel):
    """One exported copy of the network inside a version (ONNX fp32 or int8)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: Literal["model.onnx", "model.int8.onnx"]
    format: Literal["onnx"] = "onnx"
    precision: Literal["fp32", "int8"]
    sha256: str = Field(pattern=SHA256_PATTERN)
    opset: int = Field(ge=7)
    input_name: str
    output_name: str
    quantization: Quantization | None = None
    agreement: AgreementReport | None = None

    @model_validator(mode="after")
    def _check(self) -> ExportedFile:
        expected = ONNX_INT8_FILE if self.precision == "int8" else ONNX_FILE
        if self.file != expected:
            raise ValueError(f"a {self.precision} export must be named {expected}, not {self.file}")
        if self.precision == "int8" and (self.quantization is None or self.agreement is None):
            raise ValueError("an int8 export needs its quantization and agreement records")
        return self


class DerivedFrom(BaseModel):
    """The version this one was made from (same weights, e.g. with exported files added)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: int = Field(ge=1)
    weights_sha256: str = Field(pattern=SHA256_PATTERN)


class DataProvenance(BaseModel):
    """Where a version's training data came from: enough to rebuild its train/val/test file
    lists (``root``, ``seed``, fractions) and to check that a rebuild is the same
    (``split_digests``), so an evaluation can tell whether its images were held out.

    A split's digest is the sha256 of its sorted ``[path relative to root, class]`` pairs as
    compact JSON; ``splits_digest`` covers the three.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    source: str  # what training was given: the data folder or a splits file
    root: str  # the folder the file lists are relative to
    seed: int = Field(ge=0)
    presplit: bool
    val_fraction: float = Field(ge=0.0, lt=1.0)
    test_fraction: float = Field(ge=0.0, lt=1.0)
    splits_digest: str = Field(pattern=SHA256_PATTERN)
    split_digests: dict[str, str]
    counts: dict[str, int]
    splits_file: str | None = None  # the run's splits.json when the version was published


class ModelMetadata(BaseModel):
    """The content of ``model.json``: everything needed to rebuild and to serve a version."""

    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    format_version: int
    architecture: ModelConfig
    class_names: list[str] = Field(min_length=2)
    preprocessing: Preprocessing
    weights_sha256: str = Field(pattern=SHA256_PATTERN)
    evaluation: Evaluation
    training_config_digest: str
    created_at: datetime
    torch_version: str
    torchvision_version: str
    description: str = ""
    exports: list[ExportedFile] = Field(default_factory=list)
    derived_from: DerivedFrom | None = None
    data: DataProvenance | None = None  # None in versions published before it was recorded

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is not supported (this reader knows {FORMAT_VERSION})"
            )
        return v

    def check_consistent(self) -> None:
        """Raise ValueError when the parts of the metadata disagree with each other."""
        if len(self.class_names) != self.architecture.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class_names but architecture.num_classes is "
                f"{self.architecture.num_classes}"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names has duplicates")
        files = [e.file for e in self.exports]
        if len(set(files)) != len(files):
            raise ValueError(f"exports lists a file twice: {files}")

    def export(self, precision: str) -> ExportedFile | None:
        """The exported file of ``precision`` (fp32 or int8), or None when not shipped."""
        return next((e for e in self.exports if e.precision == precision), None)


def validate_model_name(name: str) -> str:
    if not MODEL_NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-64 characters a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return name
