"""Distilling a tiny autoencoder (TAESD's architecture, `ldm.models.tiny_autoencoder`) from an `AutoencoderKL`.

TAESD's recipe, without its adversarial term: the tiny encoder regresses the big encoder's scaled latents
(`scale_factor` times the posterior mean: the diffusion model's latents), and the tiny decoder, fed those same
latents, learns to reproduce both the big decoder's image and the photo (a pixel loss each) plus, optionally, an
LPIPS term against the big decoder's image. The decoder learns from the big encoder's latents, not its own
encoder's, because at inference it decodes what the diffusion model samples in that latent space. The
adversarial term TAESD adds for sharpness is left out: a discriminator needs long, tuned training to help and
destabilises the short runs this is made for, and it trades PSNR for texture.

A fresh run starts the tiny autoencoder as a linear resampler fitted to the big VAE (`linear_start`), as
train_sd.py starts the quickstart's VAE as a resampler: the residual blocks add zero, the encoder averages 2x2
blocks at each stage and its last convolution is the least-squares map from those colour averages to the big
encoder's latents; the decoder sharpens the latents, upsamples them bilinearly (nearest doubling, then a blur),
and its last convolution is the least-squares map to the big decoder's images. On the quickstart's tiny VAE this
starts within 1 dB of it; training refines every weight from there.

The big VAE is frozen and stays out of checkpoints (they hold the tiny one, its optimizer and the run's state);
a resumed run takes it from the VAE it was given again. `export` writes a diffusers `AutoencoderTiny` folder
whose latents are the big VAE's scaled latents (scaling 1.0, shift 0.0, as TAESD's own).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from omegaconf import OmegaConf

from fcdiffusion.train.ema import averaged_weights
from ldm.checkpoint import check_state_dict, load_state_dict
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.ddpm import freeze
from ldm.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig, TinyBlock, save_diffusers_folder
from ldm.modules.losses import psnr
from ldm.util import FOREACH, instantiate_from_config, load_config

VAE_PREFIX = "vae."
PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}
SD_PREFIX = "first_stage_model."


def load_vae(config_path: str | os.PathLike, weights: str | os.PathLike) -> tuple[AutoencoderKL, float | None]:
    """The `AutoencoderKL` of a config and its weights, strictly, with the scale factor the config names if any.

    The config's `model` is an AutoencoderKL (`configs/autoencoder_tiny.yaml`) or a latent diffusion model whose
    `first_stage_config` is one (`configs/sd21_base.yaml`); the weights are an autoencoder file or a whole SD
    (or FCDiffusion) checkpoint, whose `first_stage_model.*` tensors are taken.
    """
    model = OmegaConf.to_container(load_config(os.fspath(config_path)).model, resolve=True)
    scale_factor = None
    if "first_stage_config" in model.get("params", {}):
        scale_factor = model["params"].get("scale_factor", 0.18215)
        model = model["params"]["first_stage_config"]
    params = {k: v for k, v in model.get("params", {}).items() if k not in ("ckpt_path", "lossconfig")}
    vae = instantiate_from_config({**model, "params": params})
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{config_path} describes a {type(vae).__name__}, not an AutoencoderKL (or a model with one)")
    state_dict = load_state_dict(weights, hint="pass the autoencoder's weights (or an SD checkpoint holding them)")
    if any(k.startswith(SD_PREFIX) for k in state_dict):
        state_dict = {k[len(SD_PREFIX):]: v for k, v in state_dict.items() if k.startswith(SD_PREFIX)}
    check_state_dict(vae.state_dict(), state_dict, os.fspath(weights))
    vae.load_state_dict(state_dict)
    return vae, scale_factor


def student_config(vae: AutoencoderKL, width: int = 64) -> TinyAutoencoderConfig:
    """TAESD's layout for `vae`: one stage per downsampling of the VAE, its latent channels, `width` channels."""
    return TinyAutoencoderConfig.for_stages(len(vae.encoder.down) - 1, width, vae.embed_dim)


def _kernel(values: Sequence[float]) -> torch.Tensor:
    tap = torch.tensor(values)
    return torch.outer(tap, tap)


BLUR, DELTA = _kernel([0.25, 0.5, 0.25]), _kernel([0.0, 1.0, 0.0])
AVERAGE = _kernel([0.0, 0.5, 0.5])  # a 3x3 stride-2 window at padding 1 starts one pixel before its 2x2 block


