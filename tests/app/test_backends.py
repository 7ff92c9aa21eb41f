"""Backends on CPU: ONNX Runtime against torch, int8, normalisation, and what a version
whose exported files are missing, tampered or below their agreement threshold gets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.backends import BackendUnavailable, OrtBackend, TorchBackend, open_backend
from app.inference import InferenceItem, InferenceModel
from app.selection import Capabilities, Choice, probe_capabilities
from tests.app.conftest import (
    MODEL,
    exported_record,
    files,
    image_bytes,
    replace_file,
    write_exports,
)
from tests.app.test_api import assert_error
from wastenet.artifacts import LoadedVersion, load_version, read_metadata
from wastenet.preprocess import normalize
from wastenet.schema import ONNX_FILE, ONNX_INT8_FILE

ORT_INT8 = Choice("onnxruntime", "int8", vetted=True)
ORT_FP32 = Choice("onnxruntime", "fp32")
TORCH_FP32 = Choice("torch", "fp32")
AUTO = [ORT_INT8, ORT_FP32, TORCH_FP32]


@pytest.fixture(scope="module")
def caps() -> Capabilities:
    return probe_capabilities(torch.device("cpu"))


def version(repo: Path) -> Path:
    return repo / MODEL / "1"


def opened(
    repo: Path, choices: list[Choice], caps: Capabilities, batch: int = 4
) -> tuple[InferenceModel, list[str]]:
    loaded = load_version(version(repo))
    backend, skipped = open_backend(choices, loaded, caps, threads=1, max_batch_size=batch)
    return InferenceModel(loaded, backend, batch, skipped), skipped


def asymmetric_images(seed: int, n: int = 4) -> list[np.ndarray]:
    """Random pixels plus a bright top-left block and a left-to-right ramp."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        image[:8, :12] = (250, 10, 40)
        image[20:, :, 1] = np.linspace(0, 255, 32, dtype=np.uint8)
        images.append(image)
    return images


def probabilities(model: InferenceModel, images: list[np.ndarray]) -> np.ndarray:
    rows = model.predict([InferenceItem(image, model.num_classes) for image in images])
    probs = np.zeros((len(images), model.num_classes))
    for row, top in enumerate(rows):
        for index, p in top:
            probs[row, index] = p
    return probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_onnxruntime_fp32_equals_torch(exported_repo: Path, caps: Capabilities, seed: int) -> None:
    ort, _ = opened(exported_repo, [ORT_FP32], caps)
    reference, _ = opened(exported_repo, [TORCH_FP32], caps)
    assert (ort.backend.name, ort.backend.precision) == ("onnxruntime", "fp32")
    images = asymmetric_images(seed)
    got, want = probabilities(ort, images), probabilities(reference, images)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want - 1 / 12).max() > 1e-3  # not a uniform answer that anything matches
    flipped = probabilities(reference, [np.ascontiguousarray(i[:, ::-1]) for i in images])
    assert np.abs(flipped - want).max() > 1e-4  # the input's asymmetry reaches the output


def test_int8_answers_and_names_itself(exported_repo: Path, caps: Capabilities) -> None:
    int8, skipped = opened(exported_repo, AUTO, caps)
    assert skipped == []
    assert isinstance(int8.backend, OrtBackend)
    assert (int8.backend.name, int8.backend.precision) == ("onnxruntime", "int8")
    reference, _ = opened(exported_repo, [TORCH_FP32], caps)
    images = asymmetric_images(3)
    got, want = probabilities(int8, images), probabilities(reference, images)
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-6)
    assert np.abs(got - want).max() < 0.1  # quantised, yet the same network
    assert np.abs(got - want).max() > 0  # and really another one


def test_normalisation_equals_training_in_both_layouts(
    exported_repo: Path, caps: Capabilities
) -> None:
    images = asymmetric_images(4, n=3)
    expected = normalize(
        torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in images]),
        read_metadata(version(exported_repo)).preprocessing,
    )
    ort, _ = opened(exported_repo, [ORT_FP32], caps)
    reference, _ = opened(exported_repo, [TORCH_FP32], caps)
    assert isinstance(ort.backend, OrtBackend) and isinstance(reference.backend, TorchBackend)
    nchw = ort.backend.normalise(ort.stack(images))
    assert nchw.flags["C_CONTIGUOUS"] and nchw.dtype == np.float32
    assert np.abs(nchw - expected.numpy()).max() < 1e-6
    channels_last = reference.backend.normalise(reference.stack(images))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert (channels_last - expected).abs().max() < 1e-6


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda path: replace_file(path, path.read_bytes()[:-10] + b"0123456789"),
            "sha256 mismatch",
        ),
        (lambda path: path.unlink(), "missing"),
    ],
)
def test_auto_falls_back_from_a_missing_or_tampered_int8_file(
    exported_repo: Path, caps: Capabilities, damage: object, reason: str
) -> None:
    damage(version(exported_repo) / ONNX_INT8_FILE)  # type: ignore[operator]
    model, skipped = opened(exported_repo, AUTO, caps)
    assert (model.backend.name, model.backend.precision) == ("onnxruntime", "fp32")
    assert len(skipped) == 1
    assert skipped[0].startswith(f"onnxruntime int8: {ONNX_INT8_FILE}: {reason}")


