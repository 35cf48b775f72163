"""Evaluate translations: the field's image-translation metrics plus FCDiffusion's frequency-band fidelity.

    python evaluate.py --results outputs/student --input_dir my_images \\
        --model lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors
    python evaluate.py --results outputs/student --input_dir my_images --reference outputs/teacher \\
        --model lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors --metrics band teacher_agreement

RESULTS is a folder `test_distillation.py` wrote (`<name>_<mode>.png`), INPUT_DIR the folder it read (`<name>.<ext>`
with `<name>.txt` prompts, or one --prompt). Pairs are matched by name; a result without a source, a source
without a result, and a result missing from --reference are reported and skipped. Metrics (--metrics):
  band               band_error / band_freedom in latent and pixel space (fcdiffusion/core/band_fidelity.py);
                     needs --model (its VAE and band edges)
  band_retrieval     per mode, the fraction of results whose band is closest to their own source among all the
                     sources (chance: 1 / number of sources); latent space, needs --model
  teacher_agreement  latent MSE to --reference's image (e.g. the teacher's 50-step results); needs --model
  clip_score         100 * max(cos(image, prompt), 0), OpenCLIP --clip_arch with --clip_weights (default OpenAI
                     ViT-B/32, pix2pix-Turbo's)
  dino_structure     Tumanyan et al.'s DINO ViT-B/8 self-similarity distance to the source, --dino_weights
  lpips              LPIPS to the source (and to --reference), --lpips_net with --lpips_weights
  fid                FID and KID per mode as clean-fid computes them against the photos in --fid_reference,
                     clean-fid's Inception --inception_weights (KID is the one that means something on small sets)
Every figure comes with its 95% percentile-bootstrap interval over images.

    python evaluate.py --benchmark pie --data PIE-Bench/data --model student.safetensors --mode low_pass \
        --results outputs/pie_low_pass
    python evaluate.py --benchmark pie --data PIE-Bench/data --results edited/   # <key>.png already made
    python evaluate.py --compare outputs/teacher/metrics.json outputs/student/metrics.json

--benchmark pie reads PIE-Bench (DATA/mapping_file.json, DATA/annotation_images/), translates every image with its
editing prompt when --model is given (into --results), and reports PIE-Bench's seven metrics in its units per edit
type and overall (fcdiffusion/evaluation/pie_bench.py; CLIP default OpenAI ViT-L/14, PIE-Bench's). --compare A B
prints B - A per metric over the images both runs scored, with paired-bootstrap intervals (compare.json beside B).
--precision bf16 runs --model's VAE in bf16 (fp16 keeps it float32: SD's VAE overflows fp16); a delta weights
file loads over --base. Every weight file is local: a missing one is an error saying where to get it. Writes
--out (metrics.json: per_image, per_mode, settings) with a Markdown table and a plot beside it. A metric without
what it needs (--model, --reference, --fid_reference), an empty --prompt and an --out that cannot be written (or is
one of the inputs) are refused before any model is loaded; a write that fails at the end puts the results in a
temporary folder and says where.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fcdiffusion import cli
from fcdiffusion.core.devices import resolve_device
from fcdiffusion.core.inference import check_prompt
from fcdiffusion.core.paths import SD_CHECKPOINT, check_not_input, check_writable
from fcdiffusion.core.precision import PRECISIONS, prepare_for_inference
from fcdiffusion.core.weights import load_model
from fcdiffusion.evaluation import bootstrap
from fcdiffusion.evaluation.clip_score import CLIP_B32, CLIP_B32_WEIGHTS, CLIP_L14, CLIP_L14_WEIGHTS
from fcdiffusion.evaluation.suite import METRICS, Evaluator, Settings, check_metric_inputs, evaluate_folder


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--results", help="folder of <name>_<mode>.png results (PIE-Bench: <key>.png)")
    parser.add_argument("--input_dir", help="the source folder the results were translated from")
    parser.add_argument("--prompt", help="the one prompt all images were translated with (instead of .txt files)")
    parser.add_argument("--reference", help="another results folder (e.g. a teacher's) for agreement, LPIPS, FID/KID")
    parser.add_argument("--model", help="student or teacher weights file: its VAE and band edges (band, agreement)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="metrics to compute")
    defaults = Settings()
    parser.add_argument("--clip_arch", help=f"open_clip architecture (default {CLIP_B32}; PIE-Bench: {CLIP_L14})")
    parser.add_argument("--clip_weights", help=f"its local open_clip weights file (default {CLIP_B32_WEIGHTS}; "
                        f"PIE-Bench: {CLIP_L14_WEIGHTS})")
    parser.add_argument("--clip_arch_config", help="JSON config of an architecture open_clip does not ship")
    parser.add_argument("--dino_weights", default=defaults.dino_weights, help="DINO ViT-B/8 folder (transformers)")
    parser.add_argument("--lpips_net", default=defaults.lpips_net, choices=["alex", "vgg"], help="LPIPS backbone")
    parser.add_argument("--lpips_weights", help="the backbone's torchvision weights file (default: per backbone)")
    parser.add_argument("--inception_weights", default=defaults.inception_weights,
                        help="clean-fid's TorchScript Inception (inception-2015-12-05.pt)")
    parser.add_argument("--fid_reference", help="folder of reference photos FID/KID compare the results with")
    parser.add_argument("--bootstrap_resamples", type=int, default=bootstrap.RESAMPLES,
                        help="resamples of each interval (FID/KID: --bootstrap_set_resamples)")
    parser.add_argument("--bootstrap_set_resamples", type=int, default=bootstrap.SET_LEVEL_RESAMPLES)
    parser.add_argument("--bootstrap_seed", type=int, default=bootstrap.SEED)
    parser.add_argument("--benchmark", choices=["pie"], help="run a benchmark instead of a results folder")
    parser.add_argument("--data", help="PIE-Bench's data folder (mapping_file.json, annotation_images/)")
    parser.add_argument("--mode", help="control mode --model translates PIE-Bench in (default: its only one)")
    parser.add_argument("--steps", type=int, help="sampling steps for --model (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first PIE-Bench image (+1 per image)")
    parser.add_argument("--resolution", type=int, default=512, help="size PIE-Bench images are translated at")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="two metrics.json files (or folders holding one): paired differences B - A")
    parser.add_argument("--out", help="metrics.json to write (default: RESULTS/metrics.json)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch")
    cli.add_device_flag(parser)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="dtype of --model's weights")
    parser.add_argument("--base", default=SD_CHECKPOINT, help="SD 2.1-base checkpoint a delta --model applies over")
    return parser


def check_out(out: str, inputs: dict[str, str | None]) -> None:
    """Raise a UsageError, before any work, when `out` (the metrics.json to write) is a folder, one of `inputs` or
    in a folder that cannot be written."""
    if os.path.isdir(out):
        raise cli.UsageError(f"--out {out} is a folder; name the metrics.json to write")
    try:
        check_not_input(out, "--out", inputs)
        check_writable(os.path.dirname(os.path.abspath(out)), "--out")
    except ValueError as error:
        raise cli.UsageError(str(error)) from None


def compare(args: argparse.Namespace) -> None:
    """Print (and write beside RUN_B) the paired differences of two runs' metrics."""
    from fcdiffusion.evaluation.compare import compare_runs, metrics_file

    runs = {name: metrics_file(run) for name, run in zip(("RUN_A", "RUN_B"), args.compare)}
    check_out(args.out or os.fspath(runs["RUN_B"].with_name("compare.json")), runs)
    print(compare_runs(*args.compare, args.out, args.bootstrap_resamples, args.bootstrap_set_resamples,
                       args.bootstrap_seed))


