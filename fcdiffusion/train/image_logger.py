"""A Lightning callback that saves image grids from `pl_module.log_images`: every N training steps, and of the fixed
first validation batch at every validation."""
from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from fcdiffusion.core.images import labelled_grid, save_png
from fcdiffusion.train.ema import averaged_weights


class ImageLogger(pl.Callback):
    """On rank 0: every `every_n_steps` optimizer steps `<out_dir>/step-XXXXXX.png` of the training batch, and at
    every validation `<out_dir>/val-step-XXXXXX.png` of the first validation batch (the same images and seeds each
    time, so successive grids compare). Both also go to TensorBoard (`train/images`, `val/images`).

    The grid has a row per example and a column per entry of `log_images` (source, reconstruction, control,
    samples, ...), so one picture shows what the model does at that step; with EMA on, the averaged weights' work.
    """

    def __init__(self, every_n_steps: int = 500, max_images: int = 4, out_dir: str | None = None):
        self.every_n_steps, self.max_images, self.out_dir = every_n_steps, max_images, out_dir
        self._logged_at: int | None = None

    def directory(self, trainer: pl.Trainer) -> str:
        return self.out_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "image_log")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._logged_at:
            return  # (the same step again: a gradient-accumulation batch)
        self._logged_at = step
        if trainer.is_global_zero:
            self.log_grid(trainer, pl_module, batch, f"step-{step:06d}.png", "train/images")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and trainer.is_global_zero:
            self.log_grid(trainer, pl_module, batch, f"val-step-{trainer.global_step:06d}.png", "val/images")

    def log_grid(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, name: str, tag: str) -> None:
        """Write the grid of `batch` as `name` and to TensorBoard under `tag`."""
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad(), averaged_weights(pl_module):
            images = pl_module.log_images(batch, N=self.max_images)
        pl_module.train(was_training)
        grid = labelled_grid(images)
        save_png(grid, os.path.join(self.directory(trainer), name))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, trainer.global_step, dataformats="HWC")
