"""Translate a folder of images with the distilled student (few guidance-free steps) or with one teacher.

    python test_distillation.py --input_dir photos \
        --student lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors
    python test_distillation.py --input_dir photos --prompt "a watercolor painting" --mode high_pass --steps 2 \
        --student lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors
    python test_distillation.py --input_dir photos --mode low_pass --steps 50 --guidance_scale 9 \\
        --teacher lightning_logs/fcdiffusion_low_pass_checkpoint/last.ckpt

Each image `<name>.<ext>` in INPUT_DIR is translated with the prompt in `<name>.txt` (or --prompt for all), in
every requested control mode, from the same seeded noise per image (seed + its index). Writes
`<out_dir>/<name>_<mode>.png`, its decoded control signal `<out_dir>/<name>_<mode>_control.png`, and
`<out_dir>/<name>_grid.png` (source | control | result, per mode). An image
that cannot be read, or has no prompt, is reported and skipped. `--student` takes `student.safetensors` or a
distiller checkpoint; the architecture comes from the distillation config (`--config`, `key.sub=value` overrides).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from fcdiffusion.dataset import load_image
from fcdiffusion.distiller import load_fcdiffusion, load_student, teacher_model_config
from fcdiffusion.frequency import CONTROL_MODES
from fcdiffusion.images import labelled_grid, save_image, save_png
from fcdiffusion.model import FCDiffusion
from ldm.checkpoint import CheckpointMismatchError
from ldm.util import load_config

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="folder of images, each with a same-named .txt prompt")
    parser.add_argument("--prompt", help="one prompt for every image (instead of the .txt files)")
    parser.add_argument("--mode", default="all", choices=[*CONTROL_MODES, "all"], help="control mode(s) to run")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--student", help="distilled student: student.safetensors or a distiller checkpoint")
    model.add_argument("--teacher", help="one FCDiffusion teacher checkpoint (needs a single --mode: its own)")
    parser.add_argument("--steps", type=int,
                        help="sampling steps (default: 4 for the student, the config's ddim_steps for a teacher)")
    parser.add_argument("--guidance_scale", type=float,
                        help="teacher's classifier-free guidance (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (image i uses seed + i)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--resolution", type=int, default=512, help="square size images are resized and cropped to")
    parser.add_argument("--config", default="configs/distill_config.yaml",
                        help="distillation config (architecture, student options)")
    parser.add_argument("--out_dir", default="outputs/test_distillation", help="where the PNGs go")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda:1, ...")
    return parser.parse_known_args(argv)


def find_inputs(input_dir: str | os.PathLike, prompt: Optional[str]) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image path, prompt) pairs in `input_dir` (sorted), and a message per image skipped for lack of a prompt."""
    pairs, problems = [], []
    for path in sorted(p for p in Path(input_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption = path.with_suffix(".txt")
        if prompt is not None:
            pairs.append((path, prompt))
        elif caption.is_file():
            pairs.append((path, " ".join(caption.read_text(encoding="utf-8").split())))
        else:
            problems.append(f"skipping {path}: no prompt ({caption.name} missing; or pass --prompt)")
    return pairs, problems


def load_model(args: argparse.Namespace, overrides: list[str]) -> FCDiffusion:
    config = load_config(args.config, overrides)
    model_config = teacher_model_config(config)
    if args.student:
        options = {k: v for k, v in OmegaConf.to_container(config.student, resolve=True).items() if k != "init"}
        return load_student(model_config, args.student, **options)
    model_config["params"]["control_mode"] = args.mode
    return load_fcdiffusion(model_config, args.teacher)


@torch.no_grad()
def translate_batch(model: FCDiffusion, args: argparse.Namespace, modes: Sequence[str], images: torch.Tensor,
                    prompts: Sequence[str], seeds: Sequence[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """mode -> (decoded control signal, decoded result) for a batch of images (B, 3, H, W) in [-1, 1].

    Image i starts from noise seeded with seeds[i], the same in every mode, so results differ only by mode.
    """
    z = model.get_first_stage_encoding(model.encode_first_stage(images), sample=False)
    context = model.get_learned_conditioning(prompts)
    x_T = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]).to(z)
    out = {}
    for mode in modes:
        generator = torch.Generator().manual_seed(args.seed)  # the mini_pass shuffle
        if args.student:
            cond = model.mode_conditioning(z, context, mode, generator=generator)
            latents = model.generate(cond, args.steps or 4, x_T)
        else:
            cond = {"c_crossattn": [context], "c_concat": [model.control_signal(z, generator)]}
            latents = model.translate(cond, args.steps, args.guidance_scale, x_T)
        out[mode] = (model.decode_first_stage(cond["c_concat"][0]), model.decode_first_stage(latents))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    if args.teacher and args.mode == "all":
        print("error: a teacher serves one control mode; pass --mode with the teacher's mode", file=sys.stderr)
        return 2
    if not os.path.isdir(args.input_dir):
        print(f"error: input folder not found: {args.input_dir}", file=sys.stderr)
        return 2
    modes = list(CONTROL_MODES) if args.mode == "all" else [args.mode]
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        model = load_model(args, overrides).eval().to(device)
    except (FileNotFoundError, CheckpointMismatchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    pairs, problems = find_inputs(args.input_dir, args.prompt)
    for message in problems:
        print(message, file=sys.stderr)
    os.makedirs(args.out_dir, exist_ok=True)
    done, skipped = 0, len(problems)
    with tqdm(total=len(pairs), desc="translating", unit="img") as progress:
        for start in range(0, len(pairs), args.batch_size):
            batch = []
            for index, (path, prompt) in enumerate(pairs[start:start + args.batch_size], start):
                try:
                    batch.append((index, path, prompt, load_image(path, args.resolution)))
                except Exception as error:  # any decode failure (OSError, SyntaxError, DecompressionBombError, ...)
                    print(f"skipping unreadable image {path} ({type(error).__name__}: {error})", file=sys.stderr)
                    skipped += 1
                    progress.update(1)
            if not batch:
                continue
            images = torch.from_numpy(np.stack([b[3] for b in batch])).permute(0, 3, 1, 2).to(device)
            seeds = [args.seed + b[0] for b in batch]
            results = translate_batch(model, args, modes, images, [b[2] for b in batch], seeds)
            for i, (_, path, _, _) in enumerate(batch):
                columns = {"source": images[i:i + 1]}
                for mode, (control, result) in results.items():
                    save_image(result[i], os.path.join(args.out_dir, f"{path.stem}_{mode}.png"))
                    save_image(control[i], os.path.join(args.out_dir, f"{path.stem}_{mode}_control.png"))
                    columns[f"control {mode}"], columns[mode] = control[i:i + 1], result[i:i + 1]
                save_png(labelled_grid(columns), os.path.join(args.out_dir, f"{path.stem}_grid.png"))
            done += len(batch)
            progress.update(len(batch))
    print(f"translated {done} image(s) into {args.out_dir}" + (f"; skipped {skipped}" if skipped else ""))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
