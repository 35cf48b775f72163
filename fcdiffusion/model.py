"""FCDiffusion (Gao et al. 2024): SD 2.1-base steered by a control net that sees a DCT band of the source latent.

Training reconstructs an image from its caption and a frequency-filtered copy of its own latent; at inference
the filtered source latent plus a new prompt translate the image. Which band is kept (the control mode) decides
the task: `mini_pass` style-guided content creation, `low_pass` semantic manipulation, `mid_pass` scene
translation, `high_pass` style translation.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from fcdiffusion.frequency import CONTROL_MODES, frequency_control
from ldm.models.diffusion.ddpm import LatentDiffusion, freeze
from ldm.util import instantiate_from_config


def check_control_mode(mode: str) -> str:
    """Return `mode` if it is one of the four control modes, else raise a ValueError listing them."""
    if mode not in CONTROL_MODES:
        raise ValueError(f"unknown control_mode '{mode}'; valid modes: {', '.join(CONTROL_MODES)}")
    return mode


class FCDiffusion(LatentDiffusion):
    """A frozen SD UNet (`ControlledUnetModel`) modulated by a trainable `FreqControlNet` (`control_model`)."""

    def __init__(
        self,
        control_stage_config: Mapping[str, Any],
        control_mode: str,
        frequency_thresholds: Optional[Mapping[str, int]] = None,
        control_scales: float | Sequence[float] = 1.0,
        sd_locked: bool = True,
        guidance_scale: float = 9.0,
        ddim_steps: int = 50,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.control_mode = check_control_mode(control_mode)
        self.frequency_thresholds = dict(frequency_thresholds or {})
        self.control_model = instantiate_from_config(control_stage_config)
        n_pairs = len(self.model.diffusion_model.input_blocks) + 1
        scales = [float(control_scales)] * n_pairs if isinstance(control_scales, (int, float)) else list(control_scales)
        if len(scales) != n_pairs:
            raise ValueError(f"control_scales needs {n_pairs} values (input blocks + middle block), got {len(scales)}")
        self.control_scales = scales
        self.guidance_scale, self.ddim_steps = guidance_scale, ddim_steps
        self.sd_locked = sd_locked
        freeze(self.model)
        for p in self.unlocked_unet_parameters():
            p.requires_grad_(True)
        # Validate the thresholds now rather than at the first training step.
        frequency_control(torch.zeros(1, 1, 8, 8), self.control_mode, **self.frequency_thresholds)

    def unlocked_unet_parameters(self) -> list[nn.Parameter]:
        """The UNet decoder (output blocks and output head), trained alongside the control net unless sd_locked."""
        if self.sd_locked:
            return []
        unet = self.model.diffusion_model
        return [*unet.output_blocks.parameters(), *unet.out.parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.control_model.parameters(), *self.unlocked_unet_parameters()]

    def train(self, mode: bool = True) -> "FCDiffusion":
        """Keep the frozen UNet encoder in eval while training (its dropout off, like the rest of SD)."""
        super().train(mode)
        if self.sd_locked:
            self.model.eval()
        return self

    # ---- conditioning -------------------------------------------------------------------------------------
    def control_signal(self, z: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The control net's input: the source latent filtered to this model's DCT band."""
        return frequency_control(z, self.control_mode, generator=generator, **self.frequency_thresholds)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: Optional[str] = None, bs: Optional[int] = None,
                  sample_posterior: bool = True) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """(z, {'c_crossattn': [text context], 'c_concat': [control signal of z]})."""
        z, context = super().get_input(batch, k, bs, sample_posterior)
        return z, {"c_crossattn": [context], "c_concat": [self.control_signal(z)]}

    def unconditional_conditioning(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        """Classifier-free guidance's negative branch: the empty prompt, the same control signal."""
        context = cond["c_crossattn"][0]
        empty = self.get_learned_conditioning([""]).to(context).expand_as(context)
        return {**cond, "c_crossattn": [empty]}

    def control_emb_offset(self, cond: Mapping[str, Any]) -> Optional[torch.Tensor]:
        """An offset added to the control net's time embedding; none here (the distilled student adds a mode embedding)."""
        return None

    def control(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> Optional[list]:
        """The control net's scaled (add, mul) pairs, or None without a control signal."""
        if cond.get("c_concat") is None:
            return None
        context = torch.cat(cond["c_crossattn"], 1)
        pairs = self.control_model(x=x_noisy, hint=torch.cat(cond["c_concat"], 1), timesteps=t, context=context,
                                   emb_offset=self.control_emb_offset(cond))
        return [(add * s, mul * s) for (add, mul), s in zip(pairs, self.control_scales)]

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if not isinstance(cond, Mapping):
            raise TypeError("FCDiffusion.apply_model expects {'c_crossattn': [...], 'c_concat': [...]}")
        context = torch.cat(cond["c_crossattn"], 1)
        return self.model.diffusion_model(x=x_noisy, timesteps=t, context=context,
                                          control=self.control(x_noisy, t, cond))

    # ---- sampling and logging -----------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, cond: Mapping[str, Any], steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                  x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  verbose: bool = False) -> torch.Tensor:
        """Guided DDIM latents for `cond` (text + control), the way a teacher samples."""
        control = cond["c_concat"][0]
        x_T = torch.randn(control.shape, generator=generator).to(control) if x_T is None else x_T
        return self.sample_ddim(cond, control.shape[0], steps or self.ddim_steps,
                                self.guidance_scale if guidance_scale is None else guidance_scale,
                                self.unconditional_conditioning(cond), x_T=x_T, verbose=verbose)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4, ddim_steps: Optional[int] = None,
                   guidance_scale: Optional[float] = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] (B, 3, H, W) for grids: source, reconstruction, decoded control signal, samples."""
        z, cond = self.get_input(batch, bs=N, sample_posterior=False)
        x = batch[self.first_stage_key][:N]
        x = torch.as_tensor(x).permute(0, 3, 1, 2).float()
        samples = self.translate(cond, ddim_steps, guidance_scale, generator=torch.Generator().manual_seed(seed))
        return {
            "source": x,
            "reconstruction": self.decode_first_stage(z),
            "control": self.decode_first_stage(cond["c_concat"][0]),
            "samples": self.decode_first_stage(samples),
        }
