"""The distilled FCDiffusion student: one network for all four control modes, sampled in a few guidance-free steps.

It is the teacher architecture plus a learned control-mode embedding (zero-initialised, so at the start it is
exactly the network it was initialised from) added to the control net's time embedding; `cond["c_mode"]`
(a LongTensor index into `CONTROL_MODES`) picks the mode per sample. What trains is configurable:
`control_net` (default), `output_blocks` (the UNet decoder) and/or `lora` (low-rank adapters on the attention
projections of the UNet decoder; the encoder runs under `torch.no_grad()` in `ControlledUnetModel`, so adapters
there could never learn). The mode embedding always trains.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcdiffusion.frequency import CONTROL_MODES, frequency_control
from fcdiffusion.model import FCDiffusion, check_control_mode
from ldm.models.diffusion.ddim import trailing_timesteps
from ldm.modules.attention import CrossAttention

TRAINABLE_PARTS = ("control_net", "output_blocks", "lora")
STUDENT_TARGET = "fcdiffusion.student.FCDiffusionStudent"
STUDENT_OPTIONS = ("trainable", "lora_rank", "lora_alpha")


class LoRALinear(nn.Module):
    """A linear layer plus a rank-r update `(alpha / r) * up(down(x))`; `up` starts at zero, so it starts as a no-op.

    The base `weight`/`bias` keep their names (`<layer>.weight`), so SD and teacher checkpoints still load;
    the adapters add `<layer>.lora_down.weight` and `<layer>.lora_up.weight`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.scale = alpha / rank
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """Kaiming-uniform `down` (as nn.Linear), zero `up`: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_up(self.lora_down(x))


def add_lora(module: nn.Module, rank: int, alpha: float) -> list[LoRALinear]:
    """Replace to_q/to_k/to_v/to_out[0] of every CrossAttention inside `module` by LoRALinear; return them."""
    adapters = []
    for attention in [m for m in module.modules() if isinstance(m, CrossAttention)]:
        for owner, name in [(attention, "to_q"), (attention, "to_k"), (attention, "to_v"), (attention.to_out, "0")]:
            adapter = LoRALinear(getattr(owner, name), rank, alpha)
            setattr(owner, name, adapter)
            adapters.append(adapter)
    return adapters


class FCDiffusionStudent(FCDiffusion):
    """FCDiffusion with a control-mode embedding, configurable trainable parts and few-step guidance-free sampling.

    `trainable`: any of `TRAINABLE_PARTS`. `lora_rank`/`lora_alpha` size the adapters when `lora` is chosen
    (alpha defaults to the rank, a scale of 1). `control_mode` is only the default mode of `get_input`.
    `sd_locked` is derived from `trainable` (unlocked exactly when `output_blocks` trains), so a teacher's
    config can be reused unchanged.
    """

    def __init__(self, trainable: Sequence[str] = ("control_net",), lora_rank: int = 8,
                 lora_alpha: Optional[float] = None, **kwargs: Any):
        trainable = tuple(trainable)
        unknown = sorted(set(trainable) - set(TRAINABLE_PARTS))
        if unknown or not trainable:
            raise ValueError(f"trainable must name some of {', '.join(TRAINABLE_PARTS)}, got {list(trainable)}")
        kwargs["sd_locked"] = "output_blocks" not in trainable
        super().__init__(**kwargs)
        self.trainable = trainable
        time_embed_dim = self.control_model.model_channels * 4
        self.mode_embedding = nn.Embedding(len(CONTROL_MODES), time_embed_dim)
        nn.init.zeros_(self.mode_embedding.weight)
        self.lora_layers: list[LoRALinear] = []
        if "lora" in trainable:
            self.lora_layers = add_lora(self.model.diffusion_model.output_blocks, lora_rank,
                                        float(lora_rank if lora_alpha is None else lora_alpha))
        trained = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trained)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [self.mode_embedding.weight]
        if "control_net" in self.trainable:
            params += list(self.control_model.parameters())
        params += self.unlocked_unet_parameters()
        for layer in self.lora_layers:
            params += [layer.lora_down.weight, layer.lora_up.weight]
        return list({id(p): p for p in params}.values())  # adapters sit inside the decoder: list each once

    def student_only_keys(self) -> set[str]:
        """State-dict keys that an FCDiffusion (teacher or init) checkpoint lacks: mode embedding and adapters."""
        return {k for k in self.state_dict() if k.startswith("mode_embedding.") or ".lora_" in k}

    def reset_student_parameters(self, device: torch.device | str = "cpu") -> None:
        """(Re)initialise the student-only parameters, materialising them on `device` if built on meta."""
        adapters = [m for layer in self.lora_layers for m in (layer.lora_down, layer.lora_up)]
        for module in [self.mode_embedding, *adapters]:
            if any(p.is_meta for p in module.parameters()):
                module.to_empty(device=device)
        with torch.no_grad():
            nn.init.zeros_(self.mode_embedding.weight)
            for layer in self.lora_layers:
                layer.reset_adapter()

    # ---- conditioning -------------------------------------------------------------------------------------
    def control_emb_offset(self, cond: Mapping[str, Any]) -> torch.Tensor:
        """The mode embedding of each sample, `cond['c_mode']` (LongTensor indices into CONTROL_MODES)."""
        if cond.get("c_mode") is None:
            raise KeyError("the student's conditioning needs 'c_mode'; build it with mode_conditioning()")
        return self.mode_embedding(cond["c_mode"].to(self.mode_embedding.weight.device).long())

    def mode_conditioning(self, z: torch.Tensor, context: torch.Tensor, mode: str,
                          generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """Conditioning for `mode`: prompt context, source latent `z` filtered to the mode's band, the mode index."""
        index = CONTROL_MODES.index(check_control_mode(mode))
        control = frequency_control(z, mode, generator=generator, **self.frequency_thresholds)
        c_mode = torch.full((z.shape[0],), index, dtype=torch.long, device=z.device)
        return {"c_crossattn": [context], "c_concat": [control], "c_mode": c_mode}

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: Optional[str] = None, bs: Optional[int] = None,
                  sample_posterior: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
        """As FCDiffusion's, plus `c_mode` for the default `control_mode`."""
        z, cond = super().get_input(batch, k, bs, sample_posterior)
        index = CONTROL_MODES.index(self.control_mode)
        return z, {**cond, "c_mode": torch.full((z.shape[0],), index, dtype=torch.long, device=z.device)}

    def eps_and_control(self, x_noisy: torch.Tensor, t: torch.Tensor,
                        cond: Mapping[str, Any]) -> tuple[torch.Tensor, list]:
        """eps and the scaled control pairs of one forward pass (the distiller's control-matching loss uses both)."""
        pairs = self.control(x_noisy, t, cond)
        context = torch.cat(cond["c_crossattn"], 1)
        return self.model.diffusion_model(x=x_noisy, timesteps=t, context=context, control=pairs), pairs

    # ---- sampling -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, cond: Mapping[str, Any], steps: int = 4, x_T: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, verbose: bool = False) -> torch.Tensor:
        """Guidance-free DDIM latents in `steps` steps on the trailing schedule (from t=T-1), ending at alpha 1."""
        control = cond["c_concat"][0]
        x_T = torch.randn(control.shape, generator=generator).to(control) if x_T is None else x_T
        return self.sample_ddim(cond, control.shape[0], steps, guidance_scale=1.0, uncond=None, x_T=x_T,
                                verbose=verbose, timesteps=trailing_timesteps(steps, self.num_timesteps),
                                final_alpha_cumprod=1.0)

    @torch.no_grad()
    def translate(self, cond: Mapping[str, Any], steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                  x_T: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                  verbose: bool = False) -> torch.Tensor:
        """The student samples with `generate` (4 steps unless given); guidance does not apply to it."""
        return self.generate(cond, steps or 4, x_T, generator, verbose)


def student_config(model_config: Mapping[str, Any], trainable: Sequence[str] = ("control_net",),
                   lora_rank: int = 8, lora_alpha: Optional[float] = None) -> dict[str, Any]:
    """The student's `{target, params}` from a teacher's model config node (its `model:` entry)."""
    if isinstance(trainable, str):
        raise ValueError(f"trainable is a list of parts, got the string {trainable!r}")
    config = copy.deepcopy(dict(model_config))
    params = dict(config.get("params") or {})
    params.update(trainable=list(trainable), lora_rank=lora_rank, lora_alpha=lora_alpha)
    return {"target": STUDENT_TARGET, "params": params}
