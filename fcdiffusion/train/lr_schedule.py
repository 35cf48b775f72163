"""The learning-rate schedule of a run: a linear warm-up, then constant or cosine decay to zero at `max_steps`.

Steps are optimizer steps (Lightning's `global_step`, so gradient accumulation does not stretch them). The schedule
is a `torch.optim.lr_scheduler.LambdaLR` stepped by Lightning every optimizer step; its position (`last_epoch`)
and base rates are saved in the checkpoint and restored on resume, while its shape always follows the current
settings (a resumed run with a larger `--max_steps` stretches the cosine from where it is).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """Multiplies the learning rate by `factor(step)`: (step + 1) / warmup_steps during the warm-up, then 1
    (constant) or a half cosine from 1 to 0 over the remaining steps up to `total_steps` (cosine)."""

    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"--lr_schedule must be one of {', '.join(SCHEDULES)}, got '{self.name}'")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be at least 0, got {self.warmup_steps}")

    @classmethod
    def from_train(cls, train: Mapping[str, Any]) -> LRSchedule:
        """The schedule of a `train:` section (`lr_schedule`, `warmup_steps`, `max_steps`)."""
        return cls(str(train["lr_schedule"]), int(train["warmup_steps"]), int(train["max_steps"]))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def attach(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """What `configure_optimizers` returns: `optimizer` with this schedule, stepped every optimizer step.

        The lambda is a closure rather than this object, so `LambdaLR` does not store the settings in checkpoints
        (it saves callable objects' attributes) and a resumed run follows its current flags.
        """
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factor(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
