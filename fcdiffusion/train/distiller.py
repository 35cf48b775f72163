"""Unified frequency-aware distillation: four FCDiffusion teachers (one per control mode) -> one few-step student.

The student samples in k steps on `trailing_timesteps(k)` (the scheduler it records, `DISTILLED_SCHEDULER`), for
every k of `student_steps` (it records them and refuses others). Two targets (`objective`, docs/distillation.md):

- `trajectory` (default; trajectory distillation, Luhman & Luhman 2021, one segment per student step as in TRACT,
  guided teachers as in Meng et al. 2023): each example's teacher runs its full `teacher_steps`-step guided DDIM
  solve once (`fcdiffusion.train.trajectory`), kept at the student's step boundaries and pooled for reuse; student
  step (k, i) from the solve's state at t_i must land, in ONE guidance-free DDIM step, on its state at t_{i-1}.
  The x0 error is normalised per student step (`normalised`).
- `progressive` (progressive distillation's target, Salimans & Ho 2022): for a random student step t_i -> t_{i-1}
  the teacher runs n guided DDIM sub-steps from x_{t_i} = q_sample(z0, t_i) to t_{i-1}.

Either way the student's x0 target is the x0 for which one DDIM step from its input lands exactly on the teacher's
state (`ddim_x0_target`), every teacher solve runs the shared loop `ldm.models.diffusion.sampling.sample`, and the
x0 error is weighted per DCT band of i + j, each mode weighting up the band its teacher controls. Batches are
mode-major (`mode_chunks`).

Options beyond that (`DistillOptions`): the progressive teacher's sub-steps may be DPM-Solver++(2M)
(`teacher_sampler`); a guidance-conditioned student (`guidance_range`, Meng et al. 2023; CoDi samples w the same
way) draws its guidance scale per example uniformly from the range and the teacher's solve uses that scale; feature
terms (`feature_weights`, `fcdiffusion.train.feature_distill`) compare the student's intermediate features and
cross-attention maps with the teacher's forward at (x_t, t) (trajectory: the guided one, u + w (c - u)); and
`loss_stages` changes the terms' weights from a given step on.

Memory: teachers and student are built on the meta device and adopt their checkpoints' tensors, every frozen
tensor held once (`fcdiffusion.core.weights`). Teachers are not submodules: they stay out of the distiller's
checkpoints (which hold only the student) but follow `.to()` / `.half()` through `_apply`. `distill.teacher_dtype`
(bf16/fp16) holds the teachers' tensors and the frozen base they share with the student in that dtype, while the
student's trained tensors stay float32 (train in fp32 or mixed precision): layers cast their inputs to their
own weights' dtype (`fcdiffusion.core.precision.follow_weight_dtype`), and the noise-schedule buffers stay float32.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from fcdiffusion.core.frequency import CONTROL_MODES, ControlMode, band_mask, dct_2d
from fcdiffusion.core.guidance import check_guidance_range, check_guidance_scale
from fcdiffusion.core.inference import Translator, batch_images
from fcdiffusion.core.memory import make_optimizer
from fcdiffusion.core.model import Cond, FCDiffusion
from fcdiffusion.core.precision import cast_parameters, follow_weight_dtype, precision_dtype, resident_bytes
from fcdiffusion.core.student import STUDENT_OPTIONS, recorded_steps, step_counts, student_config
from fcdiffusion.core.weights import (
    WeightAdopter,
    adopt_student,
    build_on_meta,
    check_trained_teacher,
    finish_loading,
    teacher_mode,
)
from fcdiffusion.train.ema import averaged_weights
from fcdiffusion.train.feature_distill import FeatureTap, check_feature_name, feature_term
from fcdiffusion.train.lr_schedule import LRSchedule
from fcdiffusion.train.trajectory import (
    FINAL,
    START,
    Trajectory,
    TrajectoryPool,
    boundary_timesteps,
    cond_slice,
    teacher_trajectory,
)
from fcdiffusion.train.validation import agreement_metrics, seeded
from ldm.checkpoint import load_checkpoint, save_state_dict
from ldm.models.diffusion.ddim import ddim_x0_target, predicted_x0
from ldm.models.diffusion.ddpm import freeze
from ldm.models.diffusion.sampling import cat_cond, check_sampler, guidance_mix, sample
from ldm.models.diffusion.scheduler import Step, spaced_timesteps

log = logging.getLogger(__name__)


def band_energies(diff: torch.Tensor, bands: Sequence[tuple[int, int | None]]) -> torch.Tensor:
    """(N, len(bands)): per sample, the squared DCT coefficients of `diff` in each i + j band over C*H*W.

    The DCT is orthonormal, so over bands that partition the spectrum the columns sum to the plain MSE.
    Computed in float32 outside autocast (squared fp16 coefficients overflow).
    """
    with torch.autocast(diff.device.type, enabled=False):
        spectrum = dct_2d(diff.float()).pow(2).mean(1)
        h, w = spectrum.shape[-2:]
        masks = torch.stack([band_mask(h, w, low, high, spectrum.device) for low, high in bands]).float()
        return torch.einsum("nhw,bhw->nb", spectrum, masks) / (h * w)


def mode_chunks(items: torch.Tensor | Sequence[Any], modes: Sequence[str]) -> Sequence[Any]:
    """`items`' samples split by mode: the distiller's batches (tensors: views) and lists of examples (trajectories)
    are mode-major, an equal share per mode in the order of `modes`."""
    if len(items) % len(modes):
        raise ValueError(f"a batch of {len(items)} samples does not split evenly over {len(modes)} modes")
    n = len(items) // len(modes)
    return items.split(n) if torch.is_tensor(items) else [items[i * n:(i + 1) * n] for i in range(len(modes))]


OBJECTIVES = ("trajectory", "progressive")  # see the module docstring and docs/distillation.md
BASE_TERMS = ("distill", "denoise", "control")  # loss terms besides the feature terms, as loss_stages names them


@dataclass
class DistillOptions:
    """What the `distill:` config section sets (see configs/distill_config.yaml)."""

    objective: str = "trajectory"
    student_steps: int | list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher_steps: int = 50
    trajectory_pool: int = 256
    trajectory_refresh: int = 1
    trajectory_prefill: int = 0
    trajectory_prefill_batch: int = 0
    trajectory_file: str | None = None
    teacher_substeps: int = 2
    guidance_scale: float | None = None
    modes_per_step: int = 4
    distill_weight: float = 1.0
    denoise_weight: float = 0.0
    control_weight: float = 0.0
    bands: dict[str, int] = field(default_factory=lambda: {"all": 0})
    band_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    log_teacher_steps: int = 0
    teacher_dtype: str = "fp32"
    teacher_sampler: str = "ddim"
    guidance_range: list[float] | None = None
    feature_weights: dict[str, float] = field(default_factory=dict)
    loss_stages: list[list[Any]] = field(default_factory=list)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> DistillOptions:
        """Build from a config section, naming unknown keys in a ValueError."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown distill options {unknown}; valid: {', '.join(known)}")
        return cls(**options)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown distillation objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        counts = step_counts(self.student_steps)
        self.student_steps = recorded_steps(self.student_steps)
        if min(self.teacher_substeps, self.modes_per_step, self.teacher_steps, self.trajectory_pool,
               self.trajectory_refresh) < 1:
            raise ValueError("teacher_substeps, modes_per_step, teacher_steps, trajectory_pool and "
                             "trajectory_refresh must be >= 1")
        if self.trajectory_prefill_batch < 0:
            raise ValueError(f"trajectory_prefill_batch must be >= 0 (0: the training batch), got "
                             f"{self.trajectory_prefill_batch}")
        if not 0 <= self.trajectory_prefill <= self.trajectory_pool:
            raise ValueError(f"trajectory_prefill ({self.trajectory_prefill}) must be from 0 to trajectory_pool "
                             f"({self.trajectory_pool}): a pool that cannot hold it would be solved at every step")
        if self.objective == "progressive" and len(counts) > 1:
            raise ValueError(f"objective: progressive distils one step count, got student_steps {counts}; "
                             "objective: trajectory trains several")
        if self.objective == "trajectory" and self.denoise_weight:
            raise ValueError("denoise_weight applies to objective: progressive, whose inputs are noised data; the "
                             "trajectory objective's inputs lie on the teacher's solve, which is not the source")
        precision_dtype(self.teacher_dtype)
        starts = list(self.bands.values())
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"bands maps names to the first i+j of each band, from 0 and increasing; got {self.bands}")
        self.band_weights = {str(ControlMode(mode)): weights for mode, weights in self.band_weights.items()}
        for mode, weights in self.band_weights.items():
            unknown = sorted(set(weights) - set(self.bands))
            if unknown:
                raise ValueError(f"band_weights.{mode} names unknown bands {unknown}; bands: {list(self.bands)}")
        check_sampler(self.teacher_sampler)
        if self.objective == "trajectory" and self.teacher_sampler != "ddim":
            raise ValueError("objective: trajectory follows the teacher's DDIM solve (what inference compares the "
                             f"student with); teacher_sampler {self.teacher_sampler!r} applies to progressive")
        if self.guidance_range is not None:
            check_guidance_range(self.guidance_range)
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale, self.guidance_range)
        for name in self.feature_weights:
            check_feature_name(name)
        for stage in self.loss_stages:
            if len(stage) != 2 or not isinstance(stage[0], int) or stage[0] < 0 or not isinstance(stage[1], Mapping):
                raise ValueError(f"each of loss_stages is [first step, {{term: weight}}], got {stage}")
            for name in stage[1]:
                if name not in BASE_TERMS:
                    check_feature_name(name)
        if any(b[0] <= a[0] for a, b in zip(self.loss_stages, self.loss_stages[1:])):
            raise ValueError(f"loss_stages must start at increasing steps, got {[s[0] for s in self.loss_stages]}")

    def loss_weights(self, step: int) -> dict[str, float]:
        """Every term's weight at global step `step`: the base weights (`distill`, `denoise`, `control`,
        `feature_weights`) with the entries of the latest of `loss_stages` that has started over them."""
        started = [stage for start, stage in self.loss_stages if start <= step]
        weights = {"distill": self.distill_weight, "denoise": self.denoise_weight, "control": self.control_weight,
                   **{name: 0.0 for name in self.feature_names()}, **self.feature_weights,
                   **(started[-1] if started else {})}
        return {name: float(weight) for name, weight in weights.items()}

    def feature_names(self) -> list[str]:
        """The feature terms any stage weighs (the hooks to install), in order of first mention."""
        names = [*self.feature_weights, *(name for _, stage in self.loss_stages for name in stage)]
        return list(dict.fromkeys(name for name in names if name not in BASE_TERMS))

    def measured_terms(self) -> set[str]:
        """The optional terms (`control` and the feature terms) that some stage weighs: the loss computes and logs
        them at every step, also while weighted 0, so every logged step shows their current value (a logger
        repeats the last value of a metric that is not logged)."""
        weighed = any(self.loss_weights(step)["control"] for step in [0, *(start for start, _ in self.loss_stages)])
        return {*self.feature_names(), *(["control"] if weighed else [])}

    def band_limits(self) -> list[tuple[int, int | None]]:
        """Inclusive (low, high) per band; the last is open-ended."""
        starts = list(self.bands.values())
        return [(s, e - 1) for s, e in zip(starts, starts[1:])] + [(starts[-1], None)]

    def weight_matrix(self) -> torch.Tensor:
        """(len(CONTROL_MODES), len(bands)) loss weights; 1 where the config does not say."""
        return torch.tensor([[float(self.band_weights.get(m, {}).get(b, 1.0)) for b in self.bands]
                             for m in CONTROL_MODES])


