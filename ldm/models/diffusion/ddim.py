"""DDIM sampling (Song et al. 2021) with classifier-free guidance, in the conventions of Stable Diffusion.

The maths lives in small functions (`ddim_step` and its inverse `ddim_x0_target`, `guided_eps`, `predicted_x0`,
the timestep spacings and `sampling_schedule`) so the samplers, the teachers and the distiller share one
implementation; `DDIMSampler` wraps them with SD's API, and `ldm.models.diffusion.dpm_solver` builds on the same
pieces.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

Cond = Any  # a tensor, or a dict of lists of tensors such as {"c_crossattn": [...], "c_concat": [...]}


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """SD's 'uniform' DDIM timesteps, ascending: 1, 1+c, 1+2c, ... with c = T // num_steps.

    At most T - 1 steps: with T steps the last would be t = T, past the schedule.
    """
    if not 0 < num_steps < num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps - 1}], got {num_steps}")
    stride = num_train_timesteps // num_steps
    return np.arange(0, num_train_timesteps, stride)[:num_steps] + 1


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Few-step schedule that starts at the last training timestep, ascending: e.g. 4 -> 249, 499, 749, 999.

    SD's uniform spacing never visits t = T-1, so a 1-step sampler would start from a partly clean latent it
    never sees at inference; this 'trailing' spacing starts from pure noise.
    """
    if not 0 < num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64)[::-1] - 1


TIMESTEP_SPACINGS = {"uniform": ddim_timesteps, "trailing": trailing_timesteps}


def spaced_timesteps(num_steps: int, spacing: str = "uniform", num_train_timesteps: int = 1000) -> np.ndarray:
    """The ascending timesteps of a `num_steps` sampler by spacing name: SD's 'uniform' or 'trailing' (from T-1)."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    return TIMESTEP_SPACINGS[spacing](num_steps, num_train_timesteps)


def sampling_schedule(alphas_cumprod: torch.Tensor, timesteps: Sequence[int],
                      final_alpha_cumprod: float | None = None) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(timesteps ascending, their cumulative alphas, the alpha each step lands on), the alphas float64 on the CPU.

    The step from timesteps[i] lands on timesteps[i-1]'s alpha; the one from the first timestep on
    `final_alpha_cumprod`, SD's default alphas_cumprod[0] (1.0: a sampler that ends on clean data).
    """
    steps = np.sort(np.asarray(timesteps))
    alphas_cumprod = alphas_cumprod.detach().double().cpu()
    alphas = alphas_cumprod[steps]
    first = alphas_cumprod[0].item() if final_alpha_cumprod is None else final_alpha_cumprod
    return steps, alphas, torch.cat([torch.tensor([first], dtype=torch.float64), alphas[:-1]])


def initial_latents(model: Any, batch_size: int, shape: Sequence[int], x_T: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """`x_T` if given, else standard normal noise (batch_size, *shape) on the model's device (the CPU without one)."""
    if x_T is not None:
        return x_T
    device = model.device if hasattr(model, "device") else torch.device("cpu")
    return torch.randn((batch_size, *shape), generator=generator, device=device)


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
    apply_model: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Cond,
    uncond: Cond | None = None,
    guidance_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """eps prediction with classifier-free guidance: e_u + s (e_c - e_u), in one batched call.

    `guidance_scale` is one number, or one per sample (N,) (the distiller's per-example w).
    """
    if uncond is None or (not torch.is_tensor(guidance_scale) and guidance_scale == 1.0):
        return apply_model(x, t, cond)
    e_u, e_c = apply_model(torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond)).chunk(2)
    if torch.is_tensor(guidance_scale):
        guidance_scale = guidance_scale.to(e_c.dtype).view(-1, *[1] * (e_c.ndim - 1))
    return e_u + guidance_scale * (e_c - e_u)


