"""The data pipeline: discovery, file checks, stratified splits, errors, dataset, weights."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    EMPTY_FILE,
    NOT_AN_IMAGE,
    OUTSIDE_CLASS_FOLDER,
    UNREADABLE,
    DatasetError,
    DataSplits,
    ImageDataset,
    Sample,
    check_image_file,
    class_counts,
    class_weights,
    prepare_splits,
    sample_weights,
)
from training.synth import generate_synthetic_dataset
from wastenet.classes import CLASS_NAMES
from wastenet.preprocess import eval_transform
from wastenet.schema import Preprocessing

PER_CLASS = 10


@pytest.fixture(scope="module")
def data_pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "data"
    generate_synthetic_dataset(out, images_per_class=PER_CLASS, size=24, seed=3)
    return out


@pytest.fixture
def data_dir(data_pristine: Path, tmp_path: Path) -> Path:
    """A private copy of a 12 x 10 image dataset that a test may change."""
    return Path(shutil.copytree(data_pristine, tmp_path / "data"))


def _noise_jpeg(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _paths(samples: list[Sample]) -> list[str]:
    return [s.path for s in samples]


# ---------------------------------------------------------------- unsplit folders


def test_stratified_split_sizes_labels_and_coverage(data_dir: Path) -> None:
    logs: list[str] = []
    splits = prepare_splits(data_dir, val_fraction=0.2, test_fraction=0.2, seed=0, log=logs.append)

    assert splits.class_names == CLASS_NAMES
    assert not splits.presplit
    assert splits.counts() == {"train": [6] * 12, "val": [2] * 12, "test": [2] * 12}
    everything = _paths(splits.train) + _paths(splits.val) + _paths(splits.test)
    assert len(set(everything)) == 12 * PER_CLASS
    on_disk = {str(p) for p in data_dir.rglob("*.jpg")}
    assert set(everything) == on_disk
    for s in splits.train + splits.val + splits.test:
        assert os.path.isabs(s.path)
        assert Path(s.path).parent.name == CLASS_NAMES[s.label]
    assert splits.skipped == {}
    assert any("72 train / 24 val / 24 test" in line for line in logs)


def test_uneven_classes_are_split_per_class(data_dir: Path) -> None:
    for p in sorted((data_dir / "paper").iterdir())[5:]:
        p.unlink()
    for i in range(10, 30):
        shutil.copy(data_dir / "clothes" / "clothes_0000.jpg", data_dir / "clothes" / f"x{i}.jpg")
    splits = prepare_splits(data_dir, val_fraction=0.15, test_fraction=0.15, log=lambda m: None)
    counts = splits.counts()
    paper, clothes = CLASS_NAMES.index("paper"), CLASS_NAMES.index("clothes")
    # 5 images: 0.75 rounds to at least 1 each; 30 images: 4.5 rounds half up to 5.
    assert [counts[s][paper] for s in ("train", "val", "test")] == [3, 1, 1]
    assert [counts[s][clothes] for s in ("train", "val", "test")] == [20, 5, 5]
    # 10 images: 1.5 -> 2.
    assert [counts[s][0] for s in ("train", "val", "test")] == [6, 2, 2]


def test_split_is_deterministic_for_a_seed(data_dir: Path) -> None:
    a = prepare_splits(data_dir, seed=7, log=lambda m: None)
    b = prepare_splits(data_dir, seed=7, log=lambda m: None)
    c = prepare_splits(data_dir, seed=8, log=lambda m: None)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    assert set(_paths(a.test)) != set(_paths(c.test))
    assert a.counts() == c.counts()


def test_dashed_and_mixed_case_folder_names_load(data_dir: Path) -> None:
    (data_dir / "brown_glass").rename(data_dir / "brown-glass")
    (data_dir / "white_glass").rename(data_dir / "White-Glass")
    splits = prepare_splits(data_dir, log=lambda m: None)
    labels = {Path(s.path).parent.name: s.label for s in splits.train}
    assert labels["brown-glass"] == CLASS_NAMES.index("brown_glass") == 2
    assert labels["White-Glass"] == CLASS_NAMES.index("white_glass") == 11


def test_hidden_files_and_folders_are_ignored(data_dir: Path) -> None:
    (data_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (data_dir / "metal" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    for where in (data_dir / ".ipynb_checkpoints", data_dir / "metal" / ".ipynb_checkpoints"):
        where.mkdir()
        shutil.copy(data_dir / "metal" / "metal_0000.jpg", where / "metal_0000-checkpoint.jpg")
    (data_dir / "__MACOSX").mkdir()
    (data_dir / "metal" / "._metal_0000.jpg").write_bytes(b"\x00\x05\x16\x07")
    splits = prepare_splits(data_dir, log=lambda m: None)
    assert splits.skipped == {}
    assert sum(splits.counts()["train"]) + len(splits.val) + len(splits.test) == 12 * PER_CLASS
    assert all("checkpoint" not in s.path for s in splits.train + splits.val + splits.test)


def test_unusable_files_are_skipped_and_counted(data_dir: Path) -> None:
    battery = data_dir / "battery"
    good = _noise_jpeg()
    (battery / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (battery / "text.jpg").write_text("this is not a picture\n")
    (battery / "zero.jpg").write_bytes(b"")
    (battery / "labels.csv").write_text("a,b\n")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        png, "PNG"
    )
    (data_dir / "paper" / "cut.png").write_bytes(png.getvalue()[:-200])
    # A valid JPEG followed by a long trailer (as some cameras write) must be kept.
    (battery / "trailer.jpg").write_bytes(good + os.urandom(10_000).replace(b"\xff", b"\x00"))
    Image.new("RGB", (8, 8)).save(data_dir / "stray.png")

    logs: list[str] = []
    splits = prepare_splits(data_dir, log=logs.append)
    assert splits.skipped == {
        EMPTY_FILE: 1,
        NOT_AN_IMAGE: 2,
        OUTSIDE_CLASS_FOLDER: 1,
        UNREADABLE: 2,
    }
    assert splits.skipped_files == {
        EMPTY_FILE: ["battery/zero.jpg"],
        NOT_AN_IMAGE: ["battery/labels.csv", "battery/text.jpg"],
        OUTSIDE_CLASS_FOLDER: ["stray.png"],
        UNREADABLE: ["battery/truncated.jpg", "paper/cut.png"],
    }
    assert sum(len(s) for s in (splits.train, splits.val, splits.test)) == 12 * PER_CLASS + 1
    everything = _paths(splits.train) + _paths(splits.val) + _paths(splits.test)
    assert str(battery / "trailer.jpg") in everything
    assert any(
        "skipped 2 file(s): unreadable (battery/truncated.jpg, paper/cut.png)" in m for m in logs
    )


def test_check_image_file_reasons(tmp_path: Path) -> None:
    good = _noise_jpeg()
    cases = {
        "ok.jpg": good,
        "ok.JPEG": good,
        "cut.jpg": good[:-300],
        "empty.png": b"",
        "words.png": b"hello",
        "notes.txt": b"hello",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    reasons = {name: check_image_file(tmp_path / name) for name in cases}
    assert reasons == {
        "ok.jpg": None,
        "ok.JPEG": None,
        "cut.jpg": UNREADABLE,
        "empty.png": EMPTY_FILE,
        "words.png": NOT_AN_IMAGE,
        "notes.txt": NOT_AN_IMAGE,
    }
    # Without verification only the cheap checks run.
    assert check_image_file(tmp_path / "cut.jpg", verify=False) is None
    assert check_image_file(tmp_path / "empty.png", verify=False) == EMPTY_FILE


# ---------------------------------------------------------------- errors before training


def test_unknown_class_folder_is_named_with_the_valid_names(data_dir: Path) -> None:
    (data_dir / "glass").mkdir()
    shutil.copy(data_dir / "metal" / "metal_0000.jpg", data_dir / "glass")
    with pytest.raises(DatasetError) as info:
        prepare_splits(data_dir, log=lambda m: None)
    message = str(info.value)
    assert f"folder {data_dir / 'glass'} is not one of the 12 classes" in message
    assert "valid names: battery, biological, brown_glass" in message


def test_empty_class_is_an_error_naming_the_folder(data_dir: Path) -> None:
    for p in (data_dir / "shoes").iterdir():
        p.unlink()
    (data_dir / "shoes" / "broken.jpg").write_text("nope")
    with pytest.raises(
        DatasetError, match=r"empty class folder\(s\) after skipping unusable files: "
    ) as info:
        prepare_splits(data_dir, log=lambda m: None)
    assert str(data_dir / "shoes") in str(info.value)


def test_missing_class_folder_is_an_error(data_dir: Path) -> None:
    shutil.rmtree(data_dir / "trash")
    shutil.rmtree(data_dir / "battery")
    with pytest.raises(DatasetError, match=r"has no folder for class\(es\) battery, trash"):
        prepare_splits(data_dir, log=lambda m: None)


def test_missing_or_wrong_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=rf"data folder {tmp_path / 'nope'} does not exist"):
        prepare_splits(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match=r"is not a folder"):
        prepare_splits(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"has no class folders; expected one folder per class"):
        prepare_splits(tmp_path / "empty")


def test_two_spellings_of_one_class_is_an_error(data_dir: Path) -> None:
    shutil.copytree(data_dir / "green_glass", data_dir / "green-glass")
    with pytest.raises(DatasetError, match=r"are both class 'green_glass'; keep one of them"):
        prepare_splits(data_dir, log=lambda m: None)


def test_class_too_small_to_split(data_dir: Path) -> None:
    for p in sorted((data_dir / "cardboard").iterdir())[2:]:
        p.unlink()
    with pytest.raises(DatasetError, match=r"class 'cardboard' .* has 2 usable images; at least 3"):
        prepare_splits(data_dir, log=lambda m: None)
    # Without a test split two images are enough.
    splits = prepare_splits(data_dir, val_fraction=0.1, test_fraction=0.0, log=lambda m: None)
    assert splits.counts()["test"] == [0] * 12


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions(data_dir: Path, val: float, test: float) -> None:
    with pytest.raises(ValueError, match=r"fraction"):
        prepare_splits(data_dir, val_fraction=val, test_fraction=test)


# ---------------------------------------------------------------- pre-split folders


def _presplit(data_dir: Path, parts: dict[str, slice]) -> Path:
    root = data_dir.parent / "presplit"
    for split, sl in parts.items():
        for cls_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
            dest = root / split / cls_dir.name
            dest.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[sl]:
                shutil.copy(f, dest)
    return root


def test_presplit_folders_are_used_as_is(data_dir: Path) -> None:
    root = _presplit(data_dir, {"train": slice(0, 6), "val": slice(6, 8), "test": slice(8, 10)})
    splits = prepare_splits(root, seed=123, log=lambda m: None)
    assert splits.presplit
    assert splits.counts() == {"train": [6] * 12, "val": [2] * 12, "test": [2] * 12}
    assert all(f"{os.sep}val{os.sep}" in s.path for s in splits.val)
    assert all(f"{os.sep}test{os.sep}" in s.path for s in splits.test)


def test_presplit_without_val_carves_it_from_train(data_dir: Path) -> None:
    root = _presplit(data_dir, {"train": slice(0, 8), "test": slice(8, 10)})
    logs: list[str] = []
    splits = prepare_splits(root, val_fraction=0.25, test_fraction=0.15, log=logs.append)
    assert splits.counts() == {"train": [6] * 12, "val": [2] * 12, "test": [2] * 12}
    assert all(f"{os.sep}train{os.sep}" in s.path for s in splits.val)
    assert any("carving val from train/" in m for m in logs)


def test_presplit_without_train_or_mixed_with_classes(data_dir: Path) -> None:
    root = _presplit(data_dir, {"val": slice(0, 5), "test": slice(5, 10)})
    with pytest.raises(
        DatasetError, match=r"looks pre-split \(test, val\) but has no train/ folder"
    ):
        prepare_splits(root)
    (data_dir / "train").mkdir()
    with pytest.raises(DatasetError, match=r"mixes split folders \(train\) with other folders"):
        prepare_splits(data_dir)


def test_presplit_train_missing_a_class(data_dir: Path) -> None:
    root = _presplit(data_dir, {"train": slice(0, 8), "val": slice(8, 10)})
    shutil.rmtree(root / "train" / "biological")
    with pytest.raises(DatasetError, match=r"train has no folder for class\(es\) biological"):
        prepare_splits(root)


# ---------------------------------------------------------------- saved split files


def test_save_and_load_round_trip_and_relocation(data_dir: Path, tmp_path: Path) -> None:
    (data_dir / "metal" / "bad.jpg").write_text("nope")
    splits = prepare_splits(data_dir, seed=4, log=lambda m: None)
    path = tmp_path / "run" / "splits.json"
    splits.save(path)

    doc = json.loads(path.read_text())
    assert doc["counts"] == splits.counts()
    assert doc["train"][0] == [
        Path(splits.train[0].path).relative_to(data_dir).as_posix(),
        "battery",
    ]
    assert doc["skipped_files"] == {NOT_AN_IMAGE: ["metal/bad.jpg"]}
    assert DataSplits.load(path) == splits

    moved = Path(shutil.move(str(data_dir), str(tmp_path / "moved")))
    assert len(DataSplits.load(path).missing_files()) == 12 * PER_CLASS
    relocated = DataSplits.load(path, root=moved)
    assert relocated.missing_files() == []
    assert [s.label for s in relocated.test] == [s.label for s in splits.test]
    assert relocated.test[0].path == str(moved / Path(splits.test[0].path).relative_to(data_dir))


def test_split_digests_follow_the_file_lists_not_the_location(
    data_dir: Path, tmp_path: Path
) -> None:
    splits = prepare_splits(data_dir, seed=4, log=lambda m: None)
    splits.save(tmp_path / "splits.json")
    moved = Path(shutil.move(str(data_dir), str(tmp_path / "moved")))
    relocated = DataSplits.load(tmp_path / "splits.json", root=moved)
    assert relocated.digest() == splits.digest()
    assert relocated.digest("train") == splits.digest("train")
    # By hand: sha256 of the sorted [relative path, class] pairs as compact JSON.
    pairs = sorted([Path(x.path).relative_to(data_dir).as_posix(), CLASS_NAMES[x.label]]
                   for x in splits.test)  # fmt: skip
    canonical = json.dumps(pairs, separators=(",", ":"))
    assert splits.digest("test") == hashlib.sha256(canonical.encode()).hexdigest()
    other = prepare_splits(moved, seed=5, log=lambda m: None)
    assert other.digest("train") != splits.digest("train")
    assert other.digest() != splits.digest()
    record = splits.provenance("data", 0.15, 0.15)
    assert record.seed == 4 and record.split_digests["val"] == splits.digest("val")
    assert record.counts == {"train": len(splits.train), "val": len(splits.val),
                             "test": len(splits.test)}  # fmt: skip


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist"):
        DataSplits.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"bad.json cannot be read"):
        DataSplits.load(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(DatasetError, match=r"partial.json is malformed: KeyError\('class_names'\)"):
        DataSplits.load(tmp_path / "partial.json")


# ---------------------------------------------------------------- dataset


P = Preprocessing(resize_size=32, input_size=32)


def test_image_dataset_items(data_dir: Path) -> None:
    splits = prepare_splits(data_dir, log=lambda m: None)
    ds = ImageDataset(splits.test, eval_transform(P))
    assert len(ds) == len(splits.test) == 24
    assert ds.targets == [s.label for s in splits.test]
    x, y = ds[5]
    assert y == splits.test[5].label
    with Image.open(splits.test[5].path) as img:
        assert torch.equal(x, eval_transform(P)(img))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32)


def test_image_dataset_names_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    (tmp_path / "gone.jpg").write_bytes(_noise_jpeg()[:200])
    ds = ImageDataset([Sample(str(tmp_path / "gone.jpg"), 0)], eval_transform(P))
    with pytest.raises(DatasetError, match=r"cannot read image .*gone.jpg"):
        ds[0]


# ---------------------------------------------------------------- imbalance


def _samples(counts: list[int]) -> list[Sample]:
    return [Sample(f"/x/{c}_{i}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


def test_class_counts_and_inverse_frequency_weights() -> None:
    samples = _samples([4, 2, 1])
    assert class_counts(samples, 3) == [4, 2, 1]
    w = class_weights(samples, 3)
    # Inverse frequency 1/4 : 1/2 : 1, scaled to mean 1 -> (1, 2, 4) * 3 / 7.
    assert torch.allclose(w, torch.tensor([3 / 7, 6 / 7, 12 / 7]))
    assert w.mean().item() == pytest.approx(1.0)
    w_half = class_weights(samples, 3, power=0.5)
    assert (w_half[2] / w_half[0]).item() == pytest.approx(2.0)
    assert torch.equal(class_weights(samples, 3, power=0.0), torch.ones(3))


def test_absent_class_gets_zero_weight_and_bad_labels_fail() -> None:
    w = class_weights(_samples([3, 0, 1]), 3)
    assert w[1].item() == 0.0
    assert w[[0, 2]].mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"label 3 is outside 0..2"):
        class_counts(_samples([1, 1, 1, 1]), 3)


def test_sample_weights_balance_a_weighted_sampler() -> None:
    samples = _samples([88, 10, 2])
    weights = sample_weights(samples, 3)
    assert weights.shape == (100,) and weights.dtype == torch.float64
    per_class = [weights[[s.label == c for s in samples]].sum().item() for c in range(3)]
    assert per_class == pytest.approx([per_class[0]] * 3)
    sampler = torch.utils.data.WeightedRandomSampler(
        weights, num_samples=6000, generator=torch.Generator().manual_seed(0)
    )
    drawn = Counter(samples[i].label for i in sampler)
    assert all(abs(drawn[c] / 6000 - 1 / 3) < 0.03 for c in range(3))