def test_auto_falls_back_to_torch_when_both_files_are_tampered(
    exported_repo: Path, caps: Capabilities
) -> None:
    for name in (ONNX_FILE, ONNX_INT8_FILE):
        path = version(exported_repo) / name
        replace_file(path, b"not onnx at all")
    model, skipped = opened(exported_repo, AUTO, caps)
    assert (model.backend.name, model.backend.precision) == ("torch", "fp32")
    assert [s.split(":")[0] for s in skipped] == ["onnxruntime int8", "onnxruntime fp32"]
    assert all("sha256 mismatch" in s for s in skipped)


def test_an_explicit_choice_is_refused_with_the_reason(
    exported_repo: Path, caps: Capabilities
) -> None:
    path = version(exported_repo) / ONNX_INT8_FILE
    replace_file(path, path.read_bytes() + b"x")
    with pytest.raises(BackendUnavailable) as info:
        opened(exported_repo, [Choice("onnxruntime", "int8")], caps)
    message = str(info.value)
    assert message.startswith(f"onnxruntime int8: {ONNX_INT8_FILE}: sha256 mismatch")


def test_a_hash_matching_file_that_is_no_onnx_is_refused(
    exported_repo: Path, caps: Capabilities
) -> None:
    vdir = version(exported_repo)
    replace_file(vdir / ONNX_FILE, b"garbage that hashes fine")
    records = read_metadata(vdir).exports
    write_exports(
        vdir, [exported_record(vdir, "fp32"), *[r for r in records if r.precision == "int8"]]
    )
    with pytest.raises(BackendUnavailable, match="model.onnx: ONNX Runtime cannot load it"):
        opened(exported_repo, [ORT_FP32], caps)


def test_recorded_input_name_must_match_the_file(exported_repo: Path, caps: Capabilities) -> None:
    vdir = version(exported_repo)
    wrong = exported_record(vdir, "fp32").model_copy(update={"input_name": "pixels"})
    write_exports(vdir, [wrong])
    with pytest.raises(BackendUnavailable, match=r"not the \[pixels\]/\[logits\]"):
        opened(exported_repo, [ORT_FP32], caps)


def test_int8_below_its_threshold_is_skipped_by_auto_but_served_on_request(
    exported_repo: Path, caps: Capabilities
) -> None:
    vdir = version(exported_repo)
    write_exports(vdir, [exported_record(vdir, "fp32"), exported_record(vdir, "int8", top1=0.9)])
    model, skipped = opened(exported_repo, AUTO, caps)
    assert model.backend.precision == "fp32"
    assert skipped == [
        "onnxruntime int8: model.int8.onnx: top-1 agreement with torch fp32 is 90.00%, below "
        "its threshold 99.00% (published with --force); WASTE_PRECISION=int8 serves it anyway"
    ]
    asked, skipped = opened(exported_repo, [Choice("onnxruntime", "int8")], caps)
    assert asked.backend.precision == "int8" and skipped == []


def test_a_version_without_exports_skips_nothing_worth_reporting(
    template_repo: Path, caps: Capabilities
) -> None:
    model, skipped = opened(template_repo, AUTO, caps)
    assert (model.backend.name, skipped) == ("torch", [])
    with pytest.raises(BackendUnavailable) as info:
        opened(template_repo, [ORT_INT8, ORT_FP32], caps)
    assert str(info.value) == (
        "onnxruntime int8: model.json lists no int8 ONNX export (export the version with "
        "python -m training export); onnxruntime fp32: model.json lists no fp32 ONNX export "
        "(export the version with python -m training export)"
    )


def test_cpu_bf16_runs_under_autocast_close_to_fp32(template_repo: Path) -> None:
    loaded: LoadedVersion = load_version(version(template_repo))
    meta = loaded.metadata
    bf16 = TorchBackend(loaded.model, torch.device("cpu"), "bf16", meta.preprocessing, 12, 4)
    assert bf16.autocast and next(bf16.module.parameters()).dtype == torch.float32
    reference = load_version(version(template_repo))
    fp32 = TorchBackend(reference.model, torch.device("cpu"), "fp32", meta.preprocessing, 12, 4)
    batch = np.stack(asymmetric_images(5))
    got, want = bf16.forward(batch), fp32.forward(batch)
    assert got.dtype == np.float32 and got.shape == (4, 12)
    assert 0 < np.abs(got - want).max() < 0.25 * np.abs(want).max()


