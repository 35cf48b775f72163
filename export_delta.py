"""Write the small delta file of a student or teacher: only what it adds to the SD 2.1-base checkpoint.

    python export_delta.py lightning_logs/fcdiffusion_distill_checkpoint/student.safetensors student_delta.safetensors
    python export_delta.py lightning_logs/fcdiffusion_low_pass_checkpoint/last.ckpt low_pass_delta.safetensors \
        --base models/v2-1_512-ema-pruned.ckpt

The delta of a student holds its control net, mode embedding, LoRA adapters and any other tensor it trained; a
teacher's holds its control net. Its metadata describes the model as the full file's does, and names the base
checkpoint with its SHA-256. Load it with the base (`--base` of test_distillation.py and evaluate.py, or
`load_model(delta, base=...)`); another base file is refused. The full weights file stays as it was.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fcdiffusion.core.paths import SD_CHECKPOINT
from fcdiffusion.core.weights import export_delta, read_model
from ldm.checkpoint import CheckpointMismatchError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="full student or teacher weights file (self-describing)")
    parser.add_argument("out", help="the delta file to write (.safetensors)")
    parser.add_argument("--base", default=SD_CHECKPOINT, help="the SD 2.1-base checkpoint the model was trained from")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: the delta file must be a .safetensors file, got {args.out}", file=sys.stderr)
        return 2
    try:
        model, metadata = read_model(args.model)
        sizes = export_delta(model, args.out, args.base, metadata)
    except (FileNotFoundError, CheckpointMismatchError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {os.path.getsize(args.out):,} bytes ({sizes['delta_bytes']:,} bytes of tensors, "
          f"{100 * sizes['delta_bytes'] / sizes['full_bytes']:.1f}% of the full model's {sizes['full_bytes']:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
