"""The peak memory of one training step, teacher and distiller, at the SD 2.1-base architecture (random weights),
for the recipes that matter, and which GPU each recipe fits (`benchmarks/memory_benchmark.py` runs it).

A recipe is a trained set (control net + decoder, control net only, LoRA), the teachers' dtype (the distiller),
the frozen encoders' dtype, gradient checkpointing on or off, the precision (32 or bf16-mixed) and the optimizer
(AdamW, or 8-bit AdamW). Each `Build` is measured in its own process (`measure_build`), one `Step` after another,
in one of three ways (`MEASURES`):

- `cuda`, on a CUDA GPU: the whole module is built (the distiller with its four teachers), the real optimizer steps
  twice per `Step`, and the figure is `torch.cuda.max_memory_allocated()`: weights, gradients, optimizer state and
  activations, measured at the resolution asked for (512 px by default).
- `count`, anywhere (the default on a CPU): the same whole module and the same two optimizer steps on fake tensors
  (shapes and dtypes, no memory, no compute), with every tensor the step holds counted op by op
  (`fcdiffusion.apps.tensor_memory`): the bytes the allocator would be asked for at 512 px, less its rounding,
  fragmentation and the libraries' workspaces, which the cards' headroom (`HEADROOM_GIB`) is for.
- `rss`, on a CPU, with real compute: the process holds one teacher (its batch of four images standing in for four
  teachers at one image each) and measures the peak resident set above the resident weights (VmHWM after
  resetting it), with gradients dropped as they are made and no optimizer step; `compose` adds the exact bytes of
  the full module's weights, gradients and optimizer state (`fcdiffusion.core.memory`) and projects the measured
  part to the target size by a least-squares line in the pixel count. It is the cross-check of `count`: each of its
  records also counts the step's tensors, which the resident set must hold and more.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from fcdiffusion.apps.benchmark import resized_config
from fcdiffusion.apps.tensor_memory import TensorMemory, fake_tensors, real
from fcdiffusion.core.devices import synchronize
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.memory import (
    OPTIMIZERS,
    cast_frozen_encoders,
    gradient_bytes,
    make_optimizer,
    optimizer_state_bytes,
    set_gradient_checkpointing,
)
from fcdiffusion.core.precision import PRECISIONS, follow_weight_dtype, resident_bytes
from fcdiffusion.core.weights import build_on_meta
from fcdiffusion.train.distiller import FrequencyDistiller
from ldm.models.diffusion.ddpm import LatentDiffusion

GIB = 2 ** 30
CARDS_GIB = (16, 24, 40, 80)
HEADROOM_GIB = 2.0  # kept free on a card: the CUDA context, the allocator's fragmentation
TRAJECTORY_POOL = 1024  # configs/distill_config.yaml's trajectory_pool: the solved examples a distiller keeps
TRAINABLE_SETS = {"control_net+decoder": ("control_net", "output_blocks"), "control_net": ("control_net",),
                  "lora": ("lora",)}
TEACHER_SETS = ("control_net+decoder", "control_net")  # teachers train no LoRA


@dataclass(frozen=True)
class Build:
    """What one measuring process builds: a teacher (`role` "teacher": trains the control net, and the decoder when
    `trainable` says so) or the distiller with `teachers` teachers in `teacher_dtype`; `encoder_dtype` holds the
    frozen VAE and text encoder (`fcdiffusion.core.memory.cast_frozen_encoders`)."""

    role: str
    trainable: str
    teacher_dtype: str = "fp32"
    encoder_dtype: str = "fp32"
    teachers: int = len(CONTROL_MODES)

    def key(self) -> str:
        return f"{self.role}/{self.trainable}/teachers_{self.teacher_dtype}"


@dataclass(frozen=True)
class Step:
    """One training step: gradient checkpointing, precision (`fp32` or `bf16`, i.e. bf16-mixed), image size, and
    images per step through the trained network (a teacher's batch; the distiller's batch x modes)."""

    checkpointing: bool
    precision: str
    resolution: int
    samples: int = 4


@dataclass
class Recipe:
    """A row of the table: a build at the target resolution with every step option and optimizer."""

    build: Build
    checkpointing: bool
    precision: str
    optimizer: str
    encoder_dtype: str
    figures: dict[str, Any] = field(default_factory=dict)


def model_config(config: Mapping[str, Any], build: Build, resolution: int) -> dict[str, Any]:
    """The teacher's `{target, params}` at `resolution` px (band edges scaled), `sd_locked` per the trained set."""
    config = resized_config(config, resolution)
    if build.role == "teacher":
        config["params"]["sd_locked"] = build.trainable == "control_net"
    return config


