"""The noise scheduler of a sampler: which timesteps it visits and the cumulative alphas of its steps.

A `Scheduler` is built from a model's `alphas_cumprod`, a timestep spacing (`SPACINGS`) and the alpha the last
step lands on; `set_timesteps(num_steps)` picks the timesteps, and `steps(device)` gives the (t, a_t, a_next) of
each step in sampling order, what `ldm.models.diffusion.sampling.sample` loops over. The step rules themselves
(DDIM, DPM-Solver++(2M)) know nothing of timesteps; they live in `ddim` and `dpm_solver`.
"""
from __future__ import annotations

import numpy as np
import torch

# One sampling step (t, a_t, a_next): the timestep (an int for the whole batch, or one per sample (N,)), the
# cumulative alpha at it and the alpha the step lands on (0-dim, or per sample (N, 1, 1, 1)).
Step = tuple[int | torch.Tensor, torch.Tensor, torch.Tensor]


def max_steps(spacing: str, num_train_timesteps: int = 1000) -> int:
    """The most sampling steps a `spacing` fits in a schedule of `num_train_timesteps` (T): T - 1 'uniform' (with T,
    its last step would be t = T, past the schedule), T 'trailing'."""
    return num_train_timesteps - 1 if check_spacing(spacing) == "uniform" else num_train_timesteps


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """SD's 'uniform' DDIM timesteps, ascending: 1, 1+c, 1+2c, ... with c = T // num_steps.

    At most T - 1 steps: with T steps the last would be t = T, past the schedule.
    """
    if not 0 < num_steps <= max_steps("uniform", num_train_timesteps):
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps - 1}], got {num_steps}")
    stride = num_train_timesteps // num_steps
    return np.arange(0, num_train_timesteps, stride)[:num_steps] + 1


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Few-step schedule that starts at the last training timestep, ascending: e.g. 4 -> 249, 499, 749, 999.

    SD's uniform spacing never visits t = T-1, so a 1-step sampler would start from a partly clean latent it
    never sees at inference; this 'trailing' spacing starts from pure noise.
    """
    if not 0 < num_steps <= max_steps("trailing", num_train_timesteps):
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64)[::-1] - 1


SPACINGS = ("uniform", "trailing")  # the timestep spacings by name: SD's, and the one from T-1


def check_spacing(spacing: str) -> str:
    """`spacing`, if it names one of `SPACINGS`; else a ValueError listing them."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return spacing


def spaced_timesteps(num_steps: int, spacing: str = "uniform", num_train_timesteps: int = 1000) -> np.ndarray:
    """The ascending timesteps of a `num_steps` sampler by spacing name: SD's 'uniform' or 'trailing' (from T-1)."""
    spacings = {"uniform": ddim_timesteps, "trailing": trailing_timesteps}
    return spacings[check_spacing(spacing)](num_steps, num_train_timesteps)


class Scheduler:
    """Timesteps and cumulative alphas of a `num_steps` sampler on the discrete schedule `alphas_cumprod`.

    `spacing` picks the timesteps (`SPACINGS`); the step from timesteps[i] lands on the alpha of the next timestep
    in sampling order, and the last step on `final_alpha_cumprod` (None: alphas_cumprod[0], SD's convention; 1.0:
    a sampler that ends on clean data, as the distilled student). The alphas keep the dtype of `alphas_cumprod`,
    so each step rule computes in the precision it chooses from the schedule's own values.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, spacing: str = "uniform",
                 final_alpha_cumprod: float | None = None):
        if alphas_cumprod.ndim != 1:
            raise ValueError(f"alphas_cumprod must be one alpha per training timestep, got shape "
                             f"{tuple(alphas_cumprod.shape)}")
        if final_alpha_cumprod is not None and not 0 < final_alpha_cumprod <= 1:
            raise ValueError(f"final_alpha_cumprod must be in (0, 1] or None, got {final_alpha_cumprod}")
        self.alphas_cumprod = alphas_cumprod.detach().cpu()
        self.spacing = check_spacing(spacing)
        self.final_alpha_cumprod = final_alpha_cumprod
        self.timesteps: np.ndarray | None = None
        self.alphas: torch.Tensor | None = None
        self.alphas_next: torch.Tensor | None = None

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def set_timesteps(self, num_steps: int) -> Scheduler:
        """Pick `num_steps` timesteps: `timesteps` (descending, sampling order), `alphas` at them and `alphas_next`,
        the alpha each step lands on. Returns the scheduler itself."""
        ascending = spaced_timesteps(num_steps, self.spacing, self.num_train_timesteps)
        alphas = self.alphas_cumprod[torch.from_numpy(ascending)]
        final = self.alphas_cumprod[:1] if self.final_alpha_cumprod is None else \
            torch.tensor([self.final_alpha_cumprod], dtype=self.alphas_cumprod.dtype)
        self.timesteps = ascending[::-1].copy()
        self.alphas = alphas.flip(0)
        self.alphas_next = torch.cat([final, alphas[:-1]]).flip(0)
        return self

    def steps(self, device: torch.device | str) -> list[Step]:
        """(t, a_t, a_next) per step in sampling order, the alphas 0-dim tensors on `device`: one host-to-device
        copy per call, none inside a sampling loop."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_steps) before steps()")
        alphas, alphas_next = torch.stack([self.alphas, self.alphas_next]).to(device)
        return list(zip(self.timesteps.tolist(), alphas, alphas_next))
