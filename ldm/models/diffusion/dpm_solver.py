"""DPM-Solver++(2M) on Stable Diffusion's discrete noise schedule: the update of one step.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2
(multistep second order, data prediction). With alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t) for SD's cumulative
alphas a_t and lambda_t = log(alpha_t / sigma_t), a step from s to t (h = lambda_t - lambda_s) is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,

with D the eps model's x0 prediction at s for the first step (first order: exactly DDIM) and, from the second
step on, D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev with r = h_prev / h. A step that lands on alpha 1 (sigma 0, the
clean end) is first order: there h is infinite and the second-order correction undefined. Every other step is
second order, as the published algorithm has it (no lower-order final step). The timesteps come from
`ldm.models.diffusion.scheduler`, the loop and the guidance from `ldm.models.diffusion.sampling`.
"""
from __future__ import annotations

import torch


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