def build_module(config: Mapping[str, Any], build: Build, resolution: int) -> nn.Module:
    """The module a step trains, on the meta device (no memory): `FCDiffusion` or `FrequencyDistiller`. The
    distiller's step is measured with one guided teacher evaluation without graph, then the student's forward and
    backward: the peak of a trajectory-objective step too, whose teacher solve is such evaluations one after
    another (their activations are freed between them) and whose student pass is the same. What that objective
    keeps besides, its pool of solved trajectories, is `trajectory_bytes` per trajectory, from a solve of
    `teacher_steps` 4: a solve keeps the states at the student's boundaries (those of 4 steps hold those of 1 and
    2), however many steps it takes."""
    if build.role == "teacher":
        return build_on_meta(model_config(config, build, resolution))
    if build.role != "distiller":
        raise ValueError(f"unknown role {build.role!r}: teacher or distiller")
    return FrequencyDistiller(model_config(config, build, resolution), modes=CONTROL_MODES[:build.teachers],
                              student={"trainable": list(TRAINABLE_SETS[build.trainable])},
                              distill={"teacher_dtype": build.teacher_dtype, "objective": "progressive",
                                       "student_steps": 4, "teacher_substeps": 1, "teacher_steps": 4})


def models_of(module: nn.Module) -> list[nn.Module]:
    """The models a training module holds (the distiller's teachers and student, or the module itself)."""
    return module.models() if hasattr(module, "models") else [module]


def trained_parameters(module: nn.Module) -> list[nn.Parameter]:
    """What the optimizer updates."""
    return list(module.student.trainable_parameters() if hasattr(module, "student") else module.trainable_parameters())


def materialize(module: nn.Module, device: torch.device, fake: bool = False) -> nn.Module:
    """Give every meta tensor of `module`'s models real memory on `device`, small random values (parameters) or the
    noise schedule (buffers), keeping each tensor shared by several models shared. With `fake` (inside
    `tensor_memory.fake_tensors`) the tensors are fake ones on `device`: no memory, and nothing is moved."""
    replaced: dict[int, torch.Tensor] = {}
    old: list[torch.Tensor] = []  # held so that no id is reused while `replaced` is keyed by ids
    for model in models_of(module):
        for sub in model.modules():
            for store in (sub._parameters, sub._buffers):
                for name, tensor in store.items():
                    if tensor is None or not tensor.is_meta:
                        continue
                    if id(tensor) not in replaced:
                        data = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                        data.normal_(0.0, 0.02) if data.is_floating_point() else data.zero_()
                        old.append(tensor)
                        replaced[id(tensor)] = (nn.Parameter(data, requires_grad=tensor.requires_grad)
                                                if isinstance(tensor, nn.Parameter) else data)
                    store[name] = replaced[id(tensor)]
    for model in models_of(module):
        if isinstance(model, LatentDiffusion):
            params = getattr(model, "build_params", {})
            register = real(model.register_schedule) if fake else model.register_schedule  # numpy inside
            register(params.get("beta_schedule", "linear"), model.num_timesteps, params.get("linear_start", 0.00085),
                     params.get("linear_end", 0.012))
    if fake:  # Module.to cannot swap fake tensors; they are on `device` already, which Lightning must know
        for model in [module, *models_of(module)]:
            for sub in model.modules():
                if isinstance(sub, pl.LightningModule):
                    sub._device = device  # what LightningModule.to records
        return module
    module.to(device)
    if hasattr(module, "student"):
        module.student.to(device)
    return module


