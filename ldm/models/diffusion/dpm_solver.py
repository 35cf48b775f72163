"""DPM-Solver++(2M) with classifier-free guidance, on Stable Diffusion's discrete noise schedule.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2
(multistep second order, data prediction). With alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t) for SD's cumulative
alphas a_t and lambda_t = log(alpha_t / sigma_t), a step from s to t (h = lambda_t - lambda_s) is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,

with D the eps model's x0 prediction at s for the first step (first order: exactly DDIM) and, from the second
step on, D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev with r = h_prev / h. A step that lands on alpha 1 (sigma 0, the
clean end) is first order: there h is infinite and the second-order correction undefined. Every other step is
second order, as the published algorithm has it (no lower-order final step). The timesteps, the schedule and
the guidance combination are DDIM's (`ldm.models.diffusion.ddim`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import Cond, ddim_timesteps, guided_eps, initial_latents, predicted_x0, sampling_schedule


def log_snr(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = (log a - log(1 - a)) / 2 for cumulative alpha a; +inf at a = 1."""
    return 0.5 * (torch.log(alpha_cumprod) - torch.log1p(-alpha_cumprod))


def dpmpp_2m_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    a_s: torch.Tensor | float,
    a_t: torch.Tensor | float,
    x0_prev: torch.Tensor | None = None,
    h_prev: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step from cumulative alpha `a_s` to `a_t` given the x0 prediction at s; returns
    (x_t, h), h = lambda_t - lambda_s, to pass as `h_prev` to the next step with `x0_prev` = this `x0`.

    Without `x0_prev` the step is first order (DDIM). The alphas may be numbers, 0-dim tensors or per-sample
    (N, 1, 1, 1) tensors; the coefficients are computed in float64. A step landing on alpha 1, or following a
    step of length 0, is first order.
    """
    a_s, a_t = (torch.as_tensor(v, dtype=torch.float64, device=x.device) for v in (a_s, a_t))
    h = log_snr(a_t) - log_snr(a_s)
    x_coeff = ((1 - a_t) / (1 - a_s)).sqrt()
    d_coeff = -a_t.sqrt() * torch.expm1(-h)
    d = x0
    if x0_prev is not None:
        usable = torch.isfinite(h) & (h_prev > 0)
        half_inv_r = torch.where(usable, h / (2 * torch.where(usable, h_prev, 1.0)), 0.0)  # 1 / (2r)
        d = x0 + half_inv_r.to(x.dtype) * (x0 - x0_prev)
    return x_coeff.to(x.dtype) * x + d_coeff.to(x.dtype) * d, h


class DPMSolverSampler:
    """DPM-Solver++(2M) over any model exposing `alphas_cumprod`, `num_timesteps` and `apply_model(x, t, c)`.

    `sample` takes `DDIMSampler.sample`'s arguments (no `eta`: the solver is deterministic), so the two are
    interchangeable; each step is one (guided: one batched) network evaluation, as in DDIM.
    """

    def __init__(self, model: Any):
        self.model = model

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: Sequence[int],
        conditioning: Cond = None,
        x_T: torch.Tensor | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Cond = None,
        verbose: bool = True,
        generator: torch.Generator | None = None,
        timesteps: Sequence[int] | None = None,
        final_alpha_cumprod: float | None = None,
    ) -> torch.Tensor:
        """Sample `batch_size` latents of `shape` (C, H, W) in `S` steps on `timesteps` (default SD's uniform
        spacing), ending at `final_alpha_cumprod` (default alphas_cumprod[0], as DDIM)."""
        if timesteps is None:
            timesteps = ddim_timesteps(S, self.model.num_timesteps)
        steps, alphas, alphas_prev = sampling_schedule(self.model.alphas_cumprod, timesteps, final_alpha_cumprod)
        x = initial_latents(self.model, batch_size, shape, x_T, generator)
        alphas, alphas_prev = alphas.to(x.device), alphas_prev.to(x.device)  # once per call, float64
        x0_prev = h_prev = None
        order = list(range(len(steps)))[::-1]
        for index in tqdm(order, desc=f"DPM-Solver++(2M) ({len(order)} steps)", disable=not verbose, leave=False):
            t = torch.full((x.shape[0],), int(steps[index]), device=x.device, dtype=torch.long)
            eps = guided_eps(self.model.apply_model, x, t, conditioning, unconditional_conditioning,
                             unconditional_guidance_scale)
            x0 = predicted_x0(x, eps, alphas[index].to(x.dtype))
            x, h_prev = dpmpp_2m_step(x, x0, alphas[index], alphas_prev[index], x0_prev, h_prev)
            x0_prev = x0
        return x
