"""SD's KL-regularised autoencoder (`first_stage_model`), with a Lightning training step.

SD 2.x inference configs set `lossconfig` to `torch.nn.Identity`; a training config names a loss such as
`ldm.modules.losses.ReconstructionKLLoss` (see there why SD's LPIPS + discriminator loss is not offered). Losses
hold no parameters, so the state dict keeps SD's layout either way. The keys SD's files carry for its own training
code (`monitor`, `colorize_nlabels`, ...) are accepted and checked by `ldm.util.instantiate_from_config`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from einops import rearrange

from ldm.checkpoint import check_state_dict, load_state_dict
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import FOREACH, instantiate_from_config

# SD's `ddconfig` is one dict for both halves; these of its keys belong to one half only.
ENCODER_ONLY, DECODER_ONLY = ("in_channels", "double_z"), ("out_ch", "give_pre_end", "tanh_out")


class AutoencoderKL(pl.LightningModule):
    """Image <-> latent. Keys: `encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*` (SD's layout).

    Trains on batches of images (B, H, W, 3) in [-1, 1] under `image_key`, through a posterior sample, with Adam
    and SD's betas (0.5, 0.9).
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        embed_dim: int,
        lossconfig: Mapping[str, Any] | None = None,
        ckpt_path: str | os.PathLike | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        learning_rate: float = 4.5e-6,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z=True: the encoder must output mean and logvar")
        self.image_key = image_key
        self.learning_rate = learning_rate
        self.loss = instantiate_from_config(lossconfig) if lossconfig is not None else nn.Identity()
        self.embed_dim = embed_dim
        self.encoder = Encoder(**{k: v for k, v in ddconfig.items() if k not in DECODER_ONLY})
        self.decoder = Decoder(**{k: v for k, v in ddconfig.items() if k not in ENCODER_ONLY})
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

    @torch.no_grad()
    def rescale_latents(self, factor: float) -> None:
        """Make the latents `factor` times larger without changing any reconstruction (an exact reparametrisation).

        The posterior's mean and standard deviation are scaled by `factor` (the mean's rows of `quant_conv` times
        `factor`, the log-variance's bias plus 2 log `factor`) and `post_quant_conv` divides its input by it. Used
        to give a freshly trained VAE latents of SD's scale, so SD's fixed `scale_factor` makes them unit-variance.
        """
        if not factor > 0:
            raise ValueError(f"factor must be positive, got {factor}")
        c = self.embed_dim
        self.quant_conv.weight[:c] *= factor
        self.quant_conv.bias[:c] *= factor
        self.quant_conv.bias[c:] += 2 * torch.log(torch.tensor(float(factor)))
        self.post_quant_conv.weight /= factor

    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The batch's images (B, H, W, 3) as (B, 3, H, W) float on this module's device."""
        images = torch.as_tensor(batch[self.image_key])
        return rearrange(images, "b h w c -> b c h w").to(self.device, memory_format=torch.contiguous_format).float()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if isinstance(self.loss, nn.Identity):
            raise ValueError("this autoencoder has no training loss: set first_stage lossconfig to a loss, e.g. "
                             "ldm.modules.losses.ReconstructionKLLoss")
        images = self.get_input(batch)
        reconstructions, posterior = self(images)
        loss, logs = self.loss(images, reconstructions, posterior)
        self.log_dict(logs, prog_bar=True, on_step=True, batch_size=images.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate, betas=(0.5, 0.9), foreach=FOREACH)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4) -> dict[str, torch.Tensor]:
        """Sources and their reconstructions (posterior mean), for the image logger."""
        images = self.get_input(batch)[:N]
        return {"source": images, "reconstruction": self.decode(self.encode(images).mode()).clamp(-1, 1)}
