"""The Lightning run shared by teacher training and distillation: run flags, Trainer, data, fit and resume."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from fcdiffusion.dataset import FCDiffusionDataset
from fcdiffusion.image_logger import ImageLogger

# Flags that override `train:` entries of a config; None means "take the config's value".
RUN_FLAGS = {
    "data": (str, "training_data.json written by training_data_prepare.py"),
    "max_steps": (int, "total optimizer steps (a resumed run continues up to this)"),
    "batch_size": (int, "images per device per step"),
    "learning_rate": (float, "AdamW learning rate"),
    "resolution": (int, "training image size in pixels"),
    "num_workers": (int, "data loader processes"),
    "checkpoint_every": (int, "save a checkpoint every N steps"),
    "log_images_every": (int, "save an image grid every N steps (0: never)"),
    "precision": (str, "Lightning precision: 32, 16-mixed, bf16-mixed, ..."),
    "accelerator": (str, "Lightning accelerator: auto, cpu, gpu, ..."),
    "devices": (str, "Lightning devices: auto, 1, 8, '0,1', ..."),
    "strategy": (str, "Lightning strategy: auto, ddp, deepspeed_stage_2, ..."),
    "num_nodes": (int, "number of nodes"),
    "logdir": (str, "root folder of logs and checkpoints"),
    "seed": (int, "random seed"),
}


def resolve_command_line(argv: Sequence[str] | None, parse_args: Callable, resolve_config: Callable
                         ) -> DictConfig | None:
    """Set up logging, parse `argv` and resolve the config with its flags; on bad input print why, return None."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    try:
        return resolve_config(args, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def add_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple[type, str]]) -> None:
    """Add `--name` for each entry of `flags` (type, help), defaulting to None (the config's value)."""
    for name, (kind, help_text) in flags.items():
        parser.add_argument(f"--{name}", type=kind, help=help_text)


def apply_flags(section: DictConfig, args: argparse.Namespace, flags: dict[str, tuple[type, str]]) -> None:
    """Copy every flag that was given into `section`."""
    for name in flags:
        if getattr(args, name) is not None:
            section[name] = getattr(args, name)


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def devices_arg(value: Any) -> Any:
    """Lightning accepts 'auto', an int, or a list/string of ids."""
    text = str(value)
    return int(text) if text.isdigit() else text


def build_trainer(train: DictConfig, ckpt_dir: str, run_name: str, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    """A Trainer that checkpoints to `ckpt_dir` every N steps (and `last.ckpt`), logs CSV metrics and image grids."""
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", every_n_train_steps=train.checkpoint_every,
                        save_top_k=-1, save_last=True, auto_insert_metric_name=False),
        ImageLogger(every_n_steps=train.log_images_every, max_images=min(4, train.batch_size),
                    out_dir=os.path.join(ckpt_dir, "image_log")),
        *callbacks,
    ]
    return pl.Trainer(
        max_steps=train.max_steps, accelerator=train.accelerator, devices=devices_arg(train.devices),
        strategy=train.strategy, num_nodes=train.num_nodes, precision=train.precision, callbacks=callbacks,
        logger=CSVLogger(train.logdir, name=run_name), default_root_dir=train.logdir,
        log_every_n_steps=train.get("log_every", 50), enable_model_summary=False,
    )


def fit(module: pl.LightningModule, train: DictConfig, trainer: pl.Trainer, last: str, resume: bool) -> None:
    """Train `module` on `train.data`, resuming from `last` when `resume`; always leave `last` up to date."""
    dataset = FCDiffusionDataset(train.data, resolution=train.resolution)
    loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True, num_workers=train.num_workers,
                        drop_last=len(dataset) >= train.batch_size, persistent_workers=train.num_workers > 0)
    trainer.fit(module, loader, ckpt_path=last if resume else None)
    trainer.save_checkpoint(last)
