"""Start SD's autoencoder as a resampler: encode = 2^n x 2^n average pooling, decode = bilinear upsampling.

Trained from random weights, a tiny `AutoencoderKL` needs hours before its reconstructions are sharp; the
quickstart has minutes. So, when its config asks for it (`train: init: resampler`), the quickstart's autoencoder
starts as a plain resampler built from SD's own layers, and training refines it from there: the latent's first
three channels are the source's colours, averaged over each f x f block, and the decoder interpolates them back.
Every weight stays trainable; nothing in the architecture changes.

How SD's layers are set, for an image x with colour channels x_k (k = 0, 1, 2):
- every residual block adds zero (its last conv is zero), so a block is its shortcut: the identity, or a 1x1
  conv that maps the same channels across a change of width; attention blocks add zero too (`proj_out` = 0);
- a downsampling conv averages each channel over 2x2 blocks; an upsampling conv (after SD's nearest-neighbour
  doubling) blurs each channel with [1, 2, 1] x [1, 2, 1] / 16, which together is bilinear interpolation; the
  decoder's first conv sharpens the latent (identity + `sharpening` x (identity - that blur)) against the blur
  of averaging then interpolating (on the scikit-image photos at 128 px and f = 4: 21.5 dB PSNR unsharpened,
  22.8 dB with sharpening 1);
- the one GroupNorm and SiLU on the main path (before each `conv_out`) would erase a channel's level, so every
  colour travels as a quad of channels (x_k, -x_k, C, -C) that fills one norm group: the group's mean is 0, its
  variance is dominated by the constant C, so the norm only divides by a nearly fixed number, and
  SiLU(a) - SiLU(-a) = a recovers the colour exactly in the next conv. This needs 4 or 8 channels per group
  (`ddconfig.norm_groups`) and 3 groups at each end of the network.
The remaining error is (1 + x^2 / C^2)^(-1/2) - 1, under 1% for C = 8 and x in [-1, 1]. The latent's other
channels start at zero and the posterior's log-variance at `logvar`, so the sampled latents are nearly exact.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock, Downsample, ResnetBlock, Upsample

COLOURS = 3


def _group_size(norm: nn.GroupNorm) -> int:
    size = norm.num_channels // norm.num_groups
    if size < 4 or norm.num_groups < COLOURS:
        raise ValueError(f"a resampler start needs >= 4 channels per norm group and >= {COLOURS} groups at each end; "
                         f"got {norm.num_channels} channels in {norm.num_groups} groups (set ddconfig.norm_groups)")
    return size


def _quads(width: int, group: int) -> list[int]:
    """First channel of each colour's quad in a layer of `width` channels: one quad per norm group."""
    starts = [k * group for k in range(COLOURS)]
    if starts[-1] + 4 > width:
        raise ValueError(f"{width} channels cannot hold {COLOURS} quads {group} channels apart")
    return starts


