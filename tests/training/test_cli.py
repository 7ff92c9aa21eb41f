"""The command line: help, config precedence, errors, synth, resume rules and ablate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision

from tests.training.train_helpers import make_data, one_thread, tiny_config
from training.checkpoint import load_checkpoint, save_checkpoint
from training.cli import (
    build_parser,
    config_from_args,
    export_config_from_args,
    main,
    resume_config,
)
from training.config import ConfigError, TrainConfig, load_config, save_config
from training.export import ExportConfig
from training.trainer import train
from wastenet.artifacts import load_version


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


def _config(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize(
    "command", ["train", "evaluate", "predict", "synth", "ablate", "publish", "export"]
)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python -m training " + command in text
    if command == "train":
        for flag in ("--data", "--strategy", "--stage-epochs", "--lr-head", "--cbam",
                     "--pretrained", "--no-pretrained", "--resume", "--publish", "torchrun",
                     "--aug-rotation", "--ema-decay", "--weighted-sampler", "--input-size",
                     "--resize-size", "--mean", "--std", "--onnx", "--int8", "--calibration",
                     "--min-agreement", "--quant-recipe", "--force"):  # fmt: skip
            assert flag in text, flag
    if command in ("publish", "export"):
        for flag in ("--int8", "--calibration DIR", "--min-agreement", "--force"):
            assert flag in text, flag


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        'strategy = "frozen"\nepochs = 4\nlr_head = 0.002\n'
        '[model]\ncbam = "stage"\ncbam_stages = [3, 4]\n[augment]\nrotation = 5.0\n'
    )
    config = _config(["--config", str(toml), "--epochs", "7", "--ibn", "--aug-hflip", "0",
                      "--ema-decay", "0.99", "--pretrained", "/w.pth"])  # fmt: skip
    assert config.strategy == "frozen" and config.epochs == 7 and config.lr_head == 0.002
    assert config.model.cbam == "stage" and config.model.cbam_stages == (3, 4)
    assert config.model.ibn and config.augment.rotation == 5.0 and config.augment.hflip == 0
    assert (
        config.ema_decay == 0.99 and config.pretrained and str(config.pretrained_path) == "/w.pth"
    )
    assert config.lr_backbone == TrainConfig().lr_backbone

    # The saved config.json is itself a config file that gives the same config back.
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config.to_json_dict()))
    assert load_config(saved) == config
    assert _config(["--config", str(saved), "--ema-decay", "none"]).ema_decay is None
    assert not _config(["--no-pretrained"]).pretrained


def test_export_flags_and_the_export_table_reach_the_train_config(tmp_path: Path) -> None:
    config = _config(["--publish", "models", "--int8", "--calibration", "cal",
                      "--calibration-images", "64", "--min-agreement", "0.95",
                      "--quant-recipe", "all", "--force"])  # fmt: skip
    assert config.export == ExportConfig(
        int8=True,
        calibration_dir=Path("cal"),
        calibration_images=64,
        min_agreement=0.95,
        quant_recipe="all",
        force=True,
    )
    assert config.export.precisions == ("fp32", "int8")
    assert _config([]).export == ExportConfig()
    toml = tmp_path / "c.toml"
    toml.write_text("[export]\nonnx = true\nmin_agreement = 0.98\n")
    from_file = _config(["--config", str(toml), "--min-agreement", "0.97", "--publish", "m"])
    assert from_file.export == ExportConfig(onnx=True, min_agreement=0.97)
    with pytest.raises(ConfigError, match="export.min_agreement"):
        _config(["--min-agreement", "1.5"])
    with pytest.raises(ConfigError, match="publish_repo is unset: add --publish REPO"):
        _config(["--int8"])


def test_publish_and_export_commands_take_the_export_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    args = parser.parse_args(["publish", "runs/a", "--int8", "--calibration", "cal", "--force"])
    assert export_config_from_args(args) == ExportConfig(
        int8=True, calibration_dir=Path("cal"), force=True
    )
    args = parser.parse_args(["export", "models/m/1", "--data", "d", "--min-agreement", "0.9"])
    assert export_config_from_args(args) == ExportConfig(min_agreement=0.9)
    assert args.data == Path("d") and args.version_dir == Path("models/m/1")
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "models/m/1", "--onnx"])  # export always writes fp32
    capsys.readouterr()
    assert main(["publish", str(tmp_path), "--min-agreement", "2"]) == 2
    assert (
        "invalid export flags: --min-agreement: Input should be less than or equal to 1 (got 2.0)"
        in capsys.readouterr().err
    )
    assert main(["export", str(tmp_path / "m" / "1")]) == 2
    assert "model.json: missing" in capsys.readouterr().err


def test_export_settings_may_change_when_resuming(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_config(
        _config(["--no-pretrained", "--data", "d", "--out-dir", str(run)]), run / "config.json"
    )
    parser = build_parser()
    args = parser.parse_args(["train", "--resume", str(run), "--int8", "--force", "--publish", "m"])
    assert resume_config(run, args).export == ExportConfig(int8=True, force=True)
    args = parser.parse_args(
        ["train", "--resume", str(run), "--publish", "m", "--onnx", "--lr-head", "0.5"]
    )
    with pytest.raises(ConfigError, match="cannot change lr_head"):
        resume_config(run, args)


def test_augmentation_and_early_stopping_options_are_flags() -> None:
    config = _config(["--aug-policy", "randaugment", "--aug-randaugment-magnitude", "12",
                      "--aug-erasing", "0.25", "--aug-mixup-alpha", "0.2",
                      "--aug-cutmix-alpha", "1", "--early-stop-patience", "3",
                      "--early-stop-min-delta", "0.01"])  # fmt: skip
    aug = config.augment
    assert (aug.policy, aug.randaugment_magnitude, aug.erasing) == ("randaugment", 12, 0.25)
    assert (aug.mixup_alpha, aug.cutmix_alpha) == (0.2, 1.0)
    assert (config.early_stop_patience, config.early_stop_min_delta) == (3, 0.01)
    with pytest.raises(SystemExit):
        _config(["--aug-policy", "autoaugment"])


def test_bad_settings_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("lr_haed = 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "lr_haed" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="stage_epochs"):
        _config(["--epochs", "3", "--stage-epochs", "1", "1", "2"])
    with pytest.raises(ConfigError, match="input_size 300 exceeds resize_size 256"):
        _config(["--input-size", "300"])
    assert main(["train", "--no-pretrained", "--data", str(tmp_path / "nope"),
                 "--out-dir", str(tmp_path / "r")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--cbam", "everywhere"])


def test_missing_pretrained_weights_stop_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["train", "--data", str(tmp_path), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no pretrained resnet18 weights" in err and "--pretrained PATH" in err


@pytest.mark.slow
def test_synth_ablate_and_resume_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--images-per-class", "4", "--size", "40"]) == 0
    assert len(list(data.glob("*/*.jpg"))) == 48

    # Stand-in "ImageNet" weights: a torchvision state dict (random, nothing downloaded).
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "ablation"
    argv = ["ablate", "--data", str(data), "--out-dir", str(out), "--pretrained", str(weights),
            "--scheduler", "plateau",
            "--strategy", "differential", "--epochs", "1", "--input-size", "32",
            "--resize-size", "36", "--batch-size", "16", "--num-workers", "0", "--no-progress",
            "--no-verify-images", "--no-plots", "--device", "cpu",
            "--placements", "none", "block", "--with-bnneck", "--seeds", "0", "1"]  # fmt: skip
    assert main(argv) == 0
    table = (out / "ablation.md").read_text()
    report = json.loads((out / "ablation.json").read_text())
    rows = report["rows"]
    variants = ["cbam=none", "cbam=block", "cbam=block+bnneck"]
    assert [(r["variant"], r["seed"]) for r in rows] == [(v, s) for s in (0, 1) for v in variants]
    assert rows[0]["params_m"] < rows[1]["params_m"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert "| cbam=block+bnneck | 2 |" in table and "cbam=block+bnneck" in capsys.readouterr().out
    # Mean ± std over the two seeds, per variant.
    block = [r["test_accuracy"] for r in rows if r["variant"] == "cbam=block"]
    summary = {e["variant"]: e for e in report["summary"]}
    assert summary["cbam=block"]["test_accuracy"]["mean"] == pytest.approx(sum(block) / 2)
    assert summary["cbam=block"]["test_accuracy"]["std"] == pytest.approx(
        abs(block[0] - block[1]) / 2**0.5
    )
    # Gates measured on the test images: constant 0.5 before training, spread after it.
    before, after = rows[1]["gates_before"], rows[1]["gates_after"]
    assert before["channel"] == {"mean": 0.5, "std": 0.0, "image_std": 0.0}
    assert after["channel"]["std"] > 0 and after["spatial"]["image_std"] > 0
    assert rows[0]["gates_after"] == {}
    assert "0.500 → " in table and "## CBAM gates on the test images" in table
    # Every run trained on the same saved split.
    configs = [Path(r["run_dir"]) / "config.json" for r in rows]
    split_files = {json.loads(c.read_text())["splits_file"] for c in configs}
    assert split_files == {str(out / "splits.json")}
    assert {json.loads(c.read_text())["seed"] for c in configs} == {0, 1}
    log = (out / "cbam-block-bnneck-seed1" / "train.log").read_text()
    assert f"pretrained {weights}: 120 tensors loaded" in log

    # A finished run resumes only with settings that do not change its result.
    run = out / "cbam-none-seed0"
    assert main(["train", "--resume", str(run), "--lr-head", "0.5"]) == 2
    assert "cannot change lr_head" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-plots", "--device", "cpu"]) == 0
    assert "resuming" in capsys.readouterr().out


class _Interrupt(KeyboardInterrupt):
    pass


def _flat_preprocessing(config: dict[str, object]) -> dict[str, object]:
    """A config in the layout written before preprocessing was a table of its own."""
    flat = dict(config)
    pre = flat.pop("preprocessing")
    assert isinstance(pre, dict)
    flat.update({key: pre[key] for key in ("input_size", "resize_size", "mean", "std")})
    return flat


@pytest.mark.slow
def test_a_run_directory_with_flat_preprocessing_keys_evaluates_publishes_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_data(tmp_path, images_per_class=6, size=40)
    run = tmp_path / "run"

    def stop_after_one(record: dict[str, object]) -> None:
        if record["epoch"] == 1:
            raise _Interrupt

    config = tiny_config(data, run, strategy="differential", epochs=2)
    with pytest.raises(_Interrupt):
        train(config, log=lambda _m: None, on_epoch_end=stop_after_one)
    config_file = run / "config.json"
    config_file.write_text(json.dumps(_flat_preprocessing(json.loads(config_file.read_text()))))
    for name in ("best.pt", "last.pt"):
        payload = load_checkpoint(run / "checkpoints" / name)
        payload["config"] = _flat_preprocessing(payload["config"])
        save_checkpoint(run / "checkpoints" / name, payload)

    # The run stopped before its test evaluation: evaluate writes the run's metrics.json.
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 1
    assert main(["publish", str(run), "--repo", str(tmp_path / "models"), "--name", "old"]) == 0
    meta = load_version(tmp_path / "models" / "old" / "1").metadata
    assert (meta.preprocessing.input_size, meta.preprocessing.resize_size) == (32, 36)
    assert meta.model_extra is not None
    assert meta.model_extra["training"]["config"]["preprocessing"]["input_size"] == 32
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--input-size", "24"]) == 2
    assert "cannot change preprocessing.input_size" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--device", "cpu"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert json.loads(config_file.read_text())["preprocessing"]["resize_size"] == 36


def test_a_partial_pretrained_file_stops_training_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_data(tmp_path, 4, 32)
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.bn1.IN.weight"] = state.pop("layer1.0.bn1.weight")  # IBN-Net's naming
    weights = tmp_path / "partial.pth"
    torch.save(state, weights)
    argv = ["train", "--data", str(data), "--pretrained", str(weights), "--epochs", "1",
            "--strategy", "differential", "--input-size", "32", "--resize-size", "36",
            "--batch-size", "16", "--num-workers", "0", "--no-progress", "--no-verify-images",
            "--no-plots", "--device", "cpu"]  # fmt: skip
    assert main([*argv, "--out-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "1 network tensors are missing from it (layer1.0.bn1.weight)" in err
    assert "no place in the network (layer1.0.bn1.IN.weight)" in err

    run = tmp_path / "allowed"
    assert main([*argv, "--out-dir", str(run), "--allow-partial-pretrained"]) == 0
    log = (run / "train.log").read_text()
    assert "partial load allowed; missing: layer1.0.bn1.weight; unexpected: " in log


def test_ablate_offers_the_placements_an_arch_has(capsys: pytest.CaptureFixture[str]) -> None:
    from training.ablate import variants

    vgg = _config(["--arch", "vgg16_bn", "--cbam", "stage"])
    assert [name for name, _ in variants(vgg, None, False, True)] == [
        "cbam=none",
        "cbam=stage",
        "cbam=stage+bnneck",
    ]
    with pytest.raises(
        ConfigError, match=r"alexnet has no place for CBAM placement\(s\) \['block'\]"
    ):
        variants(_config(["--arch", "alexnet", "--cbam", "none"]), ["none", "block"], False, False)
    with pytest.raises(ConfigError, match="variant cbam=stage\\+ibn: .*no ResNet blocks"):
        variants(vgg, None, True, False)
    resnet = [name for name, _ in variants(_config([]), None, False, False)]
    assert resnet == ["cbam=none", "cbam=stage", "cbam=block", "cbam=block_post"]
