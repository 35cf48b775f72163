"""Speed, fidelity and memory of the distilled student against its teachers, in one run on one machine.

    python benchmarks/distillation_benchmark.py --out outputs/benchmark.json

- speed: seconds per image end to end (encode the source, encode the prompt, sample, decode) for a teacher
  at 50 guided DDIM steps and the student at 1, 2 and 4 steps, on the tiny config and on the SD 2.1-base
  architecture (random weights, reduced resolution). Student and teacher share the architecture, so one
  network times both samplers.
- fidelity (with trained tiny teachers and student): per mode, the latent-space MSE between the student's
  k-step result and the teacher's 50-step result (same image, prompt, control and initial noise), beside the
  teacher's own k-step DDIM result.
- memory: parameters held by the distiller (four teachers + student, shared tensors once) against five
  independent full models, at the SD 2.1-base config, built on the meta device.
Prints tables; `--out FILE` writes the same figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from fcdiffusion.dataset import prepare_image  # noqa: E402
from fcdiffusion.demo_data import CAPTIONS, load_photo  # noqa: E402
from fcdiffusion.distiller import FrequencyDistiller, load_fcdiffusion, load_student, student_config  # noqa: E402
from fcdiffusion.frequency import CONTROL_MODES  # noqa: E402
from ldm.util import atomic_write_text, instantiate_from_config, load_config  # noqa: E402

STUDENT_STEPS = (1, 2, 4)


def model_node(config_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    return OmegaConf.to_container(load_config(config_path, list(overrides)).model, resolve=True)


def cpu_name() -> str:
    """The CPU's model name where the OS says it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def demo_images(n: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """`n` scikit-image photos as a (n, H, W, 3) batch in [-1, 1], with their captions."""
    names = list(CAPTIONS)[:n]
    images = [torch.as_tensor(prepare_image(Image.fromarray(load_photo(name)), resolution)) for name in names]
    return torch.stack(images), [CAPTIONS[name] for name in names]


