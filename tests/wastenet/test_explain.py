import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from wastenet.explain import colorize, explain, input_image, overlay, overlay_png
from wastenet.nets import CBAM, ModelConfig, build_model, record_gates
from wastenet.schema import Preprocessing


class PooledChannels(nn.Module):
    """Logit k = mean of input channel k: Grad-CAM of class k is channel k's positive part."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        nn.init.eye_(self.features.weight[:, :, 0, 0])
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.avgpool(self.features(x)).flatten(1)


def _quadrants() -> Tensor:
    """Image 0: channel 0 bright top-left, channel 1 bright bottom-right (larger mean)."""
    x = torch.zeros(2, 3, 4, 6)
    x[0, 0, :2, :3] = 1.0
    x[0, 1, 2:, 3:] = 2.0
    x[1, 2, 0, 5] = 3.0
    return x


def test_grad_cam_of_predicted_and_requested_class_is_where_the_evidence_is() -> None:
    model = PooledChannels().eval()
    first, second = explain(model, _quadrants())
    assert (first.predicted_index, first.class_index) == (1, 1)
    expected = np.zeros((4, 6), np.float32)
    expected[2:, 3:] = 1.0
    np.testing.assert_allclose(first.cam, expected)
    assert second.class_index == 2 and second.cam[0, 5] == 1.0 and second.cam.sum() == 1.0
    assert first.attention is None

    asked = explain(model, _quadrants(), classes=[0, 0])
    top_left = np.zeros((4, 6), np.float32)
    top_left[:2, :3] = 1.0
    np.testing.assert_allclose(asked[0].cam, top_left)
    assert asked[0].predicted_index == 1 and asked[0].class_index == 0
    with torch.no_grad():
        probs = torch.softmax(model(_quadrants()), dim=1)
    assert asked[0].probability == pytest.approx(float(probs[0, 0]))
    np.testing.assert_array_equal(asked[1].cam, np.zeros((4, 6)))  # no evidence for class 0


def test_bad_requests_are_refused() -> None:
    model = PooledChannels().eval()
    with pytest.raises(ValueError, match="class index 3 is out of range 0..2"):
        explain(model, _quadrants(), classes=3)
    with pytest.raises(ValueError, match="1 classes given for 2 images"):
        explain(model, _quadrants(), classes=[0])
    with pytest.raises(ValueError, match="eval mode"):
        explain(model.train(), _quadrants())


@pytest.fixture(scope="module")
def resnet_cbam() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(cbam="block"))
    with torch.no_grad():  # gates that vary, as after training
        for m in model.modules():
            if isinstance(m, CBAM):
                for p in m.parameters():
                    p.normal_(0, 0.5)
    return model.eval()


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_cbam_network_batch_equals_single_images_and_leaves_the_model_alone(
    resnet_cbam: nn.Module,
) -> None:
    model = resnet_cbam
    model.layer1.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _state(model)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    batch = explain(model, x)
    singles = [explain(model, x[i : i + 1])[0] for i in range(3)]
    for got, alone in zip(batch, singles, strict=True):
        assert got.class_index == alone.class_index
        np.testing.assert_allclose(got.cam, alone.cam, atol=1e-5)
        assert got.attention is not None and alone.attention is not None
        np.testing.assert_allclose(got.attention, alone.attention, atol=1e-6)
    assert batch[0].cam.shape == (2, 2) and batch[0].cam.dtype == np.float32
    assert batch[0].cam.max() == pytest.approx(1.0)

    with torch.no_grad(), record_gates(model) as gates:
        model(x)
    last = gates.spatial["layer4.1.attn"][0]
    np.testing.assert_allclose(batch[1].attention, last[1, 0].numpy(), atol=1e-6)

    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.layer1.requires_grad_(True)


def test_works_with_every_parameter_frozen_and_under_inference_mode(
    resnet_cbam: nn.Module,
) -> None:
    model = resnet_cbam
    model.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    try:
        with torch.inference_mode():
            result = explain(model, x, classes=4)
    finally:
        model.requires_grad_(True)
    assert [r.class_index for r in result] == [4, 4]
    assert all(r.cam.max() > 0 for r in result)


def test_other_threads_using_the_model_meanwhile_are_not_recorded(
    resnet_cbam: nn.Module,
) -> None:
    model = resnet_cbam
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    expected = explain(model, x)
    other = torch.randn(5, 3, 64, 64)
    stop = threading.Event()

    def serve() -> None:
        with torch.no_grad():
            while not stop.is_set():
                model(other)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        results = [explain(model, x) for _ in range(3)]
    finally:
        stop.set()
        worker.join()
    for result in results:
        for got, want in zip(result, expected, strict=True):
            np.testing.assert_allclose(got.cam, want.cam, atol=1e-5)


@pytest.mark.parametrize("arch", ["vgg16_bn", "mobilenet_v2"])
def test_baselines_explain_too(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch, cbam="stage")).eval()
    (result,) = explain(model, torch.randn(1, 3, 64, 64))
    assert result.cam.ndim == 2 and result.attention is not None


def test_colours_and_overlay_keep_the_orientation() -> None:
    scale = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert scale[0, 0].argmax() == 2 and scale[0, 2].argmax() == 0  # blue low, red high
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    heat = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)  # hot at the top-left
    out = np.asarray(overlay(image, heat, alpha=1.0))
    assert out.shape == (20, 40, 3)
    assert out[0, 0, 0] >= 120 and out[0, 0, 1] < 20 and out[0, 0, 2] < 20  # (dark) red top-left
    assert out[19, 39, 2] >= 120 and out[19, 39, 0] < 20  # blue bottom-right
    png = overlay_png(image, heat)
    assert Image.open(io.BytesIO(png)).size == (40, 20)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, heat, alpha=2.0)


def test_input_image_undoes_the_normalisation() -> None:
    p = Preprocessing(resize_size=8, input_size=8)
    pixels = torch.zeros(3, 2, 3)
    pixels[0, 0, 2] = 1.0  # red at row 0, column 2
    normalised = (pixels - torch.tensor(p.mean).view(3, 1, 1)) / torch.tensor(p.std).view(3, 1, 1)
    image = np.asarray(input_image(normalised, p))
    assert image.shape == (2, 3, 3)
    assert tuple(image[0, 2]) == (255, 0, 0) and tuple(image[1, 0]) == (0, 0, 0)
