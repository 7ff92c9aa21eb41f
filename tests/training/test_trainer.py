"""A short real run on the synthetic set, through the CLI: accuracy, outputs, publishing,
and the evaluate / predict / publish commands on its results."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.training.train_helpers import make_data, one_thread
from training.checkpoint import load_checkpoint
from training.cli import main
from training.config import TrainConfig
from training.data import DataSplits
from wastenet.artifacts import config_digest, load_version
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
