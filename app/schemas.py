"""Response bodies, as documented in the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from wastenet.schema import ALIAS_RE, MAX_VERSION, VERSION_RE, ModelMetadata

# The version rules as OpenAPI patterns (ECMA 262, anchored): a number, or also 'latest'
# and alias names (which 'latest' matches) where a path segment may name a version so.
VERSION_NUMBER_PATTERN = f"^{VERSION_RE.pattern}$"
VERSION_SPEC_PATTERN = f"^(?:{VERSION_RE.pattern}|{ALIAS_RE.pattern.strip('^$')})$"


class Answer(BaseModel):
    """A response body: every field is always sent (null where it has no value) and no
    other, so the document marks every field required and a generated client needs no
    'unset' case."""

    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)


class ClassScore(Answer):
    label: str = Field(description="Class name, e.g. 'brown_glass'.")
    class_index: int = Field(description="Index of the class in the model's class_names.")
    confidence: float = Field(description="Softmax probability, 0..1.")


UNCERTAIN = "uncertain"


class ImagePrediction(Answer):
    status: Literal["ok"] = "ok"
    filename: str
    label: str = Field(
        description="Most likely class, or 'uncertain' when its confidence is below "
        "min_confidence (route the item to manual sorting; top_k still lists the classes)."
    )
    class_index: int | None = Field(
        description="Index of the label in the model's class_names; null when uncertain."
    )
    confidence: float = Field(description="Probability of the most likely class, 0..1.")
    uncertain: bool = Field(
        default=False, description="True when confidence is below min_confidence."
    )
    top_k: list[ClassScore] = Field(description="The top_k classes, most likely first.")


class FileError(Answer):
    code: str = Field(description="Machine-readable error code, e.g. 'undecodable_image'.")
    message: str = Field(description="What was wrong with the file, naming it.")


class ImageFailure(Answer):
    status: Literal["error"] = "error"
    filename: str
    error: FileError = Field(description="Why this file was not classified.")


FileResult = Annotated[ImagePrediction | ImageFailure, Field(discriminator="status")]


class PredictResponse(Answer):
    model: str = Field(description="The model that answered.")
    version: int = Field(description="The version that answered.")
    backend: Literal["torch", "onnxruntime"] = Field(description="The backend that answered.")
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        description="The precision it answered in."
    )
    predictions: list[FileResult] = Field(
        description="One entry per uploaded file, in upload order."
    )
    min_confidence: float = Field(
        default=0.0,
        description="The threshold applied: images below it are labelled 'uncertain'.",
    )


class VersionInfo(Answer):
    version: int
    state: Literal["available", "loading", "ready", "failed"] = Field(
        description="available: on disk, not loaded; loading; ready: serving; failed: see error."
    )
    error: str | None = Field(description="Why the version failed to load.")
    aliases: list[str]
    pinned: bool = Field(description="Loaded by an admin; kept when newer versions arrive.")
    loaded_at: str | None
    queue_depth: int | None = Field(description="Images waiting in its batcher (when ready).")
    backend: Literal["torch", "onnxruntime"] | None = Field(
        default=None, description="The backend serving it (when ready)."
    )
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        default=None, description="The precision it is served in (when ready)."
    )
    device: str | None = Field(default=None, description="cpu or cuda:N (when ready).")
    skipped_backends: list[str] = Field(
        default_factory=list,
        description=(
            "Faster backend/precision choices this version could not take, each with the "
            "reason (e.g. a missing or tampered model.int8.onnx)."
        ),
    )


class ModelInfo(Answer):
    name: str
    default_version: int | None = Field(
        description="The version answering when none is named (null when none is ready)."
    )
    default_selector: str | None = Field(
        description="'production' when that alias exists, else 'latest'; null while "
        "aliases.json has never been readable (the default is then unknown)."
    )
    latest_ready: int | None
    aliases: dict[str, int] = Field(
        description="Alias -> version; the aliases last read while aliases.json is unreadable."
    )
    aliases_error: str | None = Field(
        description="Why aliases.json cannot be read now (the aliases last read stay in force)."
    )
    versions: list[VersionInfo]


class IgnoredEntry(Answer):
    path: str = Field(description="Relative to the model repository, e.g. 'my-model/v2'.")
    reason: str = Field(description="Why it is neither a model nor a version.")


class ModelList(Answer):
    default_model: str = Field(description="The model answering POST /v1/predict.")
    models: list[ModelInfo]
    ignored: list[IgnoredEntry] = Field(
        default_factory=list,
        description="Entries of the model repository that are no model or version: "
        "stray files, badly named folders, links to nothing, unreadable folders.",
    )


class VersionDetail(VersionInfo):
    model: str
    metadata: ModelMetadata | None = Field(
        description="model.json: class_names, architecture, preprocessing, evaluation, ..."
    )
    metadata_error: str | None = None


class Liveness(Answer):
    status: Literal["alive"] = "alive"


class Readiness(Answer):
    status: Literal["ready"] = "ready"
    models: dict[str, int | None] = Field(
        description="Model -> the default version serving it (null when it cannot answer)."
    )
    not_ready: dict[str, str] = Field(
        default_factory=dict,
        description="Model -> why its default version cannot answer. Other models than "
        "the default one do not make the service unready.",
    )


class AliasUpdate(BaseModel):
    version: int = Field(
        ge=1, le=MAX_VERSION, description="Version number the alias should point to."
    )


class ScanResult(Answer):
    added: list[str]
    removed: list[str]
    loaded: list[str]
    failed: list[str]
    unloaded: list[str]
    ignored: list[IgnoredEntry] = Field(
        default_factory=list, description="Entries of the repository that are no model or version."
    )


# -- explanations ------------------------------------------------------------------------
class Heatmap(Answer):
    """Where the network looked, as a small array and as an image."""

    height: int = Field(description="Rows of values (the last feature map's height).")
    width: int = Field(description="Columns of values.")
    values: list[list[float]] = Field(
        description="Row 0 is the top of the network's input. Grad-CAM: 0..1 (1 = the "
        "strongest evidence for the class). Attention: the spatial gate's values, 0..1."
    )
    overlay_png: str = Field(
        description="Base64 PNG: the image as the network saw it (resized and centre-"
        "cropped, input_size x input_size) with the heatmap stretched over it and coloured "
        "blue (low) to red (high)."
    )


class ImageExplanation(Answer):
    status: Literal["ok"] = "ok"
    filename: str
    label: str = Field(description="Most likely class (the explanation network's answer).")
    class_index: int
    confidence: float
    top_k: list[ClassScore] = Field(description="The top_k classes, most likely first.")
    target: ClassScore = Field(
        description="The class Grad-CAM explains: the requested one, else the predicted one."
    )
    grad_cam: Heatmap = Field(description="Grad-CAM of the target class.")
    attention: Heatmap | None = Field(
        description="Spatial attention of the network's last CBAM; null without CBAM."
    )
    input_size: int = Field(description="Side of the network's input and of the overlays.")


ExplainResult = Annotated[ImageExplanation | ImageFailure, Field(discriminator="status")]


class ExplainResponse(Answer):
    model: str = Field(description="The model that answered.")
    version: int = Field(description="The version that answered.")
    backend: Literal["torch"] = Field(
        description="Explanations need gradients: always torch, whatever serves predict."
    )
    precision: Literal["fp32"] = Field(description="Explanations are computed in fp32.")
    explanations: list[ExplainResult] = Field(
        description="One entry per uploaded file, in upload order."
    )
