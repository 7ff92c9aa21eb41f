"""Early stopping on the validation metric, per stage.

Each stage has its own patience: when ``patience`` epochs of a stage in a row have not
improved the stage's best ``best_metric`` by more than ``min_delta``, the stage ends
there. The next stage of the plan follows (three_stage), or the run ends after the last.
The decision is computed from the history alone, so a resumed run makes the same one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def improves(value: float, best: float | None, metric: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (lower is better for a loss)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    if metric.endswith("loss"):
        return value < best - min_delta
    return value > best + min_delta


def stale_epochs(
    epochs: Sequence[Mapping[str, Any]], stage: int, metric: str, min_delta: float
) -> int:
    """Epochs of ``stage`` since the last one that improved the stage's best ``metric``."""
    best: float | None = None
    stale = 0
    for record in epochs:
        if record["stage"] != stage:
            continue
        value = float(record[metric])
        if improves(value, best, metric, min_delta):
            best, stale = value, 0
        else:
            stale += 1
    return stale


def stage_exhausted(
    epochs: Sequence[Mapping[str, Any]],
    stage: int,
    metric: str,
    patience: int | None,
    min_delta: float,
) -> bool:
    """True when early stopping ends ``stage`` now (never when ``patience`` is None)."""
    if patience is None:
        return False
    return stale_epochs(epochs, stage, metric, min_delta) >= patience
