"""Speed, fidelity and memory of the distilled student against its teachers, in one run on one machine.

    python benchmarks/distillation_benchmark.py --out outputs/benchmark.json

    python benchmarks/distillation_benchmark.py --precision fp16 --compile --repeats 5 --out outputs/fp16.json

What each figure means: `fcdiffusion/apps/benchmark.py`. Prints tables; `--out FILE` writes the same figures as JSON.
Fidelity needs trained tiny teachers and a student (the quickstart makes them) and is skipped without them; it is
measured on `--heldout DIR` (images with same-named .txt prompts, not trained on), by default on the demo photos,
against every teacher few-step baseline (DDIM uniform and trailing, DPM-Solver++(2M)); a guidance-conditioned
student also at each of `--guidance_scales` (default: its range's ends and its default w).
On CUDA the SD 2.1-base architecture is timed at 512 px by default (warm-up, synchronised repeats, peak memory).
The student is also timed with a tiny autoencoder in place of the VAE (`student_<k>_tiny_vae_s`): at the SD
architecture TAESD's (random weights), at the tiny config the one `--tiny_vae` names. `--sd_teacher_timing_steps K1 K2`
extrapolates the SD teacher's time from K1 and K2 steps (`teacher_<n>_cfg_extrapolated` says from what).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import OmegaConf

from fcdiffusion import cli
from fcdiffusion.apps.benchmark import config_resolution, fidelity, format_tables, memory, speed
from fcdiffusion.core.devices import device_name, resolve_device
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.paths import teacher_checkpoint
from fcdiffusion.core.precision import PRECISIONS, vae_dtype
from ldm.util import atomic_write_text, load_config


def model_node(config_path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    return OmegaConf.to_container(load_config(config_path, list(overrides)).model, resolve=True)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--tiny_config", default="configs/model_config_tiny.yaml")
    parser.add_argument("--sd_config", default="configs/model_config.yaml")
    parser.add_argument("--sd", action=argparse.BooleanOptionalAction, default=True,
                        help="time the SD 2.1-base architecture too (random weights)")
    parser.add_argument("--sd_resolution", type=int,
                        help="image size for the SD-architecture timing (default: 512 on CUDA, 256 otherwise)")
    parser.add_argument("--teachers_dir", default="lightning_logs",
                        help="log folder with fcdiffusion_<mode>_checkpoint/last.ckpt (trained tiny teachers)")
    parser.add_argument("--student", default="lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors",
                        help="trained tiny student; fidelity is skipped if it or a teacher is missing")
    parser.add_argument("--trainable", nargs="+", default=["control_net"],
                        help="the student's trained parts (for the memory figure)")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=4, help="photos per measurement")
    parser.add_argument("--sd_images", type=int, help="photos per SD-architecture timing (default: half of --images)")
    parser.add_argument("--heldout", help="folder of held-out photos with same-named .txt prompts for the fidelity "
                                          "figures (default: the first --images demo photos)")
    parser.add_argument("--guidance_images", type=int,
                        help="measure the guidance sweep (--guidance_scales) on the first N photos only (default: all)")
    parser.add_argument("--guidance_scales", type=float, nargs="+",
                        help="w at which a guidance-conditioned student is compared with its teachers")
    parser.add_argument("--references", metavar="DIR",
                        help="read the teachers' reference results from here instead of solving them: where "
                             "test_distillation.py --seed 1000 --save_latents --steps <--teacher_steps> wrote them")
    parser.add_argument("--sweep_latents", metavar="PATH",
                        help="save the guidance sweep's latents of the first photo here (teacher and student at each "
                             "w; the quickstart's guidance.png decodes them instead of solving again)")
    parser.add_argument("--ablation_student", metavar="PATH",
                        help="a second student measured like --student (the band-weight ablation: the same "
                             "distillation without band weights); its table compares their errors per band")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--teacher_steps", type=int, default=50)
    cli.add_device_flag(parser)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="dtype of the timed models' weights (the VAE stays float32 with fp16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and control net when timing")
    parser.add_argument("--tiny_vae", metavar="PATH",
                        help="also time the tiny config's student encoding and decoding with this tiny autoencoder "
                             "(the SD architecture's rows use TAESD's architecture with random weights)")
    parser.add_argument("--sd_teacher_timing_steps", type=int, nargs=2, metavar=("K1", "K2"),
                        help="time the SD-architecture teacher at K1 and K2 steps only and extrapolate its "
                             "--teacher_steps time linearly (recorded as extrapolated; default: measured in full)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Time the tiny (and SD-architecture) models, measure fidelity where trained models exist, size the memory,
    print the tables and write the JSON."""
    device = resolve_device(args.device)
    tiny = model_node(args.tiny_config, overrides)
    sd_resolution = args.sd_resolution or (512 if device.type == "cuda" else 256)
    results: dict[str, Any] = {
        "hardware": {"device": device_name(device), "torch": torch.__version__},
        "precision": {"precision": args.precision, "compile": args.compile,
                      "vae_dtype": str(vae_dtype(PRECISIONS[args.precision])).removeprefix("torch.")},
        "speed": {}}

    start = time.perf_counter()

    def section_done() -> None:
        nonlocal start
        print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        start = time.perf_counter()

    tiny_resolution = config_resolution(tiny)
    print(f"timing the tiny config at {tiny_resolution} px ...", flush=True)
    results["speed"]["tiny"] = speed(tiny, tiny_resolution, args.images, args.repeats, args.teacher_steps, device,
                                     args.precision, args.compile, args.tiny_vae)
    section_done()
    if args.sd:
        print(f"timing the SD 2.1-base architecture at {sd_resolution} px (random weights) ...", flush=True)
        results["speed"][f"sd21_base_{sd_resolution}px"] = speed(
            model_node(args.sd_config), sd_resolution, args.sd_images or max(1, args.images // 2), args.repeats,
            args.teacher_steps, device, args.precision, args.compile, "random", args.sd_teacher_timing_steps)
        section_done()

    teachers = {m: teacher_checkpoint(args.teachers_dir, m) for m in CONTROL_MODES}
    wanted = [*teachers.values(), args.student, *([args.ablation_student] if args.ablation_student else [])]
    missing = [os.fspath(p) for p in wanted if not os.path.isfile(p)]
    if missing:
        print(f"fidelity skipped: missing {missing}")
    else:
        print("measuring fidelity of the trained tiny student ...", flush=True)
        results["fidelity"], results["fidelity_setup"] = fidelity(
            teachers, args.student, tiny_resolution, args.images, args.teacher_steps, device, args.heldout,
            args.guidance_scales, args.ablation_student, args.guidance_images, args.sweep_latents, args.references)
        section_done()
    print("sizing memory at the SD 2.1-base config (meta tensors) ...", flush=True)
    results["memory"] = memory(model_node(args.sd_config), {"trainable": args.trainable, "lora_rank": args.lora_rank})
    section_done()
    print("\n" + format_tables(results, args.teacher_steps))
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv, unknown="overrides")


if __name__ == "__main__":
    sys.exit(main())
