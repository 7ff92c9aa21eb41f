"""ONNX export, int8 quantisation recipes and the agreement report (CPU, tiny sizes)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.training.train_helpers import make_data, one_thread
from training.data import Sample, prepare_splits
from training.export import (
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    RECIPES,
    AgreementError,
    ExportConfig,
    agreement_report,
    eval_loader,
    excluded_nodes,
    export_onnx,
    measure_agreement,
    quantize_int8,
    require_agreement,
    sample_per_class,
    softmax,
)
from wastenet.classes import CLASS_NAMES
from wastenet.nets import build_model
from wastenet.schema import ModelConfig, Preprocessing

SIZE = 32
# CBAM in layer4's two blocks only: every part a recipe can select, at a fraction of the
# export time of the full network.
CONFIG = ModelConfig(cbam="block", cbam_stages=(4,))


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


def _model(seed: int = 0) -> nn.Module:
    """Random weights with non-trivial BatchNorm statistics (so that folding them matters)."""
    torch.manual_seed(seed)
    model = build_model(CONFIG)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, SIZE, SIZE) * 3 - 1)
    return model.eval()


def _asymmetric(batch: int) -> torch.Tensor:
    """A left-to-right ramp, a top-to-bottom ramp and noise: flips and transposes show."""
    ramp = torch.linspace(-2, 2, SIZE)
    x = torch.stack([ramp.expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE)])
    x = torch.cat([x, torch.zeros(1, SIZE, SIZE)])
    return x.expand(batch, -1, -1, -1) + 0.5 * torch.randn(batch, 3, SIZE, SIZE)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    model = _model()
    export_onnx(model, SIZE, path)
    return model, path


@pytest.mark.slow
def test_onnx_fp32_equals_pytorch_for_any_batch_size(exported: tuple[nn.Module, Path]) -> None:
    model, path = exported
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == [INPUT_NAME]
    assert [o.name for o in graph.graph.output] == [OUTPUT_NAME]
    assert graph.opset_import[0].version == OPSET
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch.manual_seed(5)
    for batch in (1, 5):  # the example batch was 2: the batch dimension is dynamic
        x = _asymmetric(batch)
        with torch.no_grad():
            expected = model(x).numpy()
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        assert logits.shape == (batch, 12)
        assert np.abs(logits - expected).max() < 1e-4
        assert np.abs(expected).max() > 0.1  # the comparison is not between zeros


def test_agreement_of_identical_predictions_is_one() -> None:
    rng = np.random.default_rng(0)
    probs = softmax(rng.standard_normal((30, 12)))
    labels = np.arange(30) % 12
    report = agreement_report(probs, probs.copy(), labels, CLASS_NAMES, 0.99)
    assert (report.top1_agreement, report.max_prob_diff, report.num_samples) == (1.0, 0.0, 30)
    assert report.per_class["battery"].num_samples == 3  # labels 0, 12, 24
    assert report.per_class["white_glass"].num_samples == 2  # labels 11, 23
    assert not report.forced and report.threshold == 0.99


def test_agreement_counts_flipped_top1s_per_true_class() -> None:
    # 20 images over 3 classes; images 1, 4 and 7 change their top-1 class.
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0, 1, 2] * 2)
    reference = np.tile([0.6, 0.3, 0.1], (20, 1))
    candidate = reference.copy()
    candidate[[1, 4, 7]] = [0.35, 0.55, 0.10]  # top-1 moves from class 0 to class 1
    candidate[9] = [0.5, 0.3, 0.2]  # same top-1, probability difference 0.1
    report = agreement_report(reference, candidate, labels, ["a", "b", "c"], 0.9)
    assert report.top1_agreement == pytest.approx(17 / 20)
    assert report.max_prob_diff == pytest.approx(0.25)
    # Flips at 1 and 7 are true class a (7 images), at 4 class c (7 images).
    per = report.per_class
    assert (per["a"].num_samples, per["a"].top1_agreement) == (6, pytest.approx(4 / 6))
    assert (per["b"].num_samples, per["b"].top1_agreement) == (6, 1.0)
    assert per["c"].top1_agreement == pytest.approx(7 / 8)
    assert per["b"].max_prob_diff == 0.0
    assert per["c"].max_prob_diff == pytest.approx(0.25)


def test_agreement_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        agreement_report(np.ones((3, 2)), np.ones((4, 2)), np.zeros(3), ["a", "b"], 0.9)


def test_below_the_threshold_is_refused_naming_the_figure_unless_forced() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    reference = np.tile([0.7, 0.3], (20, 1))
    candidate = reference.copy()
    candidate[[12]] = [0.2, 0.8]
    report = agreement_report(reference, candidate, labels, ["paper", "trash"], 0.99)
    with pytest.raises(AgreementError) as exc:
        require_agreement(report, "model.int8.onnx", force=False)
    message = str(exc.value)
    assert "model.int8.onnx: top-1 agreement 0.9500 (19/20 test images)" in message
    assert "below the threshold 0.9900" in message
    assert "worst classes: trash 0.900 (9/10)" in message and "paper" not in message
    assert "--force" in message
    forced = require_agreement(report, "model.int8.onnx", force=True)
    assert forced.forced and forced.top1_agreement == 0.95
    passing = report.model_copy(update={"threshold": 0.95})
    assert require_agreement(passing, "model.int8.onnx", force=True).forced is False


@pytest.mark.slow
def test_agreement_of_a_perturbed_model_counts_its_flips(tmp_path: Path) -> None:
    """measure_agreement end to end: PyTorch against an ONNX file of a perturbed copy."""
    data = make_data(tmp_path, images_per_class=3, size=40)
    splits = prepare_splits(data, 0.3, 0.3, seed=0, verify_images=False)
    samples = [*splits.train, *splits.val, *splits.test]
    pre = Preprocessing(input_size=SIZE, resize_size=36)
    model = _model(seed=1)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.fc.bias[3] += 0.5  # type: ignore[index,operator]
    path = tmp_path / "perturbed.onnx"
    export_onnx(perturbed, SIZE, path)
    reports = measure_agreement(model, {"p": path}, samples, pre, CLASS_NAMES, 0.99)

    flips = 0
    for images, _ in eval_loader(samples, pre):
        with torch.no_grad():
            flips += int((model(images).argmax(1) != perturbed(images).argmax(1)).sum())
    assert 0 < flips < len(samples)
    report = reports["p"]
    assert report.num_samples == len(samples) == 36
    assert report.top1_agreement == pytest.approx(1 - flips / len(samples))
    assert sum(c.num_samples for c in report.per_class.values()) == 36


@pytest.mark.slow
def test_recipes_keep_the_named_parts_in_fp32(
    exported: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    model, path = exported
    graph = onnx.load(str(path)).graph
    attention = {n.name for n in graph.node if "layer4.0.attn" in str(n.metadata_props)}
    attention |= {n.name for n in graph.node if "layer4.1.attn" in str(n.metadata_props)}
    assert len(attention) > 10
    assert set(excluded_nodes(path, model, RECIPES["conv"])) == set()
    assert set(excluded_nodes(path, model, RECIPES["conv-keep-attention"])) == attention
    backbone = set(excluded_nodes(path, model, RECIPES["backbone"]))
    fc = backbone - attention
    assert len(fc) == 1 and graph.node[-1].name in fc  # the classifier's Gemm, last node
    stem = set(excluded_nodes(path, model, RECIPES["conv-keep-attention-stem"])) - attention
    first_conv = next(n.name for n in graph.node if n.op_type == "Conv")
    assert stem == {first_conv}

    # Quantised: every Conv outside CBAM reads dequantised weights, the gate conv does not.
    out = tmp_path / "int8.onnx"
    calibration = iter([np.random.default_rng(i).standard_normal((4, 3, SIZE, SIZE), np.float32)
                        for i in range(3)])  # fmt: skip
    kept = quantize_int8(path, out, calibration, model, RECIPES["conv-keep-attention"])
    assert set(kept) == attention
    q = onnx.load(str(out)).graph
    producers = {o: n.op_type for n in q.node for o in n.output}
    convs = [n for n in q.node if n.op_type == "Conv"]
    quantised = {n.name for n in convs if producers.get(n.input[1]) == "DequantizeLinear"}
    names = {n.name for n in convs}
    assert names - quantised == names & attention
    assert len(names & attention) == 2  # the two spatial-gate convs
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: _asymmetric(3).numpy()})
    assert logits.shape == (3, 12) and np.isfinite(logits).all()


def test_calibration_samples_take_turns_over_classes() -> None:
    samples = [Sample(f"{c}-{i}.jpg", c) for c in range(3) for i in range(5 if c else 1)]
    picked = sample_per_class(samples, 7)
    assert sorted(s.label for s in picked) == [0, 1, 1, 1, 2, 2, 2]
    assert picked == sample_per_class(samples, 7)  # seeded
    assert len(sample_per_class(samples, 100)) == len(samples)


def test_export_config_precisions() -> None:
    assert ExportConfig().precisions == ()
    assert ExportConfig(onnx=True).precisions == ("fp32",)
    assert ExportConfig(int8=True).precisions == ("fp32", "int8")
    with pytest.raises(ValueError, match="min_agreement"):
        ExportConfig(min_agreement=1.5)
