"""The SD UNet as FCDiffusion uses it: frozen encoder, decoder features modulated by the control net."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.modules.diffusionmodules.openaimodel import UNetModel


class ControlledUnetModel(UNetModel):
    """`UNetModel` whose middle-block output and skip features are modulated as (1 + mul) * h + add.

    Same constructor as `UNetModel`. The encoder (time embedding, input blocks, middle block) runs under
    `torch.no_grad()`: it is frozen in FCDiffusion, so only the decoder and the control net get gradients.
    """

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        control: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Predict eps, modulating the encoder features by `control` when given.

        `control` is `FreqControlNet`'s output with the per-pair scales already applied by the caller: pair i
        modulates input block i's skip feature, the last pair the middle-block output. It is not modified.
        With `control=None` the result is exactly (bit for bit) `UNetModel`'s.
        """
        with torch.no_grad():
            emb = self.embed_time(timesteps)
            h, skips = self.encode(x, emb, context)
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"expected {len(skips) + 1} control pairs (input blocks, middle), got {len(control)}")
            *skip_control, (add, mul) = control
            h = (1 + mul) * h + add
            skips = [(1 + m) * s + a for s, (a, m) in zip(skips, skip_control)]
        return self.decode(h, skips, emb, context, x.dtype)
