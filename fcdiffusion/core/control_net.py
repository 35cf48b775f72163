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


class ScalarEmbedding(nn.Module):
    """A per-sample number as an offset to the time embedding: sinusoidal (Fourier) features of it, as
    `timestep_embedding` makes of t, then an MLP shaped like `time_embed` whose last layer starts at zero, so a new
    embedding adds exactly nothing.

    The student's two such inputs:
    - the classifier-free guidance scale w (guided distillation, Meng et al. 2023). `scale` None embeds w itself
      (students distilled before the scale was recorded); a number embeds (w - 1) * scale, as latent consistency
      models embed w (Luo et al. 2023, scale 1000): w in [1, 15] then spans the timesteps' range [0, 1000), so every
      frequency of the embedding varies over it, not only the fastest few.
    - the step size in timesteps, num_timesteps / k for a k-step student step (embedded as it is, like t), so one
      network holds a different step for each step count it learned (shortcut models, Frans et al. 2024, condition
      on the step size the same way).
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

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        value = value if self.scale is None else (value - 1) * self.scale
        return self.layers(timestep_embedding(value, self.channels))


class FreqControlNet(UNetEncoder):
    """Maps (noisy latent, filtered-latent hint) to one (add, mul) modulation pair per UNet skip feature.

    Takes `hint_channels` (width of the hint embedding, 512 in FCDiffusion) plus every `UNetEncoder` option,
    by keyword; there is no decoder, so `out_channels` is not accepted. The hint has `in_channels` channels
    and the latent's spatial size. All output convs start at zero, so a fresh control net is a no-op.
    `guidance_embedding` adds a `ScalarEmbedding` (`guidance_emb`) of the guidance scale to the time embedding:
    the guidance-conditioned distilled student takes w as an input, embedded with `guidance_embedding_scale`.
    `step_embedding` adds one (`step_emb`) of the step size: a student trained for several step counts takes the
    size of the step it is taking as an input.
    """

    def __init__(self, hint_channels: int = 512, guidance_embedding: bool = False,
                 guidance_embedding_scale: float | None = None, step_embedding: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.input_hint_block = nn.Sequential(nn.Conv2d(self.in_channels, hint_channels, 3, padding=1), nn.SiLU())
        self.hint_add = zero_module(nn.Conv2d(hint_channels, self.model_channels, 1))
        self.hint_mul = zero_module(nn.Conv2d(hint_channels, self.model_channels, 1))
        self.zero_convs_add = nn.ModuleList(_zero_conv(c) for c in self.input_block_channels)
        self.zero_convs_mul = nn.ModuleList(_zero_conv(c) for c in self.input_block_channels)
        self.middle_block_out_add = _zero_conv(self.input_block_channels[-1])
        self.middle_block_out_mul = _zero_conv(self.input_block_channels[-1])
        self.guidance_emb = ScalarEmbedding(self.model_channels, 4 * self.model_channels,
                                            guidance_embedding_scale) if guidance_embedding else None
        self.step_emb = ScalarEmbedding(self.model_channels, 4 * self.model_channels) if step_embedding else None

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | None = None,
        step_size: torch.Tensor | None = None,
    ) -> list[ControlPair]:
        """Return len(input_blocks) + 1 pairs (add, mul): one per input block, then the middle block's.

        `y` (N,) is the class label when the net has `num_classes` (SD's `label_emb`, added to the time
        embedding); the distilled student uses it for the control-mode index. `guidance_scale` (N,) is the
        classifier-free guidance scale w, given exactly when the net has a guidance embedding; `step_size` (N,) the
        step's size in timesteps, given exactly when it has a step embedding.
        """
        emb = self.embed_time(timesteps, y)
        for name, embedding, value in (("guidance scale", self.guidance_emb, guidance_scale),
                                       ("step size", self.step_emb, step_size)):
            if (value is None) != (embedding is None):
                raise ValueError(f"a {name} must be given exactly when the control net has a {name} embedding "
                                 f"({name} embedding {'missing' if embedding is None else 'present'}, "
                                 f"{name} {'missing' if value is None else 'given'})")
            if value is not None:
                emb = emb + embedding(value)
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
