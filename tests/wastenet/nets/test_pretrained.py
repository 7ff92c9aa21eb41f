from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from wastenet.nets import (
    CBAM,
    GATE_START,
    ModelConfig,
    PretrainedWeightsError,
    build_model,
    find_pretrained,
    load_pretrained,
    record_gates,
)


@pytest.fixture(scope="module")
def tv_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def tv_file(tv_resnet18: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(tv_resnet18.state_dict(), path)
    return path


def test_backbone_tensors_load_by_name(tv_resnet18: nn.Module, tv_file: Path) -> None:
    config = ModelConfig(cbam="none")
    model = build_model(config)
    report = load_pretrained(model, config, tv_file)

    ours = model.state_dict()
    for key, tensor in tv_resnet18.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], tensor), key
    assert ours["fc.weight"].shape == (12, 512)
    assert report.missing == [] and report.unexpected == [] and report.unfolded == []
    assert report.loaded == len(tv_resnet18.state_dict()) - 2  # all but fc.weight, fc.bias
    assert report.new == ["fc.bias", "fc.weight"]


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, torchvision.models.ResNet):
            return nn.Sequential(*list(model.children())[:-1])(x).flatten(1)
        return model.eval().forward_features(x)


def _constant_gates(model: nn.Module) -> nn.Module:
    """The spatial gates made constant too (their BatchNorm weight at 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CBAM):
                m.spatial_gate.bn.weight.zero_()
    return model


@pytest.mark.parametrize(("placement", "last_factor"), [("block", 1.0), ("stage", 0.25)])
def test_the_fold_keeps_the_pretrained_function(
    tv_resnet18: nn.Module, tv_file: Path, placement: str, last_factor: float
) -> None:
    """The fresh gates' factor 0.25 is folded into the pretrained layers next to them, so
    the backbone computes the pretrained features at step 0 (times 0.25 where layer4's own
    output passes a CBAM: only the new head reads it): exactly while the gates are
    constant, closely with the spatial gates' small start variation. Without the fold the
    features are far off."""
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = _features(tv_resnet18, x) * last_factor
    config = ModelConfig(cbam=placement)
    model = build_model(config)
    report = load_pretrained(model, config, tv_file)
    assert report.unfolded == []
    similarity = nn.functional.cosine_similarity(_features(model, x), expected)
    assert similarity.min() > 0.99
    # Exact up to BatchNorm's eps, which does not scale with the running variance.
    constant = _features(_constant_gates(model), x)
    assert torch.allclose(constant, expected, rtol=1e-3, atol=1e-5)

    plain = build_model(config)  # the same tensors loaded without the fold
    state = {k: v for k, v in torch.load(tv_file).items() if not k.startswith("fc.")}
    plain.load_state_dict(state, strict=False)
    assert not torch.allclose(_features(_constant_gates(plain), x), expected, rtol=0.1)


def test_cbam_gates_start_at_the_steep_half(tv_file: Path) -> None:
    config = ModelConfig(cbam="block")
    model = build_model(config)
    load_pretrained(model, config, tv_file)
    x = torch.randn(3, 3, 64, 64)
    # Training mode: the spatial BatchNorm centres its input (in eval mode, before any
    # training step, its running statistics are still the identity).
    with torch.no_grad(), record_gates(model.train()) as gates:
        model(x)
    for maps in gates.channel.values():
        assert torch.equal(maps[0], torch.full_like(maps[0], GATE_START))
    spatial = torch.cat([maps[0].flatten() for maps in gates.spatial.values()])
    assert abs(float(spatial.mean()) - GATE_START) < 0.01 and 0.02 < float(spatial.std()) < 0.1
    assert GATE_START == 0.5  # sigmoid slope 0.25, the largest it has


def test_block_post_starts_near_identity_where_it_cannot_fold(
    tv_resnet18: nn.Module, tv_file: Path
) -> None:
    config = ModelConfig(cbam="block_post")
    model = build_model(config)
    report = load_pretrained(model, config, tv_file)
    # Each stage's first block is read by a block without downsample; the second by the
    # next stage's first block (which has one) or, after layer4, by the fresh head.
    assert report.unfolded == [f"layer{k}.0.post_attn" for k in (1, 2, 3, 4)]
    assert "4 CBAM modules start near identity (gates 0.95)" in report.summary()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), record_gates(model.eval()) as gates:
        model(x)
    for name, maps in gates.channel.items():
        start = 0.95 if name in report.unfolded else 0.5
        assert torch.allclose(maps[0], torch.full_like(maps[0], start)), name
        assert abs(float(gates.spatial[name][0].mean()) - start) < 0.1, name
    similarity = nn.functional.cosine_similarity(_features(model, x), _features(tv_resnet18, x))
    assert similarity.min() > 0.95


def _partial_file(tv_resnet18: nn.Module, path: Path) -> Path:
    """Like an IBN-Net checkpoint: some tensors renamed, one dropped, counters absent."""
    state = dict(tv_resnet18.state_dict())
    state["layer1.0.bn1.IN.weight"] = state.pop("layer1.0.bn1.weight")
    del state["layer4.1.conv2.weight"]
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def test_partial_pretrained_load_is_an_error_naming_the_keys(
    tv_resnet18: nn.Module, tmp_path: Path
) -> None:
    path = _partial_file(tv_resnet18, tmp_path / "partial.pth")
    config = ModelConfig(cbam="none")
    model = build_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(model, config, path)
    message = str(err.value)
    assert "2 network tensors are missing from it (layer1.0.bn1.weight, " in message
    assert "layer4.1.conv2.weight)" in message
    assert "1 of its tensors have no place in the network (layer1.0.bn1.IN.weight)" in message
    assert "num_batches_tracked" not in message  # counters, not weights
    assert "--allow-partial-pretrained" in message

    report = load_pretrained(model, config, path, allow_partial=True)
    assert report.missing == ["layer1.0.bn1.weight", "layer4.1.conv2.weight"]
    assert report.unexpected == ["layer1.0.bn1.IN.weight"]
    assert "partial load allowed; missing: layer1.0.bn1.weight" in report.summary()
    after = model.state_dict()
    assert torch.equal(after["layer4.1.conv2.weight"], before["layer4.1.conv2.weight"])
    assert torch.equal(
        after["layer4.0.conv2.weight"], tv_resnet18.state_dict()["layer4.0.conv2.weight"]
    )


def test_ibn_takes_its_halves_of_bn1(tv_resnet18: nn.Module, tv_file: Path) -> None:
    config = ModelConfig(ibn=True)
    model = build_model(config)
    report = load_pretrained(model, config, tv_file)
    tv = tv_resnet18.state_dict()
    ibn = model.layer2[1].bn1
    assert torch.equal(ibn.instance.weight, tv["layer2.1.bn1.weight"][:64])
    assert torch.equal(ibn.batch.bias, tv["layer2.1.bn1.bias"][64:])
    assert torch.equal(ibn.batch.running_var, tv["layer2.1.bn1.running_var"][64:])
    assert torch.equal(model.layer4[0].bn1.weight, tv["layer4.0.bn1.weight"])
    assert report.missing == [] and report.unexpected == []


def test_wrong_architecture_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    config = ModelConfig(arch="resnet18")
    with pytest.raises(
        PretrainedWeightsError, match=r"does not fit resnet18: layer1\.0\.conv1\.weight"
    ):
        load_pretrained(build_model(config), config, path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    config = ModelConfig()
    with pytest.raises(PretrainedWeightsError, match="cannot read pretrained weights"):
        load_pretrained(build_model(config), config, path)


def test_missing_weights_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(PretrainedWeightsError) as err:
        find_pretrained("resnet18")
    assert str(expected) in str(err.value)
    assert "nothing is downloaded" in str(err.value)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        find_pretrained("resnet18", tmp_path / "nope.pth")


def test_weights_found_in_torchvision_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tv_file: Path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(tv_file.read_bytes())
    assert find_pretrained("resnet18") == cached
    config = ModelConfig(cbam="stage")
    assert load_pretrained(build_model(config), config).path == cached
