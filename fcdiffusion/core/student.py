"""The distilled FCDiffusion student: one network for all four control modes, sampled in a few guidance-free steps.

It is the teacher architecture whose control net also takes the control mode as a class label, the way SD's
UNet takes class labels: `num_classes` = len(CONTROL_MODES), `label_emb` added to the time embedding, the
label `cond["y"]` (an index into `CONTROL_MODES`) per sample. The label embedding starts at zero, so at the
start the student is exactly the network it was initialised from. A guidance-conditioned student
(`guidance_range`) also takes the classifier-free guidance scale w it should reproduce, `cond["guidance_scale"]`,
through a
zero-initialised Fourier embedding added to its control net's time embedding (Meng et al. 2023, "On Distillation
of Guided Diffusion Models"), so w is chosen at inference at one network evaluation per step; a fixed-w student
(the default) learned one scale. A step-conditioned student (`step_embedding`) also takes the size of the step it
takes, `cond["step_size"]` (num_timesteps / k for k steps), the same way: trained for 1, 2 and 4 steps, it starts
each count's first step from the same noise at the same t and must land in a different place for each (shortcut
models, Frans et al. 2024, condition on the step size for the same reason). What trains is configurable:
`control_net` (default), `output_blocks` (the UNet decoder) and/or `lora` (low-rank adapters on the attention
projections of the UNet decoder; the encoder runs under `torch.no_grad()` in `ControlledUnetModel`, so adapters
there could never learn). The mode embedding always trains.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fcdiffusion.core.frequency import CONTROL_MODES, ControlMode
from fcdiffusion.core.guidance import check_guidance_range, check_guidance_scale
from fcdiffusion.core.model import Cond, FrequencyControlledLDM
from ldm.models.diffusion.sampling import StepCallback, check_sampler, sample
from ldm.models.diffusion.scheduler import Scheduler, check_spacing
from ldm.modules.attention import CrossAttention

GUIDANCE_EMBEDDING_SCALE = 1000.0  # w enters the guidance embedding as (w - 1) * 1000 (`ScalarEmbedding`)
TRAINABLE_PARTS = ("control_net", "output_blocks", "lora")
STUDENT_TARGET = "fcdiffusion.core.student.FCDiffusionStudent"
STUDENT_OPTIONS = ("trainable", "lora_rank", "lora_alpha", "step_embedding")
MODE_LABEL_KEY = "control_model.label_emb.weight"
GUIDANCE_PREFIX = "control_model.guidance_emb."
STEP_PREFIX = "control_model.step_emb."
# Teacher-only constructor arguments that a student config does not take.
TEACHER_ONLY_PARAMS = ("control_mode", "guidance_scale", "ddim_steps", "sd_locked")
# How a distilled student samples, as its config records it (`scheduler`): each of its steps learned one DDIM step
# on the trailing spacing, the last one landing on clean data (alpha 1). Files from before the record sample so.
DISTILLED_SCHEDULER = {"sampler": "ddim", "spacing": "trailing", "final_alpha_cumprod": 1.0}


def step_counts(student_steps: int | Sequence[int]) -> list[int]:
    """The step counts a student is trained for, ascending: `student_steps` is one count or a list of them."""
    counts = [student_steps] if isinstance(student_steps, int) else list(student_steps)
    if not counts or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in counts):
        raise ValueError(f"student_steps must be a step count >= 1 or a list of them, got {student_steps}")
    return sorted(set(counts))


def recorded_steps(student_steps: int | Sequence[int]) -> int | list[int]:
    """`student_steps` as configs and weight files record it: one count stays a number, several a sorted list."""
    return student_steps if isinstance(student_steps, int) else step_counts(student_steps)


def check_scheduler(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """A student's recorded `scheduler` as a dict, if it has the keys of `DISTILLED_SCHEDULER` with a known sampler
    and spacing and a final alpha in (0, 1] (or None, SD's alphas_cumprod[0]); else a ValueError."""
    scheduler = dict(scheduler)
    if set(scheduler) != set(DISTILLED_SCHEDULER):
        raise ValueError(f"a student's scheduler records exactly {', '.join(DISTILLED_SCHEDULER)}, got {scheduler}")
    check_sampler(scheduler["sampler"])
    check_spacing(scheduler["spacing"])
    final = scheduler["final_alpha_cumprod"]
    if final is not None and not 0 < final <= 1:
        raise ValueError(f"the scheduler's final_alpha_cumprod must be in (0, 1] or None, got {final}")
    return scheduler


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


class FCDiffusionStudent(FrequencyControlledLDM):
    """One network for every control mode: a mode-labelled control net, trainable parts, few-step sampling.

    `trainable`: any of `TRAINABLE_PARTS`; the mode embedding always trains. `lora_rank`/`lora_alpha` size the
    adapters when `lora` is chosen (alpha defaults to the rank, a scale of 1). `student_steps` is the number of
    sampling steps it was distilled for, or a list of them (`step_counts`): `sample` takes only those, by default
    the largest; `modes` the control modes it learned.
    `sd_locked` is derived from `trainable` (unlocked exactly when `output_blocks` trains). The control net
    config must have `num_classes: 4`; `student_config` builds such a config from a teacher's.
    `guidance_range` [lo, hi] makes a guidance-conditioned student (its control net needs `guidance_embedding:
    true`), whose default w is `guidance_scale`; without it, `guidance_scale` is the one scale it was distilled
    at (None in files from before students recorded it). `scheduler` is how it samples (`check_scheduler`; None,
    in files from before students recorded it: `DISTILLED_SCHEDULER`, what they were distilled for). A control net
    with `step_embedding: true` makes a step-conditioned student (`step_size`).
    """

    kind = "student"

    def __init__(self, trainable: Sequence[str] = ("control_net",), lora_rank: int = 8,
                 lora_alpha: float | None = None, student_steps: int | Sequence[int] = 4,
                 modes: Sequence[str] = CONTROL_MODES, guidance_scale: float | None = None,
                 guidance_range: Sequence[float] | None = None, scheduler: Mapping[str, Any] | None = None,
                 **kwargs: Any):
        trainable = tuple(trainable)
        unknown = sorted(set(trainable) - set(TRAINABLE_PARTS))
        if unknown or not trainable:
            raise ValueError(f"trainable must name some of {', '.join(TRAINABLE_PARTS)}, got {list(trainable)}")
        self.trained_steps = step_counts(student_steps)
        student_steps = recorded_steps(student_steps)
        if guidance_range is not None:
            guidance_range = check_guidance_range(guidance_range)
            if guidance_scale is None:
                raise ValueError(f"a guidance-conditioned student needs a default guidance_scale within its "
                                 f"guidance_range {guidance_range}, got None")
        if guidance_scale is not None:
            check_guidance_scale(guidance_scale, guidance_range)
        scheduler = check_scheduler(DISTILLED_SCHEDULER if scheduler is None else scheduler)
        kwargs["sd_locked"] = "output_blocks" not in trainable
        super().__init__(**kwargs)
        if self.control_model.num_classes != len(CONTROL_MODES):
            raise ValueError(f"the student's control net needs num_classes: {len(CONTROL_MODES)} (one label per "
                             f"control mode), got {self.control_model.num_classes}; "
                             "build its config with student_config()")
        if (guidance_range is None) != (self.control_model.guidance_emb is None):
            raise ValueError("a guidance-conditioned student (guidance_range) needs a control net with "
                             "guidance_embedding: true, and only it has one; build its config with student_config()")
        self.trainable, self.student_steps = trainable, max(self.trained_steps)
        self.guidance_scale, self.guidance_range = guidance_scale, guidance_range
        self.scheduler_config = scheduler
        self._modes = tuple(ControlMode(m) for m in modes)
        self.build_params.pop("sd_locked")
        self.build_params.update(trainable=list(trainable), lora_rank=lora_rank, lora_alpha=lora_alpha,
                                 student_steps=student_steps, modes=[str(m) for m in self._modes],
                                 guidance_scale=guidance_scale, guidance_range=guidance_range,
                                 scheduler=scheduler)
        self.lora_layers: list[LoRALinear] = []
        if "lora" in trainable:
            self.lora_layers = add_lora(self.model.diffusion_model.output_blocks, lora_rank,
                                        float(lora_rank if lora_alpha is None else lora_alpha))
        nn.init.zeros_(self.control_model.label_emb.weight)  # a no-op label: the student starts as its init
        for embedding in (self.control_model.guidance_emb, self.control_model.step_emb):
            if embedding is not None:
                embedding.reset_parameters()  # a no-op w or step size: the same
        trained = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trained)

    @property
    def modes(self) -> tuple[str, ...]:
        return self._modes

    @property
    def guidance_conditioned(self) -> bool:
        """Whether w is an input (chosen at inference) rather than fixed at distillation."""
        return self.guidance_range is not None

    @property
    def step_conditioned(self) -> bool:
        """Whether the size of the step it takes is an input (`step_size`), rather than one step for every count."""
        return self.control_model.step_emb is not None

    def step_size(self, steps: int) -> float:
        """The step-size input of a `steps`-step sample: num_timesteps / steps, the mean step of its schedule in
        timesteps (1000, 500 and 250 for 1, 2 and 4 steps)."""
        return self.num_timesteps / steps

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [self.control_model.label_emb.weight]
        for embedding in (self.control_model.guidance_emb, self.control_model.step_emb):
            params += list(embedding.parameters()) if embedding is not None else []
        if "control_net" in self.trainable:
            params += list(self.control_model.parameters())
        params += self.unlocked_unet_parameters()
        for layer in self.lora_layers:
            params += [layer.lora_down.weight, layer.lora_up.weight]
        return list({id(p): p for p in params}.values())  # listed twice: embeddings, adapters inside the decoder

    def student_only_keys(self) -> set[str]:
        """State-dict keys that an FCDiffusion (teacher or init) checkpoint lacks: mode, guidance and step
        embeddings and adapters."""
        return {k for k in self.state_dict()
                if k == MODE_LABEL_KEY or k.startswith((GUIDANCE_PREFIX, STEP_PREFIX)) or ".lora_" in k}

    def reset_student_parameters(self, device: torch.device | str = "cpu") -> None:
        """(Re)initialise the student-only parameters at zero update, materialising them on `device` if on meta."""
        adapters = [m for layer in self.lora_layers for m in (layer.lora_down, layer.lora_up)]
        embeddings = [e for e in (self.control_model.guidance_emb, self.control_model.step_emb) if e is not None]
        for module in [self.control_model.label_emb, *embeddings, *adapters]:
            if any(p.is_meta for p in module.parameters()):
                module.to_empty(device=device)
        with torch.no_grad():
            nn.init.zeros_(self.control_model.label_emb.weight)
            for module in embeddings:
                module.reset_parameters()
            for layer in self.lora_layers:
                layer.reset_adapter()

    def condition(self, z: torch.Tensor, context: torch.Tensor, mode: str,
                  generator: torch.Generator | None = None) -> Cond:
        """The teacher's conditioning for `mode` plus the mode's class label `y` for the control net, for a
        guidance-conditioned student its default `guidance_scale` and for a step-conditioned one the `step_size` of
        its default step count (per sample; `sample` sets the one of the count it runs)."""
        cond = super().condition(z, context, mode, generator)
        cond["y"] = torch.full((z.shape[0],), CONTROL_MODES.index(mode), dtype=torch.long, device=z.device)
        if self.guidance_conditioned:
            cond["guidance_scale"] = torch.full((z.shape[0],), float(self.guidance_scale), device=z.device)
        if self.step_conditioned:
            cond["step_size"] = torch.full((z.shape[0],), self.step_size(self.student_steps), device=z.device)
        return cond

    def check_sampling(self, guidance_scale: float | None = None, sampler: str | None = None,
                       spacing: str | None = None, steps: int | None = None) -> float | None:
        """The guidance scale to condition on (None for a fixed-w student), or a ValueError saying why the request
        does not apply: the student samples with the sampler and spacing it was distilled for (its recorded
        `scheduler_config`), in a step count it was distilled for (`trained_steps`), a fixed-w student at its one
        scale, a guidance-conditioned one at any scale in its `guidance_range`."""
        recorded = self.scheduler_config
        if sampler not in (None, recorded["sampler"]) or spacing not in (None, recorded["spacing"]):
            raise ValueError(f"the distilled student samples with {recorded['sampler']} on the {recorded['spacing']} "
                             "schedule it was distilled for (each of its steps learned one such step); "
                             f"sampler={sampler!r}, spacing={spacing!r} apply to teachers")
        if steps is not None and steps not in self.trained_steps:
            raise ValueError(f"this student was distilled for {', '.join(map(str, self.trained_steps))} steps and "
                             f"samples only with those; {steps} steps would run a schedule it never learned")
        if not self.guidance_conditioned:
            if guidance_scale is not None and guidance_scale != self.guidance_scale:
                learned = "its teachers' one scale" if self.guidance_scale is None else f"w={self.guidance_scale:g}"
                raise ValueError(f"this student was distilled at a fixed guidance scale ({learned}) and samples "
                                 f"without classifier-free guidance; guidance_scale={guidance_scale:g} needs a "
                                 "guidance-conditioned student (distil one with distill.guidance_range: [lo, hi])")
            return None
        return check_guidance_scale(self.guidance_scale if guidance_scale is None else guidance_scale,
                                    self.guidance_range)

    @torch.no_grad()
    def sample(self, cond: Cond, x_T: torch.Tensor, steps: int | None = None,
               guidance_scale: float | None = None, verbose: bool = False, sampler: str | None = None,
               spacing: str | None = None, callback: StepCallback | None = None) -> torch.Tensor:
        """Guidance-free sampling in `steps` (one of `trained_steps`, default the largest) with its recorded scheduler
        (a distilled student: DDIM on the trailing spacing, ending at alpha 1).

        A guidance-conditioned student reproduces the teachers' guidance at `guidance_scale` (default its own) in
        one network evaluation per step; a fixed-w student refuses another scale (`check_sampling`).
        """
        guidance_scale = self.check_sampling(guidance_scale, sampler, spacing, steps)
        steps = self.student_steps if steps is None else steps
        if guidance_scale is not None:
            cond = {**cond, "guidance_scale": torch.full((x_T.shape[0],), guidance_scale, device=x_T.device)}
        if self.step_conditioned:
            cond = {**cond, "step_size": torch.full((x_T.shape[0],), self.step_size(steps), device=x_T.device)}
        recorded = self.scheduler_config
        scheduler = Scheduler(self.alphas_cumprod, recorded["spacing"], recorded["final_alpha_cumprod"])
        scheduler.set_timesteps(steps)
        return sample(self.apply_model, x_T, scheduler.steps(x_T.device), cond, sampler=recorded["sampler"],
                      verbose=verbose, callback=callback)


