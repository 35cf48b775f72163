"""The convolutional encoder and decoder of SD's KL autoencoder (the VAE), with SD's state-dict key names.

The VAE has no timestep input; its blocks normalise with 32-group GroupNorm (eps 1e-6, affine), unlike the
UNet's float32 GroupNorm32, so checkpoints trained with SD reproduce exactly. `norm_groups` (default SD's 32)
lets a narrow model keep SD's channels per group: at SD's width every group holds 4 to 16 channels, while 32
groups over 32 channels would normalise each channel alone and erase its mean (a tiny decoder could then not
reproduce an image's colours). The group count has no parameters, so the state-dict layout is the same.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def vae_normalization(channels: int, groups: int = 32) -> nn.GroupNorm:
    """The VAE's normalisation layer: GroupNorm(groups, channels, eps=1e-6, affine); SD uses 32 groups."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a skip; a 1x1 `nin_shortcut` adapts the skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = vae_normalization(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = vae_normalization(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1-conv q/k/v/proj_out and a residual."""

    def __init__(self, in_channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = vae_normalization(in_channels, norm_groups)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C); SDPA's default scale C^-0.5 is SD's.
        q, k, v = (conv(h).reshape(b, 1, c, height * width).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3x3 conv after padding right/bottom only (SD's asymmetric pad), or avg-pool."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then an optional 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


def _mid_block(channels: int, dropout: float, norm_groups: int) -> nn.Module:
    """resnet - attention - resnet at the lowest resolution (keys `mid.block_1`, `mid.attn_1`, `mid.block_2`)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
    mid.attn_1 = AttnBlock(channels, norm_groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)
    return mid


def _resolution_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One resolution of the encoder or decoder: its residual blocks, each followed by its attention if it has one."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _check_attn_type(attn_type: str) -> None:
    if attn_type != "vanilla":
        raise ValueError(f"attn_type '{attn_type}' is not supported; valid: 'vanilla'")


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels if double_z else z_channels, H/f, W/f).

    f = 2**(len(ch_mult) - 1). Argument names follow SD's `ddconfig` (plus `norm_groups`, see the module's
    docstring).
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        attn_type: str = "vanilla",
        norm_groups: int = 32,
    ):
        super().__init__()
        _check_attn_type(attn_type)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in, norm_groups))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid_block(block_in, dropout, norm_groups)
        self.norm_out = vae_normalization(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = _resolution_level(down, h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f), mirroring `Encoder`.

    `up.N` is resolution level N (the checkpoint's order), applied from the deepest level upward;
    `give_pre_end` returns the features before the output head, `tanh_out` squashes the output.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attn_type: str = "vanilla",
        norm_groups: int = 32,
    ):
        super().__init__()
        _check_attn_type(attn_type)
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, dropout, norm_groups)
        up_levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in, norm_groups))
            if level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            up_levels.insert(0, up)
        self.up = nn.ModuleList(up_levels)
        self.norm_out = vae_normalization(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            h = _resolution_level(up, h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h
