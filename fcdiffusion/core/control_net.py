"""FCDiffusion's frequency control net: a trainable copy of the SD UNet encoder that modulates the frozen UNet.

The encoder (`time_embed`, `input_blocks`, `middle_block`) is built by `UNetEncoder`, so its keys and shapes
are the UNet's and it can be initialised from SD weights by name. Other keys follow the FCDiffusion release.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import UNetEncoder
from ldm.modules.diffusionmodules.util import timestep_embedding, zero_module

ControlPair = tuple[torch.Tensor, torch.Tensor]


def _zero_conv(channels: int) -> nn.Sequential:
    """Zero-initialised 1x1 conv, wrapped so its keys read `<name>.0.weight` as in FCDiffusion checkpoints."""
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


class GuidanceEmbedding(nn.Module):
    """The classifier-free guidance scale w as an offset to the time embedding (guided distillation, Meng et al.
    2023): sinusoidal (Fourier) features of w, as `timestep_embedding` makes of t, then an MLP shaped like
    `time_embed` whose last layer starts at zero, so a new embedding adds exactly nothing.

    `scale` None embeds w itself (students distilled before the scale was recorded); a number embeds (w - 1) * scale,
    as latent consistency models embed w (Luo et al. 2023, scale 1000): w in [1, 15] then spans the timesteps'
    range [0, 1000), so every frequency of the embedding varies over it, not only the fastest few.
    """

    def __init__(self, channels: int, out_channels: int, scale: float | None = None):
        super().__init__()
        self.channels, self.scale = channels, scale
        self.layers = nn.Sequential(nn.Linear(channels, out_channels), nn.SiLU(),
                                    zero_module(nn.Linear(out_channels, out_channels)))

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation for the first layer, zero for the last (a no-op embedding)."""
        self.layers[0].reset_parameters()
        zero_module(self.layers[2])

    def forward(self, guidance_scale: torch.Tensor) -> torch.Tensor:
        w = guidance_scale if self.scale is None else (guidance_scale - 1) * self.scale
        return self.layers(timestep_embedding(w, self.channels))


class FreqControlNet(UNetEncoder):
    """Maps (noisy latent, filtered-latent hint) to one (add, mul) modulation pair per UNet skip feature.

    Takes `hint_channels` (width of the hint embedding, 512 in FCDiffusion) plus every `UNetEncoder` option,
    by keyword; there is no decoder, so `out_channels` is not accepted. The hint has `in_channels` channels
    and the latent's spatial size. All output convs start at zero, so a fresh control net is a no-op.
    `guidance_embedding` adds a `GuidanceEmbedding` (`guidance_emb`) of the guidance scale to the time embedding:
    the guidance-conditioned distilled student takes w as an input, embedded as `GuidanceEmbedding` says with
    `guidance_embedding_scale`.
    """

    def __init__(self, hint_channels: int = 512, guidance_embedding: bool = False,
                 guidance_embedding_scale: float | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.input_hint_block = nn.Sequential(nn.Conv2d(self.in_channels, hint_channels, 3, padding=1), nn.SiLU())
        self.hint_add = zero_module(nn.Conv2d(hint_channels, self.model_channels, 1))
        self.hint_mul = zero_module(nn.Conv2d(hint_channels, self.model_channels, 1))
        self.zero_convs_add = nn.ModuleList(_zero_conv(c) for c in self.input_block_channels)
        self.zero_convs_mul = nn.ModuleList(_zero_conv(c) for c in self.input_block_channels)
        self.middle_block_out_add = _zero_conv(self.input_block_channels[-1])
        self.middle_block_out_mul = _zero_conv(self.input_block_channels[-1])
        self.guidance_emb = GuidanceEmbedding(self.model_channels, 4 * self.model_channels,
                                              guidance_embedding_scale) if guidance_embedding else None

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | None = None,
    ) -> list[ControlPair]:
        """Return len(input_blocks) + 1 pairs (add, mul): one per input block, then the middle block's.

        `y` (N,) is the class label when the net has `num_classes` (SD's `label_emb`, added to the time
        embedding); the distilled student uses it for the control-mode index. `guidance_scale` (N,) is the
        classifier-free guidance scale w, given exactly when the net has a guidance embedding.
        """
        if (guidance_scale is None) != (self.guidance_emb is None):
            raise ValueError("a guidance scale must be given exactly when the control net has a guidance embedding "
                             f"(guidance embedding {'missing' if self.guidance_emb is None else 'present'}, "
                             f"guidance_scale {'missing' if guidance_scale is None else 'given'})")
        emb = self.embed_time(timesteps, y)
        if guidance_scale is not None:
            emb = emb + self.guidance_emb(guidance_scale)
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
