"""Translate a folder of images with the distilled student (few guidance-free steps) or with one teacher.

    python test_distillation.py --input_dir photos \
        --student lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors
    python test_distillation.py --input_dir photos --prompt "a watercolor painting" --mode high_pass --steps 2 \
        --student lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors
    python test_distillation.py --input_dir photos --steps 50 --guidance_scale 9 \
        --teacher lightning_logs/fcdiffusion_low_pass_checkpoint/last.ckpt
    python test_distillation.py --input_dir photos --steps 20 --sampler dpmpp_2m --spacing trailing \
        --teacher lightning_logs/fcdiffusion_low_pass_checkpoint/last.ckpt

Each image `<name>.<ext>` in INPUT_DIR is translated with the prompt in `<name>.txt` (or --prompt for all), in
every requested control mode, from the same seeded noise per image (seed + its index). Writes
`<out_dir>/<name>_<mode>.png`, its decoded control signal `<out_dir>/<name>_<mode>_control.png`, and
`<out_dir>/<name>_grid.png` (source | control | result, per mode); with --save_latents also each result's latents
and the settings that made them, `<out_dir>/<name>_<mode>_latents.safetensors`. Images sharing a name (x.png, x.jpg) are
told apart by their suffix (`x_png_<mode>.png`, `x_jpg_<mode>.png`), so no output overwrites another. An image
that cannot be read or has no prompt (an empty caption counts as none), and any other file that is not a caption,
is reported and skipped. Before any model is loaded, an empty --prompt, --steps past the model's schedule (read from
what its file records), an --out_dir that is INPUT_DIR, cannot be written or lacks the space for the outputs are
refused; a write that fails later (a full disk) says how many images were written before it. A prompt longer than
the text encoder's context (77 tokens) is cut, with a warning.

Weight files describe themselves: the student samples with the steps it was distilled for and serves the
modes it learned, a teacher serves the mode it was trained for (another --mode is an error naming both). A teacher
samples with guided DDIM on SD's uniform spacing unless --sampler (dpmpp_2m: DPM-Solver++(2M)) and --spacing
(trailing: from t = 999) say otherwise; the student always with DDIM on the trailing schedule it learned. Only a
guidance-conditioned student (distilled with --guidance_range) takes --guidance_scale, at one network evaluation
per step; a fixed-w student refuses a scale other than its own (1 included), as the demo does. Files written before
they carried that metadata need `--config` (the distillation config; `key.sub=value` overrides). A delta file
(export_delta.py) loads over the SD 2.1-base checkpoint given with `--base`.

`--precision fp16|bf16` runs the networks and the text encoder in that dtype (half the memory and, on GPUs,
about half the time); the sampler's arithmetic stays float32, and with fp16 the VAE stays float32 (SD's VAE
overflows fp16). `--compile` compiles the UNet and the control net with torch.compile (the first batch pays it).
`--tiny_vae PATH` encodes the sources and decodes the results (or only one: `--tiny_vae_use encode|decode`) with a
tiny autoencoder instead of the model's VAE: TAESD for SD 2.1-base, or one distill_tiny_vae.py made; which one and
what it did go into `<out_dir>/settings.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fcdiffusion import cli
from fcdiffusion.core.devices import resolve_device
from fcdiffusion.core.errors import OutputError
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.images import labelled_grid, save_image, save_png
from fcdiffusion.core.inference import Translator, check_prompt
from fcdiffusion.core.model import FrequencyControlledLDM
from fcdiffusion.core.paths import SD_CHECKPOINT, check_not_input, check_writable
from fcdiffusion.core.precision import PRECISIONS, prepare_for_inference
from fcdiffusion.core.saved_latents import latents_path, save_latents, translation_settings
from fcdiffusion.core.student import FCDiffusionStudent
from fcdiffusion.core.tiny_vae import TINY_VAE_HELP, TINY_VAE_USE_HELP, TINY_VAE_USES, load_tiny_vae
from fcdiffusion.core.weights import (
    KindMismatchError,
    distilled_student_config,
    load_student,
    load_teacher,
    max_sampling_steps,
    recorded_max_sampling_steps,
    teacher_model_config,
)
from fcdiffusion.evaluation.suite import METRICS, NEEDS_REFERENCE, Evaluator, Settings, evaluate_folder
from fcdiffusion.train.dataset import LATENT_GRID, load_image
from fcdiffusion.train.image_folder import IMAGE_SUFFIXES, prompted_images
from ldm.models.diffusion.sampling import SAMPLERS
from ldm.models.diffusion.scheduler import SPACINGS
from ldm.util import atomic_write_text, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--input_dir", required=True, help="folder of images, each with a same-named .txt prompt")
    parser.add_argument("--prompt", help="one prompt for every image (instead of the .txt files)")
    parser.add_argument("--mode", choices=[*CONTROL_MODES, "all"],
                        help="control mode(s) to run (default: every mode the student learned, or the teacher's own)")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--student", help="distilled student: student.safetensors or a distiller checkpoint")
    model.add_argument("--teacher", help="one FCDiffusion teacher checkpoint (serves the mode it was trained for)")
    parser.add_argument("--steps", type=int,
                        help="sampling steps (default: the student's student_steps, a teacher's ddim_steps)")
    parser.add_argument("--guidance_scale", type=float,
                        help="classifier-free guidance w (default: the model's own): a teacher's, or a "
                             "guidance-conditioned student's within its range")
    parser.add_argument("--sampler", choices=list(SAMPLERS),
                        help="teacher's sampler: ddim (default) or dpmpp_2m (DPM-Solver++(2M))")
    parser.add_argument("--spacing", choices=list(SPACINGS),
                        help="teacher's timestep spacing: uniform (SD's, default) or trailing (starts at t = 999)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (image i uses seed + i)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--resolution", type=int, default=512,
                        help=f"square size images are resized and cropped to (a multiple of {LATENT_GRID})")
    parser.add_argument("--config",
                        help="distillation config, only for weight files that do not describe themselves")
    parser.add_argument("--out_dir", default="outputs/test_distillation", help="where the PNGs go")
    parser.add_argument("--save_latents", action="store_true",
                        help="also save each result's latents with the settings that made them "
                             "(<name>_<mode>_latents.safetensors; the benchmark's --references reads them)")
    parser.add_argument("--evaluate", nargs="+", choices=[m for m in METRICS if m not in NEEDS_REFERENCE],
                        metavar="METRIC", help="after translating, run these evaluation metrics on the results "
                        "(band, clip_score, dino_structure, lpips: default weight files; see evaluate.py) and "
                        "write <out_dir>/metrics.json")
    cli.add_device_flag(parser)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="dtype of the networks and the text encoder (the VAE: fp32 with fp16, see above)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the control net")
    parser.add_argument("--tiny_vae", metavar="PATH", help=TINY_VAE_HELP + "; recorded in <out_dir>/settings.json")
    parser.add_argument("--tiny_vae_use", choices=TINY_VAE_USES, default="both", help=TINY_VAE_USE_HELP)
    parser.add_argument("--base", default=SD_CHECKPOINT,
                        help="SD 2.1-base checkpoint that a delta weights file applies over (full files ignore it)")
    return parser


def check_usage(args: argparse.Namespace, overrides: list[str]) -> None:
    """Raise a UsageError for a command line that cannot work, before anything is loaded."""
    if args.teacher and args.mode == "all":
        raise cli.UsageError("a teacher serves one control mode; drop --mode (it uses its own) or pass the "
                             "teacher's mode")
    if args.steps is not None and args.steps < 1:
        raise cli.UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        raise cli.UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.resolution < 1 or args.resolution % LATENT_GRID:
        raise cli.UsageError(f"--resolution must be a positive multiple of {LATENT_GRID}, got {args.resolution} "
                             f"(the VAE and the UNet downsample it {LATENT_GRID}x in all)")
    if overrides and not args.config:
        raise cli.UsageError(f"unrecognised arguments {overrides} (key.sub=value overrides need --config)")
    if args.prompt is not None:
        args.prompt = cli.checked_flag("prompt", check_prompt, args.prompt)
    if not os.path.isdir(args.input_dir):
        raise cli.UsageError(f"input folder not found: {args.input_dir}")
    try:
        check_not_input(args.out_dir, "--out_dir", {"--input_dir": args.input_dir})
        check_writable(args.out_dir, "--out_dir", output_bytes(args))
    except ValueError as error:
        raise cli.UsageError(str(error)) from None
    check_steps(args, recorded_step_limit(args, overrides), args.student or args.teacher)


def output_bytes(args: argparse.Namespace) -> int:
    """About what the outputs of INPUT_DIR take, counted before any model is loaded (every mode for a student
    without --mode): per image and mode a result and a control PNG, and a grid of them all with the source, each
    PNG taken at half its raw pixels (photos compress about that well), and the latents with --save_latents."""
    images = sum(1 for p in Path(args.input_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    modes = 1 if args.teacher or args.mode not in (None, "all") else len(CONTROL_MODES)
    # --save_latents: 4 float32 channels at a quarter of the resolution or less (VAEs here downsample 4x or 8x)
    latents = images * modes * 16 * (args.resolution // 4) ** 2 if args.save_latents else 0
    return images * (4 * modes + 1) * args.resolution**2 * 3 // 2 + latents


def recorded_step_limit(args: argparse.Namespace, overrides: list[str]) -> int | None:
    """The most sampling steps the model can take, from --config or what its weights file records (no tensor read);
    None when neither says (checked again once the model is loaded)."""
    if args.config:
        config = load_config(args.config, overrides)
        model = distilled_student_config(config) if args.student else teacher_model_config(config)
        return max_sampling_steps(model, args.spacing)
    return recorded_max_sampling_steps(args.student or args.teacher, args.spacing)


def check_steps(args: argparse.Namespace, limit: int | None, model: str) -> None:
    """Raise a UsageError when --steps is more than the model's sampler fits in its schedule (`limit`)."""
    if args.steps is not None and limit is not None and args.steps > limit:
        spacing = "" if args.student else f" on the {args.spacing or 'uniform'} timestep spacing"
        raise cli.UsageError(f"--steps {args.steps} is more than {model} can sample with{spacing}: at most {limit}")


