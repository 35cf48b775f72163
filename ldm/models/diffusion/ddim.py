"""DDIM (Song et al. 2021) in the conventions of Stable Diffusion: the update between two cumulative alphas.

Pure functions of tensors: `ddim_step` (and `ddim_sigma`, its noise scale for eta > 0), its inverse
`ddim_x0_target` (the distiller's target) and `predicted_x0`. Which timesteps a sampler visits is the
`ldm.models.diffusion.scheduler`'s business, and the loop over them `ldm.models.diffusion.sampling.sample`'s.
"""
from __future__ import annotations

import torch


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


def ddim_sigma(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM's noise scale from cumulative alpha `a_t` to `a_prev`, in float64:
    eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)); eta = 1 is DDPM's posterior, 0 on a step to alpha 1."""
    a_t, a_prev = a_t.double(), a_prev.double()
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def ddim_x0_target(x_t: torch.Tensor, x_prev: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """Inverse of `ddim_step`: the x0 for which one deterministic step from (x_t, a_t) lands on `x_prev` at `a_prev`.

    DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps with eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), so
    x0 = (x_prev - r x_t) / (sqrt(a_prev) - r sqrt(a_t)), r = sqrt((1 - a_prev) / (1 - a_t)); at a_prev = 1, x_prev.
    Computed in float64: the denominator is small when a_prev is close to a_t.
    """
    x_t64, x_prev64, a_t, a_prev = x_t.double(), x_prev.double(), a_t.double(), a_prev.double()
    r = ((1 - a_prev) / (1 - a_t)).sqrt()
    return ((x_prev64 - r * x_t64) / (a_prev.sqrt() - r * a_t.sqrt())).to(x_t.dtype)
