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
  clip_score         100 * max(cos(image, prompt), 0), OpenCLIP --clip_arch with --clip_weights
  dino_structure     Tumanyan et al.'s DINO ViT-B/8 self-similarity distance to the source, --dino_weights
  lpips              LPIPS to the source (and to --reference), --lpips_net with --lpips_weights
  fid                FID and KID per mode against --reference, Inception --inception_weights (KID is the one that
                     means something on small sets)
--precision bf16 runs --model's VAE in bf16 (fp16 keeps it float32: SD's VAE overflows fp16); a delta weights
file loads over --base. Every weight file is local: a missing one is an error saying where to get it. Writes
--out (metrics.json: per_image, per_mode, settings) with a Markdown table and a plot beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fcdiffusion import cli
from fcdiffusion.core.devices import resolve_device
from fcdiffusion.core.paths import SD_CHECKPOINT
from fcdiffusion.core.precision import PRECISIONS, prepare_for_inference
from fcdiffusion.core.weights import load_model
from fcdiffusion.evaluation.suite import METRICS, Evaluator, Settings, evaluate_folder, markdown_table


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--results", required=True, help="folder of <name>_<mode>.png results")
    parser.add_argument("--input_dir", required=True, help="the source folder the results were translated from")
    parser.add_argument("--prompt", help="the one prompt all images were translated with (instead of .txt files)")
    parser.add_argument("--reference", help="another results folder (e.g. a teacher's) for agreement, LPIPS, FID/KID")
    parser.add_argument("--model", help="student or teacher weights file: its VAE and band edges (band, agreement)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), help="metrics to compute")
    defaults = Settings()
    parser.add_argument("--clip_arch", default=defaults.clip_arch, help="open_clip architecture")
    parser.add_argument("--clip_weights", default=defaults.clip_weights, help="its local open_clip weights file")
    parser.add_argument("--clip_arch_config", help="JSON config of an architecture open_clip does not ship")
    parser.add_argument("--dino_weights", default=defaults.dino_weights, help="DINO ViT-B/8 folder (transformers)")
    parser.add_argument("--lpips_net", default=defaults.lpips_net, choices=["alex", "vgg"], help="LPIPS backbone")
    parser.add_argument("--lpips_weights", help="the backbone's torchvision weights file (default: per backbone)")
    parser.add_argument("--inception_weights", default=defaults.inception_weights, help="FID Inception weights")
    parser.add_argument("--fid_dims", type=int, default=defaults.fid_dims, choices=[64, 192, 768, 2048],
                        help="Inception feature layer for FID/KID (2048: the one papers report)")
    parser.add_argument("--kid_subset_size", type=int, default=defaults.kid_subset_size)
    parser.add_argument("--out", help="metrics.json to write (default: RESULTS/metrics.json)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per batch")
    cli.add_device_flag(parser)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="dtype of --model's weights")
    parser.add_argument("--base", default=SD_CHECKPOINT, help="SD 2.1-base checkpoint a delta --model applies over")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Check the folders, load the model and every metric's network, then evaluate the results and write them."""
    for flag in ("results", "input_dir", "reference"):
        if getattr(args, flag) is not None and not os.path.isdir(getattr(args, flag)):
            raise cli.UsageError(f"--{flag} folder not found: {getattr(args, flag)}")
    if args.batch_size < 1:
        raise cli.UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    device = str(resolve_device(args.device))
    model = prepare_for_inference(load_model(args.model, args.base), device, args.precision) if args.model else None
    settings = Settings(model=model, clip_arch=args.clip_arch, clip_weights=args.clip_weights,
                        clip_arch_config=args.clip_arch_config, dino_weights=args.dino_weights,
                        lpips_net=args.lpips_net, lpips_weights=args.lpips_weights,
                        inception_weights=args.inception_weights, fid_dims=args.fid_dims,
                        kid_subset_size=args.kid_subset_size, device=device)
    evaluator = Evaluator(args.metrics, settings)
    evaluator.prepare()
    out = args.out or os.path.join(args.results, "metrics.json")
    per_mode, problems = evaluate_folder(evaluator, args.results, args.input_dir, args.prompt, args.reference,
                                         out, args.batch_size)
    for message in problems:
        print(message, file=sys.stderr)
    print(markdown_table(per_mode))
    print(f"wrote {out}" + (f"; skipped {len(problems)}" if problems else ""))


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
