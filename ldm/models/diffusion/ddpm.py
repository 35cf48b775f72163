"""Latent diffusion (Rombach et al. 2022) as a LightningModule, with the buffers and key layout of SD 2.x.

A frozen autoencoder maps images to latents (`first_stage_model`), a frozen text encoder maps prompts to
cross-attention context (`cond_stage_model`), and the UNet (`model.diffusion_model`) learns to predict the
noise added by the forward process q(x_t | x_0) of a linear beta schedule.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.checkpoint import load_weights
from ldm.models.diffusion.sampling import sample
from ldm.models.diffusion.scheduler import Scheduler
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import FOREACH, count_params, instantiate_from_config


def freeze(module: nn.Module) -> nn.Module:
    """Put `module` in eval mode and stop its gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (SD's key prefix `model.diffusion_model.`) and routes conditioning."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str = "crossattn"):
        super().__init__()
        if conditioning_key != "crossattn":
            raise ValueError(f"only conditioning_key 'crossattn' (SD 2.x text-to-image) is supported, "
                             f"got '{conditioning_key}'")
        self.diffusion_model = instantiate_from_config(diff_model_config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(x, timesteps=t, context=context)


class LatentDiffusion(pl.LightningModule):
    """SD 2.x latent diffusion with eps-prediction. Constructor arguments follow SD's YAML `params:`; the keys SD's
    files carry for code this codebase does not have (`monitor`, `use_ema`, ...) are accepted and checked by
    `ldm.util.instantiate_from_config` (`SD_ONLY_PARAMS`), so SD 2.x YAML files build unchanged.
    """

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any],
        linear_start: float = 0.00085,
        linear_end: float = 0.0120,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        first_stage_key: str = "jpg",
        cond_stage_key: str = "txt",
        image_size: int = 64,
        channels: int = 4,
        conditioning_key: str = "crossattn",
        scale_factor: float = 0.18215,
        parameterization: str = "eps",
        learning_rate: float = 1e-4,
        ckpt_path: str | None = None,
    ):
        super().__init__()
        if parameterization != "eps":
            raise ValueError(f"only parameterization 'eps' (SD 2.1-base) is supported, got '{parameterization}'")
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.image_size, self.channels = image_size, channels
        self.scale_factor = scale_factor
        self.learning_rate = learning_rate

        self.model = DiffusionWrapper(unet_config, conditioning_key)
        # image key -> its posterior's parameters, or None: encode every batch (`first_stage_posterior`)
        self.latent_cache: dict[str, torch.Tensor] | None = None
        self.first_stage_model = freeze(instantiate_from_config(first_stage_config))
        self.cond_stage_model = freeze(instantiate_from_config(cond_stage_config))
        self.register_schedule(beta_schedule, timesteps, linear_start, linear_end)
        if ckpt_path is not None:
            load_weights(self, ckpt_path)

    def register_schedule(self, beta_schedule: str, timesteps: int, linear_start: float, linear_end: float) -> None:
        """Register the 12 float32 schedule buffers of SD's state dict (computed in float64)."""
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        self.num_timesteps = timesteps

    frozen_submodules = ("first_stage_model", "cond_stage_model")

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Switch train/eval mode, keeping the frozen submodules in eval (no dropout, fixed statistics)."""
        super().train(mode)
        for name in self.frozen_submodules:
            getattr(self, name).eval()
        return self

    # ---- forward process and loss -------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        shape = (-1,) + (1,) * (x_start.ndim - 1)
        return (self.sqrt_alphas_cumprod[t].view(shape) * x_start
                + self.sqrt_one_minus_alphas_cumprod[t].view(shape) * noise)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The eps-prediction MSE ('simple' loss of DDPM) at timesteps `t`."""
        noise = torch.randn_like(x_start) if noise is None else noise
        eps = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        loss = F.mse_loss(eps.float(), noise.float())
        return loss, {"train/loss_simple": loss.detach(), "train/loss": loss.detach()}

    # ---- conditioning and autoencoder ------------------------------------------------------------------------
    @torch.no_grad()
    def get_learned_conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text -> cross-attention context (B, 77, width), with the frozen text encoder."""
        return self.cond_stage_model.encode(list(prompts))

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor):
        """Images (B, 3, H, W) in [-1, 1] -> the autoencoder's diagonal Gaussian posterior."""
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def first_stage_posterior(self, x: torch.Tensor, keys: Sequence[str] | None = None) -> DiagonalGaussianDistribution:
        """The posterior of images `x` (`encode_first_stage`). With `latent_cache` a dict and `keys` naming the images
        (a batch's "path"), a batch whose images were all seen before is served from the cache and any other batch
        is encoded and cached: the frozen encoder runs once per image instead of at every step, for training on the
        same fixed images many times (no random crops: the caller checks). The same parameters, so the same
        latents."""
        cache = self.latent_cache
        if cache is not None and keys is not None and all(key in cache for key in keys):
            return DiagonalGaussianDistribution(torch.stack([cache[key] for key in keys]))
        posterior = self.encode_first_stage(x)
        if cache is not None and keys is not None:
            cache.update(zip(keys, posterior.parameters))
        return posterior

    def get_first_stage_encoding(self, posterior: Any, sample: bool = True,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """A scaled latent from the posterior: a sample (training, as SD) or its mean."""
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str | None = None, bs: int | None = None,
                  sample_posterior: bool = True) -> tuple[torch.Tensor, Any]:
        """Batch (images HWC in [-1, 1] under `first_stage_key`, prompts under `cond_stage_key`) -> (z, context)."""
        x = batch[k or self.first_stage_key]
        x = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
        x = rearrange(x, "b h w c -> b c h w").to(self.device, memory_format=torch.contiguous_format).float()
        prompts = list(batch[self.cond_stage_key])
        keys = list(batch["path"]) if "path" in batch else None
        if bs is not None:
            x, prompts, keys = x[:bs], prompts[:bs], keys and keys[:bs]
        z = self.get_first_stage_encoding(self.first_stage_posterior(x, keys), sample=sample_posterior)
        return z, self.get_learned_conditioning(prompts)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """eps(x_t, t, c). `cond` is the context tensor or {'c_crossattn': [context]}."""
        if isinstance(cond, Mapping):
            cond = torch.cat(cond["c_crossattn"], 1)
        return self.model(x_noisy, t, cond)

    # ---- Lightning hooks ----------------------------------------------------------------------------------
    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = self.get_input(batch)
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=self.device)
        return self.p_losses(z, c, t)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs = self.shared_step(batch)
        self.log_dict(logs, prog_bar=True, on_step=True, batch_size=len(batch[self.cond_stage_key]))
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates; subclasses narrow this (e.g. only the control net)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate, foreach=FOREACH)

    # ---- sampling -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4, steps: int = 25, guidance_scale: float = 5.0,
                   seed: int = 0) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] for grids: the sources, their reconstructions, and text-to-image samples of their
        prompts (guided DDIM from seeded noise, so grids of successive steps compare)."""
        z, context = self.get_input(batch, bs=N, sample_posterior=False)
        uncond = self.get_learned_conditioning([""] * z.shape[0])
        x_T = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
        scheduler = Scheduler(self.alphas_cumprod).set_timesteps(steps)
        samples = sample(self.apply_model, x_T, scheduler.steps(z.device), context, uncond, guidance_scale)
        x = torch.as_tensor(np.asarray(batch[self.first_stage_key]))[:N]
        return {"source": rearrange(x, "b h w c -> b c h w").float(), "reconstruction": self.decode_first_stage(z),
                "samples": self.decode_first_stage(samples).clamp(-1, 1)}

    def describe(self) -> str:
        """One line with parameter counts, for logs."""
        return (f"{type(self).__name__}: {count_params(self) / 1e6:.2f}M parameters, "
                f"{count_params(self, trainable_only=True) / 1e6:.2f}M trainable")
