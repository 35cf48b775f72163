"""Unified frequency-aware distillation: four FCDiffusion teachers (one per control mode) -> one few-step student.

Target (progressive distillation, Salimans & Ho 2022, with the guided teachers of Meng et al. 2023): the student
samples in k steps on `trailing_timesteps(k)`. For a random student step t_i -> t_{i-1} (alpha 1 after the last)
the teacher of the sample's mode runs n classifier-free-guided DDIM sub-steps from x_{t_i} = q_sample(z0, t_i)
to t_{i-1}; the student's x0 target is the x0 for which ONE guidance-free DDIM step from x_{t_i} lands exactly on
the teacher's x_{t_{i-1}}. The x0 error is weighted per DCT band of i + j, each mode weighting up the band its
teacher controls.

Memory: teachers and student are built on the meta device and adopt their checkpoints' tensors; every tensor
that no model trains (VAE, text encoder, the UNet unless a teacher or the student trains its decoder) is held
once and shared by all, after checking the values are equal. Teachers are not submodules: they stay out of the
distiller's checkpoints (which hold only the student) but follow `.to()` / `.half()` through `_apply`.
"""
from __future__ import annotations

import copy
import functools
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from fcdiffusion.frequency import CONTROL_MODES, band_mask, dct_2d
from fcdiffusion.model import FCDiffusion, check_control_mode
from fcdiffusion.student import STUDENT_OPTIONS, FCDiffusionStudent, student_config
from ldm.checkpoint import check_state_dict, load_state_dict, save_state_dict
from ldm.models.diffusion.ddim import cat_cond, ddim_step, guided_eps, trailing_timesteps
from ldm.models.diffusion.ddpm import LatentDiffusion, freeze
from ldm.util import instantiate_from_config

log = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


# ---- building models and adopting (shared) weights -----------------------------------------------------------
def build_on_meta(config: Mapping[str, Any]) -> nn.Module:
    """Instantiate a `{target, params}` model config on the meta device (no memory, no random init).

    The text encoder's own weights file (`version`) is not read: full checkpoints carry its tensors.
    """
    config = copy.deepcopy(dict(config))
    cond_params = config.get("params", {}).get("cond_stage_config", {}).get("params")
    if cond_params is not None and "version" in cond_params:
        cond_params["version"] = None
    with torch.device("meta"):
        return instantiate_from_config(config)


def trained_keys(model: nn.Module) -> set[str]:
    """Names of the parameters `model.trainable_parameters()` returns: what that model learns (by structure)."""
    trained = {id(p) for p in model.trainable_parameters()}
    return {name for name, p in model.named_parameters() if id(p) in trained}


def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys of `model` that it does not train: the candidates for sharing with other models."""
    return set(model.state_dict(keep_vars=True)) - trained_keys(model)


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Make `tensor` (the object itself, so it can be shared) the parameter or buffer `key` of `model`."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter) and not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=current.requires_grad)
    setattr(owner, attr, tensor)


class WeightAdopter:
    """Puts checkpoint tensors into meta-built models, holding one copy of each frozen tensor they have in common.

    For every key a model does not train (`frozen_keys`), the first model to adopt it provides the one copy (a
    frozen Parameter or buffer); later models reuse that object when shape and dtype agree and the values are
    equal (always, on the meta device, where there are no values to compare). Otherwise they keep their own
    tensor; differing values are counted in `mismatched`.
    """

    def __init__(self) -> None:
        self.canonical: dict[str, torch.Tensor] = {}
        self.mismatched: Counter[str] = Counter()

    def _shared(self, key: str, value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        canonical = self.canonical.get(key)
        if canonical is None:
            if isinstance(template, nn.Parameter) and not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=False)
            self.canonical[key] = value.requires_grad_(False)
            return value
        if canonical.shape != value.shape or canonical.dtype != value.dtype:
            return value
        if value.is_meta or canonical.is_meta or torch.equal(canonical, value):
            return canonical
        self.mismatched[key] += 1
        return value

    def adopt(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
              expected: Optional[Iterable[str]] = None) -> None:
        """Strictly check `state_dict` against `model` (or its keys `expected`), then assign its tensors."""
        current = model.state_dict(keep_vars=True)
        expected = set(current) if expected is None else set(expected)
        check_state_dict({k: current[k] for k in expected}, state_dict, source)
        frozen = frozen_keys(model)
        for key, value in state_dict.items():
            value = value.to(dtype=current[key].dtype)
            if key in frozen:
                value = self._shared(key, value, current[key])
            _set_tensor(model, key, value)

    def share_structure(self, model: nn.Module) -> None:
        """The meta-device path: no weights, share every frozen tensor by name, shape and dtype alone."""
        state, frozen = model.state_dict(keep_vars=True), frozen_keys(model)
        self.adopt(model, {k: state[k] for k in frozen}, "meta build", expected=frozen)


def finish_loading(model: nn.Module, name: str) -> None:
    """Raise if a tensor of `model` is still on the meta device (a key no file provided); else sync `model.device`.

    A Lightning module built under the meta device believes it lives there; the no-op `.to()` corrects that.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    left = [n for n, t in tensors if t.is_meta]
    if left:
        raise RuntimeError(f"{name}: {len(left)} tensors got no weights, e.g. {left[:5]}")
    model.to(tensors[0][1].device)


