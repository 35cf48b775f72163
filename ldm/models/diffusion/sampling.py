"""The one sampling loop, with classifier-free guidance, over any schedule of steps.

`sample` takes the steps as (t, a_t, a_next) triples: a `Scheduler`'s (`Scheduler.steps`: one timestep for the
batch, 0-dim alphas) or any other grid, such as the distiller's teacher sub-steps (a timestep per sample (N,),
alphas (N, 1, 1, 1)). Each step is one (guided: one batched) network evaluation and one update of the sampler
named by `sampler` (`SAMPLERS`): DDIM (`ldm.models.diffusion.ddim`) or DPM-Solver++(2M)
(`ldm.models.diffusion.dpm_solver`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import ddim_sigma, ddim_step, predicted_x0
from ldm.models.diffusion.dpm_solver import dpmpp_2m_step
from ldm.models.diffusion.scheduler import Step

Cond = Any  # a tensor, or a dict of lists of tensors such as {"c_crossattn": [...], "c_concat": [...]}
EpsModel = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # apply_model(x, t, cond) -> eps
# callback(index, steps, x0) after each step: the step's index from 0, their number, its predicted clean latents
StepCallback = Callable[[int, int, torch.Tensor], None]

SAMPLERS = ("ddim", "dpmpp_2m")  # DDIM, DPM-Solver++(2M)


def check_sampler(sampler: str) -> str:
    """`sampler`, if it names one of `SAMPLERS`; else a ValueError listing them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return sampler


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditionings along the batch: tensors, lists of tensors, or dicts of those."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return [cat_cond(x, y) for x, y in zip(a, b)]
    if a is None:
        return None
    return torch.cat([a, b])


def guided_eps(
    apply_model: EpsModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Cond,
    uncond: Cond | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """eps prediction with classifier-free guidance: e_u + s (e_c - e_u), in one batched call.

    `guidance_scale` is one number, or one per sample (N,) (the distiller's per-example scale).
    """
    if uncond is None or (not torch.is_tensor(guidance_scale) and guidance_scale == 1.0):
        return apply_model(x, t, cond)
    e_u, e_c = apply_model(torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond)).chunk(2)
    return guidance_mix(e_c, e_u, guidance_scale)


def guidance_mix(conditional: torch.Tensor, unconditional: torch.Tensor,
                 guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance of any output of the two branches: u + s (c - u), `guidance_scale` one number or one
    per sample (N,)."""
    if torch.is_tensor(guidance_scale):
        guidance_scale = guidance_scale.to(conditional.dtype).view(-1, *[1] * (conditional.ndim - 1))
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def sample(
    apply_model: EpsModel,
    x_T: torch.Tensor,
    steps: Iterable[Step],
    cond: Cond,
    uncond: Cond | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
    sampler: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    verbose: bool = False,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run `steps` (t, a_t, a_next) from `x_T` with `sampler`; returns the final latents.

    t is an int (the whole batch) or a tensor (N,) of timesteps; the alphas are tensors on `x_T`'s device, 0-dim
    or per sample. Classifier-free guidance when `uncond` is given (`guided_eps`). DDIM with `eta` > 0 adds noise
    from `generator` at every step, scaled by the step's sigma (0 for a step landing on alpha 1); DPM-Solver++(2M)
    is deterministic. `verbose` shows a progress bar; `callback(index, steps, x0)` sees each step's predicted
    clean latents (a live preview: `fcdiffusion.core.preview.SamplingPreview`).
    """
    check_sampler(sampler)
    if eta and sampler != "ddim":
        raise ValueError(f"eta={eta} applies to DDIM only; {sampler} is deterministic")
    steps = list(steps)
    x, x0_prev, h_prev = x_T, None, None
    progress = tqdm(steps, desc=f"{sampler} ({len(steps)} steps)", disable=not verbose, leave=False)
    for index, (t, a_t, a_next) in enumerate(progress):
        if not torch.is_tensor(t):
            t = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = guided_eps(apply_model, x, t, cond, uncond, guidance_scale)
        if sampler == "ddim":
            sigma, noise = 0.0, None
            if eta > 0:
                sigma = ddim_sigma(a_t, a_next, eta).to(x.dtype)
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x, x0 = ddim_step(x, eps, a_t, a_next, sigma, noise)
        else:
            x0 = predicted_x0(x, eps, a_t)
            x, h_prev = dpmpp_2m_step(x, x0, a_t, a_next, x0_prev, h_prev)
            x0_prev = x0
        if callback is not None:
            callback(index, len(steps), x0)
    return x
