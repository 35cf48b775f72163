"""Training Stable Diffusion's own parts, for the quickstart's tiny stand-ins: the autoencoder, then the UNet.

Users of the real weights never need this (SD 2.1-base comes trained); the quickstart does, so that its tiny
models learn from real photos and their pictures mean something. `train_sd.py` runs it; what is here is what
happens after training, before the weights are written as the files the FCDiffusion scripts read.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from einops import rearrange

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.losses import psnr

SD_SCALE_FACTOR = 0.18215


def _image_batches(images: Iterable[np.ndarray], batch_size: int = 8) -> Iterable[torch.Tensor]:
    """(H, W, 3) arrays in [-1, 1] -> batches (B, 3, H, W)."""
    batch: list[torch.Tensor] = []
    for image in images:
        batch.append(torch.as_tensor(image))
        if len(batch) == batch_size:
            yield rearrange(torch.stack(batch), "b h w c -> b c h w").float()
            batch = []
    if batch:
        yield rearrange(torch.stack(batch), "b h w c -> b c h w").float()


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: Iterable[np.ndarray]) -> float:
    """The standard deviation of the posterior means of `images` (all entries together)."""
    vae.eval()
    latents = [vae.encode(batch.to(vae.device)).mode().flatten() for batch in _image_batches(images)]
    return torch.cat(latents).std().item()


def normalise_latents(vae: AutoencoderKL, images: Iterable[np.ndarray], scale_factor: float = SD_SCALE_FACTOR
                      ) -> float:
    """Rescale `vae`'s latents (exactly, see `AutoencoderKL.rescale_latents`) so that `scale_factor` times a latent
    of `images` has unit standard deviation, as SD's scale_factor does for SD's VAE; returns the factor applied.

    The LDM paper rescales latents by 1/std for the same reason: the diffusion schedule assumes unit-variance data.
    """
    factor = 1.0 / (scale_factor * latent_std(vae, images))
    vae.rescale_latents(factor)
    return factor


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: Iterable[np.ndarray]) -> list[float]:
    """PSNR in dB (see `ldm.modules.losses.psnr`) of each image's reconstruction through its posterior mean."""
    vae.eval()
    values: list[float] = []
    for batch in _image_batches(images):
        batch = batch.to(vae.device)
        values += psnr(vae.decode(vae.encode(batch).mode()), batch).tolist()
    return values