@torch.no_grad()
def _carry(conv: nn.Conv2d, source: list[int], target: list[int], kernel: torch.Tensor | None = None) -> None:
    """Make `conv` copy each quad of channels at `source` to `target` (per channel, with `kernel` or 1x1)."""
    conv.weight.zero_()
    conv.bias.zero_()
    size = conv.weight.shape[-1]
    if kernel is None:
        kernel = torch.zeros(size, size)
        kernel[size // 2, size // 2] = 1.0
    for s, t in zip(source, target, strict=True):
        for i in range(4):
            conv.weight[t + i, s + i] = kernel


def _blur() -> torch.Tensor:
    tap = torch.tensor([1.0, 2.0, 1.0]) / 4
    return torch.outer(tap, tap)


def _delta() -> torch.Tensor:
    kernel = torch.zeros(3, 3)
    kernel[1, 1] = 1.0
    return kernel


@torch.no_grad()
def _colours_in(conv: nn.Conv2d, quads: list[int], constant: float, kernel: torch.Tensor) -> None:
    """`conv` (input: colours or latent) writes the quads (x_k, -x_k, C, -C) from its input channels 0..2."""
    conv.weight.zero_()
    conv.bias.zero_()
    for k, q in enumerate(quads):
        conv.weight[q, k] = kernel
        conv.weight[q + 1, k] = -kernel
        conv.bias[q + 2], conv.bias[q + 3] = constant, -constant


@torch.no_grad()
def _colours_out(conv: nn.Conv2d, quads: list[int], group: int, constant: float) -> None:
    """`conv` reads x_k back from each normalised quad: (SiLU(a) - SiLU(-a)) times the norm's divisor."""
    conv.weight.zero_()
    conv.bias.zero_()
    centre = conv.weight.shape[-1] // 2
    divisor = constant * math.sqrt(2.0 / group)  # sqrt(2 C^2 / group): the group's std when x_k = 0
    for k, q in enumerate(quads):
        conv.weight[k, q, centre, centre] = divisor
        conv.weight[k, q + 1, centre, centre] = -divisor


@torch.no_grad()
def _quiet_residuals(module: nn.Module, groups: int) -> None:
    """Residual blocks and attention add zero; width-changing shortcuts and resampling convs carry the quads."""
    for block in module.modules():
        if isinstance(block, ResnetBlock):
            nn.init.zeros_(block.conv2.weight)
            nn.init.zeros_(block.conv2.bias)
            if isinstance(block.nin_shortcut, nn.Conv2d):
                c_in, c_out = block.nin_shortcut.in_channels, block.nin_shortcut.out_channels
                _carry(block.nin_shortcut, _quads(c_in, c_in // groups), _quads(c_out, c_out // groups))
        elif isinstance(block, AttnBlock):
            nn.init.zeros_(block.proj_out.weight)
            nn.init.zeros_(block.proj_out.bias)
        elif isinstance(block, Downsample) and block.with_conv:
            average = torch.zeros(3, 3)
            average[:2, :2] = 0.25  # after SD's right/bottom pad, the 3x3 stride-2 window starts at the 2x2 block
            quads = _quads(block.conv.in_channels, block.conv.in_channels // groups)
            _carry(block.conv, quads, quads, average)
        elif isinstance(block, Upsample) and block.with_conv:
            quads = _quads(block.conv.in_channels, block.conv.in_channels // groups)
            _carry(block.conv, quads, quads, _blur())


@torch.no_grad()
def init_as_resampler(vae: AutoencoderKL, constant: float = 8.0, logvar: float = -10.0, sharpening: float = 1.0
                      ) -> AutoencoderKL:
    """Set `vae`'s weights so that it starts as average pooling + bilinear upsampling (module docstring)."""
    encoder, decoder = vae.encoder, vae.decoder
    groups = encoder.norm_out.num_groups
    if decoder.norm_out.num_groups != groups:
        raise ValueError("the encoder and decoder must use the same norm_groups")
    z_channels = vae.quant_conv.out_channels // 2
    if z_channels < COLOURS or encoder.conv_in.in_channels != COLOURS or decoder.conv_out.out_channels != COLOURS:
        raise ValueError(f"a resampler start needs RGB images and >= {COLOURS} latent channels")
    for module in (encoder, decoder):
        _quiet_residuals(module, groups)
    enc_group, dec_group = _group_size(encoder.norm_out), _group_size(decoder.norm_out)
    _colours_in(encoder.conv_in, _quads(encoder.conv_in.out_channels, encoder.conv_in.out_channels // groups), constant,
                _delta())
    _colours_out(encoder.conv_out, _quads(encoder.norm_out.num_channels, enc_group), enc_group, constant)
    encoder.conv_out.bias[z_channels:] = logvar
    sharpen = _delta() + sharpening * (_delta() - _blur())
    _colours_in(decoder.conv_in, _quads(decoder.conv_in.out_channels, decoder.conv_in.out_channels // groups), constant,
                sharpen)
    _colours_out(decoder.conv_out, _quads(decoder.norm_out.num_channels, dec_group), dec_group, constant)
    for conv in (vae.quant_conv, vae.post_quant_conv):
        nn.init.eye_(conv.weight[:, :, 0, 0])
        nn.init.zeros_(conv.bias)
    return vae
