"""Speed, fidelity and memory of the distilled student against its teachers (`benchmarks/distillation_benchmark.py`).

- speed: seconds per image end to end (encode the source, encode the prompt, sample, decode) for a teacher
  at 50 guided DDIM steps and the student at 1, 2 and 4 steps, through `Translator`, on random weights of a
  config's architecture (teacher and student share every tensor, so one network's worth of memory times both).
- fidelity (with trained teachers and student): per mode, the latent-space MSE between the student's k-step
  result and the teacher's 50-step result (same image, prompt, control and initial noise), beside the
  teacher's own k-step DDIM result.
- memory: parameters held by the distiller (four teachers + student, shared tensors once) against five
  independent full models, built on the meta device.
"""
from __future__ import annotations

import copy
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from fcdiffusion.dataset import prepare_image
from fcdiffusion.demo_data import CAPTIONS, load_photo
from fcdiffusion.distiller import FrequencyDistiller
from fcdiffusion.frequency import CONTROL_MODES, scale_thresholds
from fcdiffusion.inference import Translation, Translator
from fcdiffusion.model import FCDiffusion
from fcdiffusion.student import FCDiffusionStudent, student_config
from fcdiffusion.weights import adopt_student, build_on_meta, load_student, load_teacher
from ldm.util import instantiate_from_config, without_text_encoder_file

STUDENT_STEPS = (1, 2, 4)
SPEED_MODE = "mid_pass"


def cpu_name() -> str:
    """The CPU's model name where the OS says it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} CPU, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def demo_images(n: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """`n` scikit-image photos as a (n, 3, H, W) batch in [-1, 1], with their captions."""
    names = list(CAPTIONS)[:n]
    images = [torch.as_tensor(prepare_image(Image.fromarray(load_photo(name)), resolution)) for name in names]
    return torch.stack(images).permute(0, 3, 1, 2), [CAPTIONS[name] for name in names]


def end_to_end(translator: Translator, image: torch.Tensor, prompt: str, mode: str, seed: int = 0,
               steps: int | None = None) -> Translation:
    """One image (3, H, W) translated in `mode`: what the speed figures time (the control is not decoded)."""
    return translator(image[None], [prompt], [mode], seed=seed, control_seed=seed, steps=steps,
                      decode_control=False)[mode]


def time_per_image(translator: Translator, images: torch.Tensor, prompts: Sequence[str], steps: int,
                   repeats: int) -> float:
    """Mean seconds per image over `repeats` passes of the images, one image at a time."""
    device = translator.model.device
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for image, prompt in zip(images, prompts):
            end_to_end(translator, image, prompt, SPEED_MODE, steps=steps)
    synchronize(device)
    return (time.perf_counter() - start) / (repeats * len(prompts))


def resized_config(config: Mapping[str, Any], resolution: int) -> dict[str, Any]:
    """`config`'s teacher at `resolution` px with random weights (no text-encoder file), serving `SPEED_MODE`.

    The band edges are scaled with the latent, so a reduced resolution keeps each band's share of the spectrum.
    """
    config = without_text_encoder_file(copy.deepcopy(dict(config)))
    params = config["params"]
    latent = resolution // 8
    thresholds = scale_thresholds(params.get("frequency_thresholds"), latent, params["image_size"])
    params.update(image_size=latent, control_mode=SPEED_MODE, frequency_thresholds=thresholds)
    return config


def random_pair(config: Mapping[str, Any], resolution: int,
                device: torch.device) -> tuple[FCDiffusion, FCDiffusionStudent]:
    """A random-weight teacher of `config`'s architecture at `resolution` px and a student sharing its tensors."""
    torch.manual_seed(0)
    teacher_config = resized_config(config, resolution)
    teacher = instantiate_from_config(teacher_config).eval().to(device)
    student = build_on_meta(student_config(teacher_config))
    adopt_student(student, teacher.state_dict(), "random teacher", allow_fcdiffusion=True)
    return teacher, student.eval().to(device)  # moves only the student's own (zero) mode embedding