def pie_bench(args: argparse.Namespace) -> None:
    """Translate PIE-Bench with --model (or read --results) and report its seven metrics."""
    from fcdiffusion.evaluation import pie_bench

    if args.data is None or (args.model is None and args.results is None):
        raise cli.UsageError("--benchmark pie needs --data and either --model or --results")
    if args.model is None and not os.path.isdir(args.results):
        raise cli.UsageError(f"--results folder not found: {args.results}")
    check_out(args.out or os.path.join(args.results or "outputs/pie_bench", "metrics.json"), {})
    settings = pie_bench.PieSettings(args.data, args.results or "outputs/pie_bench", args.out,
                                     args.clip_arch or CLIP_L14, args.clip_weights or CLIP_L14_WEIGHTS,
                                     args.clip_arch_config, args.dino_weights, args.lpips_weights,
                                     args.bootstrap_resamples, args.bootstrap_seed, args.device)
    translation = {"model": args.model, "mode": args.mode, "steps": args.steps, "seed": args.seed,
                   "resolution": args.resolution, "precision": args.precision, "batch_size": args.batch_size}
    table, problems = pie_bench.run(settings, _model(args), translation)
    for message in problems:
        print(message, file=sys.stderr)
    print(table + f"wrote {settings.out or os.path.join(settings.results, 'metrics.json')}")


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Check the folders, load the model and every metric's network, then evaluate the results and write them."""
    args.device = str(resolve_device(args.device))
    if args.compare:
        return compare(args)
    if args.benchmark == "pie":
        return pie_bench(args)
    if args.results is None or args.input_dir is None:
        raise cli.UsageError("--results and --input_dir are needed (or --benchmark, --compare)")
    for flag in ("results", "input_dir", "reference", "fid_reference"):
        if getattr(args, flag) is not None and not os.path.isdir(getattr(args, flag)):
            raise cli.UsageError(f"--{flag} folder not found: {getattr(args, flag)}")
    if args.batch_size < 1:
        raise cli.UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.prompt is not None:
        args.prompt = cli.checked_flag("prompt", check_prompt, args.prompt)
    try:
        check_metric_inputs(args.metrics, args.model is not None, args.fid_reference is not None,
                            args.reference is not None)
    except ValueError as error:
        raise cli.UsageError(str(error)) from None
    out = args.out or os.path.join(args.results, "metrics.json")
    check_out(out, {})
    settings = Settings(model=_model(args), clip_arch=args.clip_arch or CLIP_B32,
                        clip_weights=args.clip_weights or CLIP_B32_WEIGHTS,
                        clip_arch_config=args.clip_arch_config, dino_weights=args.dino_weights,
                        lpips_net=args.lpips_net, lpips_weights=args.lpips_weights,
                        inception_weights=args.inception_weights, fid_reference=args.fid_reference,
                        resamples=args.bootstrap_resamples, set_level_resamples=args.bootstrap_set_resamples,
                        seed=args.bootstrap_seed, device=args.device)
    evaluator = Evaluator(args.metrics, settings)
    evaluator.prepare()
    _, problems = evaluate_folder(evaluator, args.results, args.input_dir, args.prompt, args.reference,
                                         out, args.batch_size)
    for message in problems:
        print(message, file=sys.stderr)
    print(Path(out).with_suffix(".md").read_text())
    print(f"wrote {out}" + (f"; skipped {len(problems)}" if problems else ""))


def _model(args: argparse.Namespace) -> torch.nn.Module | None:
    return prepare_for_inference(load_model(args.model, args.base), args.device, args.precision) if args.model else None


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
