"""Train one FCDiffusion teacher (one control mode) with Lightning.

    python fcdiffusion_train.py                                   # control_mode from configs/model_config.yaml
    python fcdiffusion_train.py --control_mode high_pass --devices 8 --strategy ddp --num_nodes 2

Settings come from the config's `train:` section; flags override them, and `key.sub=value` arguments override
any config entry (e.g. `model.params.frequency_thresholds.low_threshold=20`). Checkpoints go to
`<logdir>/fcdiffusion_<mode>_checkpoint/`; running the same command again resumes from its `last.ckpt`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Optional, Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from fcdiffusion.dataset import FCDiffusionDataset
from fcdiffusion.image_logger import ImageLogger
from fcdiffusion.model import check_control_mode
from fcdiffusion.paths import DOWNLOAD_HELP
from ldm.checkpoint import CheckpointMismatchError, load_weights
from ldm.util import instantiate_from_config, load_config

log = logging.getLogger("fcdiffusion_train")

# Flags that override `train:` entries of the config; None means "take the config's value".
TRAIN_FLAGS = {
    "resume_path": (str, "initial checkpoint (from tool_add_control_sd21.py), used when no last.ckpt exists"),
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
    "strategy": (str, "Lightning strategy: auto, ddp, deepspeed_stage_2, fsdp, ..."),
    "num_nodes": (int, "number of nodes"),
    "logdir": (str, "root folder of logs and checkpoints"),
    "seed": (int, "random seed"),
}


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/model_config.yaml", help="model and training config (YAML)")
    parser.add_argument("--control_mode", help="mini_pass, low_pass, mid_pass or high_pass (default: the config's)")
    parser.add_argument("--sd_locked", type=str2bool, help="true: train only the control net; false: also the UNet decoder")
    for name, (kind, help_text) in TRAIN_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind, help=help_text)
    return parser.parse_known_args(argv)


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    """The config with flags applied: flags win over dotlist overrides, which win over the file."""
    config = load_config(args.config, overrides)
    for name in TRAIN_FLAGS:
        if getattr(args, name) is not None:
            config.train[name] = getattr(args, name)
    params = config.model.params
    if args.control_mode is not None:
        params.control_mode = args.control_mode
    if args.sd_locked is not None:
        params.sd_locked = args.sd_locked
    params.learning_rate = config.train.learning_rate
    check_control_mode(params.control_mode)
    return config


def checkpoint_dir(config: DictConfig) -> str:
    return os.path.join(config.train.logdir, f"fcdiffusion_{config.model.params.control_mode}_checkpoint")


def devices_arg(value: Any) -> Any:
    """Lightning accepts 'auto', an int, or a list/string of ids."""
    text = str(value)
    return int(text) if text.isdigit() else text


def build_trainer(config: DictConfig, extra_callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    train = config.train
    ckpt_dir = checkpoint_dir(config)
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:06d}", every_n_train_steps=train.checkpoint_every,
                        save_top_k=-1, save_last=True, auto_insert_metric_name=False),
        ImageLogger(every_n_steps=train.log_images_every, max_images=min(4, train.batch_size),
                    out_dir=os.path.join(ckpt_dir, "image_log")),
        *extra_callbacks,
    ]
    return pl.Trainer(
        max_steps=train.max_steps, accelerator=train.accelerator, devices=devices_arg(train.devices),
        strategy=train.strategy, num_nodes=train.num_nodes, precision=train.precision, callbacks=callbacks,
        logger=CSVLogger(train.logdir, name=f"fcdiffusion_{config.model.params.control_mode}"),
        default_root_dir=train.logdir, log_every_n_steps=train.log_every, enable_model_summary=False,
    )


def main(argv: Optional[Sequence[str]] = None, extra_callbacks: Sequence[pl.Callback] = ()) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    try:
        config = resolve_config(args, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train = config.train
    pl.seed_everything(train.seed, workers=True)
    last = os.path.join(checkpoint_dir(config), "last.ckpt")
    resume = os.path.isfile(last)
    try:
        model = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
        if resume:
            log.info("resuming from %s", last)
        else:
            load_weights(model, train.resume_path, hint=DOWNLOAD_HELP)
    except FileNotFoundError as error:
        print(f"error: {error}\n\n{DOWNLOAD_HELP}" if DOWNLOAD_HELP not in str(error) else f"error: {error}",
              file=sys.stderr)
        return 1
    except CheckpointMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    log.info("%s; control mode %s", model.describe(), model.control_mode)
    dataset = FCDiffusionDataset(train.data, resolution=train.resolution)
    loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True, num_workers=train.num_workers,
                        drop_last=len(dataset) >= train.batch_size, persistent_workers=train.num_workers > 0)
    trainer = build_trainer(config, extra_callbacks)
    trainer.fit(model, loader, ckpt_path=last if resume else None)
    trainer.save_checkpoint(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
