"""The interactive FCDiffusion demo: upload or pick a photo, type a prompt, see the control modes side by side.

    python app.py                                  # the quickstart's tiny student (run `make quickstart` first)
    python app.py --teacher_dir                    # the quickstart's tiny teachers instead
    python app.py --student run/fcdiffusion_distill_checkpoint/student.safetensors --teacher_dir run   # both
    python app.py --port 8000 --host 0.0.0.0       # reachable from other machines
    python app.py --tiny_vae models/taesd          # encode and decode with TAESD (or --tiny_vae_use decode)

Open the printed URL. With both a student and teachers the page has a model picker. The weights are loaded once,
at start-up; missing files are reported with what to run or pass instead, and the command exits with status 1.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fcdiffusion import cli
from fcdiffusion.apps.demo_app import DEFAULT_LOGDIR, MAX_PIXELS, build_app, launch, load_demo, weight_files
from fcdiffusion.core.devices import resolve_device
from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.tiny_vae import TINY_VAE_HELP, TINY_VAE_USE_HELP, TINY_VAE_USES, load_tiny_vae


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(__doc__)
    parser.add_argument("--student", help="distilled student: student.safetensors or a distiller checkpoint "
                        f"(default, when no teacher is named: the quickstart's, under {DEFAULT_LOGDIR})")
    parser.add_argument("--teacher_dir", nargs="?", const=str(DEFAULT_LOGDIR), metavar="LOGDIR",
                        help="serve the teachers fcdiffusion_train.py wrote under LOGDIR "
                        f"(fcdiffusion_<mode>_checkpoint/last.ckpt; without LOGDIR: {DEFAULT_LOGDIR})")
    for mode in CONTROL_MODES:
        parser.add_argument(f"--teacher_{mode}", metavar="FILE", help=f"the {mode} teacher's checkpoint")
    parser.add_argument("--resolution", type=int,
                        help="square size photos are resized and cropped to (default: the model's own, 128 px for "
                        "the tiny models, 512 for SD 2.1)")
    parser.add_argument("--max_pixels", type=int, default=MAX_PIXELS,
                        help="larger photos are refused with a message (default: %(default)s)")
    parser.add_argument("--tiny_vae", metavar="PATH", help=TINY_VAE_HELP + "; the timing line says so")
    parser.add_argument("--tiny_vae_use", choices=TINY_VAE_USES, default="both", help=TINY_VAE_USE_HELP)
    cli.add_device_flag(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also create a temporary public link (gradio.live)")
    return parser


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    """Load the weights once, then serve the page until stopped."""
    student, teachers = weight_files(args.student, args.teacher_dir,
                                     {m: getattr(args, f"teacher_{m}") for m in CONTROL_MODES})
    device = resolve_device(args.device)
    tiny_vae = load_tiny_vae(args.tiny_vae, args.tiny_vae_use, device) if args.tiny_vae else None
    demo = load_demo(student, teachers, device, args.resolution, args.max_pixels, tiny_vae)
    launch(build_app(demo), args.host, args.port, args.share)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
