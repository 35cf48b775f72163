"""An exponential moving average (EMA) of the trained parameters, kept through a Lightning run and its checkpoints.

Only the parameters that train (`requires_grad`) are averaged: the frozen SD base never changes, so copying it, as
Lightning's `WeightAveraging` (a deep copy of the whole module) would, costs memory and, for the distiller, would
copy the four teachers too. The decay warms up as in latent diffusion's `LitEma`, min(decay, (1 + n) / (10 + n))
after n updates, so early averages are not dominated by the initial weights.

`EMACallback` updates the average after every optimizer step (not every micro-batch under gradient accumulation),
saves it in the Lightning checkpoint under "ema" and restores it on resume; a checkpoint without one (EMA turned on
mid-run) starts the average from the checkpoint's weights. Validation runs with the averaged weights swapped in, and
`averaged_weights(module)` does the same for image logs and the exported student. Every DDP rank holds the same
parameters after a step, so each updates its own copy identically and no communication is needed. Sharded
strategies (FSDP, DeepSpeed stage 3) split the parameters and are not supported.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "ema"


class ExponentialMovingAverage:
    """Shadow copies of `parameters` (name -> Parameter) averaged with `decay` at each `update()`.

    Not an `nn.Module`: its tensors stay out of the module's state dict and out of DDP's buffer broadcast; `to()`
    moves them.
    """

    def __init__(self, parameters: Mapping[str, nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.parameters = dict(parameters)
        self.shadow = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.num_updates = 0
        self._backup: dict[str, torch.Tensor] | None = None

    def current_decay(self) -> float:
        """The decay of the next update: `decay`, lowered for the first updates."""
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * parameter, for every parameter."""
        weight = 1.0 - self.current_decay()
        for name, p in self.parameters.items():
            self.shadow[name].lerp_(p.detach().to(self.shadow[name].dtype), weight)
        self.num_updates += 1

    def to(self, device: torch.device | str) -> ExponentialMovingAverage:
        """Move the averages to `device` (where the parameters are)."""
        self.shadow = {name: t.to(device) for name, t in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy a saved average in (on the current device); its parameter names and shapes must match."""
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise ValueError(f"the checkpoint's EMA does not match the trained parameters (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average again from the current parameters."""
        for name, p in self.parameters.items():
            self.shadow[name].copy_(p.detach())
        self.num_updates = 0

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged values in the parameters for the duration, the trained ones restored after (also on error).

        Re-entrant: inside an active swap it does nothing, so validation and an image log within it nest.
        """
        if self._backup is not None:
            yield
            return
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    @torch.no_grad()
    def swap_in(self) -> None:
        """Keep the trained values aside and put the averaged ones in the parameters (no-op if already in)."""
        if self._backup is not None:
            return
        self._backup = {name: p.detach().clone() for name, p in self.parameters.items()}
        for name, p in self.parameters.items():
            p.copy_(self.shadow[name])

    @torch.no_grad()
    def swap_out(self) -> None:
        """Put the trained values back (no-op if they are in)."""
        if self._backup is None:
            return
        for name, p in self.parameters.items():
            p.copy_(self._backup[name])
        self._backup = None


def shards_parameters(strategy: Any) -> bool:
    """Whether a Lightning strategy splits the parameters over devices (FSDP, DeepSpeed stage 3): EMA cannot."""
    return "FSDP" in type(strategy).__name__ or bool(getattr(strategy, "zero_stage_3", False))


def trained_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of `module` that train, by state-dict name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@contextmanager
def averaged_weights(module: nn.Module) -> Iterator[None]:
    """`module` with its EMA weights swapped in when it has an EMA (`EMACallback`); otherwise as it is."""
    ema: ExponentialMovingAverage | None = getattr(module, "ema", None)
    if ema is None:
        yield
        return
    with ema.swapped():
        yield


class EMACallback(pl.Callback):
    """Keeps `pl_module.ema`, an `ExponentialMovingAverage` of its trained parameters (see the module doc).

    Put it before callbacks that save checkpoints at the end of a batch, so that they save the updated average.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self._updated_at: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            pl_module.ema = ExponentialMovingAverage(trained_parameters(pl_module), self.decay)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.ema.to(pl_module.device)  # the strategy has moved the module by now

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._updated_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step != self._updated_at:  # an optimizer step happened in this batch (not a gradient-accumulation one)
            pl_module.ema.update()
            self._updated_at = step

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.ema.swap_in()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.ema.swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if getattr(pl_module, "ema", None) is not None:
            pl_module.ema.swap_out()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = pl_module.ema.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Restore the saved average; without one, start from the checkpoint's weights (already loaded)."""
        if CHECKPOINT_KEY in checkpoint:
            pl_module.ema.load_state_dict(checkpoint[CHECKPOINT_KEY])
        else:
            log.info("the checkpoint holds no EMA weights: the average starts from its weights")
            pl_module.ema.reset()
