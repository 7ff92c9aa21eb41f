"""One typed source of truth for a network's architecture."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.classes import NUM_CLASSES

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CBAMPlacement = Literal["none", "stage", "block", "block_post"]
Head = Literal["linear", "bnneck"]


class ModelConfig(BaseModel):
    """Everything needed to rebuild a network; saved in every artifact's ``model.json``.

    - ``cbam``: where CBAM goes. ``none``; ``stage``: one CBAM after each selected layer
      group; ``block``: inside every residual block of the selected stages, on the residual
      branch before the addition (the paper's layout); ``block_post``: after the addition,
      CBAM(F(x) + x).
    - ``cbam_stages``: which of layer1..layer4 get attention (ignored for ``none``).
    - ``ibn``: IBN-a, instance norm on the first half of ``bn1`` in every block of layers 1-3.
    - ``head``: ``linear`` or ``bnneck`` (BatchNorm1d with a frozen bias, then a bias-free
      linear classifier).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: Arch = "resnet18"
    num_classes: int = Field(default=NUM_CLASSES, ge=2)
    cbam: CBAMPlacement = "block"
    cbam_stages: tuple[int, ...] = (1, 2, 3, 4)
    cbam_reduction: int = Field(default=16, ge=1)
    cbam_kernel_size: int = Field(default=7, ge=1)
    ibn: bool = False
    head: Head = "linear"

    @field_validator("cbam_stages")
    @classmethod
    def _check_stages(cls, stages: tuple[int, ...]) -> tuple[int, ...]:
        bad = [s for s in stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"cbam_stages must be a subset of 1-4, got {list(stages)}")
        if len(set(stages)) != len(stages):
            raise ValueError(f"cbam_stages has duplicates: {list(stages)}")
        return tuple(sorted(stages))

    @field_validator("cbam_kernel_size")
    @classmethod
    def _check_kernel(cls, k: int) -> int:
        if k % 2 == 0:
            raise ValueError(f"cbam_kernel_size must be odd, got {k}")
        return k

    @model_validator(mode="after")
    def _check_placement(self) -> ModelConfig:
        if self.cbam != "none" and not self.cbam_stages:
            raise ValueError(f"cbam={self.cbam!r} needs at least one stage in cbam_stages")
        return self

    @property
    def attention_stages(self) -> frozenset[int]:
        """Stages that actually carry attention (empty for ``cbam='none'``)."""
        return frozenset() if self.cbam == "none" else frozenset(self.cbam_stages)
