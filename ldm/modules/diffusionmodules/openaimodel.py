"""The SD 2.x denoising UNet (eps-prediction), with latent-diffusion's module and parameter names.

`UNetEncoder` builds the time embedding, input blocks and middle block; `UNetModel` adds the decoder. The
split lets the FCDiffusion control net reuse the encoder exactly (same keys and shapes), so it can be
initialised from an SD UNet by copying tensors by name.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import checkpoint, normalization, timestep_embedding, zero_module


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep embedding: `forward(x, emb)`."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes `emb` to timestep blocks and `context` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def resampled_channels(kind: str, channels: int, use_conv: bool, out_channels: int | None) -> int:
    """The output channels of a 2x resampling layer: `out_channels` (default `channels`), which only a conv changes."""
    out_channels = out_channels or channels
    if not use_conv and out_channels != channels:
        raise ValueError(f"{kind} without a conv cannot change the channel count")
    return out_channels


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = resampled_channels("Upsample", channels, use_conv, out_channels)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv, or 2x2 average pooling without `use_conv`."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = resampled_channels("Downsample", channels, use_conv, out_channels)
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (added after the first conv)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class UNetEncoder(nn.Module):
    """Base class holding the UNet encoder: `time_embed`, `input_blocks` and `middle_block`.

    Takes the SD 2.x UNet options (the subset SD 2.x configs use; their `image_size`, which the UNet does not need,
    is dropped by `ldm.util.instantiate_from_config`). Attention heads come from exactly one of `num_heads` (fixed
    count) or `num_head_channels` (fixed width); -1 means unset. `use_fp16` sets `self.dtype`, the dtype the blocks
    compute in (run under autocast or convert the weights). `input_block_channels[i]` is the channel count
    of input block i's output; the middle block keeps the last one. `num_classes` adds SD's class-label
    embedding `label_emb`: the label `y` (N,) of each sample is embedded and added to the time embedding.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__()
        if not use_spatial_transformer:
            raise ValueError("only use_spatial_transformer=True (SD 2.x) is supported; the old AttentionBlock is not")
        if context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim, the width of the cross-attention context")
        if dims != 2:
            raise ValueError(f"only 2D UNets are supported, got dims={dims}")
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError("set exactly one of num_heads and num_head_channels")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dropout = dropout
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.transformer_depth = transformer_depth
        self.context_dim = context_dim
        self.legacy = legacy
        self.use_linear_in_transformer = use_linear_in_transformer
        self.num_classes = num_classes

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        self.input_block_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [self._res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.input_block_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                self.input_block_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch), self._transformer(ch), self._res_block(ch, ch)
        )

    def _res_block(self, channels: int, out_channels: int) -> ResBlock:
        return ResBlock(channels, self.model_channels * 4, self.dropout, out_channels, self.use_checkpoint)

    def _transformer(self, channels: int) -> SpatialTransformer:
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = channels // heads
        return SpatialTransformer(
            channels,
            heads,
            dim_head,
            depth=self.transformer_depth,
            dropout=self.dropout,
            context_dim=self.context_dim,
            use_linear=self.use_linear_in_transformer,
            use_checkpoint=self.use_checkpoint,
        )

    def embed_time(self, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Timestep embedding (N, 4 * model_channels) fed to every ResBlock, plus the class label's if any."""
        if (y is None) != (self.num_classes is None):
            raise ValueError("a class label y must be given exactly when the model has num_classes "
                             f"(num_classes={self.num_classes}, y {'missing' if y is None else 'given'})")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        return emb if y is None else emb + self.label_emb(y)

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the input blocks and middle block: (middle-block output, every input block's output)."""
        h = x.type(self.dtype)
        features = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            features.append(h)
        return self.middle_block(h, emb, context), features


class UNetModel(UNetEncoder):
    """SD 2.x UNet: `forward(x, timesteps, context)` predicts the noise eps of latent `x`.

    Takes `out_channels` plus every `UNetEncoder` option, by keyword.
    """

    def __init__(self, out_channels: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.out_channels = out_channels
        mc = self.model_channels
        skip_channels = list(self.input_block_channels)
        ch, ds = skip_channels[-1], 2 ** (len(self.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res_block(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self._transformer(ch))
                if level and i == self.num_res_blocks:
                    layers.append(Upsample(ch, self.conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, out_channels, 3, padding=1)))

    def decode(
        self,
        h: torch.Tensor,
        skips: Sequence[torch.Tensor],
        emb: torch.Tensor,
        context: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Run the output blocks on the middle-block output `h`, consuming `skips` last first, then `out`."""
        for block, skip in zip(self.output_blocks, reversed(skips)):
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h.type(out_dtype))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed_time(timesteps, y)
        h, skips = self.encode(x, emb, context)
        return self.decode(h, skips, emb, context, x.dtype)