@torch.no_grad()
def _fit_conv(conv: nn.Conv2d, features: torch.Tensor, targets: torch.Tensor, max_rows: int = 200_000,
              ridge: float = 1e-6) -> None:
    """Set the 3x3 `conv` to the ridge least-squares map from `features` (B, C, H, W; C <= its inputs, the rest
    get zero weights) to `targets` (B, out, H, W), on at most `max_rows` pixels (an even subsample)."""
    channels = features.shape[1]
    rows = F.unfold(features.double(), 3, padding=1).transpose(1, 2).reshape(-1, channels * 9)
    values = targets.double().permute(0, 2, 3, 1).reshape(-1, targets.shape[1])
    keep = torch.linspace(0, len(rows) - 1, min(len(rows), max_rows)).long()
    x = torch.cat([rows[keep], torch.ones(len(keep), 1, dtype=torch.float64)], 1)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, x.T @ values[keep].to(x))
    conv.weight.zero_()
    conv.weight[:, :channels] = solution[:-1].T.reshape(-1, channels, 3, 3).to(conv.weight)
    conv.bias.copy_(solution[-1])


@torch.no_grad()
def linear_start(student: TinyAutoencoder, images: torch.Tensor, latents: torch.Tensor,
                 decoded: torch.Tensor, sharpening: float = 1.0) -> None:
    """Start `student` as the linear resampler closest to a big VAE that maps `images` (B, 3, H, W) in [-1, 1] to
    `latents` (its scaled latents) and those back to `decoded` (module docstring). ReLUs pass what they carry:
    the colours in [0, 1], and each latent channel as a (positive part, negative part) pair of channels."""
    config = student.config
    pairs = 2 * config.latent_channels
    if config.width < max(3, pairs):
        raise ValueError(f"a linear start needs width >= {max(3, pairs)} (3 colours, 2 per latent channel), got "
                         f"{config.width}")
    for block in student.modules():
        if isinstance(block, TinyBlock):
            nn.init.zeros_(block.conv[4].weight)
            nn.init.zeros_(block.conv[4].bias)
    encoder, decoder = list(student.encoder.layers), list(student.decoder.layers)
    for index, conv in enumerate(m for m in encoder[:-1] if isinstance(m, nn.Conv2d)):  # colours in, 2x2 averages
        conv.weight.zero_()
        for k in range(3):
            conv.weight[k, k] = DELTA if index == 0 else AVERAGE
        if conv.bias is not None:
            conv.bias.zero_()
    _fit_conv(encoder[-1], student.encoder.layers[:-1](images.add(1).div(2))[:, :3], latents)
    first = decoder[0]
    first.weight.zero_()
    first.bias.zero_()
    sharpen = DELTA + sharpening * (DELTA - BLUR)
    for j in range(config.latent_channels):
        first.weight[2 * j, j], first.weight[2 * j + 1, j] = sharpen, -sharpen
    for conv in (m for m in decoder[1:-1] if isinstance(m, nn.Conv2d)):  # after each nearest doubling: a blur
        conv.weight.zero_()
        for j in range(pairs):
            conv.weight[j, j] = BLUR
    features = student.decoder.layers[:-1](torch.tanh(latents / 3) * 3)[:, :pairs]
    _fit_conv(decoder[-1], features, decoded.add(1).div(2))