def output_names(paths: Sequence[Path]) -> tuple[dict[Path, str], list[str]]:
    """The name each input's outputs start with (`<name>_<mode>.png`, ...), and a message per naming clash.

    The name is the file's stem; inputs sharing a stem (compared ignoring case, as the file systems of macOS and
    Windows do) are each named `<stem>_<suffix>` instead (x.png, x.jpg: x_png, x_jpg). An input whose name
    still matches an earlier one's (x_png.bmp beside those two) gets no name: it would overwrite their outputs.
    """
    shared = defaultdict(list)
    for path in paths:
        shared[path.stem.casefold()].append(path)
    names, messages, owners = {}, [], {}
    for path in paths:
        group = shared[path.stem.casefold()]
        name = path.stem if len(group) == 1 else f"{path.stem}_{path.suffix[1:]}"
        if path == group[0] and len(group) > 1:
            messages.append(f"{', '.join(p.name for p in group)} share the name {path.stem!r}: their outputs are "
                            "named " + ", ".join(f"{p.stem}_{p.suffix[1:]}_<mode>.png" for p in group))
        if name.casefold() in owners:
            messages.append(f"skipping {path}: its outputs would overwrite those of {owners[name.casefold()]}")
            continue
        owners[name.casefold()] = path
        names[path] = name
    return names, messages


