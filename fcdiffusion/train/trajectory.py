"""Teacher trajectories for trajectory distillation: the full guided solve, read at the student's step boundaries.

The student of `objective: trajectory` learns to walk the teacher's own `teacher_steps`-step guided solve (what
inference compares it with) in k steps, for every k it is trained for (Luhman & Luhman 2021, "Knowledge
Distillation in Iterative Generative Models", distil the whole solve; TRACT, Berthelot et al. 2023, split it into
segments, one per student step; the guided teacher as in Meng et al. 2023). `teacher_trajectory` runs the solve
once from a noise x_T and keeps its state at each boundary of the student's trailing schedules: the start x_T (the
student's t = T-1), the states at the inner boundaries, and the solve's final latents. A boundary between two grid
points of the solve is read off DDIM's own path from the grid point before it (the DDIM update to its alpha on that
grid point's guided evaluation, which the solve's own step reuses), so every state lies on the solve whose result
the student is measured against. `TrajectoryPool` keeps the solved trajectories (with the conditioning they were
solved under) so that each is computed once and trained on for many steps; `save`/`load` carry a pool to another run
(the band-weight ablation trains on exactly the trajectories of the run it is compared with).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ldm.models.diffusion.ddim import ddim_step
from ldm.models.diffusion.sampling import Cond, EpsModel, guided_eps
from ldm.models.diffusion.scheduler import Scheduler, spaced_timesteps
from ldm.util import atomic_path

START = "start"  # the key of x_T in a trajectory (the student's first boundary, t = T-1)
FINAL = -1  # the key of the solve's final latents (the student's last step lands there, alpha 1)


def boundary_timesteps(step_counts: Sequence[int], spacing: str, num_timesteps: int) -> list[int]:
    """The inner boundaries of every student schedule in `step_counts` (descending): the timesteps the student's
    steps start from, without its first (the start, x_T) and with none for the end (the final latents)."""
    inner = {int(t) for k in step_counts for t in spaced_timesteps(k, spacing, num_timesteps)[:-1]}
    return sorted(inner, reverse=True)


@torch.no_grad()
@torch.no_grad()
def teacher_trajectory(apply_model: EpsModel, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, cond: Cond,
                       uncond: Cond, guidance_scale: torch.Tensor, boundaries: Sequence[int], teacher_steps: int,
                       spacing: str = "uniform") -> dict[int | str, torch.Tensor]:
    """The teacher's `teacher_steps`-step guided DDIM solve from `x_T` on the `spacing` schedule (how a teacher
    samples by default, and the result the benchmark measures the student against), as {START: x_T, t: the state
    at timestep t for t in `boundaries`, FINAL: the result}.

    `guidance_scale` is one scale per sample (N,). A boundary t with t_j >= t > t_{j+1} on the solve's grid is the
    DDIM step from the solve's state at t_j to alpha(t) (t_j itself when equal); a boundary above the grid's first
    timestep is x_T.
    """
    scheduler = Scheduler(alphas_cumprod, spacing).set_timesteps(teacher_steps)
    steps = scheduler.steps(x_T.device)
    alphas = alphas_cumprod.to(x_T.device)
    states: dict[int | str, torch.Tensor] = {START: x_T}
    pending = sorted(boundaries, reverse=True)
    x = x_T
    for index, (t, a_t, a_next) in enumerate(steps):
        next_t = steps[index + 1][0] if index + 1 < len(steps) else -1
        # `sample`'s DDIM step, the evaluation kept for a boundary's update: the same numbers, one evaluation less
        eps = guided_eps(apply_model, x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), cond,
                         uncond, guidance_scale)
        while pending and pending[0] > next_t:
            b = pending.pop(0)
            states[b] = x if b >= t else ddim_step(x, eps, a_t, alphas[b])[0]
        x = ddim_step(x, eps, a_t, a_next)[0]
    states[FINAL] = x
    return states


def cond_slice(cond: Cond, index: int) -> Cond:
    """Sample `index` of a batched conditioning (tensors, lists of tensors or dicts of those), batch dim kept."""
    if isinstance(cond, dict):
        return {key: cond_slice(value, index) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        return [cond_slice(value, index) for value in cond]
    return None if cond is None else cond[index:index + 1]


@dataclass
class Trajectory:
    """One solved example: the mode it was solved for, the student's conditioning for it (one sample), the guidance
    scale it was solved at (1,) and its states (`teacher_trajectory`)."""

    mode: str
    cond: Cond
    guidance_scale: torch.Tensor
    states: dict[int | str, torch.Tensor]


class TrajectoryPool:
    """The last `capacity` trajectories (first in, first out), each one example; `draw(n, mode)` picks n of a mode at
    random. Kept in memory on the training device: a restarted run solves anew."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"trajectory_pool must be >= 1, got {capacity}")
        self.capacity = capacity
        self.entries: list[Trajectory] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, trajectory: Trajectory) -> None:
        self.entries.append(trajectory)
        del self.entries[:-self.capacity]

    def count(self, mode: str) -> int:
        return sum(entry.mode == mode for entry in self.entries)

    def save(self, path: str | os.PathLike) -> None:
        """Write the pool (tensors moved to the CPU) atomically; `load` reads it back."""
        entries = [asdict(entry) for entry in self.entries]
        with atomic_path(path) as tmp:
            torch.save({"capacity": self.capacity, "entries": _to(entries, "cpu")}, tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> TrajectoryPool:
        """A pool written by `save`, its tensors on `device` (tensors and plain containers only: weights_only)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        pool = cls(int(data["capacity"]))
        pool.entries = [Trajectory(**entry) for entry in _to(data["entries"], device)]
        return pool

    def draw(self, n: int, mode: str) -> list[Trajectory]:
        """n trajectories of `mode` drawn uniformly with replacement (torch's generator: seeded runs repeat)."""
        of_mode = [entry for entry in self.entries if entry.mode == mode]
        if not of_mode:
            raise ValueError(f"the trajectory pool holds no {mode} trajectory yet")
        return [of_mode[i] for i in torch.randint(len(of_mode), (n,)).tolist()]


def _to(value, device):
    """`value` with every tensor inside its dicts and lists moved to `device`."""
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to(item, device) for item in value]
    return value.to(device) if torch.is_tensor(value) else value
