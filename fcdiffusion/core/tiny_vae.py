"""A tiny autoencoder (TAESD, or one `distill_tiny_vae.py` made) in place of a model's VAE at inference.

`load_tiny_vae(path, use, device, precision)` gives the `TinyVAE` that `Translator(model, tiny_vae)` encodes the
sources with, decodes the results with, or both (`use`); the model itself keeps its VAE, so whatever else reads
it (the evaluation's re-encoding, training) is unchanged. Its latents are the model's scaled latents
(`ldm.models.tiny_autoencoder`), and it must downsample as the model's VAE does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from fcdiffusion.core.precision import precision_dtype, vae_dtype
from ldm.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig, load_tiny_autoencoder

TINY_VAE_USES = ("both", "encode", "decode")
TINY_VAE_HELP = ("a tiny autoencoder standing in for the model's VAE (faster, slightly less faithful): TAESD's "
                 "taesd_encoder.pth/taesd_decoder.pth pair (a file of it, or its folder), or a diffusers "
                 "AutoencoderTiny folder such as distill_tiny_vae.py writes")
TINY_VAE_USE_HELP = "what the tiny autoencoder does: encode the sources, decode the results, or both (default)"


def vae_downsampling(model: Any) -> int:
    """How many pixels per latent cell the VAE of `model` (a `LatentDiffusion`) has: 2 per level after the first."""
    return 2 ** (len(model.first_stage_model.encoder.down) - 1)


@dataclass
class TinyVAE:
    """A tiny autoencoder and what it does in place of the model's VAE (`use`: both, encode or decode)."""

    autoencoder: TinyAutoencoder
    use: str = "both"
    source: str = ""

    def __post_init__(self) -> None:
        if self.use not in TINY_VAE_USES:
            raise ValueError(f"unknown tiny VAE use {self.use!r}; valid: {', '.join(TINY_VAE_USES)}")

    @property
    def encodes(self) -> bool:
        return self.use in ("both", "encode")

    @property
    def decodes(self) -> bool:
        return self.use in ("both", "decode")

    def settings(self) -> dict[str, str]:
        """What a run's settings record about it."""
        return {"tiny_vae": self.source, "tiny_vae_use": self.use}

    def check(self, model: Any) -> None:
        """A ValueError unless it stands in for the VAE of `model`: the same downsampling, the same latent channels."""
        config, factor = self.autoencoder.config, vae_downsampling(model)
        if self.autoencoder.downsampling_factor != factor or config.latent_channels != model.channels:
            raise ValueError(
                f"the tiny autoencoder {self.source or ''} downsamples {self.autoencoder.downsampling_factor}x to "
                f"{config.latent_channels} latent channels, the model's VAE {factor}x to {model.channels}: use one "
                "made for this VAE (TAESD for SD's; distill_tiny_vae.py for another)")

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the model's scaled latents, float32."""
        weight = next(self.autoencoder.parameters())
        return self.autoencoder.encode(images.to(weight.device, weight.dtype).contiguous()).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's scaled latents -> images in about [-1, 1], float32."""
        weight = next(self.autoencoder.parameters())
        return self.autoencoder.decode(latents.to(weight.device, weight.dtype)).float()


def load_tiny_vae(path: str | os.PathLike, use: str = "both", device: torch.device | str = "cpu",
                  precision: str = "fp32") -> TinyVAE:
    """The tiny autoencoder at `path` (`load_tiny_autoencoder`) on `device`, in the dtype the model's VAE gets at
    `precision` (`vae_dtype`), doing `use`."""
    dtype = vae_dtype(precision_dtype(precision))
    autoencoder = load_tiny_autoencoder(path).to(device=device, dtype=dtype)
    return TinyVAE(autoencoder, use, os.fspath(path))


def random_tiny_vae(model: Any, seed: int = 0, use: str = "both") -> TinyVAE:
    """A TAESD-width tiny autoencoder with random weights for the VAE of `model`, on its device (for timing)."""
    torch.manual_seed(seed)
    stages = vae_downsampling(model).bit_length() - 1
    config = TinyAutoencoderConfig.for_stages(stages, latent_channels=model.channels)
    return TinyVAE(TinyAutoencoder(config).eval().to(model.device), use, "random weights")
