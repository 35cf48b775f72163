"""FCDiffusion's frequency control net: a trainable copy of the SD UNet encoder that modulates the frozen UNet.

The encoder (`time_embed`, `input_blocks`, `middle_block`) is built by `UNetEncoder`, so its keys and shapes
are the UNet's and it can be initialised from SD weights by name. Other keys follow the FCDiffusion release.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import UNetEncoder
from ldm.modules.diffusionmodules.util import zero_module

ControlPair = tuple[torch.Tensor, torch.Tensor]


def _zero_conv(channels: int) -> nn.Sequential:
    """Zero-initialised 1x1 conv, wrapped so its keys read `<name>.0.weight` as in FCDiffusion checkpoints."""
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class FreqControlNet(UNetEncoder):
    """Maps (noisy latent, filtered-latent hint) to one (add, mul) modulation pair per UNet skip feature.

    Takes `hint_channels` (width of the hint embedding, 512 in FCDiffusion) plus every `UNetEncoder` option,
    by keyword; there is no decoder, so `out_channels` is not accepted. The hint has `in_channels` channels
    and the latent's spatial size. All output convs start at zero, so a fresh control net is a no-op.
    """

    def __init__(self, hint_channels: int = 512, **kwargs: Any):
        super().__init__(**kwargs)
        self.input_hint_block = nn.Sequential(nn.Conv2d(self.in_channels, hint_channels, 3, padding=1), nn.SiLU())
        self.hint_add = zero_module(nn.Conv2d(hint_channels, self.model_channels, 1))
        self.hint_mul = zero_module(nn.Conv2d(hint_channels, self.model_channels, 1))
        self.zero_convs_add = nn.ModuleList(_zero_conv(c) for c in self.input_block_channels)
        self.zero_convs_mul = nn.ModuleList(_zero_conv(c) for c in self.input_block_channels)
        self.middle_block_out_add = _zero_conv(self.input_block_channels[-1])
        self.middle_block_out_mul = _zero_conv(self.input_block_channels[-1])

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> list[ControlPair]:
        """Return len(input_blocks) + 1 pairs (add, mul): one per input block, then the middle block's.

        `y` (N,) is the class label when the net has `num_classes` (SD's `label_emb`, added to the time
        embedding); the distilled student uses it for the control-mode index.
        """
        emb = self.embed_time(timesteps, y)
        guide = self.input_hint_block(hint)
        h = self.input_blocks[0](x.type(self.dtype), emb, context)
        h = h * (1 + self.hint_mul(guide)) + self.hint_add(guide)
        features = [h]
        for block in self.input_blocks[1:]:
            h = block(h, emb, context)
            features.append(h)
        h = self.middle_block(h, emb, context)
        pairs = [(add(f), mul(f)) for f, add, mul in zip(features, self.zero_convs_add, self.zero_convs_mul)]
        return pairs + [(self.middle_block_out_add(h), self.middle_block_out_mul(h))]
