"""A Lightning callback that saves image grids from `pl_module.log_images` every N training steps."""
from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch

from fcdiffusion.images import labelled_grid, save_png


class ImageLogger(pl.Callback):
    """Every `every_n_steps` optimizer steps, on rank 0, write `<log_dir>/image_log/step-XXXXXX.png`.

    The grid has a row per example and a column per entry of `log_images` (source, reconstruction, control,
    samples, ...), so one picture shows what the model does at that step.
    """

    def __init__(self, every_n_steps: int = 500, max_images: int = 4, out_dir: str | None = None):
        self.every_n_steps, self.max_images, self.out_dir = every_n_steps, max_images, out_dir

    def directory(self, trainer: pl.Trainer) -> str:
        return self.out_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "image_log")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, N=self.max_images)
        pl_module.train(was_training)
        save_png(labelled_grid(images), os.path.join(self.directory(trainer), f"step-{step:06d}.png"))
