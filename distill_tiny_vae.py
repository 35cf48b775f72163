"""Distil a tiny autoencoder (TAESD's architecture) from any AutoencoderKL, for fast encoding and decoding.

    python distill_tiny_vae.py --config configs/tiny_vae_distill.yaml --data datasets/training_data.json \
        --export models/tiny_vae_sd21                            # from SD 2.1-base's VAE (in its checkpoint)
    python distill_tiny_vae.py --config configs/tiny_vae_distill_tiny.yaml --vae models/autoencoder_tiny.safetensors \
        --data datasets/quickstart/training_data.json --export models/tiny_vae_tiny   # the quickstart's

The recipe (`fcdiffusion/train/tiny_vae_distill.py`): the tiny encoder regresses the big encoder's scaled latents,
the tiny decoder learns to reproduce the big decoder's images and the photos from those latents (pixel losses,
plus LPIPS when its backbone weights are there: `vae.lpips_weights`, default models/vgg16-397923af.pth; without
them the LPIPS term is off, and the log says so). It has as many stages as the VAE downsamples by 2. The config's
`vae:` names the big VAE (`config`: an AutoencoderKL config or an SD config, `weights`: its file or an SD checkpoint,
`scale_factor`), `student:` the tiny one's width and start (`init`: `linear`, the linear resampler closest to the big
VAE, fitted on `init_images` photos, or `random`) and `loss:` the weights; `train:` and the flags are those of
fcdiffusion_train.py. Checkpoints go to `<logdir>/<config name>_checkpoint/` (the tiny autoencoder and its
optimizer, never the big VAE) and the same command resumes. When training is done, `--export DIR` writes a diffusers
`AutoencoderTiny` folder (config.json + diffusion_pytorch_model.safetensors) that `--tiny_vae DIR` of
test_distillation.py, app.py and the benchmark takes, and diffusers' `AutoencoderTiny.from_pretrained` loads.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from fcdiffusion import cli
from fcdiffusion.core.paths import LAST_CHECKPOINT
from fcdiffusion.evaluation.lpips_distance import LPIPSDistance, backbone_help, default_backbone_weights
from fcdiffusion.train.data_module import RunData
from fcdiffusion.train.tiny_vae_distill import TinyVAEDistiller, load_vae, student_config
from fcdiffusion.train.training import build_trainer, check_train_section, fit, locked_run, resume_checkpoint
from ldm.models.tiny_autoencoder import TinyAutoencoder
from ldm.util import load_config

log = logging.getLogger("distill_tiny_vae")

TINY_VAE_FLAGS = {
    "vae_config": (str, "the big VAE's config: an AutoencoderKL config, or an SD config (its first_stage_config)"),
    "vae": (str, "the big VAE's weights: an autoencoder file, or an SD checkpoint holding first_stage_model.*"),
    "scale_factor": (float, "the diffusion model's latent scale factor (default: the SD config's, else 0.18215)"),
    "width": (int, "channels of the tiny autoencoder (TAESD: 64)"),
    "lpips_weight": (float, "weight of the LPIPS term (0: off)"),
    "lpips_weights": (str, "torchvision's ImageNet weights of the LPIPS backbone (default: models/<its file>)"),
}
SECTIONS = {"vae_config": ("vae", "config"), "vae": ("vae", "weights"), "scale_factor": ("vae", "scale_factor"),
            "width": ("student", "width"), "lpips_weight": ("loss", "lpips_weight"),
            "lpips_weights": ("loss", "lpips_weights")}


# `student.init` values: how the tiny autoencoder starts (a resumed run keeps its own weights).
STUDENT_INITS = ("linear", "random")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--config", default="configs/tiny_vae_distill.yaml", help="tiny VAE distillation config")
    parser.add_argument("--export", help="when training is done, write the tiny autoencoder to this folder "
                        "(diffusers' AutoencoderTiny layout)")
    cli.add_flags(parser, TINY_VAE_FLAGS)
    cli.add_flags(parser, cli.RUN_FLAGS)
    return parser


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> DictConfig:
    config = load_config(args.config, overrides)
    for section in ("vae", "train"):
        if section not in config:
            raise ValueError(f"{args.config} has no {section}: section")
    for name, (section, key) in SECTIONS.items():
        if getattr(args, name) is not None:
            config.setdefault(section, {})[key] = getattr(args, name)
    cli.apply_flags(config.train, args, cli.RUN_FLAGS)
    init = config.get("student", {}).get("init", "linear")
    if init not in STUDENT_INITS:
        raise ValueError(f"unknown student.init {init!r}; valid: {', '.join(STUDENT_INITS)}")
    config.name, config.export = Path(args.config).stem, args.export
    check_train_section(config.train)
    return config


def checkpoint_folder(config: DictConfig) -> str:
    return os.path.join(config.train.logdir, f"{config.name}_checkpoint")


def perceptual_loss(loss: DictConfig) -> tuple[Any, float]:
    """(the LPIPS network, its weight): None and 0 when the weight is 0 or the backbone's weights are missing."""
    weight = float(loss.get("lpips_weight", 0.0))
    if not weight:
        return None, 0.0
    net = loss.get("lpips_net", "vgg")
    path = loss.get("lpips_weights") or default_backbone_weights(net)
    if not os.path.isfile(path):
        log.warning("the LPIPS term is off: no backbone weights at %s\n%s", path, backbone_help(net))
        return None, 0.0
    return LPIPSDistance(net, path).model, weight


def build_module(config: DictConfig) -> TinyVAEDistiller:
    vae_section, loss = config.vae, config.get("loss", {})
    vae, config_scale = load_vae(vae_section.config, vae_section.weights)
    scale = vae_section.get("scale_factor") or config_scale or 0.18215
    perceptual, lpips_weight = perceptual_loss(loss)
    student = TinyAutoencoder(student_config(vae, int(config.get("student", {}).get("width", 64))))
    return TinyVAEDistiller(
        vae, student, scale, float(config.train.learning_rate), float(loss.get("latent_weight", 1.0)),
        float(loss.get("teacher_weight", 1.0)), float(loss.get("photo_weight", 1.0)), lpips_weight,
        loss.get("pixel_loss", "l2"), perceptual,
        source={"vae": os.fspath(vae_section.weights), "vae_config": os.fspath(vae_section.config)})


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Distil in a locked checkpoint folder, the config and data checked before the big VAE loads."""
    config = resolve_config(args, overrides)
    train, folder = config.train, checkpoint_folder(config)
    with locked_run(train, folder) as data:
        distil(config, data, folder)


def distil(config: DictConfig, data: RunData, folder: str) -> None:
    """The run itself, in the locked checkpoint `folder`: build, resume or start as a resampler, fit, then export."""
    train = config.train
    pl.seed_everything(train.seed, workers=True)
    resume = resume_checkpoint(folder, train.max_steps)
    module = build_module(config)
    if not resume and config.get("student", {}).get("init", "linear") == "linear":
        count = int(config.student.get("init_images", 16))
        module.start_linear(next(iter(DataLoader(data.train_set, batch_size=count))))
        log.info("the tiny autoencoder starts as the linear resampler closest to the VAE (fitted on %d photos)", count)
    trainer = build_trainer(train, folder, config.name)
    fit(module, data, train, trainer, resume[0] if resume else None, os.path.join(folder, LAST_CHECKPOINT))
    if config.export and trainer.is_global_zero:
        module.export(config.export, trainer.global_step)
        print(f"wrote {config.export}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv, unknown="overrides")


if __name__ == "__main__":
    sys.exit(main())