def student_config(model_config: Mapping[str, Any], trainable: Sequence[str] = ("control_net",),
                   lora_rank: int = 8, lora_alpha: float | None = None, student_steps: int | Sequence[int] = 4,
                   modes: Sequence[str] = CONTROL_MODES, guidance_scale: float | None = None,
                   guidance_range: Sequence[float] | None = None, step_embedding: bool = False) -> dict[str, Any]:
    """The student's `{target, params}` from a teacher's model config node (its `model:` entry).

    The teacher-only arguments go, the control net gets one class label per control mode (and a guidance
    embedding with `guidance_range`, a step-size embedding with `step_embedding`). `guidance_scale` (default: the
    teachers') is the w the student learns, or its default w when guidance-conditioned. The student samples with
    `DISTILLED_SCHEDULER`, which it records.
    """
    if isinstance(trainable, str):
        raise ValueError(f"trainable is a list of parts, got the string {trainable!r}")
    config = copy.deepcopy(dict(model_config))
    teacher = dict(config.get("params") or {})
    params = {k: v for k, v in teacher.items() if k not in TEACHER_ONLY_PARAMS}
    control = dict(params["control_stage_config"])
    control["params"] = {**dict(control.get("params") or {}), "num_classes": len(CONTROL_MODES)}
    if guidance_range is not None:
        control["params"].update(guidance_embedding=True, guidance_embedding_scale=GUIDANCE_EMBEDDING_SCALE)
    if step_embedding:
        control["params"]["step_embedding"] = True
    params.update(control_stage_config=control, trainable=list(trainable), lora_rank=lora_rank,
                  lora_alpha=lora_alpha,
                  student_steps=recorded_steps(student_steps),
                  modes=[str(ControlMode(m)) for m in modes],
                  guidance_scale=teacher.get("guidance_scale") if guidance_scale is None else guidance_scale,
                  guidance_range=None if guidance_range is None else list(guidance_range),
                  scheduler=dict(DISTILLED_SCHEDULER))
    return {"target": STUDENT_TARGET, "params": params}