class FrequencyDistiller(pl.LightningModule):
    """Distils the teachers `teachers` (mode -> checkpoint) into one `FCDiffusionStudent`.

    `model_config` is the teachers' `{target, params}` node; `student` holds `FCDiffusionStudent` options
    (`trainable`, `lora_rank`, `lora_alpha`); `distill` the `DistillOptions`. With `teachers` and
    `student_init` both None nothing is loaded and every tensor stays on the meta device (to plan memory).
    A teacher checkpoint that records another control mode than the one it is given for is refused.
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        teachers: Mapping[str, str | os.PathLike] | None = None,
        student_init: str | os.PathLike | None = None,
        student: Mapping[str, Any] | None = None,
        distill: Mapping[str, Any] | None = None,
        learning_rate: float = 1e-5,
        modes: Sequence[str] = CONTROL_MODES,
    ):
        super().__init__()
        if (teachers is None) != (student_init is None):
            raise ValueError("give the teacher checkpoints and the student initialisation, or neither (meta build)")
        modes = list(teachers) if teachers is not None else list(modes)
        if not modes:
            raise ValueError("no teachers given")
        self.modes = [ControlMode(m) for m in modes]
        self.options = DistillOptions.from_mapping(dict(distill or {}))
        self.learning_rate = learning_rate
        teacher_models = {}
        for mode in self.modes:
            teacher_config = copy.deepcopy(dict(model_config))
            teacher_config["params"] = {**teacher_config.get("params", {}), "control_mode": mode}
            teacher_models[mode] = build_on_meta(teacher_config)
        unknown = sorted(set(student or {}) - set(STUDENT_OPTIONS))
        if unknown:
            raise ValueError(f"unknown student options {unknown}; valid: {', '.join(STUDENT_OPTIONS)}")
        self.student = build_on_meta(student_config(model_config, **dict(student or {}), modes=self.modes,
                                                    student_steps=self.options.student_steps,
                                                    guidance_scale=self.options.guidance_scale,
                                                    guidance_range=self.options.guidance_range))
        # Frozen tensors take `teacher_dtype` before any weights arrive, so the adopter converts, compares and
        # shares them in that dtype (a resumed student's stored bf16 base is then shared with the teachers' too).
        dtype = precision_dtype(self.options.teacher_dtype)
        cast_parameters([*teacher_models.values(), self.student], dtype, skip=self.student.trainable_parameters())
        adopter = WeightAdopter()
        if teachers is None:
            for model in [*teacher_models.values(), self.student]:
                adopter.share_structure(model)
        else:
            for mode, teacher in teacher_models.items():
                source = os.fspath(teachers[mode])
                state_dict, metadata = load_checkpoint(source)
                check_trained_teacher(state_dict, source)
                teacher_mode(metadata, source, mode)
                adopter.adopt(teacher, state_dict, source)
                finish_loading(teacher, source)
            init_state, _ = load_checkpoint(student_init)
            adopt_student(self.student, init_state, os.fspath(student_init), adopter, allow_fcdiffusion=True)
        if adopter.mismatched:
            log.warning("%d frozen tensors differ between the models and are held per model, e.g. %s",
                        len(adopter.mismatched), sorted(adopter.mismatched)[:5])
        for teacher in teacher_models.values():
            freeze(teacher)
        self._teachers = teacher_models  # a plain dict: not submodules, so not in state_dict / checkpoints
        names = self.options.feature_names()  # hooks of the feature terms, installed only while a loss records
        self._taps = {name: FeatureTap(model, names)
                      for name, model in [*teacher_models.items(), ("student", self.student)]}
        if dtype != torch.float32:
            for model in self.models():
                follow_weight_dtype(model)
        self.band_limits = self.options.band_limits()
        self.band_names = list(self.options.bands)
        self.register_buffer("band_weights", self.options.weight_matrix(), persistent=False)
        spacing = self.student.scheduler_config["spacing"]
        self.step_counts = step_counts(self.options.student_steps)
        self.schedules = {k: spaced_timesteps(k, spacing, self.student.num_timesteps).tolist()
                          for k in self.step_counts}
        timesteps = self.schedules[self.step_counts[-1]]
        self.register_buffer("student_timesteps", torch.as_tensor(timesteps, device="cpu"), persistent=False)
        # Trajectory objective: each student step (k, i) of every trained count, its error scale per mode, the pool.
        self.step_pairs = [(k, i) for k in self.step_counts for i in range(k)]
        self.boundaries = boundary_timesteps(self.step_counts, spacing, self.student.num_timesteps)
        self.register_buffer("step_error", torch.full((len(CONTROL_MODES), len(self.step_pairs)), float("nan")),
                             persistent=False)
        self.pool, self._pool_from_file = TrajectoryPool(self.options.trajectory_pool), False
        counts = self.parameter_counts()
        log.info("distiller: %d teachers (%s) + student; resident parameters %.2fM (unique tensors) vs %.2fM for "
                 "independent models (%.1f%%), %.1f MB resident (teachers in %s); student trains %.2fM",
                 len(self.modes), ", ".join(self.modes), counts["resident"] / 1e6, counts["independent"] / 1e6,
                 100 * counts["resident"] / counts["independent"], counts["resident_bytes"] / 1e6,
                 self.options.teacher_dtype, counts["trainable"] / 1e6)

    # ---- models and memory --------------------------------------------------------------------------------
    @property
    def teachers(self) -> dict[str, FCDiffusion]:
        return self._teachers

    def models(self) -> list[nn.Module]:
        return [*self._teachers.values(), self.student]

    def parameter_counts(self) -> dict[str, int]:
        """Parameter elements and tensor bytes the models hold.

        'resident': elements of the unique parameter tensors of all models; 'independent': each model counted
        on its own (what separate copies would hold); 'trainable': the student's trained elements.
        'resident_bytes': bytes of the unique parameters and buffers of all models, in their current dtypes;
        'teacher_bytes': the same for the teachers alone (with the frozen base they share with the student);
        'independent_bytes': each model on its own with every floating tensor in float32 (five fp32 models).
        """
        unique = {id(p): p.numel() for m in self.models() for p in m.parameters()}
        independent = sum(sum(p.numel() for p in m.parameters()) for m in self.models())
        trainable = sum(p.numel() for p in self.student.trainable_parameters())
        independent_bytes = sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
                                for m in self.models() for t in [*m.parameters(), *m.buffers()])
        return {"resident": sum(unique.values()), "independent": independent, "trainable": trainable,
                "resident_bytes": resident_bytes(self.models()),
                "teacher_bytes": resident_bytes(self._teachers.values()), "independent_bytes": independent_bytes}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FrequencyDistiller:
        """Move/cast the teachers with the student (shared Parameters are updated in place, so stay shared)."""
        super()._apply(fn, recurse)
        device = self.student.alphas_cumprod.device
        for teacher in getattr(self, "_teachers", {}).values():
            teacher._apply(fn, recurse)
            teacher.to(device)  # a no-op move that also updates the teacher's Lightning `device` property
        return self

    def train(self, mode: bool = True) -> FrequencyDistiller:
        """Train the student only; the teachers stay in eval mode."""
        super().train(mode)
        for teacher in self._teachers.values():
            teacher.eval()
        return self

    # ---- the loss, part by part ---------------------------------------------------------------------------
    def alpha_at(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] as (N, 1, 1, 1), with t = -1 meaning alpha 1 (the clean end of the trajectory)."""
        alphas = self.student.alphas_cumprod
        a = torch.where(t >= 0, alphas[t.clamp(min=0)], torch.ones((), dtype=alphas.dtype, device=alphas.device))
        return a.view(-1, 1, 1, 1)

    def student_schedule(self, step_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_i, t_{i-1}) of the student's trailing schedule for step indices i (t_{-1} = -1, alpha 1)."""
        timesteps = self.student_timesteps.to(step_index.device)  # a buffer: already there after `.to(device)`
        t = timesteps[step_index]
        return t, torch.where(step_index > 0, timesteps[(step_index - 1).clamp(min=0)], torch.full_like(t, -1))

    @staticmethod
    def teacher_condition(cond: Cond) -> Cond:
        """A student's conditioning as a teacher takes it: the same prompt and control signal, no mode label, no
        guidance scale and no step size."""
        return {k: v for k, v in cond.items() if k not in ("y", "guidance_scale", "step_size")}

    def teacher_steps(self, t: torch.Tensor, t_prev: torch.Tensor) -> list[Step]:
        """The teacher's n sub-steps from t to t_prev (per sample, (N,)) as `sample` takes them: (s, a_s, a_next)
        on the integer timesteps round(t + (t_prev - t) j / n), alpha 1 at t_prev = -1."""
        n = self.options.teacher_substeps
        grid = [torch.round(t + (t_prev - t) * (j / n)).long() for j in range(n + 1)]
        return [(s.clamp(min=0), self.alpha_at(s), self.alpha_at(s_next)) for s, s_next in zip(grid[:-1], grid[1:])]

    @torch.no_grad()
    def teacher_solve(self, mode: str, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                      cond: Cond) -> torch.Tensor:
        """The teacher of `mode` from x at t to t_prev: `sample` on its guided sub-steps (`teacher_steps`) with DDIM
        or DPM-Solver++(2M) (`teacher_sampler`; its first sub-step is first order, i.e. DDIM), at each sample's
        `cond["guidance_scale"]` for a guidance-conditioned student, else at the one distillation scale."""
        teacher = self._teachers[mode]
        guidance_scale = cond.get("guidance_scale")
        if guidance_scale is None:
            guidance_scale = self.options.guidance_scale
            guidance_scale = teacher.guidance_scale if guidance_scale is None else guidance_scale
        cond = self.teacher_condition(cond)
        return sample(teacher.apply_model, x, self.teacher_steps(t, t_prev), cond,
                      teacher.unconditional_conditioning(cond), guidance_scale, sampler=self.options.teacher_sampler)

    @torch.no_grad()
    def teacher_targets(self, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, modes: Sequence[str],
                        conds: Sequence[Cond]) -> torch.Tensor:
        """The student's x0 targets: per mode chunk, the x0 whose one DDIM step lands on the teacher's solve."""
        x_prev = torch.cat([self.teacher_solve(mode, x, s, s_prev, cond) for mode, cond, x, s, s_prev
                            in zip(modes, conds, *(mode_chunks(v, modes) for v in (x_t, t, t_prev)))])
        return ddim_x0_target(x_t, x_prev, self.alpha_at(t), self.alpha_at(t_prev))

    def band_loss(self, x0: torch.Tensor, target: torch.Tensor, modes: Sequence[str]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample band-weighted x0 error (N,), per-sample band energies (N, bands)); samples mode-major."""
        energies = band_energies(x0 - target, self.band_limits)
        weights = self.band_weights.to(energies)  # rows picked by Python ints below: views, no host-to-device copy
        per_sample = torch.cat([weights[CONTROL_MODES.index(mode)].expand(len(chunk), -1)
                                for mode, chunk in zip(modes, mode_chunks(energies, modes))])
        return (energies * per_sample).sum(1), energies

    def control_loss(self, x_t: torch.Tensor, t: torch.Tensor, modes: Sequence[str], conds: Sequence[Cond],
                     student_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Mean MSE between the student's control-net outputs and those of each sample's teacher: its conditional
        outputs, or with `guidance` (N,) the guided ones, u + w (c - u), as the teacher's guided solve combines its
        two branches (the trajectory objective's target)."""
        with torch.no_grad():
            per_mode = []
            for mode, cond, x, s, w in zip(modes, conds, mode_chunks(x_t, modes), mode_chunks(t, modes),
                                           mode_chunks(guidance, modes) if guidance is not None else modes):
                teacher, cond = self._teachers[mode], self.teacher_condition(cond)
                pairs = teacher.control(x, s, cond)
                if guidance is not None:
                    unconditional = teacher.control(x, s, teacher.unconditional_conditioning(cond))
                    pairs = [tuple(guidance_mix(c, u, w) for c, u in zip(pair, other))
                             for pair, other in zip(pairs, unconditional)]
                per_mode.append(pairs)
            teacher = [torch.cat(parts) for pair in zip(*per_mode) for parts in zip(*pair)]
        student = [tensor for pair in student_pairs for tensor in pair]
        return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()

    @torch.no_grad()
    def teacher_features(self, x_t: torch.Tensor, t: torch.Tensor, modes: Sequence[str], conds: Sequence[Cond],
                         names: Sequence[str], guidance: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
        """Per feature term, each sample's teacher's features from its conditional forward at (x_t, t),
        concatenated over the mode chunks (mode-major, as the student's batch). With `guidance` (N,), block outputs
        are the guided u + w (c - u) of the two branches; attention maps stay the conditional branch's (a
        distribution over the prompt's tokens: the unconditional branch attends to the empty prompt's)."""
        per_mode = []
        for mode, cond, x, s, w in zip(modes, conds, mode_chunks(x_t, modes), mode_chunks(t, modes),
                                       mode_chunks(guidance, modes) if guidance is not None else modes):
            teacher, cond = self._teachers[mode], self.teacher_condition(cond)
            with self._taps[mode].recording(names) as features:
                teacher.apply_model(x, s, cond)
            if guidance is not None:
                blocks = [name for name in names if not name.startswith("attn_")]
                with self._taps[mode].recording(blocks) as unconditional:
                    teacher.apply_model(x, s, teacher.unconditional_conditioning(cond))
                for name in blocks:
                    features[name] = [guidance_mix(c, u, w) for c, u in zip(features[name], unconditional[name])]
            per_mode.append(features)
        return {name: [torch.cat(parts) for parts in zip(*(f[name] for f in per_mode))] for name in names}

    def distillation_loss(self, z: torch.Tensor, context: torch.Tensor, modes: Sequence[str],
                          step_index: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                          guidance_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and logs for latents z (B, C, H, W) with text context, trained on every mode in `modes`.

        Samples are ordered mode-major (B per mode); `step_index` (B * len(modes),) picks each one's student step,
        `noise` its x_t (trajectory: its x_T) and, for a guidance-conditioned student, `guidance_scale` its scale,
        all random when None (give them for a reproducible loss). With the trajectory objective the teacher's
        trajectories are solved here (`solve_trajectories`) and `step_index` indexes `step_pairs`; training draws
        them from the pool instead (`training_step`). The terms' weights are those of the current global step
        (`loss_stages`).
        """
        if self.options.objective == "trajectory":
            trajectories = self.solve_trajectories(z, context, modes, noise, guidance_scale)
            return self.trajectory_loss(trajectories, modes, step_index)
        b, m = z.shape[0], len(modes)
        if step_index is None:
            step_index = torch.randint(0, self.step_counts[0], (b * m,), device=z.device)
        noise = torch.randn((b * m, *z.shape[1:]), device=z.device, dtype=z.dtype) if noise is None else noise
        t, t_prev = self.student_schedule(step_index.to(z.device))
        conds = [self.student.condition(z, context, mode) for mode in modes]
        if self.student.guidance_conditioned:
            low, high = self.student.guidance_range
            guidance_scale = torch.empty(b * m, device=z.device).uniform_(low, high) if guidance_scale is None \
                else guidance_scale.to(z.device)
            conds = [{**cond, "guidance_scale": chunk}
                     for cond, chunk in zip(conds, mode_chunks(guidance_scale, modes))]
        z0 = z.repeat(m, 1, 1, 1)
        x_t = self.student.q_sample(z0, t, noise)
        target = self.teacher_targets(x_t, t, t_prev, modes, conds)
        weights = self.options.loss_weights(self.global_step)
        x0, pairs, student_features = self.student_pass(x_t, t, functools.reduce(cat_cond, conds))

        weighted, energies = self.band_loss(x0, target, modes)
        loss_distill = weighted.mean()
        loss_denoise = F.mse_loss(x0.float(), z0.float())
        loss = weights["distill"] * loss_distill + weights["denoise"] * loss_denoise
        logs = {"train/loss_distill": loss_distill.detach(), "train/loss_denoise": loss_denoise.detach()}
        loss = self.shared_terms(loss, logs, x_t, t, modes, conds, pairs, student_features, weighted, energies)
        logs["train/loss"] = loss.detach()
        return loss, logs

    def student_pass(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond
                     ) -> tuple[torch.Tensor, list, dict[str, list[torch.Tensor]]]:
        """The student's forward at (x_t, t): its x0, its control pairs and the features every weighed term needs."""
        features = self.options.feature_names()
        recording = self._taps["student"].recording(features) if features else contextlib.nullcontext({})
        with recording as student_features:
            eps, pairs = self.student.eps_and_control(x_t, t, cond)
        return predicted_x0(x_t, eps, self.alpha_at(t)), pairs, student_features

    def shared_terms(self, loss: torch.Tensor, logs: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
                     modes: Sequence[str], conds: Sequence[Cond], pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     student_features: Mapping[str, list[torch.Tensor]], weighted: torch.Tensor,
                     energies: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """`loss` plus the control and feature terms both objectives weigh (against the guided teacher with
        `guidance`), their values and the band and per-mode errors added to `logs`."""
        weights, measured = self.options.loss_weights(self.global_step), self.options.measured_terms()
        if "control" in measured:
            loss_control = self.control_loss(x_t, t, modes, conds, pairs, guidance)
            loss = loss + weights["control"] * loss_control
            logs["train/loss_control"] = loss_control.detach()
        names = self.options.feature_names()
        if names:
            teacher_features = self.teacher_features(x_t, t, modes, conds, names, guidance)
            for name in names:
                value = feature_term(name, student_features[name], teacher_features[name])
                loss = loss + weights[name] * value
                logs[f"train/feat_{name}"] = value.detach()
        for name, value in zip(self.band_names, energies.detach().mean(0)):
            logs[f"train/band_{name}"] = value
        for mode, chunk in zip(modes, mode_chunks(weighted, modes)):
            logs[f"train/distill_{mode}"] = chunk.detach().mean()
        return loss

    # ---- the trajectory objective -------------------------------------------------------------------------
    def example_guidance(self, n: int, device: torch.device, guidance_scale: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """Each example's guidance scale (n,): given, drawn uniformly from a guidance-conditioned student's range,
        or the one distillation scale (`guidance_scale`, else the teachers')."""
        if guidance_scale is not None:
            return guidance_scale.to(device)
        if self.student.guidance_conditioned:
            low, high = self.student.guidance_range
            return torch.empty(n, device=device).uniform_(low, high)
        scale = self.options.guidance_scale
        scale = next(iter(self._teachers.values())).guidance_scale if scale is None else scale
        return torch.full((n,), float(scale), device=device)

    @torch.no_grad()
    def solve_trajectories(self, z: torch.Tensor, context: torch.Tensor, modes: Sequence[str],
                           noise: torch.Tensor | None = None, guidance_scale: torch.Tensor | None = None
                           ) -> list[Trajectory]:
        """Per example (mode-major, B per mode), the teacher's `teacher_steps`-step guided DDIM solve from its noise
        x_T at its guidance scale, read at the student's boundaries (`teacher_trajectory`), with the student's
        conditioning for it."""
        b, m = z.shape[0], len(modes)
        noise = torch.randn((b * m, *z.shape[1:]), device=z.device, dtype=z.dtype) if noise is None else noise
        scales = self.example_guidance(b * m, z.device, guidance_scale)
        trajectories = []
        for mode, x_T, w in zip(modes, mode_chunks(noise, modes), mode_chunks(scales, modes)):
            cond = self.student.condition(z, context, mode)
            cond.pop("step_size", None)  # a trajectory serves every count: `trajectory_loss` sets each step's
            if self.student.guidance_conditioned:
                cond["guidance_scale"] = w
            teacher, teacher_cond = self._teachers[mode], self.teacher_condition(cond)
            states = teacher_trajectory(teacher.apply_model, teacher.alphas_cumprod, x_T, teacher_cond,
                                        teacher.unconditional_conditioning(teacher_cond), w, self.boundaries,
                                        self.options.teacher_steps)
            trajectories += [Trajectory(str(mode), cond_slice(cond, j), w[j:j + 1],
                                        {key: state[j:j + 1] for key, state in states.items()}) for j in range(b)]
        return trajectories

    def pair_states(self, trajectory: Trajectory, pair: tuple[int, int]) -> tuple[torch.Tensor, int, torch.Tensor,
                                                                                    int]:
        """(x at t_i, t_i, the solve's state at t_{i-1}, t_{i-1}) of student step i of the k-step schedule, pair
        (k, i); t_{-1} = -1 is the final latents (alpha 1)."""
        k, i = pair
        timesteps = self.schedules[k]
        t, t_prev = timesteps[i], timesteps[i - 1] if i > 0 else -1
        x = trajectory.states[START if i == k - 1 else t]
        return x, t, trajectory.states[FINAL if i == 0 else t_prev], t_prev

    def normalised(self, weighted: torch.Tensor, modes: Sequence[str], pair_index: torch.Tensor) -> torch.Tensor:
        """`weighted` (N, samples mode-major over `modes`) divided by the running scale of its mode's band-weighted
        error at its student step (`step_error[mode, (k, i)]`: an exponential average, decay 0.9, of the batch means,
        updated while training). The error of a step from pure noise is orders of magnitude above that of the last
        step, and a mode whose weights raise a band holding much of its error would outweigh the others:
        normalised, every mode counts alike at every step, and the band weights only move the emphasis between the
        bands of each mode's error."""
        mode_index = torch.cat([torch.full((len(chunk),), CONTROL_MODES.index(mode), device=pair_index.device)
                                for mode, chunk in zip(modes, mode_chunks(pair_index, modes))])
        cell = mode_index * len(self.step_pairs) + pair_index
        values = weighted.detach().float()
        scale = self.step_error.clone().view(-1)
        for c in cell.unique().tolist():
            mean = values[cell == c].mean()
            scale[c] = 0.9 * scale[c] + 0.1 * mean if not torch.isnan(scale[c]) else mean
        if self.training:
            self.step_error.copy_(scale.view_as(self.step_error))
        return weighted / scale[cell].clamp(min=1e-12).to(weighted)

    def trajectory_loss(self, trajectories: Sequence[Trajectory], modes: Sequence[str],
                        pair_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and logs of the student on solved `trajectories` (mode-major, an equal share per mode in `modes`):
        example j learns student step `step_pairs[pair_index[j]]` (random when None): from the solve's state at t_i
        its one DDIM step must land on the solve's state at t_{i-1}, i.e. its x0 on `ddim_x0_target`. The x0 error
        is band-weighted per mode, normalised per mode and step (`normalised`); control and feature terms compare with
        the guided teacher at the example's w on the same input."""
        device = trajectories[0].guidance_scale.device
        if pair_index is None:
            pair_index = torch.randint(len(self.step_pairs), (len(trajectories),))
        pair_index = pair_index.to(device)
        picked = [self.pair_states(tr, self.step_pairs[p]) for tr, p in zip(trajectories, pair_index.tolist())]
        x_t = torch.cat([x for x, _, _, _ in picked])
        x_prev = torch.cat([x for _, _, x, _ in picked])
        t = torch.tensor([s for _, s, _, _ in picked], device=device)
        t_prev = torch.tensor([s for _, _, _, s in picked], device=device)
        target = ddim_x0_target(x_t, x_prev, self.alpha_at(t), self.alpha_at(t_prev))
        guidance = torch.cat([tr.guidance_scale for tr in trajectories])
        chunks = [functools.reduce(cat_cond, [tr.cond for tr in chunk])
                  for chunk in mode_chunks(trajectories, modes)]
        if self.student.step_conditioned:  # each example's step is one of its count k: num_timesteps / k
            sizes = torch.tensor([self.student.step_size(self.step_pairs[p][0]) for p in pair_index.tolist()],
                                 device=device)
            chunks = [{**cond, "step_size": size} for cond, size in zip(chunks, mode_chunks(sizes, modes))]
        weights = self.options.loss_weights(self.global_step)
        x0, pairs, student_features = self.student_pass(x_t, t, functools.reduce(cat_cond, chunks))
        weighted, energies = self.band_loss(x0, target, modes)
        loss_distill = self.normalised(weighted, modes, pair_index).mean()
        loss = weights["distill"] * loss_distill
        logs = {"train/loss_distill": loss_distill.detach()}
        loss = self.shared_terms(loss, logs, x_t, t, modes, chunks, pairs, student_features, weighted, energies,
                                 guidance)
        for k in self.step_counts:
            of_k = torch.tensor([self.step_pairs[p][0] == k for p in pair_index.tolist()], device=device)
            if of_k.any():
                logs[f"train/error_k{k}"] = energies.detach().sum(1)[of_k].mean()
        logs["train/loss"] = loss.detach()
        return loss, logs

    def pooled_trajectories(self, batch: Mapping[str, Any], modes: Sequence[str]) -> list[Trajectory]:
        """B trajectories per mode (B: the batch's size) from the pool, mode-major; the batch's are solved and pooled
        every `trajectory_refresh` steps after the first and whenever the pool lacks one of `modes` (never with a pool
        read from `trajectory_file`; `prefill_pool` fills it before the first step). The batch is encoded (VAE, text
        encoder) only for a solve: the steps between train on the pool alone."""
        n = len(batch[self.student.first_stage_key])
        if self._pool_from_file:
            missing = [m for m in modes if not self.pool.count(m)]
            if missing:
                raise ValueError(f"the trajectory file {self.options.trajectory_file} holds no {', '.join(missing)} "
                                 "trajectory; distil from a file of a run with the same modes")
        elif (0 < self.global_step and self.global_step % self.options.trajectory_refresh == 0
              or any(not self.pool.count(m) for m in modes)):
            z, context = self.student.get_input(batch)
            for trajectory in self.solve_trajectories(z, context, modes):
                self.pool.add(trajectory)
        return [trajectory for mode in modes for trajectory in self.pool.draw(n, mode)]

    def prefill_pool(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Solve `trajectory_prefill` trajectories (rounded up to whole photos, each solved for every mode with its
        own noise and guidance scale) from the photos of `batches`, read again from the start until there are
        enough, `trajectory_prefill_batch` photos per solve (0: a training batch's worth). Every step then draws
        from the whole pool. A larger solve batch costs memory, not fidelity; it pays where a small batch leaves the
        device idle (a GPU), not on a CPU, where the tiny teacher's evaluations are compute-bound."""
        photos = -(-(self.options.trajectory_prefill - len(self.pool)) // len(self.modes))
        if self._pool_from_file or photos <= 0:
            return
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        encoded = 0
        while encoded < photos:
            before = encoded
            for batch in batches:
                parts.append(self.student.get_input(self.transfer_batch_to_device(batch, self.device, 0)))
                encoded += len(parts[-1][0])
                if encoded >= photos:
                    break
            if encoded == before:
                raise ValueError("the training data yielded no batch to solve trajectories from")
        z = torch.cat([z for z, _ in parts])[:photos]
        context = torch.cat([context for _, context in parts])[:photos]
        size = self.options.trajectory_prefill_batch or len(parts[0][0])
        log.info("solving %d trajectories (%d photos x %d modes, %d photos per solve) before the first step",
                 photos * len(self.modes), photos, len(self.modes), size)
        for chunk in tqdm(range(0, photos, size), desc="teacher trajectories", unit="solve",
                          disable=self._trainer is None or not self._trainer.is_global_zero):
            for trajectory in self.solve_trajectories(z[chunk:chunk + size], context[chunk:chunk + size], self.modes):
                self.pool.add(trajectory)

    # ---- Lightning hooks ----------------------------------------------------------------------------------
    def sample_modes(self) -> list[str]:
        """The modes of one step: all teachers' or `modes_per_step` of them drawn at random, in canonical order."""
        k = self.options.modes_per_step
        if k >= len(self.modes):
            return list(self.modes)
        picked = set(torch.randperm(len(self.modes))[:k].tolist())
        return [mode for i, mode in enumerate(self.modes) if i in picked]

    def on_fit_start(self) -> None:
        """With `trajectory_file` naming an existing file, train on its pool and solve nothing."""
        path = self.options.trajectory_file
        if self.options.objective == "trajectory" and path and os.path.isfile(path):
            self.pool, self._pool_from_file = TrajectoryPool.load(path, self.device), True
            log.info("training on the %d trajectories of %s (no teacher solves)", len(self.pool), path)

    def on_train_start(self) -> None:
        """Fill the trajectory pool from the training data before the first step (`prefill_pool`); a resumed run
        fills it anew."""
        if self.options.objective == "trajectory" and self.options.trajectory_prefill:
            self.prefill_pool(self.trainer.train_dataloader)

    def on_train_end(self) -> None:
        """With `trajectory_file` set and not read, write the pool there (rank 0) for another run to train on."""
        path = self.options.trajectory_file
        if self.options.objective == "trajectory" and path and not self._pool_from_file and len(self.pool) \
                and self.trainer.is_global_zero:
            self.pool.save(path)
            log.info("wrote the %d pooled trajectories to %s", len(self.pool), path)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        modes = self.sample_modes()
        if self.options.objective == "trajectory":
            loss, logs = self.trajectory_loss(self.pooled_trajectories(batch, modes), modes)
        else:
            loss, logs = self.distillation_loss(*self.student.get_input(batch), modes)
        if self.logs_this_step():
            # Only where the logger writes (every log_every_n_steps): Lightning's bookkeeping of a logged value costs
            # about 1 ms of host time, 15 ms a step for these. The progress bar turns its values into numbers, a
            # device sync for a GPU tensor; the host copy made here, where the logger syncs anyway, adds none.
            n = len(batch[self.student.first_stage_key])
            self.log_dict(logs, on_step=True, batch_size=n)
            self.log("loss", logs["train/loss"].cpu(), prog_bar=True, logger=False, batch_size=n)
        return loss

    def logs_this_step(self) -> bool:
        """Whether the trainer writes logs at this step (every `log_every_n_steps`, counted as Lightning's logger
        connector counts them; always without a trainer)."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (trainer.global_step + 1) % every == 0

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """`val/loss` and its parts (the training logs, renamed) over every mode and evenly over the student's steps,
        with noise and every other draw seeded by the batch's position; on the first (fixed) batch also the
        student's agreement with its teachers and its band fidelity (`train.validation.agreement_metrics`)."""
        with seeded(batch_idx, self.device):
            z, context = self.student.get_input(batch)
            n = z.shape[0] * len(self.modes)
            pairs = len(self.step_pairs) if self.options.objective == "trajectory" else self.step_counts[0]
            step_index = torch.arange(n, device=z.device) % pairs
            _, logs = self.distillation_loss(z, context, list(self.modes), step_index=step_index)
        logs = {f"val/{name.split('/', 1)[-1]}": value for name, value in logs.items()}
        if batch_idx == 0:
            logs.update(agreement_metrics(self.student, self.teachers, batch,
                                             self.__dict__.setdefault("_validation_references", {})))
        self.log_dict(logs, batch_size=z.shape[0], sync_dist=True)

    lr_schedule = LRSchedule()  # `fcdiffusion.train.training.fit` sets the run's
    optimizer_name = "adamw"  # and its `--optimizer` (`fcdiffusion.core.memory.OPTIMIZERS`)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (or `optimizer_name`'s optimizer) on the student's trained parameters, its learning rate following
        `lr_schedule` step by step."""
        return self.lr_schedule.attach(make_optimizer(self.student.trainable_parameters(), self.learning_rate,
                                                      self.optimizer_name))

    def student_metadata(self) -> dict[str, str]:
        """The student's self-description plus how it was distilled."""
        return {**self.student.weights_metadata(), "fcdiffusion.distill": json.dumps(asdict(self.options))}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["metadata"] = self.student_metadata()

    def export_student(self, path: str | os.PathLike) -> None:
        """Write the student's weights alone with their metadata (atomically): `load_student(path)` rebuilds it.
        With EMA on (`fcdiffusion.train.ema`), the averaged weights."""
        with averaged_weights(self):
            save_state_dict(self.student.state_dict(), path, self.student_metadata())

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
        """Source, then per mode the student's k-step sample (and the teacher's, if log_teacher_steps > 0)."""
        images, prompts = batch_images(batch, self.student.first_stage_key, self.student.cond_stage_key, N)
        student = Translator(self.student)
        z, context = student.encode(images, prompts)
        results = student.translate_latents(z, context, self.modes, seed=seed)
        columns = {"source": images}
        for mode in self.modes:
            columns[mode] = results[mode].image
            if self.options.log_teacher_steps > 0:
                teacher = Translator(self._teachers[mode]).translate_latents(
                    z, context, [mode], seed=seed, steps=self.options.log_teacher_steps,
                    guidance_scale=self.options.guidance_scale)
                columns[f"{mode} teacher"] = teacher[mode].image
        return columns


class StudentExport(pl.Callback):
    """Writes the student-only weights file to `path` with every checkpoint the trainer saves (rank 0)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            pl_module.export_student(self.path)