class TinyVAEDistiller(pl.LightningModule):
    """Trains `student` (a `TinyAutoencoder`) to stand in for the frozen `vae` whose latents the diffusion model
    sees scaled by `scale_factor`. Batches are images (B, H, W, 3) in [-1, 1] under `image_key`.

    `perceptual` (e.g. an `lpips.LPIPS`, images in [-1, 1] -> (B, 1, 1, 1)) is held outside the module's tensors
    (no checkpoint carries it); None turns the LPIPS term off.
    """

    lr_schedule: Any = None  # the run's `LRSchedule`, set by `fcdiffusion.train.training.fit`

    def __init__(self, vae: AutoencoderKL, student: TinyAutoencoder, scale_factor: float = 0.18215,
                 learning_rate: float = 1e-3, latent_weight: float = 1.0, teacher_weight: float = 1.0,
                 photo_weight: float = 1.0, lpips_weight: float = 0.0, pixel_loss: str = "l2",
                 perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 image_key: str = "jpg", source: Mapping[str, str] | None = None):
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"unknown pixel_loss {pixel_loss!r}; valid: {', '.join(PIXEL_LOSSES)}")
        if lpips_weight and perceptual is None:
            raise ValueError("lpips_weight > 0 needs the LPIPS network (perceptual)")
        if student.config.stages != len(vae.encoder.down) - 1 or student.config.latent_channels != vae.embed_dim:
            raise ValueError(f"the tiny autoencoder ({student.config.stages} stages, {student.config.latent_channels} "
                             f"latent channels) does not fit the VAE ({len(vae.encoder.down) - 1} downsamplings, "
                             f"{vae.embed_dim} channels)")
        self.vae, self.student = freeze(vae.eval()), student
        self.scale_factor, self.learning_rate, self.image_key = float(scale_factor), learning_rate, image_key
        self.weights = {"latent": latent_weight, "teacher": teacher_weight, "photo": photo_weight,
                        "lpips": lpips_weight}
        self.pixel_loss = pixel_loss
        self.__dict__["perceptual"] = perceptual  # not a submodule: frozen, and no checkpoint should hold it
        self.source = dict(source or {})

    def train(self, mode: bool = True) -> TinyVAEDistiller:
        super().train(mode)
        self.vae.eval()
        return self

    def on_fit_start(self) -> None:
        if isinstance(self.perceptual, nn.Module):
            self.perceptual.to(self.device)

    # ---- the targets and the losses --------------------------------------------------------------------------
    def get_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        images = torch.as_tensor(batch[self.image_key])
        return rearrange(images, "b h w c -> b c h w").to(self.device, memory_format=torch.contiguous_format).float()

    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the big VAE's scaled latents of `images`, the big decoder's images of them)."""
        mean = self.vae.encode(images).mode()
        return self.scale_factor * mean, self.vae.decode(mean)

    def losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(each weighted term's value, the decoder's output, the big decoder's image) for a batch of images."""
        latents, decoded = self.targets(images)
        out = self.student.decode(latents)
        pixel = PIXEL_LOSSES[self.pixel_loss]
        terms = {"latent": F.mse_loss(self.student.encode(images), latents), "teacher": pixel(out, decoded),
                 "photo": pixel(out, images)}
        if self.weights["lpips"]:
            terms["lpips"] = self.perceptual(out, decoded).mean()
        return terms, out, decoded

    @torch.no_grad()
    def start_linear(self, batch: Mapping[str, Any]) -> None:
        """`linear_start` of the tiny autoencoder, fitted on a batch of photos."""
        images = self.get_input(batch)
        linear_start(self.student, images, *self.targets(images))

    def total(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        terms, _, _ = self.losses(self.get_input(batch))
        loss = self.total(terms)
        n = len(batch[self.image_key])
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, on_step=True, batch_size=n)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=n)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """`val/loss` (the training loss), and PSNR of the tiny decoder against the photos and the big decoder's
        images, and of the tiny round trip (tiny encoder, tiny decoder) against the photos."""
        images = self.get_input(batch)
        terms, out, decoded = self.losses(images)
        roundtrip = self.student.decode(self.student.encode(images))
        n = images.shape[0]
        self.log_dict({"val/loss": self.total(terms), **{f"val/{k}": v for k, v in terms.items()},
                       "val/psnr_photo": psnr(out, images).mean(), "val/psnr_full_decoder": psnr(out, decoded).mean(),
                       "val/psnr_roundtrip": psnr(roundtrip, images).mean()}, batch_size=n, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(self.student.parameters(), lr=self.learning_rate, foreach=FOREACH)
        return {"optimizer": optimizer} if self.lr_schedule is None else self.lr_schedule.attach(optimizer)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4) -> dict[str, torch.Tensor]:
        """Sources, the big VAE's reconstructions, the tiny decoder's (of the big latents), the tiny round trips."""
        images = self.get_input(batch)[:N]
        latents, decoded = self.targets(images)
        return {"source": images, "full": decoded.clamp(-1, 1),
                "tiny_decoder": self.student.decode(latents).clamp(-1, 1),
                "tiny_both": self.student.decode(self.student.encode(images)).clamp(-1, 1)}

    # ---- checkpoints and export ---------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        """What the exported folder and the checkpoints record: the big VAE, its scale factor, the loss."""
        return {"fcdiffusion.kind": "tiny_vae",
                "fcdiffusion.tiny_vae": json.dumps({**self.source, "scale_factor": self.scale_factor,
                                                    "weights": self.weights, "pixel_loss": self.pixel_loss})}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(VAE_PREFIX)}
        checkpoint["metadata"] = self.metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The big VAE is not in the checkpoint: the loaded one fills in, so the strict load checks the rest."""
        checkpoint["state_dict"].update({VAE_PREFIX + k: v for k, v in self.vae.state_dict().items()})

    def export(self, folder: str | os.PathLike, step: int) -> None:
        """Write the tiny autoencoder (its EMA weights, with EMA on) as a diffusers `AutoencoderTiny` folder."""
        with averaged_weights(self):
            save_diffusers_folder(self.student, folder, {**self.metadata(), "fcdiffusion.step": str(step)})
