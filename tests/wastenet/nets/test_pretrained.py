from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from wastenet.nets import (
    CBAM,
    ModelConfig,
    PretrainedWeightsError,
    build_model,
    find_pretrained,
    load_pretrained,
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
    config = ModelConfig(cbam="block")
    model = build_model(config)
    report = load_pretrained(model, config, tv_file)

    ours = model.state_dict()
    for key, tensor in tv_resnet18.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(ours[key], tensor), key
    assert ours["fc.weight"].shape == (12, 512)
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == len(tv_resnet18.state_dict()) - 2  # all but fc.weight, fc.bias
    assert "fc.weight" in report.new
    assert "layer3.1.attn.channel_gate.mlp.0.weight" in report.new


def test_cbam_start_keeps_the_pretrained_function(tv_resnet18: nn.Module, tv_file: Path) -> None:
    """With near-identity gates the pretrained features survive CBAM's insertion;
    with the usual ~0.5 x 0.5 gates they do not (see training/nets/cbam.py)."""
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = torch.flatten(nn.Sequential(*list(tv_resnet18.children())[:-1])(x), 1)

    def similarity(model: nn.Module) -> float:
        with torch.no_grad():
            feats = model.eval().forward_features(x)
        return float(nn.functional.cosine_similarity(feats, plain).min())

    config = ModelConfig(cbam="block")
    model = build_model(config)
    load_pretrained(model, config, tv_file)
    ours = similarity(model)
    for m in model.modules():
        if isinstance(m, CBAM):  # the textbook start: sigmoid(0) = 0.5 in both gates
            nn.init.zeros_(m.channel_gate.mlp[2].weight)
            nn.init.zeros_(m.channel_gate.mlp[2].bias)
            nn.init.zeros_(m.spatial_gate.bn.weight)
            nn.init.zeros_(m.spatial_gate.bn.bias)
    textbook = similarity(model)
    assert ours > 0.95
    assert ours > textbook + 0.02


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
