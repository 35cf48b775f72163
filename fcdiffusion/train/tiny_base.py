"""Tiny stand-ins for the downloaded weights: an SD-layout base checkpoint and an OpenCLIP text-tower file.

The files have the formats of `v2-1_512-ema-pruned.ckpt` and `open_clip_pytorch_model.bin` at the size of
`configs/sd21_tiny.yaml`, so every script runs on them unchanged. Weights are random; layers SD initialises to
zero (the UNet's output convolutions) are redrawn, otherwise the UNet would predict eps = 0 whatever its input
and no gradient could reach a control net through it.
"""
from __future__ import annotations

import os

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import save_state_dict
from ldm.util import instantiate_from_config, load_config, without_text_encoder_file

TINY_SD_CHECKPOINT = "models/v2-1_tiny.ckpt"
TINY_OPENCLIP_CHECKPOINT = "CLIP-ViT-H-14/open_clip_tiny.bin"


def redraw_zero_parameters(module: torch.nn.Module, std: float, generator: torch.Generator) -> int:
    """Fill every all-zero parameter with N(0, std^2); returns how many tensors were redrawn."""
    redrawn = 0
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
                redrawn += 1
    return redrawn


def build_tiny_text_tower(clip_path: str | os.PathLike = TINY_OPENCLIP_CHECKPOINT,
                          config: str = "configs/sd21_tiny.yaml", seed: int = 0) -> None:
    """Write a random tiny OpenCLIP text tower to `clip_path`, in open_clip's layout.

    The quickstart trains the autoencoder and the UNet but not this (a prompt encoder needs far more text than a
    few captions); fixed random features still tell its prompts apart.
    """
    torch.manual_seed(seed)
    cfg = without_text_encoder_file(OmegaConf.to_container(load_config(config).model, resolve=True))
    save_state_dict(instantiate_from_config(cfg["params"]["cond_stage_config"]).model.state_dict(), clip_path)


def build_tiny_base(sd_path: str | os.PathLike = TINY_SD_CHECKPOINT,
                    clip_path: str | os.PathLike = TINY_OPENCLIP_CHECKPOINT,
                    config: str = "configs/sd21_tiny.yaml", seed: int = 0, std: float = 0.02) -> None:
    """Write a random tiny SD checkpoint to `sd_path` and its text tower, in open_clip's layout, to `clip_path`."""
    torch.manual_seed(seed)
    cfg = OmegaConf.to_container(load_config(config).model, resolve=True)
    model = instantiate_from_config(without_text_encoder_file(cfg))
    redraw_zero_parameters(model.model, std, torch.Generator().manual_seed(seed))
    save_state_dict(model.state_dict(), sd_path)
    save_state_dict(model.cond_stage_model.model.state_dict(), clip_path)
