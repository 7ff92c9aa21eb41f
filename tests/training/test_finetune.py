import re

import pytest
import torch
from torch import nn

from training.finetune import (
    GROUPS,
    PARTS,
    freeze,
    named_parts,
    param_groups,
    trainable_parts,
    unfreeze,
)
from wastenet.nets import ModelConfig, build_model

LRS = {"backbone": 1e-5, "attention": 1e-4, "head": 1e-3}


@pytest.fixture(params=["block", "stage", "block_post", "none"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    return build_model(ModelConfig(cbam=request.param, head="bnneck", ibn=True))


def test_every_parameter_is_in_exactly_one_part(model: nn.Module) -> None:
    parts = named_parts(model)
    assert list(parts) == list(PARTS)
    seen = [id(p) for ps in parts.values() for _, p in ps]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert all(name.startswith(("conv1", "bn1")) for name, _ in parts["stem"])
    attn_name = re.compile(r"(^|\.)(post_)?attn\d?\.")
    assert all(attn_name.search(name) for name, _ in parts["attention"])
    assert not any(attn_name.search(name) for name, _ in parts["layer3"])


def test_freeze_backbone_leaves_attention_and_head(model: nn.Module) -> None:
    changed = freeze(model, ["backbone"])
    parts = named_parts(model)
    assert changed == sum(len(parts[p]) for p in ("stem", "layer1", "layer2", "layer3", "layer4"))
    expected = ["attention", "head"] if parts["attention"] else ["head"]
    assert trainable_parts(model) == expected

    unfreeze(model, ["layer4"])
    assert all(p.requires_grad for _, p in named_parts(model)["layer4"])
    assert not any(p.requires_grad for _, p in named_parts(model)["layer3"])


def test_unknown_part_is_named() -> None:
    model = build_model(ModelConfig())
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['layer5'\]"):
        freeze(model, ["layer5"])


def test_param_groups_cover_trainable_parameters_once(model: nn.Module) -> None:
    freeze(model, ["stem", "layer1"])
    groups = param_groups(model, LRS, weight_decay=1e-4)
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped) == sorted(trainable)
    for group in groups:
        base = group["name"].split("/")[0]
        assert group["lr"] == LRS[base] == group["initial_lr"]
        no_decay = group["name"].endswith("/no_decay")
        assert group["weight_decay"] == (0.0 if no_decay else 1e-4)
        assert all((p.ndim <= 1) == no_decay for p in group["params"])
    stem_ids = {id(p) for _, p in named_parts(model)["stem"]}
    assert not stem_ids & set(grouped)


def test_param_groups_route_parts_to_their_lr() -> None:
    model = build_model(ModelConfig(cbam="block"))
    groups = {g["name"]: g for g in param_groups(model, LRS)}
    assert sorted(groups) == sorted(GROUPS)
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(model.layer1[0].attn.channel_gate.mlp[0].weight) in ids["attention"]
    assert id(model.layer1[0].conv1.weight) in ids["backbone"]
    assert id(model.fc.weight) in ids["head"]
    opt = torch.optim.AdamW(param_groups(model, LRS))
    assert sorted(g["lr"] for g in opt.param_groups) == sorted(LRS.values())


@pytest.mark.parametrize(
    ("lrs", "message"),
    [
        ({"backbone": 1e-5, "head": 1e-3}, r"missing \['attention'\]"),
        ({**LRS, "neck": 1.0}, r"extra \['neck'\]"),
        ({**LRS, "head": 0.0}, "'head' must be > 0"),
    ],
)
def test_param_groups_reject_bad_lrs(lrs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        param_groups(build_model(ModelConfig()), lrs)


# Parameter names of each part in the tutorials' baselines (torchvision's names).
BASELINE_PARTS = {
    "vgg16_bn": {
        "stem": ["features.0.weight", "features.4.bias"],
        "layer1": ["features.7.weight", "features.11.weight"],
        "layer4": ["features.40.weight", "classifier.0.weight", "classifier.3.bias"],
        "attention": ["features.12.attn.channel_gate.mlp.0.weight",
                      "features.42.attn.spatial_gate.bn.weight"],
        "head": ["classifier.6.weight", "classifier.6.bias"],
    },
    "alexnet": {
        "stem": ["features.0.weight"],
        "layer1": ["features.3.weight"],
        "layer3": ["features.8.bias"],
        "layer4": ["features.10.weight", "classifier.1.weight", "classifier.4.bias"],
        "attention": ["features.4.attn.spatial_gate.conv.weight"],
        "head": ["classifier.6.weight"],
    },
    "mobilenet_v2": {
        "stem": ["features.0.0.weight", "features.1.conv.0.0.weight"],
        "layer1": ["features.2.conv.0.0.weight", "features.3.conv.3.bias"],
        "layer3": ["features.7.conv.1.0.weight", "features.13.conv.2.weight"],
        "layer4": ["features.14.conv.0.0.weight", "features.18.1.weight"],
        "attention": ["features.3.post_attn.channel_gate.mlp.2.weight"],
        "head": ["classifier.1.weight"],
    },
}  # fmt: skip


@pytest.mark.parametrize("arch", list(BASELINE_PARTS))
def test_baseline_parts_follow_their_stages(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch, cbam="stage"))
    parts = named_parts(model)
    names = {part: [n for n, _ in ps] for part, ps in parts.items()}
    for part, expected in BASELINE_PARTS[arch].items():
        assert set(expected) <= set(names[part]), (part, set(expected) - set(names[part]))
    seen = [id(p) for ps in parts.values() for _, p in ps]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert all(parts[p] for p in PARTS)  # every part has parameters
    assert all(".attn." in n or ".post_attn." in n for n in names["attention"])

    freeze(model, ["backbone"])
    assert trainable_parts(model) == ["attention", "head"]
    unfreeze(model, ["layer4"])
    assert trainable_parts(model) == ["layer4", "attention", "head"]
