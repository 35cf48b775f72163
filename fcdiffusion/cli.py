"""The command-line skeleton every top-level script shares: its parser, the run flags of the training scripts, the
`--device` flag, `key.sub=value` config overrides, logging, and the mapping of errors to exit statuses.

A script is thin: it builds its parser, writes `run(args, overrides)` out of library calls (which raise, never
print errors or return statuses) and ends with

    def main(argv: Sequence[str] | None = None) -> int:
        return cli.main(build_parser(), run, argv, unknown="overrides")

    if __name__ == "__main__":
        sys.exit(main())

Exit statuses: 0 when `run` returns (or the status it returns: e.g. 1 when nothing could be done); 1 for a known
error (`KNOWN_ERRORS`, and a write that failed on a full disk or a read-only file system), printed as one
`error: <message>`; a `RunError`'s own status and label (an interrupted training run: `interrupted: ...`, 128 + the
signal); 2 for argparse's own usage errors (an unknown flag, a bad value, a missing argument). Any other exception
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from omegaconf import DictConfig

from fcdiffusion.core.errors import RunError
from ldm.checkpoint import CheckpointMismatchError


class UsageError(ValueError):
    """A command line that cannot work, found before any model is built or file written."""


# What a script reports as `error: <message>` with exit status 1 instead of a traceback (with `RunError`).
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                 PermissionError, CheckpointMismatchError)

# Write failures no code can prevent (a disk filled by someone else, a file system remounted read-only): where no
# command turned them into its own message, still one `error:` line (status 1) naming the file, not a traceback.
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

def str2bool(value: str) -> bool:
    """A boolean flag's value: true/false, yes/no, 1/0 (y/n)."""
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


# A flag table: `--name` -> (type, help); a flag left out is None, which means "keep the config's value".
Flags = Mapping[str, tuple[Callable[[str], Any], str]]

# Flags of the training scripts (fcdiffusion_train.py, fcdiffusion_distill.py, train_sd.py): each overrides the
# config's `train:` entry of the same name.
RUN_FLAGS: Flags = {
    "data": (str, "training data: the index written by training_data_prepare.py, or WebDataset tar shards such as "
                  "'shards/{00000..00123}.tar' (img2dataset's layout)"),
    "val_data": (str, "validation index (training_data_prepare.py --val_fraction); empty: no validation"),
    "val_every": (int, "validate every N optimizer steps"),
    "val_batches": (int, "validation batches per device at each validation (0: the whole index)"),
    "keep_best": (int, "keep the K checkpoints with the lowest val/loss (best-*.ckpt)"),
    "ema_decay": (float, "keep an EMA of the trained weights with this decay, e.g. 0.999 (0: off)"),
    "lr_schedule": (str, "learning rate after the warm-up: constant, or cosine (to 0 at max_steps)"),
    "warmup_steps": (int, "linear learning-rate warm-up over the first N optimizer steps (0: none)"),
    "gradient_clip_val": (float, "clip the gradient norm to this value (0: no clipping)"),
    "accumulate_grad_batches": (int, "batches per optimizer step (effective batch: batch_size x devices x N)"),
    "max_steps": (int, "total optimizer steps (a resumed run continues up to this)"),
    "batch_size": (int, "images per device per step"),
    "learning_rate": (float, "AdamW learning rate"),
    "resolution": (int, "training image size in pixels"),
    "num_workers": (int, "data loader processes"),
    "checkpoint_every": (int, "save a checkpoint every N steps"),
    "log_images_every": (int, "save an image grid every N steps (0: never)"),
    "precision": (str, "fp32, bf16 or fp16 (Lightning's 32-true, bf16-mixed, 16-mixed): bf16 and fp16 train in "
                       "mixed precision, float32 weights with the passes autocast to that dtype"),
    "gradient_checkpointing": (str2bool, "true: recompute the trained networks' block activations in the backward "
                                         "pass instead of keeping them (less memory, about a third more compute); "
                                         "false: keep them (default: the model config's use_checkpoint)"),
    "encoder_dtype": (str, "fp32 or bf16: dtype of the frozen VAE and text encoder on the training device (they run "
                           "only without gradients; checkpoints keep their exact float32 values)"),
    "optimizer": (str, "adamw (fused on CUDA) or adamw8bit (bitsandbytes' 8-bit AdamW: a quarter of the state bytes)"),
    "accelerator": (str, "Lightning accelerator: auto, cpu, gpu, ..."),
    "devices": (str, "Lightning devices: auto, 1, 8, '0,1', ..."),
    "strategy": (str, "Lightning strategy: auto, ddp, deepspeed_stage_2, ..."),
    "num_nodes": (int, "number of nodes"),
    "logdir": (str, "root folder of logs and checkpoints"),
    "seed": (int, "random seed"),
}


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser that shows the script's docstring (examples included) as its `--help` text."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_flags(arguments: argparse.ArgumentParser, flags: Flags) -> None:
    """Add `--name` for each entry of `flags`, defaulting to None (the config's value)."""
    for name, (kind, help_text) in flags.items():
        arguments.add_argument(f"--{name}", type=kind, help=help_text)


def apply_flags(section: DictConfig, args: argparse.Namespace, flags: Flags) -> None:
    """Copy every flag of `flags` that was given into the config `section`."""
    for name in flags:
        if getattr(args, name) is not None:
            section[name] = getattr(args, name)


def add_device_flag(arguments: argparse.ArgumentParser) -> None:
    """`--device` (default auto), for `fcdiffusion.core.devices.resolve_device`."""
    arguments.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda:1, ...")


def main(arguments: argparse.ArgumentParser, run: Callable[[argparse.Namespace, list[str]], int | None],
         argv: Sequence[str] | None = None, unknown: Literal["error", "overrides", "forward"] = "error") -> int:
    """Parse `argv`, set up logging and call `run(args, rest)`; its return value is the exit status (None: 0).

    `unknown` says what becomes of arguments the parser does not know: "error", an argparse error (status 2);
    "overrides", config overrides (`rest`), each of which must be `key.sub=value` (else an argparse error);
    "forward", `rest` as they are (for a script that passes them to another). Errors map to statuses as the
    module docstring says.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if unknown == "error":
        args, rest = arguments.parse_args(argv), []
    else:
        args, rest = arguments.parse_known_args(argv)
    if unknown == "overrides":
        bad = [a for a in rest if "=" not in a or a.startswith("-")]
        if bad:
            arguments.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are key.sub=value)")
    try:
        status = run(args, rest)
    except RunError as error:
        print(f"{error.label}: {error}", file=sys.stderr)
        return error.status
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in FULL_OR_READ_ONLY:
            raise
        print(f"error: could not write {error.filename2 or error.filename or 'a file'}: {error.strerror}; make "
              "room there (or write elsewhere) and run again", file=sys.stderr)
        return 1
    return 0 if status is None else int(status)


def checked_flag(flag: str, check: Callable[[Any], Any], value: Any) -> Any:
    """`check(value)` for the flag `--flag`, its ValueError turned into a UsageError that names the flag."""
    try:
        return check(value)
    except ValueError as error:
        raise UsageError(f"--{flag}: {error}") from None
