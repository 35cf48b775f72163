"""SD's KL-regularised autoencoder (`first_stage_model`), inference only.

The VAE is never trained here, so the training-only arguments of SD's class (the loss, EMA, monitor, ...)
are accepted for config compatibility and ignored; in particular `lossconfig` builds nothing, which keeps
LPIPS/discriminator weights (and their downloads) out of the model and its state dict.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ldm.checkpoint import check_state_dict, load_state_dict
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """Image <-> latent. Keys: `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` (SD's layout)."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        lossconfig: Mapping[str, Any] | None = None,
        ckpt_path: str | os.PathLike | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True: the encoder must output mean and logvar")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def init_from_ckpt(self, path: str | os.PathLike, ignore_keys: Sequence[str] = ()) -> None:
        """Load a VAE checkpoint strictly, after dropping keys that start with any of `ignore_keys` (e.g. 'loss')."""
        state_dict = load_state_dict(path, hint="pass the autoencoder checkpoint as ckpt_path")
        kept = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_keys)}
        check_state_dict(self.state_dict(), kept, os.fspath(path))
        self.load_state_dict(kept)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `x` through a posterior sample (or its mode); returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
