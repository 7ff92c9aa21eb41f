"""A short real run on the synthetic set, through the CLI: accuracy, outputs, publishing,
and the evaluate / predict / publish commands on its results."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from tests.training.train_helpers import make_data, one_thread, tiny_config
from training import trainer
from training.checkpoint import (
    BestCheckpoint,
    BestEpoch,
    LastCheckpoint,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from training.cli import main
from training.config import ConfigError, TrainConfig
from training.data import DataSplits
from training.publish import default_description
from training.trainer import train
from wastenet.artifacts import config_digest, load_version
from wastenet.classes import CLASS_NAMES
from wastenet.nets import ModelConfig, build_model
from wastenet.preprocess import eval_transform

NAME = "waste-test"
EPOCHS = 5
CHANCE = 1 / 12


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see train_helpers.one_thread
    try:
        root = tmp_path_factory.mktemp("run")
        data = make_data(root, images_per_class=30, size=40)
        run_dir, repo = root / "run", root / "models"
        code = main(
            [
                "train", "--data", str(data), "--out-dir", str(run_dir), "--no-pretrained",
                "--strategy", "differential", "--epochs", str(EPOCHS), "--batch-size", "16",
                "--lr-backbone", "1e-3", "--lr-attention", "1e-3", "--lr-head", "1e-3",
                "--label-smoothing", "0", "--input-size", "32", "--resize-size", "36",
                "--num-workers", "0", "--no-progress", "--no-verify-images", "--device", "cpu",
                "--publish", str(repo), "--publish-name", NAME,
            ]
        )  # fmt: skip
        assert code == 0
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "run": run_dir, "repo": repo, "root": root}


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    yield from one_thread()


@pytest.mark.slow
def test_short_run_beats_chance_clearly(run: dict[str, Path]) -> None:
    metrics = json.loads((run["run"] / "metrics.json").read_text())
    print(f"synthetic test accuracy after {EPOCHS} epochs: {metrics['accuracy']:.3f}")
    assert metrics["num_samples"] == 12 * 5
    assert metrics["accuracy"] >= 3 * CHANCE
    assert metrics["macro_f1"] > 2 * CHANCE


@pytest.mark.slow
def test_run_directory_holds_every_output(run: dict[str, Path]) -> None:
    d = run["run"]
    config = TrainConfig.model_validate_json((d / "config.json").read_text())
    assert config.epochs == EPOCHS and config.out_dir == d and not config.pretrained
    assert json.loads((d / "class_index.json").read_text())["white_glass"] == 11

    history = json.loads((d / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, EPOCHS + 1))
    first = history["epochs"][0]
    for key in (
        "stage",
        "trainable_params",
        "lr",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "val_macro_f1",
        "time_s",
    ):
        assert key in first, key
    assert first["trainable_params"] == sum(
        p.numel() for p in build_model(ModelConfig()).parameters()
    )
    assert set(first["lr"]) == {"backbone", "attention", "head"}
    splits = DataSplits.load(d / "splits.json")
    steps = len(splits.train) // 16
    assert len(history["iterations"]) == EPOCHS * steps
    assert history["iterations"][-1]["step"] == EPOCHS * steps
    assert all(it["loss"] > 0 for it in history["iterations"])

    metrics = json.loads((d / "metrics.json").read_text())
    assert len(metrics["confusion_matrix"]) == 12 and len(metrics["per_class"]) == 12
    for key in ("precision", "recall", "f1", "roc_auc", "average_precision"):
        assert key in metrics["per_class"]["battery"]

    best = load_checkpoint(d / "checkpoints" / "best.pt")
    last = load_checkpoint(d / "checkpoints" / "last.pt")
    assert best["epoch"] == metrics["best_epoch"] and last["epoch"] == EPOCHS
    assert best["epoch"] == max(history["epochs"], key=lambda e: e["val_macro_f1"])["epoch"]

    plots = sorted((d / "plots").glob("*.png"))
    names = {p.stem for p in plots}
    for stem in (
        "loss_per_iteration",
        "epoch_curves",
        "confusion_matrix",
        "pr_curves",
        "roc_curves",
        "class_distribution",
    ):
        assert stem in names, stem
    for p in plots:
        assert p.stat().st_size > 1000
        with Image.open(p) as img:
            assert img.format == "PNG" and min(img.size) > 100
    log = (d / "train.log").read_text()
    assert "best epoch" in log and log.count("epoch 1/5") == 1


@pytest.mark.slow
def test_published_version_predicts_like_the_trained_model(run: dict[str, Path]) -> None:
    version = run["repo"] / NAME / "1"
    loaded = load_version(version)
    meta = loaded.metadata
    best = load_checkpoint(run["run"] / "checkpoints" / "best.pt")
    trained = build_model(ModelConfig.model_validate(best["model_config"]))
    trained.load_state_dict(best["model"])
    trained.eval()

    metrics = json.loads((run["run"] / "metrics.json").read_text())
    assert meta.evaluation.accuracy == pytest.approx(metrics["accuracy"])
    assert meta.evaluation.macro_f1 == pytest.approx(metrics["macro_f1"])
    assert meta.preprocessing.input_size == 32 and meta.preprocessing.resize_size == 36
    config = json.loads((run["run"] / "config.json").read_text())
    assert meta.training_config_digest == config_digest(config)
    assert "differential" in meta.description
    assert "trained from scratch" in meta.description and "fine-tuned" not in meta.description

    transform = eval_transform(meta.preprocessing)
    splits = DataSplits.load(run["run"] / "splits.json")
    images = []
    for s in splits.test[:24]:
        with Image.open(s.path) as img:
            images.append(transform(img))
    batch = torch.stack(images)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch), trained(batch), rtol=0, atol=0)


@pytest.mark.slow
def test_evaluate_command_reproduces_the_test_metrics(run: dict[str, Path], tmp_path: Path) -> None:
    version = run["repo"] / NAME / "1"
    out = tmp_path / "eval"
    assert main(["evaluate", str(version), "--splits", str(run["run"] / "splits.json"),
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((run["run"] / "metrics.json").read_text())
    assert got["accuracy"] == pytest.approx(want["accuracy"])
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert (out / "plots" / "confusion_matrix.png").stat().st_size > 1000
    # A run directory evaluates on its own saved split by default.
    assert main(["evaluate", str(run["run"]), "--split", "val", "--out", str(tmp_path / "v"),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "v" / "metrics-val.json").read_text())["split"] == "val"


@pytest.mark.slow
def test_published_version_records_where_its_data_came_from(run: dict[str, Path]) -> None:
    meta = load_version(run["repo"] / NAME / "1").metadata
    splits = DataSplits.load(run["run"] / "splits.json")
    assert meta.data is not None
    assert (meta.data.source, meta.data.root) == (str(run["data"].resolve()), splits.root)
    assert (meta.data.seed, meta.data.val_fraction, meta.data.test_fraction) == (0, 0.15, 0.15)
    assert meta.data.split_digests == {s: splits.digest(s) for s in ("train", "val", "test")}
    assert meta.data.splits_digest == splits.digest()
    assert meta.data.counts == {"train": len(splits.train), "val": 60, "test": 60}
    assert meta.data.splits_file == str((run["run"] / "splits.json").resolve())
    metrics = json.loads((run["run"] / "metrics.json").read_text())
    assert metrics["data"]["splits_digest"] == splits.digest() and metrics["held_out"] is True


@pytest.mark.slow
def test_evaluate_refuses_images_the_version_was_trained_on(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version, data = str(run["repo"] / NAME / "1"), str(run["data"])
    # Another seed splits the same folder differently: its test split holds training images.
    argv = ["evaluate", version, "--data", data, "--seed", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "s1")]) == 2
    assert "of the 60 evaluation images were training images of" in capsys.readouterr().err
    assert not (tmp_path / "s1").exists()
    assert main([*argv, "--out", str(tmp_path / "s1"), "--allow-overlap"]) == 0
    assert "NOT HELD OUT" in capsys.readouterr().out
    forced = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert forced["held_out"] is False and forced["overlap"]["train"] > 0
    # Without --seed the training seed is used: the held-out test split, the run's numbers.
    assert main(["evaluate", version, "--data", data, "--device", "cpu",
                 "--out", str(tmp_path / "s0")]) == 0  # fmt: skip
    held = json.loads((tmp_path / "s0" / "metrics.json").read_text())
    want = json.loads((run["run"] / "metrics.json").read_text())
    assert held["held_out"] is True and held["overlap"] == {"train": 0, "val": 0}
    assert held["data"]["seed"] == 0 and held["confusion_matrix"] == want["confusion_matrix"]


@pytest.mark.slow
def test_evaluate_without_known_training_files_warns(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A version whose model.json records no data and whose run directory is gone.
    copy = tmp_path / "models" / NAME / "1"
    shutil.copytree(run["repo"] / NAME / "1", copy)
    meta = json.loads((copy / "model.json").read_text())
    del meta["data"]
    meta["training"]["run_dir"] = str(tmp_path / "gone")
    (copy / "model.json").write_text(json.dumps(meta))
    assert main(["evaluate", str(copy), "--data", str(run["data"]), "--device", "cpu",
                 "--out", str(tmp_path / "e")]) == 0  # fmt: skip
    assert "WARNING: cannot tell whether these 60 images were held out" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["held_out"] is None


@pytest.mark.slow
def test_evaluate_run_leaves_the_training_metrics_alone(
    run: dict[str, Path], tmp_path: Path
) -> None:
    before = (run["run"] / "metrics.json").read_text()
    assert main(["evaluate", str(run["run"]), "--device", "cpu"]) == 0
    assert (run["run"] / "metrics.json").read_text() == before
    assert "best_epoch" in json.loads(before)
    again = json.loads((run["run"] / "eval-test" / "metrics.json").read_text())
    assert again["held_out"] is True
    assert again["confusion_matrix"] == json.loads(before)["confusion_matrix"]
    assert (run["run"] / "eval-test" / "plots" / "epoch_curves.png").is_file()
    # Pointed at the run directory itself, it refuses rather than replace them.
    assert main(["evaluate", str(run["run"]), "--out", str(run["run"]), "--device", "cpu"]) == 2
    assert (run["run"] / "metrics.json").read_text() == before


@pytest.mark.slow
def test_predict_command_writes_top_k_csv_and_json(run: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    splits = DataSplits.load(run["run"] / "splits.json")
    for i, s in enumerate(splits.test[:5]):
        Image.open(s.path).save(folder / "sub" / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    version = run["repo"] / NAME / "1"

    assert main(["predict", str(version), str(folder), "--out", str(tmp_path / "p.csv"),
                 "--top-k", "3", "--device", "cpu"]) == 0  # fmt: skip
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    broken = next(r for r in rows if r["path"].endswith("broken.jpg"))
    assert broken["error"] and broken["class_1"] == ""
    good = [r for r in rows if not r["error"]]
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) >= float(r["probability_3"])
               for r in good)  # fmt: skip

    loaded = load_version(version)
    transform = eval_transform(loaded.metadata.preprocessing)
    for r in good:
        with Image.open(r["path"]) as img, torch.no_grad():
            probs = loaded.model(transform(img)[None]).softmax(1)[0]
        assert r["class_1"] == loaded.metadata.class_names[int(probs.argmax())]
        assert float(r["probability_1"]) == pytest.approx(float(probs.max()), abs=1e-5)

    # The same from the run directory (its best checkpoint), as JSON.
    assert main(["predict", str(run["run"]), str(folder), "--out", str(tmp_path / "p.json"),
                 "--top-k", "2", "--device", "cpu"]) == 0  # fmt: skip
    data = json.loads((tmp_path / "p.json").read_text())
    by_path = {d["path"]: d for d in data}
    for r in good:
        assert by_path[r["path"]]["predictions"][0]["class"] == r["class_1"]
        assert len(by_path[r["path"]]["predictions"]) == 2


@pytest.mark.slow
def test_publish_command_adds_the_next_version(
    run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["publish", str(run["run"]), "--repo", str(run["repo"]), "--name", NAME,
            "--description", "second copy"]  # fmt: skip
    # train --publish already published these weights as version 1.
    capsys.readouterr()
    assert main(argv) == 2
    assert f"already published as {NAME} version 1 " in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    meta = load_version(run["repo"] / NAME / "2").metadata
    assert meta.description == "second copy"
    assert meta.model_extra is not None and meta.model_extra["training"]["best_epoch"] >= 1


# ----------------------------------------------------------------- the loop's decisions


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("small"), images_per_class=6, size=40)


def _script_validation(
    monkeypatch: pytest.MonkeyPatch, f1: dict[str, list[float]]
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Validation answers macro-F1 ``f1[kind][i]`` in its i-th call for ``kind`` (raw, ema,
    or "" without EMA), with matching loss and accuracy; the test split is evaluated for
    real. Returns the state dict of each network validated, per kind."""
    real = trainer.evaluate
    calls: dict[str, list[dict[str, torch.Tensor]]] = {kind: [] for kind in f1}

    def scripted(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = real(model, *args, **kwargs)
        desc = kwargs["desc"]
        if desc.startswith("validate"):
            kind = desc.removeprefix("validate").strip()
            value = f1[kind][len(calls[kind])]
            calls[kind].append({k: v.clone() for k, v in model.state_dict().items()})
            out.update(macro_f1=value, accuracy=value, loss=1.0 - value)
        return out

    monkeypatch.setattr(trainer, "evaluate", scripted)
    return calls


def test_ema_and_raw_weights_are_both_validated_and_the_better_is_kept(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _script_validation(monkeypatch, {"raw": [0.3, 0.25, 0.35], "ema": [0.2, 0.4, 0.1]})
    config = tiny_config(
        small_data, tmp_path / "run", strategy="differential", epochs=3, ema_decay=0.999,
        publish_repo=str(tmp_path / "models"), publish_name="ema-test",
    )  # fmt: skip
    result = train(config, log=lambda _m: None)

    epochs = result.history["epochs"]
    assert result.history["losses"] == {
        "train": "cross-entropy, label smoothing 0.1",
        "val": "cross-entropy",
    }
    assert [e["weights"] for e in epochs] == ["raw", "ema", "raw"]
    assert [e["val_macro_f1"] for e in epochs] == [0.3, 0.4, 0.35]
    assert [e["raw_val_macro_f1"] for e in epochs] == [0.3, 0.25, 0.35]
    assert [e["ema_val_macro_f1"] for e in epochs] == [0.2, 0.4, 0.1]
    assert result.best_epoch == 2
    # best.pt holds the EMA network exactly as validated in epoch 2, and says so.
    best = BestCheckpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best.best.weights == "ema" and best.epoch == 2
    validated = calls["ema"][1]
    assert best.model.keys() == validated.keys()
    for name, tensor in validated.items():
        assert torch.equal(best.model[name], tensor), name
    assert not torch.equal(best.model["fc.weight"], calls["raw"][1]["fc.weight"])
    assert result.metrics is not None and result.metrics["weights"] == "ema"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_epoch"] == 2
    meta = load_version(tmp_path / "models" / "ema-test" / "1").metadata
    assert meta.model_extra is not None
    assert meta.model_extra["training"]["best"]["weights"] == "ema"


def test_early_stopping_ends_each_stage_on_its_own_patience(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stage 1 stalls after one epoch and gives way to stage 3 (stage 2 has no epochs). Stage
    # 3 starts below stage 1's best but improves on its own, then stalls: the run ends
    # before its seventh epoch.
    _script_validation(monkeypatch, {"": [0.3, 0.2, 0.25, 0.28, 0.27, 0.9]})
    settings: dict[str, Any] = {
        "strategy": "three_stage", "stage_epochs": (3, 0, 4), "early_stop_patience": 1,
    }  # fmt: skip
    lines: list[str] = []

    def stop_after_two(record: dict[str, Any]) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    config = tiny_config(small_data, tmp_path / "run", **settings)
    with pytest.raises(KeyboardInterrupt):
        train(config, log=lines.append, on_epoch_end=stop_after_two)
    # The resumed run makes the same decision from the saved history.
    result = train(config, resume=tmp_path / "run", log=lines.append)
    assert [e["epoch"] for e in result.history["epochs"]] == [1, 2, 4, 5, 6]
    assert [e["stage"] for e in result.history["epochs"]] == [1, 1, 3, 3, 3]
    assert result.stopped_early and result.best_epoch == 1
    assert any("stage 1 ends after epoch 2" in line for line in lines)
    assert any("the run ends after epoch 6" in line for line in lines)


def test_amp_auto_picks_bf16_only_on_compute_capability_8(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    # A T4 says yes to is_bf16_supported() (emulated), but has compute capability 7.5.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert trainer.amp_settings("auto", cuda) == (torch.float16, True)
    assert trainer.amp_settings("fp16", cuda) == (torch.float16, True)
    with pytest.raises(ConfigError, match=r"Tesla T4 \(compute capability 7.5\) has no native"):
        trainer.amp_settings("bf16", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert trainer.amp_settings("auto", cuda) == (torch.bfloat16, False)
    assert trainer.amp_settings("off", cuda) == (None, False)
    assert trainer.amp_settings("auto", torch.device("cpu")) == (None, False)


def test_resume_on_a_gpu_keeps_the_rng_states_on_the_cpu(tmp_path: Path) -> None:
    # A CUDA run resumes: the checkpoint must not be mapped to the GPU, or the RNG states
    # land there and torch.set_rng_state / numpy refuse them. Here "cuda" is only a name
    # (on a machine without a GPU, mapping to it fails outright).
    net = build_model(ModelConfig(cbam="none"))
    config = TrainConfig(model=ModelConfig(cbam="none"))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    last = LastCheckpoint(
        config=config, class_names=CLASS_NAMES, epoch=2, model=net.state_dict(), best=BestEpoch(),
        stage=1, ema=None, optimizer={}, scheduler={}, scaler=None,
        history={"epochs": [], "iterations": []}, rng=rng_state(),
    )  # fmt: skip
    last.save(tmp_path / "last.pt")
    torch.manual_seed(0)
    setup = SimpleNamespace(
        resume_from=tmp_path / "last.pt", device=torch.device("cuda"), model=net, ema=None,
        scaler=None,
    )  # fmt: skip
    state = trainer.initial_state(setup, lambda _m: None)  # type: ignore[arg-type]
    assert state.resumed is not None and state.epochs_done == 2
    assert state.resumed.rng["torch"].device.type == "cpu"
    set_rng_state(state.resumed.rng)
    assert torch.equal(torch.rand(3), expected)


def test_default_description_says_how_the_backbone_started() -> None:
    metrics = {"accuracy": 0.5, "macro_f1": 0.4, "num_samples": 10}
    scratch = default_description(TrainConfig(pretrained=False, data_dir=Path("d")), metrics)
    tuned = default_description(TrainConfig(data_dir=Path("d")), metrics)
    assert "trained from scratch" in scratch and "fine-tuned" not in scratch
    assert "fine-tuned from ImageNet weights" in tuned
