"""The image-folder data pipeline: discovery, checks, stratified splits, dataset, weights.

Augmentation lives in ``training.augment``.

torch / torchvision / Pillow / numpy only (no training extras), so the demo bootstrap and
the evaluation commands can use it without scikit-learn.

A dataset folder is either one sub-folder per class (``brown_glass`` or ``brown-glass``)
or a pre-split folder with ``train/``, ``val/`` and ``test/``, each holding class folders.
Everything that would stop a run halfway (a misspelled class folder, an empty class, a
missing folder) is found here and raised as :class:`DatasetError` before training starts;
files that cannot be used (not an image, empty, truncated, corrupt) are skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from wastenet.classes import CLASS_NAMES, canonical_class_name
from wastenet.preprocess import to_rgb
from wastenet.schema import DataProvenance

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Folder names accepted for each split of a pre-split dataset.
SPLIT_FOLDERS: dict[str, str] = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
_JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif"})
SPLITS_FORMAT_VERSION = 1

# Reasons a file is skipped (the keys of DataSplits.skipped).
NOT_AN_IMAGE = "not an image"
EMPTY_FILE = "empty file"
UNREADABLE = "unreadable"
OUTSIDE_CLASS_FOLDER = "not in a class folder"

# How far from the end of a JPEG to look for its end-of-image marker. Files without it in
# that window (truncated, or carrying a long trailer) get a reduced-size decode instead.
_JPEG_TAIL_BYTES = 4096
_PROGRESS_EVERY_S = 5.0


class DatasetError(ValueError):
    """The dataset folder cannot be used as given; the message names the folder, class or file."""


@dataclass(frozen=True)
class Sample:
    path: str  # absolute
    label: int


@dataclass
class DataSplits:
    """Train/val/test file lists over the 12 classes, plus what was skipped and why."""

    root: str
    class_names: tuple[str, ...]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: dict[str, int]  # reason -> count
    seed: int
    presplit: bool
    # reason -> skipped files (relative to root), so that nothing is dropped silently.
    skipped_files: dict[str, list[str]] = field(default_factory=dict)

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        samples: list[Sample] = getattr(self, name)
        return samples

    def counts(self) -> dict[str, list[int]]:
        """split -> number of images per class, in class index order."""
        return {s: class_counts(self.split(s), len(self.class_names)) for s in SPLITS}

    def describe(self) -> str:
        """A per-class table of the split sizes, for logs."""
        counts = self.counts()
        width = max(len(n) for n in self.class_names)
        lines = [f"{'class':<{width}}  {'train':>6} {'val':>6} {'test':>6}"]
        for i, name in enumerate(self.class_names):
            row = " ".join(f"{counts[s][i]:>6}" for s in SPLITS)
            lines.append(f"{name:<{width}}  {row}")
        totals = " ".join(f"{sum(counts[s]):>6}" for s in SPLITS)
        lines.append(f"{'total':<{width}}  {totals}")
        if self.skipped:
            lines.append(
                "skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items()))
            )
        return "\n".join(lines)

    def save(self, path: Path) -> None:
        """Write the file lists as JSON (paths relative to ``root``); atomic replace."""
        path = Path(path)
        doc: dict[str, Any] = {
            "format_version": SPLITS_FORMAT_VERSION,
            "root": self.root,
            "class_names": list(self.class_names),
            "seed": self.seed,
            "presplit": self.presplit,
            "counts": self.counts(),
            "skipped": dict(self.skipped),
            "skipped_files": {k: list(v) for k, v in self.skipped_files.items()},
        }
        for s in SPLITS:
            doc[s] = [
                [_relative(x.path, self.root), self.class_names[x.label]] for x in self.split(s)
            ]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, root: Path | None = None) -> DataSplits:
        """Read a file written by :meth:`save`; ``root`` relocates a dataset that has moved."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"split file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"split file {path} cannot be read: {e}") from None
        try:
            if doc["format_version"] != SPLITS_FORMAT_VERSION:
                raise DatasetError(
                    f"split file {path} has format_version {doc['format_version']}; "
                    f"this reader knows {SPLITS_FORMAT_VERSION}"
                )
            class_names = tuple(str(n) for n in doc["class_names"])
            index = {n: i for i, n in enumerate(class_names)}
            base = os.path.abspath(root) if root is not None else str(doc["root"])
            lists: dict[str, list[Sample]] = {}
            for s in SPLITS:
                items = []
                for rel, name in doc[s]:
                    if name not in index:
                        raise DatasetError(f"split file {path}: {rel!r} has unknown class {name!r}")
                    items.append(Sample(os.path.join(base, rel), index[name]))
                lists[s] = items
            return cls(
                root=base,
                class_names=class_names,
                train=lists["train"],
                val=lists["val"],
                test=lists["test"],
                skipped={str(k): int(v) for k, v in doc.get("skipped", {}).items()},
                seed=int(doc["seed"]),
                presplit=bool(doc["presplit"]),
                skipped_files={str(k): list(v) for k, v in doc.get("skipped_files", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DatasetError):
                raise
            raise DatasetError(f"split file {path} is malformed: {e!r}") from None

    def relative_paths(self, name: str) -> list[str]:
        """The files of split ``name`` as saved: relative to ``root`` (absolute outside it)."""
        return [_relative(x.path, self.root) for x in self.split(name)]

    def digest(self, name: str | None = None) -> str:
        """sha256 of split ``name``'s sorted (relative path, class) pairs; of all three
        splits' digests when ``name`` is None. Independent of where the dataset lies."""
        if name is None:
            doc: Any = {s: self.digest(s) for s in SPLITS}
        else:
            labels = [self.class_names[x.label] for x in self.split(name)]
            doc = sorted(zip(self.relative_paths(name), labels, strict=True))
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def provenance(
        self,
        source: str,
        val_fraction: float,
        test_fraction: float,
        splits_file: str | None = None,
    ) -> DataProvenance:
        """The record of these splits for a published model.json."""
        return DataProvenance(
            source=source,
            root=self.root,
            seed=self.seed,
            presplit=self.presplit,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            splits_digest=self.digest(),
            split_digests={s: self.digest(s) for s in SPLITS},
            counts={s: len(self.split(s)) for s in SPLITS},
            splits_file=splits_file,
        )

    def missing_files(self) -> list[str]:
        """Listed files that no longer exist (e.g. after moving the dataset without ``root``)."""
        return [x.path for s in SPLITS for x in self.split(s) if not os.path.isfile(x.path)]


def _relative(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    if rel.startswith(".."):
        return path
    return Path(rel).as_posix()


# ---------------------------------------------------------------- discovery and checks


def _is_hidden(name: str) -> bool:
    # .DS_Store, .ipynb_checkpoints, ._resource forks, __MACOSX from zip files.
    return name.startswith(".") or name.startswith("__")


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _walk_files(folder: Path) -> list[Path]:
    """Every non-hidden file below ``folder``, sub-folders included, in a stable order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(Path(dirpath, f) for f in sorted(filenames) if not _is_hidden(f))
    return found


def check_image_file(path: Path, verify: bool = True) -> str | None:
    """None when ``path`` is a usable image, else the reason to skip it.

    Cheap enough for tens of thousands of files: Pillow reads the header and ``verify()``
    checks the structure (PNG chunk CRCs) without decoding pixels. JPEG ``verify()`` checks
    nothing, so a JPEG must also end with its end-of-image marker; one that does not gets a
    1/8-scale decode, which fails on a truncated file and passes a valid file with a trailer.
    Formats other than JPEG and PNG are rare in photo sets and are decoded fully.
    """
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return NOT_AN_IMAGE
    try:
        size = path.stat().st_size
    except OSError:
        return UNREADABLE
    if size == 0:
        return EMPTY_FILE
    if not verify:
        return None
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
        if fmt == "JPEG":
            if not _jpeg_has_end_marker(path, size):
                with Image.open(path) as img:
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                    img.load()
        elif fmt != "PNG":
            with Image.open(path) as img:
                img.load()
    except UnidentifiedImageError:
        return NOT_AN_IMAGE
    except Exception:  # Pillow raises many types for corrupt data (OSError, SyntaxError, ...)
        return UNREADABLE
    return None


def _jpeg_has_end_marker(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, size - _JPEG_TAIL_BYTES))
        return b"\xff\xd9" in f.read()


def _check_all(files: Sequence[Path], verify: bool, log: Callable[[str], None]) -> list[str | None]:
    """check_image_file over many files: threads overlap disk reads; progress in the log."""
    results: list[str | None] = []
    start = last = time.monotonic()
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(lambda p: check_image_file(p, verify), files, chunksize=64):
            results.append(result)
            now = time.monotonic()
            if now - last >= _PROGRESS_EVERY_S:
                last = now
                log(f"checked {len(results)}/{len(files)} files ({now - start:.0f} s)")
    return results


@dataclass
class _Found:
    """Usable files per class index for one split folder, plus the skipped files."""

    per_class: dict[int, list[str]]
    skipped: dict[str, list[str]]
    folders: dict[int, Path]


def _scan_split_folder(
    folder: Path, root: Path, verify: bool, log: Callable[[str], None]
) -> _Found:
    per_class: dict[int, list[Path]] = {}
    folders: dict[int, Path] = {}
    skipped: dict[str, list[str]] = {}
    for sub in _visible_dirs(folder):
        name = canonical_class_name(sub.name)
        if name is None:
            raise DatasetError(
                f"folder {sub} is not one of the {len(CLASS_NAMES)} classes; "
                f"valid names: {', '.join(CLASS_NAMES)} (dashes also accepted, e.g. brown-glass)"
            )
        idx = CLASS_NAMES.index(name)
        if idx in folders:
            raise DatasetError(
                f"folders {folders[idx]} and {sub} are both class {name!r}; keep one of them"
            )
        folders[idx] = sub
        per_class[idx] = _walk_files(sub)
    stray = [p for p in folder.iterdir() if p.is_file() and not _is_hidden(p.name)]
    stray_images = [p for p in stray if p.suffix.lower() in IMAGE_EXTENSIONS]
    if stray_images:
        skipped[OUTSIDE_CLASS_FOLDER] = [_relative(str(p), str(root)) for p in sorted(stray_images)]

    order = [(idx, p) for idx in sorted(per_class) for p in per_class[idx]]
    log(f"{folder}: {len(order)} files in {len(per_class)} class folders")
    results = _check_all([p for _, p in order], verify, log)
    usable: dict[int, list[str]] = {idx: [] for idx in per_class}
    for (idx, p), reason in zip(order, results, strict=True):
        if reason is None:
            usable[idx].append(str(p))
        else:
            skipped.setdefault(reason, []).append(_relative(str(p), str(root)))
    return _Found(usable, skipped, folders)


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) sizes for a class of n images: rounded, at least 1 when the fraction > 0."""

    def size(fraction: float) -> int:
        return 0 if fraction <= 0 else max(1, int(n * fraction + 0.5))

    return size(val_fraction), size(test_fraction)


def _stratified(
    per_class: dict[int, list[str]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    where: dict[int, Path],
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    need = 1 + (val_fraction > 0) + (test_fraction > 0)
    for idx in sorted(per_class):
        paths = sorted(per_class[idx])
        n_val, n_test = _split_counts(len(paths), val_fraction, test_fraction)
        if len(paths) - n_val - n_test < 1:
            raise DatasetError(
                f"class {CLASS_NAMES[idx]!r} ({where[idx]}) has {len(paths)} usable images; "
                f"at least {need} are needed to split it (val_fraction {val_fraction}, "
                f"test_fraction {test_fraction})"
            )
        # One stream per class: adding images to one class leaves the others' splits alone.
        order = np.random.default_rng([seed, idx]).permutation(len(paths))
        picked = [paths[i] for i in order]
        test += [Sample(p, idx) for p in sorted(picked[:n_test])]
        val += [Sample(p, idx) for p in sorted(picked[n_test : n_test + n_val])]
        train += [Sample(p, idx) for p in sorted(picked[n_test + n_val :])]
    return train, val, test


def _merge_skipped(into: dict[str, list[str]], more: dict[str, list[str]]) -> None:
    for reason, files in more.items():
        into.setdefault(reason, []).extend(files)


def _require_all_classes(found: _Found, folder: Path) -> None:
    missing = [CLASS_NAMES[i] for i in range(len(CLASS_NAMES)) if i not in found.per_class]
    if missing:
        raise DatasetError(
            f"{folder} has no folder for class(es) {', '.join(missing)}; every one of the "
            f"{len(CLASS_NAMES)} classes needs at least one image"
        )
    empty = [f"{found.folders[i]}" for i, files in sorted(found.per_class.items()) if not files]
    if empty:
        raise DatasetError(
            f"empty class folder(s) after skipping unusable files: {', '.join(empty)}"
        )


@dataclass
class _Split:
    """The three file lists of a dataset folder, and the files skipped while finding them."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped_files: dict[str, list[str]]


def prepare_splits(
    data_dir: Path,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    verify_images: bool = True,
    log: Callable[[str], None] | None = None,
) -> DataSplits:
    """Find, check and split the images under ``data_dir`` (see the module docstring).

    Unsplit data is split per class with ``seed``. A pre-split folder is used as is; when it
    lacks ``val/`` or ``test/``, that split is carved from ``train/`` per class with the
    corresponding fraction (and ``seed``). Raises DatasetError for a missing folder, a
    class folder that is not one of the 12, an empty or missing class, a pre-split folder
    without ``train/``, or a class too small to split.
    """
    say = log if log is not None else logger.info
    _check_fractions(val_fraction, test_fraction)
    root = Path(os.path.abspath(data_dir))
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data folder {root} is not a folder")
    dirs = _visible_dirs(root)
    split_dirs = _split_folders(root, dirs)
    fractions = (val_fraction, test_fraction)
    if split_dirs:
        found = _presplit(root, dirs, split_dirs, fractions, seed, verify_images, say)
    else:
        found = _unsplit(root, dirs, fractions, seed, verify_images, say)
    presplit = bool(split_dirs)
    for reason, files in sorted(found.skipped_files.items()):
        examples = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        say(f"skipped {len(files)} file(s): {reason} ({examples})")
    splits = DataSplits(
        root=str(root),
        class_names=CLASS_NAMES,
        train=found.train,
        val=found.val,
        test=found.test,
        skipped={reason: len(files) for reason, files in sorted(found.skipped_files.items())},
        seed=seed,
        presplit=presplit,
        skipped_files={k: sorted(v) for k, v in sorted(found.skipped_files.items())},
    )
    say(
        f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images"
        f" ({'pre-split' if presplit else f'stratified split, seed {seed}'})"
    )
    return splits


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}"
        )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}"
        )


def _split_folders(root: Path, dirs: list[Path]) -> dict[str, Path]:
    """split name -> folder, for the folders of ``root`` named like a split."""
    split_dirs: dict[str, Path] = {}
    for d in dirs:
        split = SPLIT_FOLDERS.get(d.name.lower())
        if split is None:
            continue
        if split in split_dirs:
            raise DatasetError(f"{split_dirs[split]} and {d} are both the {split!r} split")
        split_dirs[split] = d
    return split_dirs


def _presplit(
    root: Path,
    dirs: list[Path],
    split_dirs: dict[str, Path],
    fractions: tuple[float, float],
    seed: int,
    verify: bool,
    say: Callable[[str], None],
) -> _Split:
    """train/ val/ test/ as given; a missing val/ or test/ is carved from train/."""
    others = [d for d in dirs if d.name.lower() not in SPLIT_FOLDERS]
    if others:
        split_names = ", ".join(sorted(d.name for d in split_dirs.values()))
        raise DatasetError(
            f"{root} mixes split folders ({split_names}) "
            f"with other folders ({', '.join(d.name for d in others)}); use either one folder "
            "per class or train/ val/ test/ with class folders inside"
        )
    if "train" not in split_dirs:
        raise DatasetError(
            f"{root} looks pre-split ({', '.join(d.name for d in split_dirs.values())}) "
            "but has no train/ folder"
        )
    found = {s: _scan_split_folder(d, root, verify, say) for s, d in split_dirs.items()}
    _require_all_classes(found["train"], split_dirs["train"])
    skipped_files: dict[str, list[str]] = {}
    for s, f in found.items():
        _merge_skipped(skipped_files, f.skipped)
        if s != "train":
            absent = [CLASS_NAMES[i] for i in range(len(CLASS_NAMES)) if not f.per_class.get(i)]
            if absent:
                say(f"warning: {split_dirs[s]} has no images of {', '.join(absent)}")
    carve_val = fractions[0] if "val" not in found else 0.0
    carve_test = fractions[1] if "test" not in found else 0.0
    if carve_val or carve_test:
        say(
            f"{root}: carving {'val ' if carve_val else ''}{'test ' if carve_test else ''}"
            f"from train/ per class with seed {seed}"
        )
    train = found["train"]
    train_list, val, test = _stratified(train.per_class, carve_val, carve_test, seed, train.folders)
    if "val" in found:
        val = _samples(found["val"].per_class)
    if "test" in found:
        test = _samples(found["test"].per_class)
    return _Split(train_list, val, test, skipped_files)


def _unsplit(
    root: Path,
    dirs: list[Path],
    fractions: tuple[float, float],
    seed: int,
    verify: bool,
    say: Callable[[str], None],
) -> _Split:
    """One folder per class, split per class with ``seed``."""
    if not dirs:
        raise DatasetError(
            f"{root} has no class folders; expected one folder per class "
            f"({', '.join(CLASS_NAMES)}) or train/ val/ test/ with class folders inside"
        )
    f = _scan_split_folder(root, root, verify, say)
    _require_all_classes(f, root)
    train, val, test = _stratified(f.per_class, fractions[0], fractions[1], seed, f.folders)
    return _Split(train, val, test, f.skipped)


def _samples(per_class: dict[int, list[str]]) -> list[Sample]:
    return [Sample(p, idx) for idx in sorted(per_class) for p in sorted(per_class[idx])]


# ---------------------------------------------------------------- dataset


class ImageDataset(torch.utils.data.Dataset[tuple[Tensor, int]]):
    """Samples -> (tensor, label); opens each file with Pillow and converts with ``to_rgb``."""

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[[Image.Image], Tensor]
    ) -> None:
        self.samples = list(samples)
        self.transform = transform

    @property
    def targets(self) -> list[int]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        sample = self.samples[index]
        try:
            with Image.open(sample.path) as img:
                tensor = self.transform(to_rgb(img))
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read image {sample.path}: {e}") from e
        return tensor, sample.label


# ---------------------------------------------------------------- imbalance


def _labels(samples: Iterable[Sample], num_classes: int) -> np.ndarray:
    labels = np.fromiter((s.label for s in samples), dtype=np.int64)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is outside 0..{num_classes - 1}")
    return labels


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Number of samples per class index."""
    counts = np.bincount(_labels(samples, num_classes), minlength=num_classes)
    return [int(c) for c in counts]


def class_weights(samples: Sequence[Sample], num_classes: int, power: float = 1.0) -> Tensor:
    """Loss weights proportional to ``count ** -power`` (1 = inverse frequency, 0.5 = milder).

    Scaled to mean 1 over the classes that have samples; a class without samples gets 0.
    """
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    counts = np.asarray(class_counts(samples, num_classes), dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("no samples: cannot compute class weights")
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = counts[present] ** -power
    weights[present] /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)


def sample_weights(samples: Sequence[Sample], num_classes: int, power: float = 1.0) -> Tensor:
    """One weight per sample for WeightedRandomSampler: with power 1, classes are drawn equally."""
    per_class = class_weights(samples, num_classes, power).double()
    return per_class[torch.from_numpy(_labels(samples, num_classes))]