def test_cuda_graphs_stay_off_on_cpu(template_repo: Path) -> None:
    loaded = load_version(version(template_repo))
    meta = loaded.metadata
    backend = TorchBackend(
        loaded.model, torch.device("cpu"), "fp32", meta.preprocessing, 12, 2, cuda_graphs=True
    )
    backend.warm([1, 2])
    assert backend.cuda_graphs is False and backend._graphs == {}


# -- through the service ------------------------------------------------------------------
MakeClient = Callable[..., TestClient]


def version_info(client: TestClient) -> dict[str, object]:
    body = client.get(f"/v1/models/{MODEL}").json()
    info: dict[str, object] = body["versions"][0]
    return info


def predict(client: TestClient) -> dict[str, object]:
    response = client.post("/v1/predict", files=files(("a.jpg", image_bytes())))
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_auto_serves_int8_and_every_answer_names_it(
    exported_repo: Path, make_client: MakeClient
) -> None:
    client = make_client(model_dir=exported_repo)
    info = version_info(client)
    assert (info["backend"], info["precision"], info["device"]) == ("onnxruntime", "int8", "cpu")
    assert info["skipped_backends"] == []
    body = predict(client)
    assert (body["backend"], body["precision"]) == ("onnxruntime", "int8")
    detail = client.get(f"/v1/models/{MODEL}/versions/1").json()
    assert detail["backend"] == "onnxruntime"
    assert [e["file"] for e in detail["metadata"]["exports"]] == [ONNX_FILE, ONNX_INT8_FILE]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"backend": "torch"}, ("torch", "fp32")),
        ({"precision": "fp32"}, ("onnxruntime", "fp32")),
        ({"backend": "onnxruntime", "precision": "fp32"}, ("onnxruntime", "fp32")),
    ],
)
def test_settings_pick_the_backend(
    exported_repo: Path,
    make_client: MakeClient,
    settings: dict[str, str],
    expected: tuple[str, str],
) -> None:
    body = predict(make_client(model_dir=exported_repo, **settings))
    assert (body["backend"], body["precision"]) == expected


def test_a_tampered_int8_file_falls_back_and_says_why(
    exported_repo: Path, make_client: MakeClient
) -> None:
    path = version(exported_repo) / ONNX_INT8_FILE
    replace_file(path, path.read_bytes()[:1000])
    client = make_client(model_dir=exported_repo)
    info = version_info(client)
    assert (info["state"], info["backend"], info["precision"]) == ("ready", "onnxruntime", "fp32")
    [reason] = info["skipped_backends"]  # type: ignore[misc]
    assert reason.startswith("onnxruntime int8: model.int8.onnx: sha256 mismatch")
    assert predict(client)["precision"] == "fp32"


def test_a_tampered_file_that_was_asked_for_fails_the_version(
    exported_repo: Path, make_client: MakeClient
) -> None:
    path = version(exported_repo) / ONNX_INT8_FILE
    replace_file(path, path.read_bytes()[:1000])
    client = make_client(ready=False, model_dir=exported_repo, precision="int8")
    info = version_info(client)
    assert info["state"] == "failed" and info["backend"] is None
    error = str(info["error"])
    assert error.startswith("no backend can serve it: onnxruntime int8: model.int8.onnx: sha256")
    path = f"/v1/models/{MODEL}/versions/1/predict"
    response = client.post(path, files=files(("a.jpg", image_bytes())))
    assert_error(response, 503, "version_failed", "model.int8.onnx", "sha256 mismatch")


def test_a_version_without_exports_fails_when_onnxruntime_is_required(
    make_client: MakeClient,
) -> None:
    client = make_client(ready=False, backend="onnxruntime")
    info = version_info(client)
    assert info["state"] == "failed"
    assert "model.json lists no fp32 ONNX export" in str(info["error"])


@pytest.mark.parametrize("choice", [ORT_FP32, TORCH_FP32])
def test_normalised_rows_replace_their_pixels_on_every_backend(
    exported_repo: Path, caps: Capabilities, choice: Choice
) -> None:
    images = asymmetric_images(5, n=3)
    model, _ = opened(exported_repo, [choice], caps)
    prep = read_metadata(version(exported_repo)).preprocessing
    row = normalize(torch.from_numpy(images[1]).permute(2, 0, 1), prep).numpy()
    blank = np.zeros_like(images[1])
    mixed = model.backend.forward_mixed(model.stack([images[0], blank, images[2]]), {1: row})
    expected = model.backend.forward(model.stack(images))
    assert np.abs(mixed - expected).max() < 1e-4
    # The placeholder really is replaced: the blank image alone answers differently.
    alone = model.backend.forward(model.stack([blank]))
    assert np.abs(alone[0] - expected[1]).max() > 1e-3
