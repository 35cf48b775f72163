"""Speed, fidelity and memory of the distilled student against its teachers (`benchmarks/distillation_benchmark.py`).

- speed: seconds per image end to end (encode the source, encode the prompt, sample, decode) for a teacher
  at 50 guided DDIM steps and the student at 1, 2 and 4 steps, through `Translator`, on random weights of a
  config's architecture (teacher and student share every tensor, so one network's worth of memory times both).
- fidelity (with trained teachers and student): per mode, the latent-space MSE to the teacher's 50-step guided
  DDIM result (same image, prompt, control and initial noise) of the student's k-step result and of every
  few-step alternative: the teacher's own guided k-step DDIM on SD's uniform spacing (which starts late: t=751 at
  k=4) and on the trailing one (from t=999), and its k-step DPM-Solver++(2M) (trailing). A guided teacher step is
  two network evaluations (batched into one call), a student step one. A guidance-conditioned student is also
  compared at several w with the teacher's 50-step result at the same w. Measured on held-out photos (a folder
  of images with same-named .txt prompts), or by default on the demo photos.
- memory: parameters and bytes held by the distiller (four teachers + student, shared tensors once; teachers in
  float32 and in bf16, `teacher_dtype`) against five independent float32 models, and the bytes of the full and the
  delta weights files of a student and a teacher (tensor data, from shapes and dtypes), all at the SD 2.1-base
  config built on the meta device.

Speed runs in the chosen precision (`fcdiffusion.core.precision`; fidelity stays float32). On CUDA each configuration
is warmed up first, then timed over `repeats` passes with device synchronisation (min and median), and its peak
GPU memory is recorded. The floor of a k-step student is what no pipeline can avoid: one text encoding, one VAE
encode, one VAE decode and k network evaluations (control net + UNet), each timed alone; the end-to-end time
over the floor says how much the pipeline adds.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fcdiffusion.core.devices import synchronize
from fcdiffusion.core.frequency import CONTROL_MODES, scale_thresholds
from fcdiffusion.core.inference import Translation, Translator, encode_images
from fcdiffusion.core.model import FCDiffusion
from fcdiffusion.core.precision import prepare_for_inference
from fcdiffusion.core.saved_latents import latents_path, load_latents, translation_settings
from fcdiffusion.core.student import FCDiffusionStudent, student_config
from fcdiffusion.core.tiny_vae import load_tiny_vae, random_tiny_vae
from fcdiffusion.core.weights import (
    CONTROL_PREFIX,
    adopt_student,
    build_on_meta,
    delta_keys,
    load_student,
    load_teacher,
)
from fcdiffusion.train.dataset import load_image, prepare_image
from fcdiffusion.train.demo_data import CAPTIONS, load_photo
from fcdiffusion.train.distiller import DistillOptions, FrequencyDistiller, band_energies
from fcdiffusion.train.image_folder import prompted_images
from ldm.checkpoint import read_metadata
from ldm.util import atomic_path, instantiate_from_config, without_text_encoder_file

STUDENT_STEPS = (1, 2, 4)
SEED = 1000  # fidelity: image i's noise seed is SEED + i, the mini_pass shuffle's SEED
SPEED_MODE = "mid_pass"
# The teacher's guided few-step baselines: result-key prefix -> (sampler, spacing). `teacher` (DDIM on SD's uniform
# spacing) keeps the key of the benchmark's first versions.
TEACHER_BASELINES = {"teacher": ("ddim", "uniform"), "teacher_ddim_trailing": ("ddim", "trailing"),
                     "teacher_dpmpp_2m_trailing": ("dpmpp_2m", "trailing")}
GUIDED_BASELINE = "teacher_dpmpp_2m_trailing"  # the one beside a guidance-conditioned student at each w


def demo_images(n: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """`n` scikit-image photos as a (n, 3, H, W) batch in [-1, 1], with their captions."""
    names = list(CAPTIONS)[:n]
    images = [torch.as_tensor(prepare_image(Image.fromarray(load_photo(name)), resolution)) for name in names]
    return torch.stack(images).permute(0, 3, 1, 2), [CAPTIONS[name] for name in names]


def folder_images(folder: str | os.PathLike, n: int, resolution: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """The first `n` images of `folder` that have a same-named .txt prompt (sorted by name), as a (n, 3, H, W)
    batch in [-1, 1], with their prompts and file names; a ValueError when there are none."""
    pairs = prompted_images(folder)[0][:n]
    if not pairs:
        raise ValueError(f"no images with same-named .txt prompts in {os.fspath(folder)}")
    images = [torch.as_tensor(load_image(path, resolution)) for path, _ in pairs]
    return torch.stack(images).permute(0, 3, 1, 2), [prompt for _, prompt in pairs], [p.name for p, _ in pairs]


def end_to_end(translator: Translator, image: torch.Tensor, prompt: str, mode: str, seed: int = 0,
               steps: int | None = None) -> Translation:
    """One image (3, H, W) translated in `mode`: what the speed figures time (the control is not decoded)."""
    return translator(image[None], [prompt], [mode], seed=seed, control_seed=seed, steps=steps,
                      decode_control=False)[mode]


def time_per_image(translator: Translator, images: torch.Tensor, prompts: Sequence[str], steps: int,
                   repeats: int) -> float:
    """Mean seconds per image over `repeats` passes of the images, one image at a time."""
    return statistics.fmean(pass_times(translator, images, prompts, steps, repeats))


def pass_times(translator: Translator, images: torch.Tensor, prompts: Sequence[str], steps: int,
               repeats: int) -> list[float]:
    """Seconds per image of each of `repeats` passes over the images (one image at a time), synchronised."""
    return timed(lambda: [end_to_end(translator, image, prompt, SPEED_MODE, steps=steps)
                          for image, prompt in zip(images, prompts)], translator.model.device, repeats,
                 per=len(prompts))


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, per: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (divided by `per`), the device synchronised around each."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) / per)
    return times


@torch.no_grad()
def floor(translator: Translator, image: torch.Tensor, prompt: str, repeats: int) -> dict[str, float]:
    """Seconds of each part a k-step student cannot skip, each timed alone (min over `repeats`), and the floor
    of k = 1, 2, 4 steps: text encoder + VAE encode + VAE decode + k network evaluations."""
    model, device = translator.model, translator.model.device
    images = image[None].to(device)
    z, context = translator.encode(images, [prompt])
    cond = model.condition(z, context, SPEED_MODE, generator=torch.Generator().manual_seed(0))
    t = torch.full((1,), model.num_timesteps - 1, device=device, dtype=torch.long)
    parts = {"text_encoder_s": lambda: model.get_learned_conditioning([prompt]),
             "vae_encode_s": lambda: encode_images(model, images),
             "vae_decode_s": lambda: model.decode_first_stage(z),
             "network_s": lambda: model.apply_model(z, t, cond)}
    figures = {name: min(timed(fn, device, repeats)) for name, fn in parts.items()}
    fixed = figures["text_encoder_s"] + figures["vae_encode_s"] + figures["vae_decode_s"]
    for k in STUDENT_STEPS:
        figures[f"floor_{k}_s"] = fixed + k * figures["network_s"]
    return figures


def vae_factor(config: Mapping[str, Any]) -> int:
    """How many pixels per latent cell the model of `config` (a `{target, params}` node) has: its VAE downsamples
    once per level of `ddconfig.ch_mult` after the first (SD: 8)."""
    return 2 ** (len(config["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)


def config_resolution(config: Mapping[str, Any]) -> int:
    """The image size in pixels the model of `config` is built for (its latent size times `vae_factor`)."""
    return vae_factor(config) * config["params"]["image_size"]


def resized_config(config: Mapping[str, Any], resolution: int) -> dict[str, Any]:
    """`config`'s teacher at `resolution` px with random weights (no text-encoder file), serving `SPEED_MODE`.

    The band edges are scaled with the latent, so a reduced resolution keeps each band's share of the spectrum.
    """
    config = without_text_encoder_file(copy.deepcopy(dict(config)))
    params = config["params"]
    latent = resolution // vae_factor(config)
    thresholds = scale_thresholds(params.get("frequency_thresholds"), latent, params["image_size"])
    params.update(image_size=latent, control_mode=SPEED_MODE, frequency_thresholds=thresholds)
    return config


@contextlib.contextmanager
def fast_random_init(block: int = 1 << 20, seed: int = 0) -> Iterator[None]:
    """Within it, `Tensor.uniform_` and `Tensor.normal_` (which torch's initialisers call) fill from one fixed block
    of `block` random values, repeated and scaled to the asked range: each tensor keeps its initialiser's
    distribution, at memory speed. For timing only, where the values do not matter: torch's CPU generator draws
    about 60M values a second, 27 of the 38 seconds that building the SD 2.1-base teacher took on a 2-core CPU."""
    generator = torch.Generator().manual_seed(seed)
    uniform, normal = torch.rand(block, generator=generator), torch.randn(block, generator=generator)

    def fill(tensor: torch.Tensor, values: torch.Tensor, scale: float, shift: float) -> torch.Tensor:
        with torch.no_grad():
            flat = tensor.view(-1)  # initialisers get fresh, contiguous tensors
            whole = flat.numel() // block * block
            flat[:whole].view(-1, block).copy_(values)
            flat[whole:].copy_(values[:flat.numel() - whole])
            return tensor.mul_(scale).add_(shift)

    def uniform_(tensor: torch.Tensor, low: float = 0.0, high: float = 1.0, **kwargs: Any) -> torch.Tensor:
        low, high = kwargs.get("from", low), kwargs.get("to", high)
        return fill(tensor, uniform, high - low, low)

    def normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, **kwargs: Any) -> torch.Tensor:
        return fill(tensor, normal, kwargs.get("std", std), kwargs.get("mean", mean))

    originals = torch.Tensor.uniform_, torch.Tensor.normal_
    torch.Tensor.uniform_, torch.Tensor.normal_ = uniform_, normal_
    try:
        yield
    finally:
        torch.Tensor.uniform_, torch.Tensor.normal_ = originals


def random_pair(config: Mapping[str, Any], resolution: int,
                device: torch.device) -> tuple[FCDiffusion, FCDiffusionStudent]:
    """A random-weight teacher of `config`'s architecture at `resolution` px (initialised by `fast_random_init`) and a
    student sharing its tensors."""
    torch.manual_seed(0)  # for what initialises without uniform_ or normal_
    teacher_config = resized_config(config, resolution)
    with fast_random_init():
        teacher = instantiate_from_config(teacher_config)
    teacher = teacher.eval().to(device)
    student = build_on_meta(student_config(teacher_config, student_steps=list(STUDENT_STEPS)))
    adopt_student(student, teacher.state_dict(), "random teacher", allow_fcdiffusion=True)
    return teacher, student.eval().to(device)  # moves only the student's own (zero) mode embedding


def speed(config: Mapping[str, Any], resolution: int, n_images: int, repeats: int, teacher_steps: int,
          device: torch.device, precision: str = "fp32", compile: bool = False, tiny_vae: str | None = None,
          teacher_timing_steps: Sequence[int] | None = None) -> dict[str, Any]:
    """Seconds per image of the guided teacher and of the student at 1, 2 and 4 steps (random weights), in
    `precision` (optionally compiled), with the student's floor (`floor`).

    `<config>_s` is the mean over the passes on a CPU and the median on CUDA, where every configuration is first
    warmed up and also gets `<config>_min_s`, `<config>_median_s` and `<config>_peak_bytes` (peak GPU memory).
    `tiny_vae` (a tiny autoencoder's path, or "random": TAESD's width, random weights) adds the student encoding
    and decoding with it, `student_<k>_tiny_vae_s`, and its parts to the floor. `teacher_timing_steps` (k1, k2)
    times the teacher at those step counts only and extrapolates its `teacher_steps` time linearly
    (`extrapolate_teacher`), recorded under `teacher_<steps>_cfg_extrapolated`.
    """
    teacher_model, student_model = (prepare_for_inference(m, device, precision, compile)
                                    for m in random_pair(config, resolution, device))
    teacher, student = Translator(teacher_model), Translator(student_model)
    images, prompts = demo_images(n_images, resolution)
    teacher_runs = list(teacher_timing_steps or [teacher_steps])
    runs = {**{f"teacher_{k}_cfg": (teacher, k) for k in teacher_runs},
            **{f"student_{k}": (student, k) for k in STUDENT_STEPS}}
    tiny = None
    if tiny_vae is not None:
        tiny = (random_tiny_vae(student_model) if tiny_vae == "random"
                else load_tiny_vae(tiny_vae, "both", device, precision))
        runs.update({f"student_{k}_tiny_vae": (Translator(student_model, tiny), k) for k in STUDENT_STEPS})
    figures: dict[str, Any] = {}
    if device.type != "cuda":
        end_to_end(student, images[0], prompts[0], SPEED_MODE, steps=1)  # warm-up
        for name, (translator, steps) in runs.items():
            figures[f"{name}_s"] = time_per_image(translator, images, prompts, steps, repeats)
    else:
        for name, (translator, steps) in runs.items():
            end_to_end(translator, images[0], prompts[0], SPEED_MODE, steps=steps)  # warm-up (and compilation)
            torch.cuda.reset_peak_memory_stats(device)
            times = pass_times(translator, images, prompts, steps, repeats)
            figures.update({f"{name}_s": statistics.median(times), f"{name}_min_s": min(times),
                            f"{name}_median_s": statistics.median(times),
                            f"{name}_peak_bytes": torch.cuda.max_memory_allocated(device)})
    if teacher_timing_steps:
        figures.update(extrapolate_teacher(figures, teacher_timing_steps, teacher_steps))
    figures["speedup_4"] = figures[f"teacher_{teacher_steps}_cfg_s"] / figures["student_4_s"]
    parts = floor(student, images[0], prompts[0], repeats)
    if tiny is not None:
        figures["tiny_vae"] = tiny.settings()
        figures.update({f"tiny_vae_speedup_{k}": figures[f"student_{k}_s"] / figures[f"student_{k}_tiny_vae_s"]
                        for k in STUDENT_STEPS})
        image = images[:1].to(device)
        z = student.encode_images(image)
        parts.update({"tiny_vae_encode_s": min(timed(lambda: tiny.encode(image), device, repeats)),
                      "tiny_vae_decode_s": min(timed(lambda: tiny.decode(z), device, repeats))})
    figures["floor"] = {**parts, **{f"end_to_end_over_floor_{k}": figures[f"student_{k}_s"] / parts[f"floor_{k}_s"]
                                    for k in STUDENT_STEPS}}
    return figures


def extrapolate_teacher(figures: Mapping[str, Any], measured: Sequence[int], steps: int) -> dict[str, Any]:
    """The teacher's `steps`-step time from its end-to-end times at two step counts k1 < k2: the cost per guided
    step (t2 - t1) / (k2 - k1), plus the fixed cost t1 - k1 x that (text encoder, VAE encode and decode, Python)."""
    k1, k2 = sorted(measured)
    if k1 == k2:
        raise ValueError(f"teacher timing needs two different step counts, got {list(measured)}")
    t1, t2 = figures[f"teacher_{k1}_cfg_s"], figures[f"teacher_{k2}_cfg_s"]
    per_step = (t2 - t1) / (k2 - k1)
    fixed = t1 - k1 * per_step
    return {f"teacher_{steps}_cfg_s": fixed + steps * per_step,
            f"teacher_{steps}_cfg_extrapolated": {"from_steps": [k1, k2], "measured_s": [t1, t2],
                                                  "per_step_s": per_step, "fixed_s": fixed}}


def distill_options(student_path: str | os.PathLike) -> DistillOptions:
    """How the student in `student_path` was distilled (its `fcdiffusion.distill` metadata; defaults if absent)."""
    return DistillOptions.from_mapping(json.loads(read_metadata(student_path).get("fcdiffusion.distill", "{}")))


@torch.no_grad()
def fidelity(teachers: Mapping[str, str | os.PathLike], student_path: str | os.PathLike, resolution: int,
             n_images: int, teacher_steps: int, device: torch.device, photos: str | os.PathLike | None = None,
             guidance_scales: Sequence[float] | None = None, ablation: str | os.PathLike | None = None,
             guidance_images: int | None = None, sweep_latents: str | os.PathLike | None = None,
             references: str | os.PathLike | None = None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Per mode, the latent MSE to the teacher's `teacher_steps`-step guided DDIM result of the student at each step
    count it was trained for (`student_k{k}_mse`, and split over the DCT bands of its distillation,
    `student_k{k}_band_<band>`: the band energies of the difference, which sum to the MSE) and of each guided teacher
    baseline at k steps for k in `STUDENT_STEPS` (`TEACHER_BASELINES`: `<name>_k{k}_mse`); and the settings they were
    measured with. `ablation` is a second student (e.g. distilled without band weights, on the same trajectories),
    measured the same way as `ablation_student_k{k}_...`. `guidance_images` limits the guidance sweep below to the
    first that many photos (each of its w needs another full teacher solve; default: all). `sweep_latents` saves
    the sweep's latents of the first photo, so a figure of it needs no teacher solve again: a dict with its `image`
    name, `prompt`, `teacher_steps`, `scales` and `latents["<mode> w<w:g>"]`, each holding `teacher_<teacher_steps>`
    and `student_k<k>` for every trained k (the sweep's noise: seed 1000, mini_pass shuffle seed 1000).

    `photos` is a folder of held-out images with same-named .txt prompts (its first `n_images`; default: the first
    `n_images` demo photos, which the quickstart also trains on). A guidance-conditioned student is also measured
    at each w of `guidance_scales` (default: the ends of its range and its default w) against the teacher's result
    at the same w, beside the `GUIDED_BASELINE` at that w: `w{w:g}_student_k{k}_mse`, `w{w:g}_<baseline>_k{k}_mse`.
    Image i uses noise seed 1000 + i and mini_pass shuffle seed 1000 (what `test_distillation.py --seed 1000`
    uses), the same for every model, step count and w. `references`: a folder where `test_distillation.py --seed 1000
    --save_latents` saved the teachers' results at `teacher_steps` with these settings; each reference found there
    is read instead of solved (one that was made otherwise raises), and `setup["references"]` counts them.
    """
    student_model = load_student(student_path).to(device).eval()
    student = Translator(student_model)
    options = distill_options(student_path)
    limits, band_names = options.band_limits(), list(options.bands)
    students = {"student": student}
    if ablation is not None:
        students["ablation_student"] = Translator(load_student(ablation).to(device).eval())
    counts = student_model.trained_steps
    if photos is None:
        images, prompts = demo_images(n_images, resolution)
        names = list(CAPTIONS)[:n_images]
    else:
        images, prompts, names = folder_images(photos, n_images, resolution)
    scales: list[float] = []
    if student_model.guidance_conditioned:
        low, high = student_model.guidance_range
        scales = sorted({float(w) for w in (guidance_scales or (low, student_model.guidance_scale, high))})
        for w in scales:
            student_model.check_sampling(w)
    if sweep_latents is not None and not (scales and (guidance_images is None or guidance_images > 0)):
        raise ValueError("sweep_latents needs a guidance-conditioned student and guidance_images of at least 1")
    out: dict[str, dict[str, float]] = {}
    sweep: dict[str, dict[str, torch.Tensor]] = {}
    read = 0
    for mode in CONTROL_MODES:
        teacher = Translator(load_teacher(teachers[mode], mode).to(device).eval())
        errors: dict[str, list[float]] = {}

        def record(name: str, latents: torch.Tensor, reference: torch.Tensor) -> None:
            errors.setdefault(name, []).append(torch.mean((latents - reference) ** 2).item())

        for i, (image, prompt) in enumerate(zip(images, prompts)):
            z, context = teacher.encode(image[None], [prompt])
            run = lambda translator, steps, **options: translator.translate_latents(  # noqa: E731
                z, context, [mode], seed=SEED + i, control_seed=SEED, steps=steps, decode_control=False,
                **options)[mode].latents
            saved = None if references is None else latents_path(references, Path(names[i]).stem, mode)
            if saved is not None and saved.is_file():
                reference = load_latents(saved, translation_settings(
                    teachers[mode], prompt, resolution, SEED + i, SEED, teacher_steps))[None].to(device)
                read += 1
            else:
                reference = run(teacher, teacher_steps)
            for name, translator in students.items():
                for k in translator.model.trained_steps:
                    latents = run(translator, k)
                    record(f"{name}_k{k}_mse", latents, reference)
                    for band, energy in zip(band_names, band_energies(latents - reference, limits)[0].tolist()):
                        errors.setdefault(f"{name}_k{k}_band_{band}", []).append(energy)
            for k in STUDENT_STEPS:
                for name, (sampler, spacing) in TEACHER_BASELINES.items():
                    record(f"{name}_k{k}_mse", run(teacher, k, sampler=sampler, spacing=spacing), reference)
            sampler, spacing = TEACHER_BASELINES[GUIDED_BASELINE]
            for w in scales if guidance_images is None or i < guidance_images else ():
                # the teacher's own w gives the reference again: reused, not sampled twice
                guided = reference if w == teacher.model.guidance_scale else run(teacher, teacher_steps,
                                                                                   guidance_scale=w)
                kept = sweep.setdefault(f"{mode} w{w:g}", {}) if i == 0 else {}
                kept[f"teacher_{teacher_steps}"] = guided
                for k in counts:
                    kept[f"student_k{k}"] = run(student, k, guidance_scale=w)
                    record(f"w{w:g}_student_k{k}_mse", kept[f"student_k{k}"], guided)
                    record(f"w{w:g}_{GUIDED_BASELINE}_k{k}_mse",
                           run(teacher, k, guidance_scale=w, sampler=sampler, spacing=spacing), guided)
        out[mode] = {name: float(np.mean(values)) for name, values in errors.items()}
        del teacher
    setup = {"photos": "demo photos (also trained on)" if photos is None else os.fspath(photos), "images": names,
             "teacher_steps": teacher_steps, "guidance_scales": scales,
             "baselines": {name: {"sampler": sampler, "spacing": spacing}
                           for name, (sampler, spacing) in TEACHER_BASELINES.items()},
             "nfe": "student: k per image; a guided teacher k-step baseline: 2k (k batched calls of batch 2)",
             "student_steps": counts, "bands": options.bands,
             "guidance_images": names[:guidance_images] if scales else [],
             "references": {"folder": os.fspath(references), "read": read} if references is not None else None,
             "band_weights": {m: options.band_weights.get(m, {}) for m in CONTROL_MODES}}
    if ablation is not None:
        setup["ablation"] = {"student": os.fspath(ablation),
                             "band_weights": distill_options(ablation).band_weights}
    if sweep_latents is not None:
        with atomic_path(sweep_latents) as tmp:
            torch.save({"image": names[0], "prompt": prompts[0], "teacher_steps": teacher_steps, "scales": scales,
                        "latents": {key: {name: z.cpu() for name, z in kept.items()} for key, kept in sweep.items()}},
                       tmp)
    return out, setup


def memory(sd_config: Mapping[str, Any], student_options: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters and bytes the distiller holds at the SD 2.1-base config (teachers in float32 and in bf16) vs
    five independent float32 models, and the full vs delta weights-file bytes (all on the meta device)."""
    distiller = FrequencyDistiller(sd_config, student=student_options)
    counts = distiller.parameter_counts()
    half = FrequencyDistiller(sd_config, student=student_options, distill={"teacher_dtype": "bf16"}).parameter_counts()
    return {"distiller_params": counts["resident"], "five_full_models_params": counts["independent"],
            "ratio": counts["resident"] / counts["independent"],
            "distiller_bytes": counts["resident_bytes"], "distiller_bytes_teacher_bf16": half["resident_bytes"],
            "five_full_models_bytes": counts["independent_bytes"],
            "bytes_ratio": counts["resident_bytes"] / counts["independent_bytes"],
            "bytes_ratio_teacher_bf16": half["resident_bytes"] / counts["independent_bytes"],
            "teacher_bytes": counts["teacher_bytes"], "teacher_bytes_bf16": half["teacher_bytes"],
            "files": weight_file_bytes(distiller)}


def weight_file_bytes(distiller: FrequencyDistiller) -> dict[str, int]:
    """Tensor bytes of the full and the delta weights files of the distiller's student and first teacher, from
    shapes and dtypes (a file adds a JSON header of some kilobytes). The SD base holds the teacher's keys but
    the control net's, as `tool_add_control_sd21.py` reads it."""
    teacher = next(iter(distiller.teachers.values()))
    base_keys = [k for k in teacher.state_dict() if not k.startswith(CONTROL_PREFIX)]
    sizes: dict[str, int] = {}
    for name, model in (("student", distiller.student), ("teacher", teacher)):
        state = model.state_dict()
        sizes[f"{name}_full_bytes"] = sum(v.numel() * v.element_size() for v in state.values())
        sizes[f"{name}_delta_bytes"] = sum(state[k].numel() * state[k].element_size()
                                           for k in delta_keys(model, base_keys))
    return sizes


def fidelity_tables(figures: Mapping[str, Mapping[str, float]], setup: Mapping[str, Any],
                    teacher_steps: int = 50) -> list[str]:
    """Markdown lines of the fidelity tables: a row per mode and k, the student and every teacher baseline
    (figures missing from older results show as a dash), then the guidance-conditioned student per w if measured."""
    def cell(f: Mapping[str, float], key: str) -> str:
        return f"{f[key]:.4f}" if key in f else "—"

    where = f" on {len(setup['images'])} photos from {setup['photos']}" if setup.get("images") else ""
    counts = setup.get("student_steps", STUDENT_STEPS)
    lines = [f"Fidelity: latent MSE to the teacher's {teacher_steps}-step guided DDIM result{where} (lower is "
             "better). Network evaluations (NFE) per image: the student's k steps take k, a guided teacher's k steps "
             "2k (each step one batched call of batch 2); the last column is the best teacher baseline at the "
             "student's NFE (k/2 guided steps).", "",
             "| mode | k | student (k NFE) | teacher DDIM uniform (2k NFE) | teacher DDIM trailing (2k NFE) "
             "| teacher DPM-Solver++(2M) trailing (2k NFE) | best teacher at k NFE |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, f in figures.items():
        for k in setup.get("student_steps", STUDENT_STEPS):
            half = [f[f"{name}_k{k // 2}_mse"] for name in TEACHER_BASELINES if f"{name}_k{k // 2}_mse" in f]
            best = f"{min(half):.4f}" if k > 1 and half else "—"
            baselines = " | ".join(cell(f, f"{name}_k{k}_mse") for name in TEACHER_BASELINES)
            lines.append(f"| {mode} | {k} | {cell(f, f'student_k{k}_mse')} | {baselines} | {best} |")
    scales = setup.get("guidance_scales") or []
    if scales:
        on = setup.get("guidance_images") or setup.get("images") or []
        lines += ["", f"Guidance-conditioned student at w: latent MSE to the teacher's {teacher_steps}-step guided "
                      "DDIM result at the same w, beside the teacher's DPM-Solver++(2M) (trailing) at the same w"
                      + (f", on {len(on)} photos ({', '.join(on)})" if on else ""), "",
                  "| mode | w | " + " | ".join(f"student k={k} | DPM-Solver++ k={k}" for k in counts) + " |",
                  "| --- | --- | " + " | ".join("--- | ---" for _ in counts) + " |"]
        for mode, f in figures.items():
            for w in scales:
                cells = " | ".join(f"{cell(f, f'w{w:g}_student_k{k}_mse')} | "
                                   f"{cell(f, f'w{w:g}_{GUIDED_BASELINE}_k{k}_mse')}" for k in counts)
                lines.append(f"| {mode} | {w:g} | {cells} |")
    if setup.get("ablation"):
        lines += ["", *ablation_table(figures, setup)]
    return lines


def ablation_table(figures: Mapping[str, Mapping[str, float]], setup: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the band-weight ablation: per mode and trained k, the error in the bands the mode's weights
    raise and in the others, for the student and for the ablation student (the same distillation without them)."""
    lines = ["Band-weight ablation: per mode, the student's error to the teacher's result in the DCT bands its "
             "band weights raise and in the other bands (band energies of the latent difference; they sum to the "
             "MSE), with the weights and without them (`ablation`: the same distillation on the same teacher "
             "trajectories, `band_weights: {}`)", "",
             "| mode | weighted bands | k | weighted: with / without | others: with / without |",
             "| --- | --- | --- | --- | --- |"]
    for mode, f in figures.items():
        raised = [band for band, weight in setup["band_weights"].get(mode, {}).items() if weight > 1]
        others = [band for band in setup["bands"] if band not in raised]
        for k in setup["student_steps"]:
            def total(who: str, bands: Sequence[str]) -> float:
                return sum(f[f"{who}_k{k}_band_{band}"] for band in bands)
            lines.append(f"| {mode} | {', '.join(raised) or '—'} | {k} | {total('student', raised):.4f} / "
                         f"{total('ablation_student', raised):.4f} | {total('student', others):.4f} / "
                         f"{total('ablation_student', others):.4f} |")
    return lines


def table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Markdown lines of a captioned table, after a blank line."""
    return ["", caption, "", "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def tiny_vae_cells(s: Mapping[str, Any]) -> list[str]:
    """The tiny-VAE row's cells: full / tiny seconds (speed-up) per student step count, then the VAE parts."""
    cells = [f"{s[f'student_{k}_s']:.3f} / {s[f'student_{k}_tiny_vae_s']:.3f} ({s[f'tiny_vae_speedup_{k}']:.2f}x)"
             for k in STUDENT_STEPS]
    f = s.get("floor", {})
    parts = (f"{f['tiny_vae_encode_s']:.3f} / {f['tiny_vae_decode_s']:.3f} s (full: {f['vae_encode_s']:.3f} / "
             f"{f['vae_decode_s']:.3f})" if "tiny_vae_encode_s" in f else "—")
    return [*cells, parts]


def format_tables(results: dict[str, Any], teacher_steps: int = 50) -> str:
    """The benchmark's figures as Markdown tables."""
    key = f"teacher_{teacher_steps}_cfg_s"
    hardware = results["hardware"]
    precision = results.get("precision", {})
    how = f", {precision['precision']}{' compiled' if precision.get('compile') else ''}" if precision else ""
    lines = [f"Speed, seconds per image end to end ({hardware['device']}, torch {hardware['torch']}{how})", "",
             f"| config | teacher {teacher_steps} steps + CFG | student 1 | student 2 | student 4 | speed-up at 4 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in results["speed"].items():
        lines.append(f"| {name} | {s[key]:.3f} | {s['student_1_s']:.3f} | {s['student_2_s']:.3f} "
                     f"| {s['student_4_s']:.3f} | {s['speedup_4']:.1f}x |")
    for name, s in results["speed"].items():
        extrapolated = s.get(f"{key[:-2]}_extrapolated")
        if extrapolated:
            k1, k2 = extrapolated["from_steps"]
            lines.append(f"\n{name}: the teacher's {teacher_steps}-step time is extrapolated from its measured "
                         f"end-to-end times at {k1} and {k2} steps ({extrapolated['measured_s'][0]:.3f} s, "
                         f"{extrapolated['measured_s'][1]:.3f} s): {extrapolated['fixed_s']:.3f} s fixed (text "
                         f"encoder, VAE, pipeline) + {teacher_steps} x {extrapolated['per_step_s']:.3f} s per "
                         "guided step")
    tiny = {name: s for name, s in results["speed"].items() if "student_1_tiny_vae_s" in s}
    if tiny:
        lines += table("The student with a tiny autoencoder (encoding and decoding) in place of the VAE: seconds per "
                       "image end to end, full VAE / tiny VAE (speed-up)",
                       ["config", "tiny VAE", "student 1", "student 2", "student 4", "tiny encode / decode"],
                       [[name, s["tiny_vae"]["tiny_vae"], *tiny_vae_cells(s)] for name, s in tiny.items()])
    peaks = {name: s for name, s in results["speed"].items() if f"{key[:-2]}_peak_bytes" in s}
    if peaks:
        runs = (key[:-2], *(f"student_{k}" for k in STUDENT_STEPS))
        lines += table("Peak GPU memory (torch.cuda.max_memory_allocated), GB, and min / median seconds per image",
                       ["config", f"teacher {teacher_steps} steps + CFG", "student 1", "student 2", "student 4"],
                       [[name, *(f"{s[f'{run}_peak_bytes'] / 1e9:.2f} ({s[f'{run}_min_s']:.3f} / "
                                 f"{s[f'{run}_median_s']:.3f} s)" for run in runs)] for name, s in peaks.items()])
    floors = {name: s["floor"] for name, s in results["speed"].items() if "floor" in s}
    if floors:
        lines += table("Floor of the k-step student: text encoder + VAE encode + VAE decode + k network evaluations, "
                       "each timed alone (seconds); end to end / floor in brackets",
                       ["config", "text encoder", "VAE encode", "VAE decode", "network", "floor 1", "floor 2",
                        "floor 4"],
                       [[name, *(f"{f[part]:.3f}" for part in ("text_encoder_s", "vae_encode_s", "vae_decode_s",
                                                               "network_s")),
                         *(f"{f[f'floor_{k}_s']:.3f} ({f[f'end_to_end_over_floor_{k}']:.2f}x)" for k in STUDENT_STEPS)]
                        for name, f in floors.items()])
    if results.get("fidelity"):
        lines += ["", *fidelity_tables(results["fidelity"], results.get("fidelity_setup", {}), teacher_steps)]
    if results.get("memory"):
        m = results["memory"]
        lines += ["", f"Memory at the SD 2.1-base config: the distiller (four teachers + student) holds "
                      f"{m['distiller_params'] / 1e9:.3f}B parameters, five full models "
                      f"{m['five_full_models_params'] / 1e9:.3f}B "
                      f"({100 * m['ratio']:.1f}%)"]
        if "distiller_bytes" in m:
            lines += ["", f"Resident bytes: {m['distiller_bytes'] / 1e9:.2f} GB with float32 teachers, "
                          f"{m['distiller_bytes_teacher_bf16'] / 1e9:.2f} GB with teacher_dtype bf16, against "
                          f"{m['five_full_models_bytes'] / 1e9:.2f} GB for five independent float32 models "
                          f"({100 * m['bytes_ratio']:.1f}% / {100 * m['bytes_ratio_teacher_bf16']:.1f}%); the "
                          f"teachers (with the shared frozen base) {m['teacher_bytes'] / 1e9:.2f} GB -> "
                          f"{m['teacher_bytes_bf16'] / 1e9:.2f} GB"]
        if m.get("files"):
            f = m["files"]
            lines += ["", "Weights files at the SD 2.1-base config (tensor bytes): student "
                          f"{f['student_full_bytes'] / 1e9:.3f} GB full, {f['student_delta_bytes'] / 1e9:.3f} GB delta "
                          f"({100 * f['student_delta_bytes'] / f['student_full_bytes']:.1f}%); teacher "
                          f"{f['teacher_full_bytes'] / 1e9:.3f} GB full, {f['teacher_delta_bytes'] / 1e9:.3f} GB delta "
                          f"({100 * f['teacher_delta_bytes'] / f['teacher_full_bytes']:.1f}%)"]
    return "\n".join(lines) + "\n"
