"""The 12 waste classes, in index order, and the folder spellings that map to them."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "battery",
    "biological",
    "brown_glass",
    "cardboard",
    "clothes",
    "green_glass",
    "metal",
    "paper",
    "plastic",
    "shoes",
    "trash",
    "white_glass",
)
NUM_CLASSES = len(CLASS_NAMES)


def canonical_class_name(folder_name: str) -> str | None:
    """Map a dataset folder name to its class name, or None when it is not one of the 12.

    The public Kaggle dataset spells three folders with dashes (``brown-glass``); both
    spellings, and any letter case, map to the same class.
    """
    name = folder_name.strip().lower().replace("-", "_").replace(" ", "_")
    return name if name in CLASS_NAMES else None