def load_fcdiffusion(config: Mapping[str, Any], path: str | os.PathLike, hint: str = "") -> FCDiffusion:
    """An FCDiffusion model (or any model config) built on meta and loaded strictly from `path`."""
    model = build_on_meta(config)
    WeightAdopter().adopt(model, load_state_dict(path, hint), os.fspath(path))
    finish_loading(model, os.fspath(path))
    return model


def student_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The student's own keys: a distiller checkpoint's `student.*` entries with the prefix dropped, else as is."""
    if state_dict and all(k.startswith(STUDENT_PREFIX) for k in state_dict):
        return {k[len(STUDENT_PREFIX):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def adopt_student(student: FCDiffusionStudent, state_dict: Mapping[str, torch.Tensor], source: str,
                  adopter: Optional[WeightAdopter] = None, allow_fcdiffusion: bool = False) -> None:
    """Load a student strictly from a student file (or distiller checkpoint).

    With `allow_fcdiffusion` (initialising a distillation) the student-only keys may be missing, as in an
    FCDiffusion checkpoint or a student trained without LoRA: those parameters keep their initialisation (zero
    mode embedding, zero LoRA update), so the student begins as exactly the loaded network. Any other key
    difference raises `CheckpointMismatchError`.
    """
    state_dict = student_state_dict(state_dict)
    keys = set(student.state_dict())
    if allow_fcdiffusion:
        student.reset_student_parameters()
        keys -= student.student_only_keys() - set(state_dict)
    (adopter or WeightAdopter()).adopt(student, state_dict, source, expected=keys)
    finish_loading(student, source)


def load_student(model_config: Mapping[str, Any], path: str | os.PathLike,
                 **student_options: Any) -> FCDiffusionStudent:
    """An `FCDiffusionStudent` (teacher architecture `model_config` + `student_options`) loaded strictly from `path`."""
    student = build_on_meta(student_config(model_config, **student_options))
    adopt_student(student, load_state_dict(path), os.fspath(path))
    return student


def teacher_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The teachers' `{target, params}`: the `model:` node of file `config.model_config`, `config.model` merged in."""
    if not os.path.isfile(config["model_config"]):
        raise FileNotFoundError(f"model config not found: {config['model_config']}")
    merged = OmegaConf.merge(OmegaConf.load(config["model_config"]).model, config.get("model") or {})
    return OmegaConf.to_container(merged, resolve=True)