@contextmanager
def kept_so_far(out_dir: str, done: int) -> Iterator[None]:
    """Turn a failed write (a full disk, a file system gone read-only) into an `OutputError` that says what was
    kept: the `done` images translated before it, in `out_dir` (each output is written atomically)."""
    try:
        yield
    except OSError as error:
        target = error.filename2 or error.filename or out_dir
        raise OutputError(f"could not write {target}: {error.strerror or error}; the {done} image(s) translated "
                          f"before it are in {out_dir}; make room (or pick another --out_dir) and run again") from None


def load_model(args: argparse.Namespace, overrides: list[str]) -> FrequencyControlledLDM:
    """The student or teacher the flags name; its own metadata describes it unless --config is given."""
    config = load_config(args.config, overrides) if args.config else None
    try:
        if args.student:
            return load_student(args.student, distilled_student_config(config) if config else None, args.base)
        mode = None if args.mode in (None, "all") else args.mode
        return load_teacher(args.teacher, mode, teacher_model_config(config) if config else None, args.base)
    except KindMismatchError as error:
        raise KindMismatchError(f"{error} (pass it with --{error.found})", error.found) from None


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    """Check the command line, load the model (and the evaluation's networks), translate every input; status 1
    when no image could be translated."""
    check_usage(args, overrides)
    device = resolve_device(args.device)
    model = load_model(args, overrides)
    check_steps(args, max_sampling_steps(model.model_config(), args.spacing), args.student or args.teacher)
    modes = list(model.modes) if args.mode in (None, "all") else [model.check_mode(args.mode)]
    if isinstance(model, FCDiffusionStudent):  # teachers take any sampler, spacing and scale
        model.check_sampling(args.guidance_scale, args.sampler, args.spacing, args.steps)
    model = prepare_for_inference(model, device, args.precision, args.compile)
    tiny_vae = load_tiny_vae(args.tiny_vae, args.tiny_vae_use, device, args.precision) if args.tiny_vae else None
    evaluator = Evaluator(args.evaluate, Settings(model=model, device=device)) if args.evaluate else None
    if evaluator is not None:
        evaluator.prepare()  # a missing weights file fails now, not after the translations
    translator = Translator(model, tiny_vae)
    vae = tiny_vae.settings() if tiny_vae else "full"
    pairs, problems = prompted_images(args.input_dir, args.prompt)
    names, notes = output_names([path for path, _ in pairs])
    for message in problems + notes:
        print(message, file=sys.stderr)
    named = [(path, prompt) for path, prompt in pairs if path in names]
    done, skipped = 0, len(problems) + len(pairs) - len(named)
    pairs = named
    with kept_so_far(args.out_dir, done):
        os.makedirs(args.out_dir, exist_ok=True)
        atomic_write_text(os.path.join(args.out_dir, "settings.json"), json.dumps({
            "model": args.student or args.teacher, "steps": args.steps, "seed": args.seed,
            "precision": args.precision, "vae": vae}, indent=2) + "\n")
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
            images = torch.from_numpy(np.stack([b[3] for b in batch])).permute(0, 3, 1, 2)
            results = translator(images, [b[2] for b in batch], modes, seed=[args.seed + b[0] for b in batch],
                                 control_seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                                 sampler=args.sampler, spacing=args.spacing)
            with kept_so_far(args.out_dir, done):
                for i, (_, path, _, _) in enumerate(batch):
                    columns = {"source": images[i:i + 1]}
                    for mode, result in results.items():
                        save_image(result.image[i], os.path.join(args.out_dir, f"{names[path]}_{mode}.png"))
                        if args.save_latents:
                            save_latents(latents_path(args.out_dir, names[path], mode), result.latents[i],
                                         translation_settings(
                                             args.student or args.teacher, batch[i][2], args.resolution,
                                             args.seed + batch[i][0], args.seed, args.steps, args.guidance_scale,
                                             args.sampler, args.spacing, args.precision, vae))
                        save_image(result.control[i], os.path.join(args.out_dir,
                                                                   f"{names[path]}_{mode}_control.png"))
                        columns[f"control {mode}"] = result.control[i:i + 1].cpu()
                        columns[mode] = result.image[i:i + 1].cpu()
                    save_png(labelled_grid(columns), os.path.join(args.out_dir, f"{names[path]}_grid.png"))
            done += len(batch)
            progress.update(len(batch))
    print(f"translated {done} image(s) into {args.out_dir}" + (f"; skipped {skipped}" if skipped else ""))
    if evaluator is not None and done:
        metrics = os.path.join(args.out_dir, "metrics.json")
        evaluate_folder(evaluator, args.out_dir, args.input_dir, args.prompt, out=metrics, batch_size=args.batch_size)
        print(Path(metrics).with_suffix(".md").read_text() + f"wrote {metrics}")
    return 0 if done else 1


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv, unknown="overrides")


if __name__ == "__main__":
    sys.exit(main())