def encode(model, image: torch.Tensor, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An (H, W, 3) image in [-1, 1] and its prompt -> (latent mean, text context), batch of one."""
    x = image.permute(2, 0, 1)[None].to(model.device)
    return model.get_first_stage_encoding(model.encode_first_stage(x), sample=False), model.get_learned_conditioning([prompt])


@torch.no_grad()
def end_to_end(student, image: torch.Tensor, prompt: str, mode: str, sample: Callable[[dict, torch.Tensor], torch.Tensor],
               seed: int = 0) -> torch.Tensor:
    """Encode the source and the prompt, sample with `sample(cond, x_T)`, decode: one translated image."""
    z, context = encode(student, image, prompt)
    cond = student.mode_conditioning(z, context, mode, generator=torch.Generator().manual_seed(seed))
    x_T = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
    return student.decode_first_stage(sample(cond, x_T))


def time_per_image(student, images: torch.Tensor, prompts: list[str], sample, repeats: int) -> float:
    """Mean seconds per image over `repeats` passes of the images."""
    device = student.device
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for image, prompt in zip(images, prompts):
            end_to_end(student, image.to(device), prompt, "mid_pass", sample)
    synchronize(device)
    return (time.perf_counter() - start) / (repeats * len(prompts))


def teacher_sampler(model, steps: int) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """The teacher's way: guided DDIM on SD's uniform steps (the unconditional branch keeps the control)."""
    return lambda cond, x_T: model.sample_ddim(
        cond, x_T.shape[0], steps, model.guidance_scale, model.unconditional_conditioning(cond), x_T=x_T)


def student_sampler(student, steps: int) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    return lambda cond, x_T: student.generate(cond, steps, x_T=x_T)


def speed(student, resolution: int, n_images: int, repeats: int, teacher_steps: int) -> dict[str, float]:
    """Seconds per image of the guided teacher sampler and the student at 1, 2 and 4 steps, on `student`'s weights."""
    images, prompts = demo_images(n_images, resolution)
    end_to_end(student, images[0].to(student.device), prompts[0], "mid_pass", student_sampler(student, 1))  # warm-up
    figures = {f"teacher_{teacher_steps}_cfg_s": time_per_image(student, images, prompts,
                                                                teacher_sampler(student, teacher_steps), repeats)}
    for k in STUDENT_STEPS:
        figures[f"student_{k}_s"] = time_per_image(student, images, prompts, student_sampler(student, k), repeats)
    figures["speedup_4"] = figures[f"teacher_{teacher_steps}_cfg_s"] / figures["student_4_s"]
    return figures


def random_student(config: dict[str, Any], resolution: int, device: torch.device):
    """An FCDiffusionStudent of `config`'s architecture with random weights, at `resolution` pixels."""
    node = student_config(config)
    node["params"]["cond_stage_config"]["params"]["version"] = None
    node["params"]["image_size"] = resolution // 8
    torch.manual_seed(0)
    return instantiate_from_config(node).to(device).eval()


@torch.no_grad()
def fidelity(config: dict[str, Any], teachers: dict[str, str], student_path: str, student_options: dict[str, Any],
             resolution: int, n_images: int, teacher_steps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Per mode: latent MSE to the teacher's `teacher_steps`-step result of the student and of the teacher at k steps."""
    student = load_student(config, student_path, **student_options).to(device).eval()
    images, prompts = demo_images(n_images, resolution)
    out: dict[str, dict[str, float]] = {}
    for mode in CONTROL_MODES:
        teacher = load_fcdiffusion({**config, "params": {**config["params"], "control_mode": mode}},
                                   teachers[mode]).to(device).eval()
        errors: dict[str, list[float]] = {}
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            z, context = encode(teacher, image.to(device), prompt)
            cond = student.mode_conditioning(z, context, mode, generator=torch.Generator().manual_seed(i))
            x_T = torch.randn(z.shape, generator=torch.Generator().manual_seed(1000 + i)).to(z)
            reference = teacher_sampler(teacher, teacher_steps)(cond, x_T)
            for k in STUDENT_STEPS:
                errors.setdefault(f"student_k{k}_mse", []).append(
                    torch.mean((student.generate(cond, k, x_T=x_T) - reference) ** 2).item())
                errors.setdefault(f"teacher_k{k}_mse", []).append(
                    torch.mean((teacher_sampler(teacher, k)(cond, x_T) - reference) ** 2).item())
        out[mode] = {name: float(np.mean(values)) for name, values in errors.items()}
        del teacher
    return out


def memory(sd_config: dict[str, Any], student_options: dict[str, Any]) -> dict[str, float]:
    """Parameters the distiller holds at the SD 2.1-base config vs five independent full models (meta device)."""
    counts = FrequencyDistiller(sd_config, student=student_options).parameter_counts()
    return {"distiller_params": counts["resident"], "five_full_models_params": counts["independent"],
            "ratio": counts["resident"] / counts["independent"]}


def format_tables(results: dict[str, Any], teacher_steps: int = 50) -> str:
    """The benchmark's figures as Markdown tables."""
    key = f"teacher_{teacher_steps}_cfg_s"
    lines = [f"Speed, seconds per image end to end ({results['hardware']['device']}, torch {results['hardware']['torch']})",
             "", f"| config | teacher {teacher_steps} steps + CFG | student 1 | student 2 | student 4 | speed-up at 4 |",
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
                      f"{m['distiller_params'] / 1e9:.3f}B parameters, five full models {m['five_full_models_params'] / 1e9:.3f}B "
                      f"({100 * m['ratio']:.1f}%)"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny_config", default="configs/model_config_tiny.yaml")
    parser.add_argument("--sd_config", default="configs/model_config.yaml")
    parser.add_argument("--sd", action=argparse.BooleanOptionalAction, default=True,
                        help="time the SD 2.1-base architecture too (random weights)")
    parser.add_argument("--sd_resolution", type=int, default=256, help="image size for the SD-architecture timing")
    parser.add_argument("--teachers_dir", default="lightning_logs",
                        help="folder with fcdiffusion_<mode>_checkpoint/last.ckpt (trained tiny teachers)")
    parser.add_argument("--student", default="lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors",
                        help="trained tiny student; fidelity is skipped if it or a teacher is missing")
    parser.add_argument("--trainable", nargs="+", default=["control_net"], help="the student's trained parts")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=4, help="photos per measurement")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--teacher_steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    return parser.parse_known_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, overrides = parse_args(argv)
    device = torch.device(args.device)
    tiny = model_node(args.tiny_config, overrides)
    student_options = {"trainable": args.trainable, "lora_rank": args.lora_rank}
    results: dict[str, Any] = {"hardware": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"{cpu_name()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__}, "speed": {}}

    tiny_resolution = 8 * tiny["params"]["image_size"]
    print(f"timing the tiny config at {tiny_resolution} px ...", flush=True)
    results["speed"]["tiny"] = speed(random_student(tiny, tiny_resolution, device), tiny_resolution, args.images,
                                     args.repeats, args.teacher_steps)
    if args.sd:
        print(f"timing the SD 2.1-base architecture at {args.sd_resolution} px (random weights) ...", flush=True)
        sd_student = random_student(model_node(args.sd_config), args.sd_resolution, device)
        results["speed"][f"sd21_base_{args.sd_resolution}px"] = speed(
            sd_student, args.sd_resolution, max(1, args.images // 2), args.repeats, args.teacher_steps)
        del sd_student

    teachers = {m: os.path.join(args.teachers_dir, f"fcdiffusion_{m}_checkpoint", "last.ckpt") for m in CONTROL_MODES}
    missing = [p for p in [*teachers.values(), args.student] if not os.path.isfile(p)]
    if missing:
        print(f"fidelity skipped: missing {missing}")
    else:
        print("measuring fidelity of the trained tiny student ...", flush=True)
        results["fidelity"] = fidelity(tiny, teachers, args.student, student_options, tiny_resolution, args.images,
                                       args.teacher_steps, device)
    results["memory"] = memory(model_node(args.sd_config), student_options)
    print("\n" + format_tables(results, args.teacher_steps))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