def speed(config: Mapping[str, Any], resolution: int, n_images: int, repeats: int, teacher_steps: int,
          device: torch.device) -> dict[str, float]:
    """Seconds per image of the guided teacher and of the student at 1, 2 and 4 steps (random weights)."""
    teacher, student = (Translator(m) for m in random_pair(config, resolution, device))
    images, prompts = demo_images(n_images, resolution)
    end_to_end(student, images[0], prompts[0], SPEED_MODE, steps=1)  # warm-up
    figures = {f"teacher_{teacher_steps}_cfg_s": time_per_image(teacher, images, prompts, teacher_steps, repeats)}
    for k in STUDENT_STEPS:
        figures[f"student_{k}_s"] = time_per_image(student, images, prompts, k, repeats)
    figures["speedup_4"] = figures[f"teacher_{teacher_steps}_cfg_s"] / figures["student_4_s"]
    return figures


@torch.no_grad()
def fidelity(teachers: Mapping[str, str | os.PathLike], student_path: str | os.PathLike, resolution: int,
             n_images: int, teacher_steps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Per mode: latent MSE to the teacher's `teacher_steps`-step result of the student and of the teacher at k steps.

    Image i uses noise seed 1000 + i and mini_pass shuffle seed i, the same for every model and step count.
    """
    student = Translator(load_student(student_path).to(device).eval())
    images, prompts = demo_images(n_images, resolution)
    out: dict[str, dict[str, float]] = {}
    for mode in CONTROL_MODES:
        teacher = Translator(load_teacher(teachers[mode], mode).to(device).eval())
        errors: dict[str, list[float]] = {}
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            z, context = teacher.encode(image[None], [prompt])
            run = lambda translator, steps: translator.translate_latents(  # noqa: E731
                z, context, [mode], seed=1000 + i, control_seed=i, steps=steps, decode_control=False)[mode].latents
            reference = run(teacher, teacher_steps)
            for k in STUDENT_STEPS:
                errors.setdefault(f"student_k{k}_mse", []).append(torch.mean((run(student, k) - reference) ** 2).item())
                errors.setdefault(f"teacher_k{k}_mse", []).append(torch.mean((run(teacher, k) - reference) ** 2).item())
        out[mode] = {name: float(np.mean(values)) for name, values in errors.items()}
        del teacher
    return out


def memory(sd_config: Mapping[str, Any], student_options: Mapping[str, Any]) -> dict[str, float]:
    """Parameters the distiller holds at the SD 2.1-base config vs five independent full models (meta device)."""
    counts = FrequencyDistiller(sd_config, student=student_options).parameter_counts()
    return {"distiller_params": counts["resident"], "five_full_models_params": counts["independent"],
            "ratio": counts["resident"] / counts["independent"]}


def format_tables(results: dict[str, Any], teacher_steps: int = 50) -> str:
    """The benchmark's figures as Markdown tables."""
    key = f"teacher_{teacher_steps}_cfg_s"
    hardware = results["hardware"]
    lines = [f"Speed, seconds per image end to end ({hardware['device']}, torch {hardware['torch']})", "",
             f"| config | teacher {teacher_steps} steps + CFG | student 1 | student 2 | student 4 | speed-up at 4 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in results["speed"].items():
        lines.append(f"| {name} | {s[key]:.3f} | {s['student_1_s']:.3f} | {s['student_2_s']:.3f} "
                     f"| {s['student_4_s']:.3f} | {s['speedup_4']:.1f}x |")
    if results.get("fidelity"):
        lines += ["", f"Fidelity: latent MSE to the teacher's {teacher_steps}-step guided result (lower is better)", "",
                  "| mode | student k=1 | teacher k=1 | student k=2 | teacher k=2 | student k=4 | teacher k=4 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for mode, f in results["fidelity"].items():
            cells = " | ".join(f"{f[f'student_k{k}_mse']:.4f} | {f[f'teacher_k{k}_mse']:.4f}" for k in STUDENT_STEPS)
            lines.append(f"| {mode} | {cells} |")
    if results.get("memory"):
        m = results["memory"]
        lines += ["", f"Memory at the SD 2.1-base config: the distiller (four teachers + student) holds "
                      f"{m['distiller_params'] / 1e9:.3f}B parameters, five full models "
                      f"{m['five_full_models_params'] / 1e9:.3f}B "
                      f"({100 * m['ratio']:.1f}%)"]
    return "\n".join(lines) + "\n"
