"""The tutorials' baselines: VGG-16 (BN), MobileNetV2 and AlexNet under torchvision's names."""

from pathlib import Path

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from wastenet.nets import CBAM, ModelConfig, build_model, load_pretrained

BASELINES = ["vgg16_bn", "mobilenet_v2", "alexnet"]


@pytest.fixture(scope="module", params=BASELINES)
def torchvision_net(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    torch.manual_seed(0)
    return request.param, getattr(torchvision.models, request.param)(weights=None).eval()


def _images(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_torchvision_state_dicts_load_by_name_and_give_identical_outputs(
    torchvision_net: tuple[str, nn.Module],
) -> None:
    arch, theirs = torchvision_net
    ours = build_model(ModelConfig(arch=arch, cbam="none", num_classes=1000))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    with torch.no_grad():
        for seed in (1, 2):
            x = _images(seed)
            assert torch.equal(ours(x), theirs(x))


STAGE_CBAM = {
    "vgg16_bn": ["features.12.attn", "features.22.attn", "features.32.attn", "features.42.attn"],
    "alexnet": ["features.4.attn", "features.7.attn", "features.9.attn", "features.11.attn"],
    "mobilenet_v2": [f"features.{i}.post_attn" for i in (3, 6, 13, 17)],
}


def _cbam_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, CBAM)]


@pytest.mark.parametrize("arch", BASELINES)
def test_stage_cbam_sits_after_each_selected_group(arch: str) -> None:
    assert _cbam_names(build_model(ModelConfig(arch=arch, cbam="stage"))) == STAGE_CBAM[arch]
    chosen = _cbam_names(build_model(ModelConfig(arch=arch, cbam="stage", cbam_stages=(2, 4))))
    assert chosen == [STAGE_CBAM[arch][1], STAGE_CBAM[arch][3]]


def test_vgg_stage_cbam_sees_the_stage_width() -> None:
    model = build_model(ModelConfig(arch="vgg16_bn", cbam="stage"))
    widths = [
        model.get_submodule(n).channel_gate.mlp[0].in_features for n in STAGE_CBAM["vgg16_bn"]
    ]
    assert widths == [128, 256, 512, 512]


def test_mobilenet_block_cbam_in_every_inverted_residual_of_the_groups() -> None:
    block = _cbam_names(build_model(ModelConfig(arch="mobilenet_v2", cbam="block")))
    assert block == [f"features.{i}.attn" for i in range(2, 18)]  # features.1 is the stem
    post = _cbam_names(
        build_model(ModelConfig(arch="mobilenet_v2", cbam="block_post", cbam_stages=(1,)))
    )
    assert post == ["features.2.post_attn", "features.3.post_attn"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "alexnet", "cbam": "block"}, "cbam='block' puts CBAM inside residual blocks, "
         "and alexnet has none; use cbam='stage'"),
        ({"arch": "vgg16_bn", "cbam": "block_post"}, "and vgg16_bn has none"),
        ({"arch": "mobilenet_v2", "ibn": True, "cbam": "block"}, "mobilenet_v2 has no ResNet"),
        ({"arch": "vgg16_bn", "ibn": True, "cbam": "stage"}, "vgg16_bn has no ResNet blocks"),
    ],
)  # fmt: skip
def test_placements_a_baseline_has_no_place_for_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    ("arch", "cbam"),
    [
        ("vgg16_bn", "stage"),
        ("alexnet", "stage"),
        ("mobilenet_v2", "stage"),
        ("mobilenet_v2", "block"),
    ],
)
def test_fresh_cbam_keeps_the_pretrained_function(arch: str, cbam: str) -> None:
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(weights=None).eval()
    for m in theirs.modules():  # running statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model = build_model(ModelConfig(arch=arch, cbam=cbam, num_classes=1000))
    result = model.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(".attn." in k or ".post_attn." in k for k in result.missing_keys)
    assert model.fold_attention_start() == []
    for m in model.modules():  # constant spatial gates too: then the fold is exact
        if isinstance(m, CBAM):
            nn.init.zeros_(m.spatial_gate.bn.weight)
    model.eval()
    x = _images(3)
    with torch.no_grad():
        assert torch.allclose(model(x), theirs(x), rtol=1e-3, atol=1e-5)


def test_mobilenet_pretrained_file_keeps_the_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = torchvision.models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(theirs.state_dict(), path)
    config = ModelConfig(arch="mobilenet_v2", cbam="block")
    model = build_model(config)
    report = load_pretrained(model, config, path)
    assert report.missing == [] and report.unexpected == [] and report.unfolded == []
    assert report.loaded == len(theirs.state_dict()) - 2
    assert {"classifier.1.weight", "classifier.1.bias"} <= set(report.new)
    assert model.classifier[1].weight.shape == (12, 1280)
    mine = model.state_dict()
    assert torch.equal(
        mine["features.5.conv.1.0.weight"], theirs.state_dict()["features.5.conv.1.0.weight"]
    )


@pytest.mark.parametrize("arch", BASELINES)
def test_baselines_run_at_small_inputs(arch: str) -> None:
    head = "bnneck" if arch == "mobilenet_v2" else "linear"
    model = build_model(ModelConfig(arch=arch, cbam="stage", head=head)).eval()
    with torch.no_grad():
        logits = model(_images(4))
    assert logits.shape == (2, 12) and torch.isfinite(logits).all()