# ---- the distillation maths -----------------------------------------------------------------------------------
def ddim_x0_target(x_t: torch.Tensor, x_prev: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
    """The x0 for which one deterministic DDIM step from (x_t, a_t) lands on `x_prev` at `a_prev`.

    DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps with eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t), so
    x0 = (x_prev - r x_t) / (sqrt(a_prev) - r sqrt(a_t)), r = sqrt((1 - a_prev) / (1 - a_t)); at a_prev = 1, x_prev.
    """
    x_t64, x_prev64, a_t, a_prev = x_t.double(), x_prev.double(), a_t.double(), a_prev.double()
    r = ((1 - a_prev) / (1 - a_t)).sqrt()
    return ((x_prev64 - r * x_t64) / (a_prev.sqrt() - r * a_t.sqrt())).to(x_t.dtype)


def band_energies(diff: torch.Tensor, bands: Sequence[tuple[int, Optional[int]]]) -> torch.Tensor:
    """(N, len(bands)): per sample, the squared DCT coefficients of `diff` in each i + j band over C*H*W.

    The DCT is orthonormal, so over bands that partition the spectrum the columns sum to the plain MSE.
    Computed in float32 outside autocast (squared fp16 coefficients overflow).
    """
    with torch.autocast(diff.device.type, enabled=False):
        spectrum = dct_2d(diff.float()).pow(2).mean(1)
        h, w = spectrum.shape[-2:]
        masks = torch.stack([band_mask(h, w, low, high, spectrum.device) for low, high in bands]).float()
        return torch.einsum("nhw,bhw->nb", spectrum, masks) / (h * w)


@dataclass
class DistillOptions:
    """What the `distill:` config section sets (see configs/distill_config.yaml)."""

    student_steps: int = 4
    teacher_substeps: int = 2
    guidance_scale: Optional[float] = None
    modes_per_step: int = 4
    distill_weight: float = 1.0
    denoise_weight: float = 0.0
    control_weight: float = 0.0
    bands: dict[str, int] = field(default_factory=lambda: {"all": 0})
    band_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    log_teacher_steps: int = 0

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> "DistillOptions":
        """Build from a config section, naming unknown keys in a ValueError."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown distill options {unknown}; valid: {', '.join(known)}")
        return cls(**options)

    def __post_init__(self) -> None:
        if min(self.student_steps, self.teacher_substeps, self.modes_per_step) < 1:
            raise ValueError("student_steps, teacher_substeps and modes_per_step must be >= 1")
        starts = list(self.bands.values())
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"bands maps names to the first i+j of each band, from 0 and increasing; got {self.bands}")
        for mode, weights in self.band_weights.items():
            check_control_mode(mode)
            unknown = sorted(set(weights) - set(self.bands))
            if unknown:
                raise ValueError(f"band_weights.{mode} names unknown bands {unknown}; bands: {list(self.bands)}")

    def band_limits(self) -> list[tuple[int, Optional[int]]]:
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
    """

    def __init__(
        self,
        model_config: Mapping[str, Any],
        teachers: Optional[Mapping[str, str | os.PathLike]] = None,
        student_init: Optional[str | os.PathLike] = None,
        student: Optional[Mapping[str, Any]] = None,
        distill: Optional[Mapping[str, Any]] = None,
        learning_rate: float = 1e-5,
        modes: Sequence[str] = CONTROL_MODES,
    ):
        super().__init__()
        if (teachers is None) != (student_init is None):
            raise ValueError("give the teacher checkpoints and the student initialisation, or neither (meta build)")
        modes = list(teachers) if teachers is not None else list(modes)
        if not modes:
            raise ValueError("no teachers given")
        self.modes = [check_control_mode(m) for m in modes]
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
        self.student = build_on_meta(student_config(model_config, **dict(student or {})))
        models = [*teacher_models.values(), self.student]
        adopter = WeightAdopter()
        if teachers is None:
            for model in models:
                adopter.share_structure(model)
        else:
            for mode, teacher in teacher_models.items():
                adopter.adopt(teacher, load_state_dict(teachers[mode]), os.fspath(teachers[mode]))
                finish_loading(teacher, os.fspath(teachers[mode]))
            adopt_student(self.student, load_state_dict(student_init), os.fspath(student_init), adopter,
                          allow_fcdiffusion=True)
        if adopter.mismatched:
            log.warning("%d frozen tensors differ between the models and are held per model, e.g. %s",
                        len(adopter.mismatched), sorted(adopter.mismatched)[:5])
        for teacher in teacher_models.values():
            freeze(teacher)
        self._teachers = teacher_models  # a plain dict: not submodules, so not in state_dict / checkpoints
        self.band_limits = self.options.band_limits()
        self.band_names = list(self.options.bands)
        self.register_buffer("band_weights", self.options.weight_matrix(), persistent=False)
        counts = self.parameter_counts()
        log.info("distiller: %d teachers (%s) + student; resident parameters %.2fM (unique tensors) vs %.2fM for "
                 "independent models (%.1f%%); student trains %.2fM", len(self.modes), ", ".join(self.modes),
                 counts["resident"] / 1e6, counts["independent"] / 1e6,
                 100 * counts["resident"] / counts["independent"], counts["trainable"] / 1e6)

    # ---- models and memory --------------------------------------------------------------------------------
    @property
    def teachers(self) -> dict[str, FCDiffusion]:
        return self._teachers

    def models(self) -> list[nn.Module]:
        return [*self._teachers.values(), self.student]

    def parameter_counts(self) -> dict[str, int]:
        """'resident': elements of the unique parameter tensors of all models; 'independent': each model counted
        on its own (what separate copies would hold); 'trainable': the student's trained elements."""
        unique = {id(p): p.numel() for m in self.models() for p in m.parameters()}
        independent = sum(sum(p.numel() for p in m.parameters()) for m in self.models())
        trainable = sum(p.numel() for p in self.student.trainable_parameters())
        return {"resident": sum(unique.values()), "independent": independent, "trainable": trainable}

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "FrequencyDistiller":
        """Move/cast the teachers with the student (shared Parameters are updated in place, so stay shared)."""
        super()._apply(fn, recurse)
        device = self.student.alphas_cumprod.device
        for teacher in getattr(self, "_teachers", {}).values():
            teacher._apply(fn, recurse)
            teacher.to(device)  # a no-op move that also updates the teacher's Lightning `device` property
        return self

    def train(self, mode: bool = True) -> "FrequencyDistiller":
        """Train the student only; the teachers stay in eval mode."""
        super().train(mode)
        for teacher in self._teachers.values():
            teacher.eval()
        return self

    # ---- the loss -----------------------------------------------------------------------------------------
    def alpha_at(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] as (N, 1, 1, 1), with t = -1 meaning alpha 1 (the clean end of the trajectory)."""
        alphas = self.student.alphas_cumprod
        a = torch.where(t >= 0, alphas[t.clamp(min=0)], torch.ones((), dtype=alphas.dtype, device=alphas.device))
        return a.view(-1, 1, 1, 1)

    @torch.no_grad()
    def teacher_solve(self, mode: str, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                      cond: Mapping[str, Any]) -> torch.Tensor:
        """The teacher of `mode` from x at t to t_prev: n guided DDIM sub-steps on integer timesteps in between."""
        teacher, n = self._teachers[mode], self.options.teacher_substeps
        scale = teacher.guidance_scale if self.options.guidance_scale is None else self.options.guidance_scale
        uncond = teacher.unconditional_conditioning(cond)
        grid = [torch.round(t + (t_prev - t) * (j / n)).long() for j in range(n + 1)]
        for s, s_next in zip(grid[:-1], grid[1:]):
            eps = guided_eps(teacher.apply_model, x, s.clamp(min=0), cond, uncond, scale)
            x, _ = ddim_step(x, eps, self.alpha_at(s), self.alpha_at(s_next))
        return x

    def student_schedule(self, step_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_i, t_{i-1}) of the student's trailing schedule for step indices i (t_{-1} = -1, alpha 1)."""
        timesteps = torch.as_tensor(trailing_timesteps(self.options.student_steps, self.student.num_timesteps),
                                    device=step_index.device)
        t = timesteps[step_index]
        return t, torch.where(step_index > 0, timesteps[(step_index - 1).clamp(min=0)], torch.full_like(t, -1))

    def distillation_loss(self, z: torch.Tensor, context: torch.Tensor, modes: Sequence[str],
                          step_index: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and logs for latents z (B, C, H, W) with text context, trained on every mode in `modes`.

        Samples are ordered mode-major (B per mode); `step_index` (B * len(modes),) picks each one's student step
        and `noise` its x_t, both random when None (give them for a reproducible loss).
        """
        b, m = z.shape[0], len(modes)
        n = b * m
        if step_index is None:
            step_index = torch.randint(0, self.options.student_steps, (n,), device=z.device)
        noise = torch.randn((n, *z.shape[1:]), device=z.device, dtype=z.dtype) if noise is None else noise
        t, t_prev = self.student_schedule(step_index.to(z.device))
        conds = [self.student.mode_conditioning(z, context, mode) for mode in modes]
        cond = functools.reduce(cat_cond, conds)
        z0 = z.repeat(m, 1, 1, 1)
        x_t = self.student.q_sample(z0, t, noise)
        a_t, a_prev = self.alpha_at(t), self.alpha_at(t_prev)
        chunks = [slice(i * b, (i + 1) * b) for i in range(m)]
        with torch.no_grad():
            x_prev = torch.cat([self.teacher_solve(mode, x_t[s], t[s], t_prev[s], c)
                                for mode, s, c in zip(modes, chunks, conds)])
            target = ddim_x0_target(x_t, x_prev, a_t, a_prev)
        eps, pairs = self.student.eps_and_control(x_t, t, cond)
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()

        energies = band_energies(x0 - target, self.band_limits)  # (n, bands)
        mode_index = torch.tensor([CONTROL_MODES.index(mode) for mode in modes], device=z.device).repeat_interleave(b)
        weighted = (energies * self.band_weights.to(energies)[mode_index]).sum(1)
        loss_distill = weighted.mean()
        loss_denoise = F.mse_loss(x0.float(), z0.float())
        loss = self.options.distill_weight * loss_distill + self.options.denoise_weight * loss_denoise
        logs = {"train/loss_distill": loss_distill.detach(), "train/loss_denoise": loss_denoise.detach()}
        if self.options.control_weight:
            with torch.no_grad():
                teacher_pairs = [self._teachers[mode].control(x_t[s], t[s], c)
                                 for mode, s, c in zip(modes, chunks, conds)]
                teacher_pairs = [torch.cat(parts) for pair in zip(*teacher_pairs) for parts in zip(*pair)]
            student_pairs = [tensor for pair in pairs for tensor in pair]
            loss_control = torch.stack([F.mse_loss(s.float(), t.float())
                                        for s, t in zip(student_pairs, teacher_pairs)]).mean()
            loss = loss + self.options.control_weight * loss_control
            logs["train/loss_control"] = loss_control.detach()
        for name, value in zip(self.band_names, energies.detach().mean(0)):
            logs[f"train/band_{name}"] = value
        for mode, s in zip(modes, chunks):
            logs[f"train/distill_{mode}"] = weighted[s].detach().mean()
        logs["train/loss"] = loss.detach()
        return loss, logs

    # ---- Lightning hooks ----------------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Any], bs: Optional[int] = None,
               sample_posterior: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, text context) of a dataset batch, through the (shared, frozen) VAE and text encoder."""
        return LatentDiffusion.get_input(self.student, batch, bs=bs, sample_posterior=sample_posterior)

    def sample_modes(self) -> list[str]:
        """The modes of one step: all teachers' or `modes_per_step` of them drawn at random, in canonical order."""
        k = self.options.modes_per_step
        if k >= len(self.modes):
            return list(self.modes)
        picked = set(torch.randperm(len(self.modes))[:k].tolist())
        return [mode for i, mode in enumerate(self.modes) if i in picked]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        z, context = self.encode(batch)
        loss, logs = self.distillation_loss(z, context, self.sample_modes())
        self.log_dict(logs, on_step=True, batch_size=z.shape[0])
        self.log("loss", logs["train/loss"], prog_bar=True, logger=False, batch_size=z.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.student.trainable_parameters(), lr=self.learning_rate)

    def export_student(self, path: str | os.PathLike) -> None:
        """Write the student's weights alone (atomically); `FCDiffusionStudent` loads them strictly."""
        save_state_dict(self.student.state_dict(), path)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
        """Source, then per mode the student's k-step sample (and the teacher's, if log_teacher_steps > 0)."""
        z, context = self.encode(batch, bs=N, sample_posterior=False)
        x = torch.as_tensor(batch[self.student.first_stage_key][:N]).permute(0, 3, 1, 2).float()
        x_T = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
        images = {"source": x}
        for mode in self.modes:
            cond = self.student.mode_conditioning(z, context, mode)
            images[mode] = self.student.decode_first_stage(self.student.generate(cond, self.options.student_steps, x_T))
            if self.options.log_teacher_steps > 0:
                teacher = self._teachers[mode]
                latents = teacher.translate(cond, self.options.log_teacher_steps, self.options.guidance_scale, x_T)
                images[f"{mode} teacher"] = self.student.decode_first_stage(latents)
        return images


class StudentExport(pl.Callback):
    """Writes the student-only weights file to `path` with every checkpoint the trainer saves (rank 0)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            pl_module.export_student(self.path)
