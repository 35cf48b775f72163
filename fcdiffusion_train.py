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

from fcdiffusion.core.frequency import check_control_mode
from fcdiffusion.core.paths import DOWNLOAD_HELP, LAST_CHECKPOINT, teacher_checkpoint_dir
from fcdiffusion.train.data_module import RunData
from fcdiffusion.train.training import (
    RUN_FLAGS,
    add_flags,
    apply_flags,
    build_trainer,
    check_train_section,
    fit,
    locked_run,
    resolve_command_line,
    resume_checkpoint,
    resume_conflicts,
    str2bool,
)
from ldm.checkpoint import CheckpointMismatchError, load_weights
from ldm.util import instantiate_from_config, load_config

log = logging.getLogger("fcdiffusion_train")

# What a resumed run must share with its checkpoint (the optimizer state and the task depend on them).
RESUME_FIXED = ("sd_locked", "frequency_thresholds", "control_scales")
TRAIN_FLAGS = {"resume_path": (str, "initial checkpoint (tool_add_control_sd21.py), used when no last.ckpt exists"),
               **RUN_FLAGS}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/model_config.yaml", help="model and training config (YAML)")
    parser.add_argument("--control_mode", help="mini_pass, low_pass, mid_pass or high_pass (default: the config's)")
    parser.add_argument("--sd_locked", type=str2bool,
                        help="true: train only the control net; false: also the UNet decoder")
    add_flags(parser, TRAIN_FLAGS)
    return parser.parse_known_args(argv)


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    """The config with flags applied: flags win over dotlist overrides, which win over the file."""
    config = load_config(args.config, overrides)
    apply_flags(config.train, args, TRAIN_FLAGS)
    params = config.model.params
    if args.control_mode is not None:
        params.control_mode = args.control_mode
    if args.sd_locked is not None:
        params.sd_locked = args.sd_locked
    params.learning_rate = config.train.learning_rate
    check_control_mode(params.control_mode)
    check_train_section(config.train)
    return config


def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence[pl.Callback] = ()) -> int:
    config = resolve_command_line(argv, parse_args, resolve_config)
    if config is None:
        return 2
    return locked_run(config.train, checkpoint_folder(config), lambda data: run(config, data, extra_callbacks))


def checkpoint_folder(config: DictConfig) -> str:
    """Where this teacher's checkpoints go (one folder per control mode)."""
    train = config.train
    return os.fspath(os.fspath(teacher_checkpoint_dir(train.logdir, config.model.params.control_mode)))


def run(config: DictConfig, data: RunData, extra_callbacks: Sequence[pl.Callback]) -> int:
    """The run itself, in a locked checkpoint folder: resume or initialise, then fit; the exit status."""
    train, mode, folder = config.train, config.model.params.control_mode, checkpoint_folder(config)
    pl.seed_everything(train.seed, workers=True)
    resume = resume_checkpoint(folder)
    try:
        model = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
        if resume:
            conflicts = resume_conflicts(resume[1], model.model_config()["params"], RESUME_FIXED)
            if conflicts:
                print(f"error: {resume[0]} was trained with other settings ({'; '.join(conflicts)}); resume with "
                      "the same settings, or train into another --logdir", file=sys.stderr)
                return 2
            log.info("resuming from %s", resume[0])
        else:
            load_weights(model, train.resume_path, hint=DOWNLOAD_HELP)
    except FileNotFoundError as error:
        print(f"error: {error}\n\n{DOWNLOAD_HELP}" if DOWNLOAD_HELP not in str(error) else f"error: {error}",
              file=sys.stderr)
        return 1
    except CheckpointMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a config the model refuses (e.g. a frequency band empty at this latent size)
        print(f"error: {error}", file=sys.stderr)
        return 2
    log.info("%s; control mode %s", model.describe(), model.control_mode)
    trainer = build_trainer(train, folder, f"fcdiffusion_{mode}", extra_callbacks)
    return fit(model, data, train, trainer, resume[0] if resume else None, os.path.join(folder, LAST_CHECKPOINT))


if __name__ == "__main__":
    sys.exit(main())
