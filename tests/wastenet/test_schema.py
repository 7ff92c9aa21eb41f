"""The model.json contract: exported files, their records and how a reader checks them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from wastenet.artifacts import ArtifactError, read_export
from wastenet.classes import CLASS_NAMES
from wastenet.schema import (
    ONNX_FILE,
    ONNX_INT8_FILE,
    AgreementReport,
    ClassAgreement,
    DataProvenance,
    ExportedFile,
    ModelMetadata,
    Quantization,
)

SHA = "ab" * 32


def agreement(top1: float = 0.995) -> AgreementReport:
    per_class = {
        c: ClassAgreement(num_samples=10, top1_agreement=1.0, max_prob_diff=0.01)
        for c in CLASS_NAMES
    }
    return AgreementReport(
        num_samples=120,
        top1_agreement=top1,
        max_prob_diff=0.03,
        per_class=per_class,
        threshold=0.99,
    )


def quantization() -> Quantization:
    return Quantization(
        method="onnxruntime static QDQ, per-channel",
        activation_type="QUInt8",
        weight_type="QInt8",
        calibration_source="train split",
        calibration_images=64,
    )


def int8_record(**changes: Any) -> ExportedFile:
    fields: dict[str, Any] = {
        "file": ONNX_INT8_FILE,
        "precision": "int8",
        "sha256": SHA,
        "opset": 18,
        "input_name": "input",
        "output_name": "logits",
        "quantization": quantization(),
        "agreement": agreement(),
    }
    return ExportedFile(**{**fields, **changes})


def test_an_int8_export_carries_its_quantization_and_agreement() -> None:
    assert int8_record().agreement is not None
    with pytest.raises(ValidationError, match="needs its quantization and agreement"):
        int8_record(agreement=None)
    with pytest.raises(ValidationError, match="must be named model.int8.onnx"):
        int8_record(file=ONNX_FILE)
    with pytest.raises(ValidationError, match="sha256"):
        int8_record(sha256="XYZ")


def _metadata(exports: list[ExportedFile]) -> ModelMetadata:
    return ModelMetadata.model_validate(
        {
            "format_version": 1,
            "architecture": {},
            "class_names": list(CLASS_NAMES),
            "preprocessing": {},
            "weights_sha256": SHA,
            "evaluation": {"num_samples": 1, "accuracy": 1.0, "macro_f1": 1.0, "per_class_f1": {}},
            "training_config_digest": "x",
            "created_at": "2026-01-01T00:00:00Z",
            "torch_version": "2",
            "torchvision_version": "0",
            "exports": [e.model_dump() for e in exports],
        }
    )


def test_metadata_finds_an_export_by_precision_and_refuses_duplicates() -> None:
    fp32 = ExportedFile(
        file=ONNX_FILE, precision="fp32", sha256=SHA, opset=18, input_name="x", output_name="y"
    )
    meta = _metadata([fp32, int8_record()])
    meta.check_consistent()
    assert meta.export("fp32") == fp32 and meta.export("int8") == int8_record()
    assert _metadata([]).export("int8") is None
    with pytest.raises(ValueError, match="lists a file twice"):
        _metadata([int8_record(), int8_record()]).check_consistent()


def test_read_export_refuses_a_tampered_or_missing_file(tmp_path: Path) -> None:
    data = b"onnx bytes \x00\x01"
    (tmp_path / ONNX_INT8_FILE).write_bytes(data)
    record = int8_record(sha256=hashlib.sha256(data).hexdigest())
    assert read_export(tmp_path, record) == data
    (tmp_path / ONNX_INT8_FILE).write_bytes(data[:-1] + b"\x02")
    with pytest.raises(ArtifactError, match="sha256 mismatch") as err:
        read_export(tmp_path, record)
    assert err.value.path == tmp_path / ONNX_INT8_FILE
    (tmp_path / ONNX_INT8_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_export(tmp_path, record)


def metadata(**changes: Any) -> dict[str, Any]:
    return {
        "format_version": 1,
        "architecture": {},
        "class_names": list(CLASS_NAMES),
        "preprocessing": {},
        "weights_sha256": SHA,
        "evaluation": {"num_samples": 1, "accuracy": 1.0, "macro_f1": 1.0, "per_class_f1": {}},
        "training_config_digest": "x",
        "created_at": "2025-01-01T00:00:00Z",
        "torch_version": "2",
        "torchvision_version": "0",
        **changes,
    }


def test_data_provenance_is_optional_and_checked_when_present() -> None:
    assert ModelMetadata.model_validate(metadata()).data is None  # versions from before it
    record = {
        "source": "/data/garbage", "root": "/data/garbage", "seed": 3, "presplit": False,
        "val_fraction": 0.15, "test_fraction": 0.15, "splits_digest": SHA,
        "split_digests": {"train": SHA, "val": SHA, "test": SHA},
        "counts": {"train": 70, "val": 15, "test": 15},
    }  # fmt: skip
    meta = ModelMetadata.model_validate(metadata(data=record))
    assert meta.data == DataProvenance(**record) and meta.data.splits_file is None
    with pytest.raises(ValidationError, match="splits_digest"):
        ModelMetadata.model_validate(metadata(data={**record, "splits_digest": "short"}))
    with pytest.raises(ValidationError, match="seed"):
        ModelMetadata.model_validate(metadata(data={**record, "seed": -1}))