def predicted_x0(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor | float) -> torch.Tensor:
    """The x0 that eps implies at cumulative alpha `a_t`: (x - sqrt(1 - a_t) eps) / sqrt(a_t)."""
    a_t = torch.as_tensor(a_t, dtype=x.dtype, device=x.device)
    return (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor | float,
    a_prev: torch.Tensor | float,
    sigma: torch.Tensor | float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from cumulative alpha `a_t` to `a_prev`; returns (x_prev, predicted x0).

    Give the alphas as tensors on `x`'s device (or floats): a float becomes a device tensor here, a host-to-device
    copy. `sigma` may stay a float (0 for deterministic DDIM): it only enters as a scalar operand.
    """
    a_t, a_prev = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (a_t, a_prev))
    pred_x0 = predicted_x0(x, eps, a_t)
    x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def ddim_x0_target(x_t: torch.Tensor, x_prev: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """Inverse of `ddim_step`: the x0 for which one deterministic step from (x_t, a_t) lands on `x_prev` at `a_prev`.

    DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps with eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), so
    x0 = (x_prev - r x_t) / (sqrt(a_prev) - r sqrt(a_t)), r = sqrt((1 - a_prev) / (1 - a_t)); at a_prev = 1, x_prev.
    Computed in float64: the denominator is small when a_prev is close to a_t.
    """
    x_t64, x_prev64, a_t, a_prev = x_t.double(), x_prev.double(), a_t.double(), a_prev.double()
    r = ((1 - a_prev) / (1 - a_t)).sqrt()
    return ((x_prev64 - r * x_t64) / (a_prev.sqrt() - r * a_t.sqrt())).to(x_t.dtype)


class DDIMSampler:
    """DDIM sampler over any model exposing `alphas_cumprod`, `num_timesteps` and `apply_model(x, t, c)`."""

    def __init__(self, model: Any):
        self.model = model

    def make_schedule(
        self, ddim_num_steps: int, ddim_eta: float = 0.0, timesteps: Sequence[int] | None = None,
        final_alpha_cumprod: float | None = None,
    ) -> None:
        """Pick the timesteps and their alphas. SD's default: uniform steps, final alpha = alphas_cumprod[0]."""
        if timesteps is None:
            timesteps = ddim_timesteps(ddim_num_steps, self.model.num_timesteps)
        steps, alphas, alphas_prev = sampling_schedule(self.model.alphas_cumprod, timesteps, final_alpha_cumprod)
        sigmas = ddim_eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
        self.ddim_timesteps = steps
        self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas = alphas.float(), alphas_prev.float(), sigmas.float()

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Cond = None,
        eta: float = 0.0,
        x_T: torch.Tensor | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Cond = None,
        verbose: bool = True,
        generator: torch.Generator | None = None,
        timesteps: Sequence[int] | None = None,
        final_alpha_cumprod: float | None = None,
    ) -> torch.Tensor:
        """Sample `batch_size` latents of `shape` (C, H, W) in `S` steps; returns the final x0.

        `timesteps`/`final_alpha_cumprod` override SD's schedule (e.g. a trailing few-step schedule ending
        at alpha 1 for a distilled student).
        """
        self.make_schedule(S, eta, timesteps, final_alpha_cumprod)
        x = initial_latents(self.model, batch_size, shape, x_T, generator)
        # The schedule goes to the device once per call, and whether a step adds noise is decided on the host:
        # no host-to-device copy or device sync inside the loop.
        alphas, alphas_prev, sigmas = (v.to(device=x.device, dtype=x.dtype)
                                       for v in (self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas))
        noisy = (self.ddim_sigmas > 0).tolist()
        order = list(range(len(self.ddim_timesteps)))[::-1]
        for index in tqdm(order, desc=f"DDIM ({len(order)} steps)", disable=not verbose, leave=False):
            t = torch.full((x.shape[0],), int(self.ddim_timesteps[index]), device=x.device, dtype=torch.long)
            eps = guided_eps(self.model.apply_model, x, t, conditioning, unconditional_conditioning,
                             unconditional_guidance_scale)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if noisy[index] else None
            x, _ = ddim_step(x, eps, alphas[index], alphas_prev[index], sigmas[index], noise)
        return x
