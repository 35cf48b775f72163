"""Train Stable Diffusion's own parts from a config: its autoencoder, or its text-to-image UNet.

    python train_sd.py --config configs/autoencoder_tiny.yaml --data datasets/quickstart/training_data.json \
        --export models/autoencoder_tiny.safetensors
    python train_sd.py --config configs/sd21_tiny.yaml --data datasets/quickstart/training_data.json \
        --autoencoder models/autoencoder_tiny.safetensors --export models/v2-1_tiny.ckpt

Only the quickstart needs this: SD 2.1-base comes trained, while the tiny stand-ins must learn from photos before
the FCDiffusion steps mean anything. The config's `model:` is an `AutoencoderKL` (trained on pixels) or a
`LatentDiffusion` (its UNet trained on the frozen autoencoder's latents, with the frozen text encoder); its
`train:` section and the flags are those of fcdiffusion_train.py, plus `augment:` (random crops and flips, for few
photos) and `init:` (`resampler`: an autoencoder starts as average pooling + bilinear upsampling, see
fcdiffusion/train/resampler_init.py). Checkpoints go to `<logdir>/<config name>_checkpoint/` and the same command
resumes. When training is done, `--export FILE` writes the weights in SD's layout; an autoencoder's latents are
first rescaled so that SD's scale_factor (0.18215) gives the training photos unit-variance latents, as it does for
SD's own VAE.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from fcdiffusion import cli
from fcdiffusion.core.paths import LAST_CHECKPOINT
from fcdiffusion.train.data_module import RunData
from fcdiffusion.train.dataset import FCDiffusionDataset
from fcdiffusion.train.pretraining import SD_SCALE_FACTOR, normalise_latents, reconstruction_psnr
from fcdiffusion.train.resampler_init import init_as_resampler
from fcdiffusion.train.training import build_trainer, check_train_section, fit, locked_run, resume_checkpoint
from ldm.checkpoint import save_state_dict
from ldm.models.autoencoder import AutoencoderKL
from ldm.util import instantiate_from_config, load_config

log = logging.getLogger("train_sd")

# `train: init:` values: how an AutoencoderKL starts instead of random weights (a resumed run keeps its own).
AUTOENCODER_INITS = {"resampler": init_as_resampler}


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--config", required=True, help="an AutoencoderKL or LatentDiffusion config with train:")
    parser.add_argument("--autoencoder", help="trained autoencoder weights for a LatentDiffusion config "
                        "(sets model.params.first_stage_config.params.ckpt_path)")
    parser.add_argument("--export", help="when training is done, write the weights here (.ckpt or .safetensors)")
    cli.add_flags(parser, cli.RUN_FLAGS)
    return parser


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    config = load_config(args.config, overrides)
    if "train" not in config:
        raise ValueError(f"{args.config} has no train: section")
    cli.apply_flags(config.train, args, cli.RUN_FLAGS)
    if args.autoencoder is not None:
        config.model.params.first_stage_config.params.ckpt_path = args.autoencoder
    config.model.params.learning_rate = config.train.learning_rate
    init = config.train.pop("init", None)
    if init is not None and init not in AUTOENCODER_INITS:
        raise ValueError(f"unknown train.init {init!r}; valid: {', '.join(AUTOENCODER_INITS)} (or leave it out)")
    config.init = init
    config.name = Path(args.config).stem
    config.export = args.export
    check_train_section(config.train)
    return config


def checkpoint_folder(config: DictConfig) -> str:
    return os.path.join(config.train.logdir, f"{config.name}_checkpoint")


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Train SD's part in a locked checkpoint folder (config and data checked first), then export it."""
    config = resolve_config(args, overrides)
    with locked_run(config.train, checkpoint_folder(config)) as data:
        train_model(config, data)


def train_model(config: DictConfig, data: RunData) -> None:
    """The run itself, in a locked checkpoint folder: build, resume or initialise, fit, then export."""
    train, folder = config.train, checkpoint_folder(config)
    pl.seed_everything(train.seed, workers=True)
    resume = resume_checkpoint(folder, train.max_steps, train.optimizer)
    module = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
    if not hasattr(module, "training_step"):
        raise ValueError(f"{config.model.target} has no training step")
    if not resume and config.init is not None:
        if not isinstance(module, AutoencoderKL):
            raise ValueError(f"train.init applies to an AutoencoderKL, not {config.model.target}")
        AUTOENCODER_INITS[config.init](module)
        log.info("autoencoder starts as a %s", config.init)
    trainer = build_trainer(train, folder, config.name)
    fit(module, data, train, trainer, resume[0] if resume else None, os.path.join(folder, LAST_CHECKPOINT))
    if config.export and trainer.is_global_zero:
        export(module, config, trainer.global_step)


def export(module: pl.LightningModule, config: DictConfig, step: int) -> None:
    """Write the trained weights to `config.export`, with what made them as metadata."""
    metadata = {"train_sd.config": json.dumps(OmegaConf.to_container(config.model, resolve=True)),
                "train_sd.step": str(step)}
    if isinstance(module, AutoencoderKL):
        plain = FCDiffusionDataset(config.train.data, resolution=config.train.resolution)
        images = [plain[i]["jpg"] for i in range(len(plain))]
        factor = normalise_latents(module, images, SD_SCALE_FACTOR)
        scores = reconstruction_psnr(module, images)
        metadata["train_sd.latent_rescale"] = f"{factor:.6g}"
        log.info("latents rescaled by %.4g for scale_factor %g; training photos reconstruct at %.2f dB PSNR (mean)",
                 factor, SD_SCALE_FACTOR, sum(scores) / len(scores))
    save_state_dict(module.state_dict(), config.export, metadata)
    print(f"wrote {config.export}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv, unknown="overrides")


if __name__ == "__main__":
    sys.exit(main())
