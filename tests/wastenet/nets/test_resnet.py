import pytest
import torch
from pydantic import ValidationError
from torch import nn

from wastenet.nets import (
    CBAM,
    IBN,
    START_SCALE,
    BasicBlock,
    BNNeck,
    Bottleneck,
    ModelConfig,
    build_model,
    list_architectures,
)

# Woo et al., ECCV 2018, Table 4: parameters (M) of ResNet + CBAM, ImageNet-1K head.
PAPER_TABLE_4 = {"resnet18": 11.78, "resnet34": 21.96, "resnet50": 28.09, "resnet101": 49.33}
BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet50": [3, 4, 6, 3]}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(PAPER_TABLE_4))
def test_parameter_counts_match_the_paper(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch, num_classes=1000, cbam="block"))
    assert round(n_params(model) / 1e6, 2) == PAPER_TABLE_4[arch]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet152"])
def test_no_attention_equals_torchvision(arch: str) -> None:
    import torchvision

    ours = build_model(ModelConfig(arch=arch, num_classes=1000, cbam="none"))
    theirs = getattr(torchvision.models, arch)()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }


def test_list_architectures() -> None:
    assert list_architectures() == [
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "vgg16_bn",
        "mobilenet_v2",
        "alexnet",
    ]


def cbam_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, CBAM)]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_placements_put_cbam_where_they_say(arch: str) -> None:
    blocks = BLOCKS[arch]
    assert cbam_names(build_model(ModelConfig(arch=arch, cbam="none"))) == []

    stage = cbam_names(build_model(ModelConfig(arch=arch, cbam="stage", cbam_stages=(2, 4))))
    assert stage == ["attn2", "attn4"]

    block = cbam_names(build_model(ModelConfig(arch=arch, cbam="block", cbam_stages=(1, 3))))
    assert block == [f"layer1.{i}.attn" for i in range(blocks[0])] + [
        f"layer3.{i}.attn" for i in range(blocks[2])
    ]

    post = cbam_names(build_model(ModelConfig(arch=arch, cbam="block_post")))
    assert len(post) == sum(blocks)
    assert all(name.endswith(".post_attn") for name in post)


def test_stage_attention_matches_stage_width() -> None:
    model = build_model(ModelConfig(arch="resnet50", cbam="stage"))
    widths = [getattr(model, f"attn{i}").channel_gate.mlp[0].in_features for i in (1, 2, 3, 4)]
    assert widths == [256, 512, 1024, 2048]


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(arch="resnet18", cbam="none"),
        ModelConfig(arch="resnet18", cbam="stage", ibn=True),
        ModelConfig(arch="resnet34", cbam="block", head="bnneck"),
        ModelConfig(arch="resnet50", cbam="block_post", cbam_stages=(3, 4), ibn=True),
    ],
    ids=lambda c: f"{c.arch}-{c.cbam}-ibn{c.ibn}-{c.head}",
)
def test_forward_shapes(config: ModelConfig) -> None:
    model = build_model(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
        features = model.forward_features(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 12)
    assert features.shape == (2, model.num_features)
    assert torch.isfinite(logits).all()


def randomise_gates(module: nn.Module) -> None:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)


@pytest.mark.parametrize("position", ["branch", "post"])
def test_basic_block_puts_attention_on_branch_or_after_addition(position: str) -> None:
    torch.manual_seed(0)
    block = BasicBlock(8, 8, attn_layer=lambda c: CBAM(c, reduction=2), attn_position=position)  # type: ignore[arg-type]
    randomise_gates(block)
    block.eval()
    cbam = block.attn if position == "branch" else block.post_attn
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        expected = (cbam(branch) + x) if position == "branch" else cbam(branch + x)
        assert torch.allclose(block(x), torch.relu(expected), atol=1e-6)


def test_bottleneck_attention_is_on_the_widened_branch() -> None:
    block = Bottleneck(64, 16, attn_layer=CBAM)
    assert isinstance(block.attn, CBAM)
    assert block.attn.channel_gate.mlp[0].in_features == 64
    assert isinstance(block.post_attn, nn.Identity)


def test_channel_gate_is_a_shared_mlp_over_avg_and_max() -> None:
    torch.manual_seed(0)
    cbam = CBAM(32, reduction=16)
    randomise_gates(cbam)
    gate = cbam.channel_gate
    assert [gate.mlp[0].in_features, gate.mlp[0].out_features, gate.mlp[2].out_features] == [
        32,
        2,
        32,
    ]
    x = torch.randn(3, 32, 5, 7)
    avg = x.mean(dim=(2, 3))
    mx = x.amax(dim=(2, 3))
    expected = x * torch.sigmoid(gate.mlp(avg) + gate.mlp(mx))[:, :, None, None]
    assert torch.allclose(gate(x), expected, atol=1e-6)


