"""Building blocks shared by the UNet, the control net and the diffusion schedule."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def make_beta_schedule(
    schedule: str, n_timestep: int, linear_start: float = 1e-4, linear_end: float = 2e-2
) -> np.ndarray:
    """Diffusion betas in float64. SD uses 'linear': a linspace in sqrt(beta), squared."""
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu")
        betas = betas**2
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    else:
        raise ValueError(f"unknown beta schedule '{schedule}'; valid: 'linear', 'sqrt_linear'")
    return betas.numpy()


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` and return it (new layers that start as a no-op)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and weight dtypes, as SD does for fp16 stability."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = (None if p is None else p.float() for p in (self.weight, self.bias))
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, groups: int = 32) -> nn.Module:
    """The UNet's normalisation layer: 32-group GroupNorm."""
    return GroupNorm32(groups, channels)


def checkpoint(func: Callable, inputs: Sequence[torch.Tensor], flag: bool):
    """Run `func(*inputs)`, recomputing activations in backward when `flag` (gradient checkpointing, non-reentrant:
    it tracks the parameters itself)."""
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
