"""A live preview while a teacher samples: every few steps, the step's predicted x0 decoded by a tiny autoencoder.

`SamplingPreview(tiny_vae, every, sink)` is a sampler callback, `callback(index, steps, x0)`: `index` counts the
steps done from 0, `steps` is their number and `x0` the step's prediction of the clean latents (B, C, h, w), the
model's scaled latents. On every `every`-th step and the last it decodes `x0` with the tiny decoder (a few ms,
where SD's VAE decoder takes about as long as a network evaluation) and hands `sink(step, images)` the pictures
as uint8 (B, H, W, 3), `step` counting from 1.

Where it plugs in: the one sampling loop (`ldm.models.diffusion.sampling.sample`) calls `callback` after every
step with the step's predicted x0; `model.sample(..., callback=)` and `Translator.translate_latents(..., callback=)`
pass it down. The demo builds one per request (`Demo.preview`) and streams its pictures to the page.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fcdiffusion.core.images import to_uint8
from fcdiffusion.core.tiny_vae import TinyVAE

PreviewSink = Callable[[int, np.ndarray], None]


class SamplingPreview:
    """Decodes the sampler's x0 predictions with `tiny_vae` every `every` steps (and at the last) into `sink`."""

    def __init__(self, tiny_vae: TinyVAE, sink: PreviewSink, every: int = 5):
        if every < 1:
            raise ValueError(f"a preview every {every} steps: must be at least 1")
        self.tiny_vae, self.sink, self.every = tiny_vae, sink, every

    def due(self, index: int, steps: int) -> bool:
        """Whether the step `index` (from 0) of `steps` gets a preview."""
        return (index + 1) % self.every == 0 or index + 1 == steps

    @torch.no_grad()
    def __call__(self, index: int, steps: int, x0: torch.Tensor) -> None:
        if self.due(index, steps):
            self.sink(index + 1, to_uint8(self.tiny_vae.decode(x0)))
