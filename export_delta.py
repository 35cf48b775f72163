"""Write the small delta file of a student or teacher: only what it adds to the SD 2.1-base checkpoint.

    python export_delta.py lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors student_delta.safetensors
    python export_delta.py lightning_logs/fcdiffusion_low_pass_checkpoint/last.ckpt low_pass_delta.safetensors \
        --base models/v2-1_512-ema-pruned.ckpt

The delta of a student holds its control net, mode embedding, LoRA adapters and any other tensor it trained; a
teacher's holds its control net. Its metadata describes the model as the full file's does, and names the base
checkpoint with its SHA-256. Load it with the base (`--base` of test_distillation.py and evaluate.py, or
`load_model(delta, base=...)`); another base file is refused. The full weights file stays as it was: an OUT that
names it (or --base), by any path, is refused before anything is read.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fcdiffusion import cli
from fcdiffusion.core.paths import SD_CHECKPOINT, check_not_input, check_writable
from fcdiffusion.core.weights import export_delta, read_model


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("model", help="full student or teacher weights file (self-describing)")
    parser.add_argument("out", help="the delta file to write (.safetensors)")
    parser.add_argument("--base", default=SD_CHECKPOINT, help="the SD 2.1-base checkpoint the model was trained from")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Read the full model, write its delta over --base and say how small it is."""
    if not args.out.endswith(".safetensors"):
        raise cli.UsageError(f"the delta file must be a .safetensors file, got {args.out}")
    check_not_input(args.out, "the delta file", {"the full weights file": args.model, "--base": args.base})
    check_writable(os.path.dirname(os.path.abspath(args.out)), "the delta file's folder")
    model, metadata = read_model(args.model)
    sizes = export_delta(model, args.out, args.base, metadata)
    print(f"wrote {args.out}: {os.path.getsize(args.out):,} bytes ({sizes['delta_bytes']:,} bytes of tensors, "
          f"{100 * sizes['delta_bytes'] / sizes['full_bytes']:.1f}% of the full model's {sizes['full_bytes']:,})")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
