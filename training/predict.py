"""Load a trained network from a published version, a run directory or a checkpoint, and
run it over images: batch prediction with top-k, and evaluation on a split."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from training.checkpoint import CheckpointError, load_trained
from training.data import IMAGE_EXTENSIONS
from wastenet.artifacts import load_version
from wastenet.nets import ModelConfig, build_model
from wastenet.preprocess import eval_transform
from wastenet.schema import METADATA_FILE, Preprocessing

OUTPUT_SUFFIXES = (".csv", ".json")


@dataclass
class Predictor:
    """A network in eval mode with what it needs to read images."""

    model: nn.Module
    model_config: ModelConfig
    class_names: list[str]
    preprocessing: Preprocessing
    source: str
    device: torch.device

    @torch.no_grad()
    def probabilities(self, batch: Tensor) -> Tensor:
        logits = self.model(batch.to(self.device))
        return logits.float().softmax(dim=1).cpu()


def load_predictor(source: Path, device: str | torch.device = "cpu") -> Predictor:
    """From a version folder (model.json), a run directory (its best.pt) or a .pt checkpoint."""
    dev = torch.device(device)
    if (source / METADATA_FILE).is_file():
        loaded = load_version(source, map_location=dev)
        meta = loaded.metadata
        return Predictor(
            loaded.model,
            meta.architecture,
            list(meta.class_names),
            meta.preprocessing,
            f"{loaded.ref.name} version {loaded.ref.version}",
            dev,
        )
    path = source / "checkpoints" / "best.pt" if source.is_dir() else source
    if source.is_dir() and not path.is_file():
        raise CheckpointError(
            source,
            "neither a model version (no model.json) nor a run directory (no checkpoints/best.pt)",
        )
    ckpt = load_trained(path)
    model = build_model(ckpt.model_config)
    model.load_state_dict(ckpt.inference_weights())
    model.eval().to(dev)
    return Predictor(
        model,
        ckpt.model_config,
        list(ckpt.class_names),
        ckpt.preprocessing,
        f"checkpoint {path} (epoch {ckpt.epoch})",
        dev,
    )


def check_output_path(out: Path) -> None:
    """Raise ValueError unless ``out`` ends in .csv or .json: checked before any inference."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output {out} must end in .csv or .json")


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), by the extensions training reads, sorted."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _load(path: Path, transform: Callable[[Image.Image], Tensor]) -> Tensor | str:
    try:
        with Image.open(path) as img:
            return transform(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"unreadable image: {exc}"


def _batches(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def predict_images(
    predictor: Predictor, paths: Sequence[Path], top_k: int = 3, batch_size: int = 32
) -> list[dict[str, Any]]:
    """One row per image: ``path``, ``predictions`` (top-k class/probability) or ``error``."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k, len(predictor.class_names))
    transform = eval_transform(predictor.preprocessing)
    rows: list[dict[str, Any]] = []
    for chunk in _batches(paths, batch_size):
        loaded = [(p, _load(p, transform)) for p in chunk]
        good = [(p, t) for p, t in loaded if isinstance(t, Tensor)]
        probs = predictor.probabilities(torch.stack([t for _, t in good])) if good else None
        by_path: dict[Path, list[dict[str, Any]]] = {}
        if probs is not None:
            top = probs.topk(k, dim=1)
            for (p, _), values, indices in zip(good, top.values, top.indices, strict=True):
                by_path[p] = [
                    {"class": predictor.class_names[int(i)], "probability": float(v)}
                    for v, i in zip(values, indices, strict=True)
                ]
        for p, t in loaded:
            if isinstance(t, str):
                rows.append({"path": str(p), "predictions": [], "error": t})
            else:
                rows.append({"path": str(p), "predictions": by_path[p], "error": None})
    return rows


def write_predictions(rows: list[dict[str, Any]], out: Path, top_k: int) -> None:
    """CSV (``.csv``: path, class_1, probability_1, ..., error) or JSON (``.json``)."""
    check_output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=2) + "\n")
        return
    header = ["path"]
    for i in range(1, top_k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    header.append("error")
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            cells: list[Any] = [row["path"]]
            for i in range(top_k):
                if i < len(row["predictions"]):
                    pred = row["predictions"][i]
                    cells += [pred["class"], f"{pred['probability']:.6f}"]
                else:
                    cells += ["", ""]
            cells.append(row["error"] or "")
            writer.writerow(cells)