def static_bytes(module: nn.Module, build: Build, optimizer: str) -> dict[str, int]:
    """Exact bytes a step holds besides activations, from shapes and dtypes: `weights` (every distinct tensor of
    every model, the frozen encoders in `build.encoder_dtype`), `gradients` and `optimizer_state`."""
    models = models_of(module)
    weights = resident_bytes(models)
    if build.encoder_dtype != "fp32":
        size = torch.empty((), dtype=PRECISIONS[build.encoder_dtype]).element_size()
        seen: set[int] = set()
        for model in models:
            for name in ("first_stage_model", "cond_stage_model"):
                for p in getattr(model, name).parameters():
                    if id(p) not in seen and p.dtype == torch.float32:
                        seen.add(id(p))
                        weights -= p.numel() * (4 - size)
    trained = trained_parameters(module)
    return {"weights": weights, "gradients": gradient_bytes(trained),
            "optimizer_state": optimizer_state_bytes(trained, optimizer)}


# ---- measuring, in the process that holds the module ---------------------------------------------------------
def _proc_status_kb(name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name}")


class PeakMeter:
    """The peak memory of a block of work: CUDA's allocator peak, or on a CPU the process's peak resident set
    (VmHWM, reset through `/proc/self/clear_refs`); read as `TensorMemory`'s count is (`reset_peak`, `peak`)."""

    def __init__(self, device: torch.device):
        self.device = device

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kb("VmRSS") * 1024

    def reset_peak(self) -> int:
        """Forget the peak; returns the memory in use now."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
        return self.current()

    @property
    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_kb("VmHWM") * 1024


def step_batch(module: nn.Module, step: Step) -> dict[str, Any]:
    """The random batch of `step` for `module`: `step.samples` images, or that many over the distiller's modes."""
    return random_batch(step, step.samples // (len(module.modes) if hasattr(module, "modes") else 1))


def random_batch(step: Step, images: int) -> dict[str, Any]:
    """`images` random images (HWC in [-1, 1]) with prompts, as the data loader gives them."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((images, step.resolution, step.resolution, 3), generator=generator) * 2 - 1
    return {"jpg": pixels, "txt": ["a photograph of a mountain lake at dawn"] * images}


def step_loss(module: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The training loss of one batch, as `training_step` computes it (without logging)."""
    if hasattr(module, "distillation_loss"):
        z, context = module.student.get_input(batch)
        return module.distillation_loss(z, context, module.sample_modes())[0]
    return module.shared_step(batch)[0]


def run_step(module: nn.Module, batch: Mapping[str, Any], step: Step, device: torch.device,
             optimizer: torch.optim.Optimizer | None) -> None:
    """Forward, backward and (with an optimizer) its step, under bf16 autocast for `bf16` as Lightning's
    bf16-mixed runs it."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=step.precision == "bf16"):
        loss = step_loss(module, batch)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _drop_gradient(p: torch.Tensor) -> None:
    p.grad = None


# How a record's figure was taken: the CUDA allocator's peak, tensors counted op by op (fake tensors, any size, on
# any machine), or the resident set of a CPU process above its weights (real compute, small sizes).
MEASURES = {"cuda": "cuda_max_memory_allocated", "count": "counted_tensor_peak", "rss": "cpu_peak_rss_above_resident"}
WHOLE_PEAKS = (MEASURES["cuda"], MEASURES["count"])  # records that hold a whole step's peak, not a part to compose


def measure_build(config: Mapping[str, Any], build: Build, steps: Sequence[Step], device: torch.device,
                  optimizers: Sequence[str] = ("adamw",), emit: Callable[[dict[str, Any]], None] = print,
                  measure: str | None = None) -> None:
    """Build `build` at the SD config `config` on `device` and measure each of `steps`, calling `emit` with one
    record per measurement (so a process killed later keeps what it reported). `measure` (`MEASURES`; default
    `cuda` on a CUDA device, else `count`):

    - `cuda`: each optimizer of `optimizers` steps twice per `Step`; `peak_bytes` is the allocator's peak.
    - `count`: the module is made of fake tensors on the CPU (no memory, no compute), AdamW steps twice per
      `Step` as its fused CUDA kernel does (no temporaries), and `peak_bytes` is the tensors' peak counted op by op
      (`tensor_memory.TensorMemory`): weights, gradients, optimizer state and activations of the whole module at
      any size. An 8-bit optimizer cannot run on fake tensors; `compose` swaps its exact state bytes in.
    - `rss`: gradients are dropped as they are made, nothing steps, and `dynamic_bytes` is the peak resident set
      above the one before the step; `counted_dynamic_bytes` counts the same step's new tensors, the part of it
      that is tensors (the rest: the allocator, the libraries' buffers).
    """
    measure = measure or ("cuda" if device.type == "cuda" else "count")
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; valid: {', '.join(MEASURES)}")
    if measure == "count":
        device = torch.device("cpu")  # fake CPU tensors, as tested; fake CUDA ones would need a CUDA context
    torch.manual_seed(0)
    started = time.perf_counter()
    meta = build_module(config, build, min(s.resolution for s in steps))  # outside fake mode: open_clip moves modules
    with fake_tensors() if measure == "count" else contextlib.nullcontext():
        module = prepare_module(meta, build, device, fake=measure == "count")
        header = {"build": asdict(build), "device": str(device), "build_s": round(time.perf_counter() - started, 1),
                  "measure": MEASURES[measure]}
        if measure != "rss" and hasattr(module, "solve_trajectories"):
            header["trajectory_bytes"] = trajectory_bytes(module, step_batch(module, steps[0]))
        if measure == "rss":
            _measure_rss(module, steps, device, header, emit)
        else:
            names = ["adamw"] if measure == "count" else optimizers
            _measure_steps(module, steps, device, names, header, emit, counted=measure == "count")


def prepare_module(meta: nn.Module, build: Build, device: torch.device, fake: bool = False) -> nn.Module:
    """`build`'s training module (`build_module`) on `device` in train mode: random weights (fake ones with `fake`),
    the frozen encoders in `build.encoder_dtype`, layers computing in their weights' dtype where the teachers are
    not float32."""
    module = materialize(meta, device, fake)
    if build.encoder_dtype != "fp32":
        cast_frozen_encoders(models_of(module), PRECISIONS[build.encoder_dtype])
    if hasattr(module, "student") and build.teacher_dtype != "fp32":
        for model in models_of(module):
            follow_weight_dtype(model)
    module.train()
    return module


def trajectory_bytes(module: nn.Module, batch: Mapping[str, Any]) -> float:
    """Bytes one solved trajectory holds in a distiller's pool (states, conditioning, guidance scale), from a solve
    of `batch` for every mode: its distinct tensor storages (a batch's shared context counted once) over the
    trajectories it gave."""
    with torch.no_grad():
        trajectories = module.solve_trajectories(*module.student.get_input(batch), module.modes)
    held = TensorMemory(tree_leaves([(t.cond, t.guidance_scale, t.states) for t in trajectories]))
    return held.current / len(trajectories)


def _tensors_of(module: nn.Module) -> Iterable[torch.Tensor]:
    for model in [module, *models_of(module)]:
        yield from model.parameters()
        yield from model.buffers()


def _measure_steps(module: nn.Module, steps: Sequence[Step], device: torch.device, optimizers: Sequence[str],
                   header: Mapping[str, Any], emit: Callable[[dict[str, Any]], None], counted: bool) -> None:
    """Two real optimizer steps per `Step` and optimizer; the peak from the CUDA allocator or counted."""
    trained = trained_parameters(module)
    meter = TensorMemory(_tensors_of(module)) if counted else PeakMeter(device)
    for optimizer_name in optimizers:
        with meter if counted else contextlib.nullcontext():
            optimizer = (torch.optim.AdamW(trained, lr=1e-5, fused=True) if counted
                         else make_optimizer(trained, 1e-5, optimizer_name))
            for step in steps:
                set_gradient_checkpointing(models_of(module), step.checkpointing)
                batch = step_batch(module, step)
                base = meter.reset_peak()
                started = time.perf_counter()
                for _ in range(2):
                    run_step(module, batch, step, device, optimizer)
                synchronize(device)
                peak = meter.peak
                emit({**header, "step": asdict(step), "optimizer": optimizer_name, "base_bytes": base,
                      "peak_bytes": peak, "dynamic_bytes": peak - base,
                      "step_s": None if counted else round((time.perf_counter() - started) / 2, 2)})
            del optimizer, batch
            gc.collect()


def _measure_rss(module: nn.Module, steps: Sequence[Step], device: torch.device, header: Mapping[str, Any],
                 emit: Callable[[dict[str, Any]], None]) -> None:
    """One step per `Step`, gradients dropped as they are made: the resident set's peak above the weights, and the
    new tensors' peak counted in the same step."""
    for p in trained_parameters(module):
        p.register_post_accumulate_grad_hook(_drop_gradient)
    meter = PeakMeter(device)
    for step in steps:
        set_gradient_checkpointing(models_of(module), step.checkpointing)
        batch = step_batch(module, step)
        counter = TensorMemory(_tensors_of(module))  # the weights: views of them are not new memory
        held = counter.current
        base = meter.reset_peak()
        started = time.perf_counter()
        with counter:
            run_step(module, batch, step, device, None)
        seconds = time.perf_counter() - started
        peak = meter.peak
        emit({**header, "step": asdict(step), "optimizer": None, "base_bytes": base, "peak_bytes": peak,
              "dynamic_bytes": peak - base, "counted_dynamic_bytes": counter.peak - held,
              "step_s": round(seconds, 2)})


def emit_json_line(record: Mapping[str, Any]) -> None:
    """Print a record as one JSON line (the parent reads them as they come)."""
    print("MEASURED " + json.dumps(record), flush=True)


# ---- composing the table ----------------------------------------------------------------------------------------
def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x; one point: slope 0."""
    if len(points) == 1:
        return points[0][1], 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var
    return mean_y - slope * mean_x, slope


# Growth of the measured part between the smallest and largest measured size below which it is not resolved (the
# resident set's noise): the projection is then only a lower bound.
RESOLVED_GROWTH_BYTES = 64 * 2 ** 20


def project(records: Sequence[Mapping[str, Any]], resolution: int) -> dict[str, Any]:
    """The measured part (`dynamic_bytes`) at `resolution` px from records at other sizes: a line in the pixel
    count through them (`measured` when `resolution` itself was measured; None from a single other size). When it
    grows by less than `RESOLVED_GROWTH_BYTES` over the measured sizes, the activations are below the noise there
    and the projection is a lower bound (`lower_bound`)."""
    points = sorted((r["step"]["resolution"] ** 2, float(r["dynamic_bytes"])) for r in records)
    measured = [y for x, y in points if x == resolution ** 2]
    if measured:
        return {"bytes": max(measured), "how": "measured", "points": points, "lower_bound": False}
    if len({x for x, _ in points}) < 2:
        return {"bytes": None, "how": "one size only", "points": points, "lower_bound": False}
    intercept, slope = fit_line(points)
    residual = max(abs(y - (intercept + slope * x)) for x, y in points)
    growth = slope * (points[-1][0] - points[0][0])
    return {"bytes": intercept + max(slope, 0.0) * resolution ** 2, "how": "projected", "points": points,
            "per_megapixel": slope * 1e6, "fit_residual_bytes": residual,
            "lower_bound": growth < RESOLVED_GROWTH_BYTES}


def fits(peak_bytes: float) -> dict[str, bool]:
    """Per card size (GiB), whether a step of this peak fits with `HEADROOM_GIB` to spare."""
    return {f"{card}GB": peak_bytes <= (card - HEADROOM_GIB) * GIB for card in CARDS_GIB}


def recipes(optimizers: Sequence[str] = OPTIMIZERS) -> list[Recipe]:
    """Every row of the table: teachers (two trained sets) and the distiller (three trained sets, teachers fp32 or
    bf16), the frozen encoders fp32 or bf16 (with bf16 teachers they are bf16 already), checkpointing on/off,
    precision fp32/bf16(-mixed), each optimizer."""
    rows = []
    builds = [Build("teacher", t) for t in TEACHER_SETS]
    builds += [Build("distiller", t, d) for d in ("fp32", "bf16") for t in TRAINABLE_SETS]
    for build in builds:
        for encoder_dtype in (["bf16"] if build.teacher_dtype == "bf16" else ["fp32", "bf16"]):
            for checkpointing in (True, False):
                for precision in ("fp32", "bf16"):
                    for optimizer in optimizers:
                        rows.append(Recipe(build, checkpointing, precision, optimizer, encoder_dtype))
    return rows


def measured_for(recipe: Recipe, records: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], str]:
    """The records whose measured part stands for `recipe`'s, and where they come from.

    The same build, checkpointing and precision; for whole peaks (`WHOLE_PEAKS`) also the same encoder dtype, and
    on CUDA the same optimizer (counted records are AdamW's, which `compose` turns into the others). A distiller
    with float32 teachers whose student trains a float32 control net does not fit a small CPU machine's `rss`
    process: its student step is the teacher-training step of the same trained set (the same float32 network on
    the same images), its teacher solve that of the float32 LoRA distiller, and the larger of the two stands for it
    (`proxy`)."""
    def same(r: Mapping[str, Any], role: str, trainable: str, teacher_dtype: str) -> bool:
        b, s = r["build"], r["step"]
        exact = r["measure"] not in WHOLE_PEAKS or (b["encoder_dtype"] == recipe.encoder_dtype and (
            r["measure"] == MEASURES["count"] or r["optimizer"] == recipe.optimizer))
        return (b["role"] == role and b["trainable"] == trainable and b["teacher_dtype"] == teacher_dtype
                and s["checkpointing"] == recipe.checkpointing and s["precision"] == recipe.precision and exact)

    b = recipe.build
    own = [r for r in records if same(r, b.role, b.trainable, b.teacher_dtype)]
    if own or b.role != "distiller" or b.teacher_dtype != "fp32" or b.trainable == "lora":
        return own, "own"
    student = [r for r in records if same(r, "teacher", b.trainable, "fp32")]
    solve = [r for r in records if same(r, "distiller", "lora", "fp32")]
    if not student or not solve:
        return [], "none"
    by_size: dict[int, Mapping[str, Any]] = {}
    for r in [*student, *solve]:
        size = r["step"]["resolution"]
        if size in {s["step"]["resolution"] for s in student} and size in {s["step"]["resolution"] for s in solve}:
            if size not in by_size or r["dynamic_bytes"] > by_size[size]["dynamic_bytes"]:
                by_size[size] = r
    return list(by_size.values()), "proxy"


def compose(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]], resolution: int,
            optimizers: Sequence[str] = OPTIMIZERS) -> list[dict[str, Any]]:
    """One figure per recipe (`recipes`) at `resolution` px, with what fits: the allocator's peak (CUDA records);
    the counted peak (counted records: AdamW's, the other optimizers' with their exact state bytes in place of
    AdamW's, which is resident through the step); or the exact static bytes of the full module plus the resident
    set's part projected to `resolution` (`rss` records). A distiller's figure adds a full trajectory pool
    (`TRAJECTORY_POOL` trajectories of the records' `trajectory_bytes`) where the records measured one."""
    statics: dict[tuple[Build, str], dict[str, int]] = {}
    modules: dict[Build, nn.Module] = {}
    rows = []
    for recipe in recipes(optimizers):
        b = recipe.build
        build = Build(b.role, b.trainable, b.teacher_dtype, recipe.encoder_dtype)
        if build not in modules:
            modules[build] = build_module(config, build, resolution)
        for name in {recipe.optimizer, "adamw"}:
            if (build, name) not in statics:
                statics[(build, name)] = static_bytes(modules[build], build, name)
        static = statics[(build, recipe.optimizer)]
        chosen, source = measured_for(recipe, records)
        row: dict[str, Any] = {"role": b.role, "trainable": b.trainable, "teacher_dtype": b.teacher_dtype,
                               "encoder_dtype": recipe.encoder_dtype, "gradient_checkpointing": recipe.checkpointing,
                               "precision": "bf16-mixed" if recipe.precision == "bf16" else "32",
                               "optimizer": recipe.optimizer, "resolution": resolution, "static": static}
        if not chosen:
            row.update(peak_bytes=None, how="not measured")
        elif chosen[0]["measure"] == MEASURES["cuda"]:
            at = [r for r in chosen if r["step"]["resolution"] == resolution]
            row.update(peak_bytes=max(r["peak_bytes"] for r in at) if at else None,
                       how="measured" if at else "not measured",
                       step_s=min(r["step_s"] for r in at) if at else None)
        elif chosen[0]["measure"] == MEASURES["count"]:
            at = [r for r in chosen if r["step"]["resolution"] == resolution]
            adamw = statics[(build, "adamw")]["optimizer_state"]
            row.update(peak_bytes=max(r["peak_bytes"] for r in at) - adamw + static["optimizer_state"] if at else None,
                       how="counted" if at else "not measured")
        else:
            dynamic = project(chosen, resolution)
            how = f"composed, {dynamic['how']}" + (", lower bound" if dynamic["lower_bound"] else "")
            row.update(dynamic=dynamic, how=how + (", proxy" if source == "proxy" else ""),
                       lower_bound=dynamic["lower_bound"],
                       peak_bytes=None if dynamic["bytes"] is None else sum(static.values()) + dynamic["bytes"])
        pool = [r["trajectory_bytes"] for r in chosen if "trajectory_bytes" in r]
        if pool and row["peak_bytes"] is not None:  # the trajectory objective's pool, full: resident at every step
            row["trajectory_pool_bytes"] = round(TRAJECTORY_POOL * max(pool))
            row["peak_bytes"] += row["trajectory_pool_bytes"]
        if row["peak_bytes"] is not None:
            row["fits"] = fits(row["peak_bytes"])
        rows.append(row)
    return rows


def gib(value: float | None) -> str:
    return "—" if value is None else f"{value / GIB:.1f}"


def table_markdown(rows: Iterable[Mapping[str, Any]], optimizers: Sequence[str] = OPTIMIZERS) -> str:
    """The table: a line per recipe (all but the optimizer) that has a figure, per optimizer its peak in GiB and the
    smallest card (16/24/40/80 GB) it fits with `HEADROOM_GIB` to spare (for a lower bound: the smallest card not
    ruled out)."""
    grouped: dict[tuple, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        key = (row["role"], row["trainable"], row["teacher_dtype"], row["encoder_dtype"],
               row["gradient_checkpointing"], row["precision"])
        grouped.setdefault(key, {})[row["optimizer"]] = row
    head = "| job | trains | teachers | VAE + text encoder | checkpointing | precision | " + " | ".join(
        f"{name}: peak GiB | {name}: fits" for name in optimizers) + " | how |"
    lines = [head, "|" + " --- |" * (7 + 2 * len(optimizers))]
    for (role, trainable, teachers, encoders, checkpointing, precision), by_optimizer in grouped.items():
        if all(row["peak_bytes"] is None for row in by_optimizer.values()):
            continue
        cells = []
        how = ""
        for name in optimizers:
            row = by_optimizer.get(name)
            if row is None or row["peak_bytes"] is None:
                cells += ["—", "—"]
                continue
            smallest = next((card for card, ok in row["fits"].items() if ok), None)
            if row.get("lower_bound"):  # only the cards it cannot fit are known
                cells += [f"≥ {gib(row['peak_bytes'])}", f"not below {smallest}" if smallest else "none"]
            else:
                cells += [gib(row["peak_bytes"]), f"{smallest}+" if smallest else "none"]
            how = row["how"]
        lines.append(f"| {role} | {trainable.replace('+', ' + ')} | {teachers if role == 'distiller' else '—'} | "
                     f"{encoders} | {'on' if checkpointing else 'off'} | {precision} | {' | '.join(cells)} | {how} |")
    return "\n".join(lines) + "\n"


def worker_environment(threads: int | None = None) -> dict[str, str]:
    """The environment of a measuring process: glibc returns every large block to the system when freed (a fixed
    mmap threshold), so the resident set follows the memory in use."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
