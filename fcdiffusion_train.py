"""Train one FCDiffusion teacher (one control mode) with Lightning.

    python fcdiffusion_train.py                                   # control_mode from configs/model_config.yaml
    python fcdiffusion_train.py --control_mode high_pass --devices 8 --strategy ddp --num_nodes 2
    python fcdiffusion_train.py --data 'shards/{00000..00123}.tar' --val_data datasets/training_data_val.json
    python fcdiffusion_train.py --ema_decay 0.9999 --warmup_steps 500 --lr_schedule cosine --gradient_clip_val 1.0

Settings come from the config's `train:` section; flags override them, and `key.sub=value` arguments override
any config entry (e.g. `model.params.frequency_thresholds.low_threshold=20`). Checkpoints go to
`<logdir>/fcdiffusion_<mode>_checkpoint/`; running the same command again resumes from its `last.ckpt`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from fcdiffusion import cli
from fcdiffusion.core.frequency import ControlMode
from fcdiffusion.core.paths import DOWNLOAD_HELP, LAST_CHECKPOINT, teacher_checkpoint_dir
from fcdiffusion.train import training
from fcdiffusion.train.data_module import RunData
from ldm.checkpoint import load_weights
from ldm.util import instantiate_from_config, load_config

log = logging.getLogger("fcdiffusion_train")

# What a resumed run must share with its checkpoint (the optimizer state and the task depend on them).
RESUME_FIXED = ("sd_locked", "frequency_thresholds", "control_scales")
TRAIN_FLAGS = {"resume_path": (str, "initial checkpoint (tool_add_control_sd21.py), used when no last.ckpt exists"),
               **cli.RUN_FLAGS}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--config", default="configs/model_config.yaml", help="model and training config (YAML)")
    parser.add_argument("--control_mode", help="mini_pass, low_pass, mid_pass or high_pass (default: the config's)")
    parser.add_argument("--sd_locked", type=cli.str2bool,
                        help="true: train only the control net; false: also the UNet decoder")
    cli.add_flags(parser, TRAIN_FLAGS)
    return parser


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    """The config with flags applied: flags win over dotlist overrides, which win over the file."""
    config = load_config(args.config, overrides)
    cli.apply_flags(config.train, args, TRAIN_FLAGS)
    params = config.model.params
    if args.control_mode is not None:
        params.control_mode = args.control_mode
    if args.sd_locked is not None:
        params.sd_locked = args.sd_locked
    params.learning_rate = config.train.learning_rate
    ControlMode(params.control_mode)
    training.check_train_section(config.train)
    return config


def checkpoint_folder(config: DictConfig) -> str:
    """Where this teacher's checkpoints go (one folder per control mode)."""
    return os.fspath(teacher_checkpoint_dir(config.train.logdir, config.model.params.control_mode))


def run(args: argparse.Namespace, overrides: list[str], extra_callbacks: Sequence[pl.Callback] = ()) -> None:
    """Train one teacher in its locked checkpoint folder; the config and the data are checked before any model is
    built."""
    config = resolve_config(args, overrides)
    with training.locked_run(config.train, checkpoint_folder(config)) as data:
        train_teacher(config, data, extra_callbacks)


def train_teacher(config: DictConfig, data: RunData, extra_callbacks: Sequence[pl.Callback]) -> None:
    """The run itself, in a locked checkpoint folder: resume or initialise, then fit."""
    train, mode, folder = config.train, config.model.params.control_mode, checkpoint_folder(config)
    pl.seed_everything(train.seed, workers=True)
    resume = training.resume_checkpoint(folder, train.max_steps, train.optimizer)
    try:
        model = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
        if not resume:
            load_weights(model, train.resume_path, hint=DOWNLOAD_HELP)
    except FileNotFoundError as error:
        if DOWNLOAD_HELP in str(error):
            raise
        raise FileNotFoundError(f"{error}\n\n{DOWNLOAD_HELP}") from error
    if resume:
        conflicts = training.resume_conflicts(resume[1], model.model_config()["params"], RESUME_FIXED)
        if conflicts:
            raise ValueError(f"{resume[0]} was trained with other settings ({'; '.join(conflicts)}); resume with "
                             "the same settings, or train into another --logdir")
    log.info("%s; control mode %s", model.describe(), model.control_mode)
    trainer = training.build_trainer(train, folder, f"fcdiffusion_{mode}", extra_callbacks)
    training.fit(model, data, train, trainer, resume[0] if resume else None, os.path.join(folder, LAST_CHECKPOINT))


def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence[pl.Callback] = ()) -> int:
    return cli.main(build_parser(), lambda args, overrides: run(args, overrides, extra_callbacks), argv,
                    unknown="overrides")


if __name__ == "__main__":
    sys.exit(main())