def test_spatial_gate_is_conv_bn_over_max_and_mean_maps() -> None:
    torch.manual_seed(0)
    cbam = CBAM(16)
    randomise_gates(cbam)
    gate = cbam.spatial_gate.eval()
    assert gate.conv.kernel_size == (7, 7) and gate.conv.in_channels == 2
    x = torch.randn(2, 16, 9, 9)
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    expected = x * torch.sigmoid(gate.bn(gate.conv(pooled)))
    assert torch.allclose(gate(x), expected, atol=1e-6)


def test_fresh_cbam_starts_at_the_steep_half() -> None:
    model = build_model(ModelConfig(cbam="block")).eval()
    cbam = model.layer2[0].attn
    x = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        assert torch.equal(cbam.channel_gate(x), x * 0.5)  # exactly, for every image
        assert cbam.spatial_gate.bn.weight.item() == pytest.approx(0.3)
        assert cbam.spatial_gate.bn.bias.item() == 0.0  # sigmoid(0) = 0.5 on average
        cbam.spatial_gate.bn.weight.zero_()
        ratio = cbam(x) / x
    assert START_SCALE == 0.25
    assert torch.allclose(ratio, torch.full_like(ratio, START_SCALE), atol=1e-6)


def test_ibn_a_on_layers_1_to_3_only() -> None:
    model = build_model(ModelConfig(arch="resnet50", ibn=True))
    ibn = {name: m for name, m in model.named_modules() if isinstance(m, IBN)}
    assert sorted(ibn) == sorted(
        f"layer{stage}.{i}.bn1"
        for stage, n in zip((1, 2, 3), (3, 4, 6), strict=True)
        for i in range(n)
    )
    first = ibn["layer2.0.bn1"]
    assert first.instance.num_features == 64 and first.batch.num_features == 64
    assert isinstance(model.layer4[0].bn1, nn.BatchNorm2d)


def test_ibn_normalises_first_half_per_instance() -> None:
    ibn = IBN(8).eval()
    x = torch.randn(2, 8, 5, 5) * 3 + 1
    out = ibn(x)
    first = out[:, :4]
    assert torch.allclose(first.mean(dim=(2, 3)), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(out[:, 4:], ibn.batch(x[:, 4:]))


def test_bnneck_bias_is_frozen_and_logits_come_in_eval() -> None:
    model = build_model(ModelConfig(head="bnneck", cbam="none"))
    head = model.fc
    assert isinstance(head, BNNeck)
    names = [n for n, _ in model.named_parameters()]
    assert "fc.bottleneck.bias" not in names and "fc.classifier.bias" not in names
    assert "fc.bottleneck.bias" in model.state_dict()

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.equal(head.bottleneck.bias, torch.zeros(512))
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cbam_stages": (0, 5)}, "subset of 1-4"),
        ({"cbam_stages": (2, 2)}, "duplicates"),
        ({"cbam_stages": ()}, "at least one stage"),
        ({"cbam_kernel_size": 4}, "odd"),
        ({"arch": "resnet200"}, "resnet18"),
        ({"head": "mlp"}, "bnneck"),
        ({"depth": 3}, "Extra inputs"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**kwargs)


def test_config_sorts_stages_and_ignores_them_without_cbam() -> None:
    assert ModelConfig(cbam_stages=(4, 2)).cbam_stages == (2, 4)
    assert ModelConfig(cbam="none", cbam_stages=()).attention_stages == frozenset()


def test_ibn_keeps_a_channels_last_input_channels_last() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="resnet50", ibn=True, cbam="none")).eval()
    model.to(memory_format=torch.channels_last)
    layouts: dict[str, bool] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _a, out, name=name: layouts.__setitem__(
                name, out.is_contiguous(memory_format=torch.channels_last)
            )
        )
        for name, m in model.named_modules()
        if isinstance(m, IBN)
    ]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x.contiguous(memory_format=torch.channels_last))
        plain = model(x)
    for h in handles:
        h.remove()
    assert len(layouts) == 13 and all(layouts.values()), layouts
    assert torch.allclose(fast, plain, atol=1e-5)
    standard = IBN(8)(torch.randn(2, 8, 5, 5))
    assert standard.is_contiguous()
