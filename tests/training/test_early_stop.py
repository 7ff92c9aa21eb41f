"""Early stopping: improvement by more than min_delta, counted per stage."""

from __future__ import annotations

import math

from training.early_stop import improves, stage_exhausted, stale_epochs


def test_improves_needs_more_than_min_delta_in_the_metric_direction() -> None:
    assert improves(0.5, None, "val_macro_f1")
    assert improves(0.52, 0.5, "val_macro_f1", 0.01)
    assert not improves(0.505, 0.5, "val_macro_f1", 0.01)
    assert not improves(0.5, 0.5, "val_acc")
    assert improves(0.9, 1.0, "val_loss", 0.05) and not improves(0.96, 1.0, "val_loss", 0.05)
    assert not improves(math.nan, 0.5, "val_acc") and improves(0.1, math.nan, "val_acc")


def _records(*stage_and_f1: tuple[int, float]) -> list[dict[str, float]]:
    return [{"stage": s, "val_macro_f1": v} for s, v in stage_and_f1]


def test_stale_epochs_count_within_the_stage_only() -> None:
    # Stage 3 starts below stage 1's best; it still improves on its own best.
    epochs = _records((1, 0.6), (1, 0.5), (3, 0.3), (3, 0.31), (3, 0.315), (3, 0.312))
    assert stale_epochs(epochs, 1, "val_macro_f1", 0.0) == 1
    assert stale_epochs(epochs, 3, "val_macro_f1", 0.0) == 1
    assert stale_epochs(epochs, 3, "val_macro_f1", 0.02) == 3  # none beat 0.3 + 0.02
    assert stage_exhausted(epochs, 3, "val_macro_f1", 3, 0.02)
    assert not stage_exhausted(epochs, 3, "val_macro_f1", 2, 0.0)
    assert not stage_exhausted(epochs, 3, "val_macro_f1", None, 0.0)
