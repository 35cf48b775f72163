"""Where files live: the downloaded weights (and the message that tells a user how to get them), the checkpoints
the training scripts write under a log folder, and the checks that an output can be written before the work that
makes it (`check_writable`) and is not one of the command's inputs (`check_not_input`)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

DISTILL_CHECKPOINT_DIR = "fcdiffusion_distill_checkpoint"
STUDENT_FILE = "student.safetensors"
LAST_CHECKPOINT = "last.ckpt"


def teacher_checkpoint_dir(logdir: str | os.PathLike, mode: str) -> Path:
    """Where `fcdiffusion_train.py` writes the checkpoints of the `mode` teacher."""
    return Path(logdir) / f"fcdiffusion_{mode}_checkpoint"


def teacher_checkpoint(logdir: str | os.PathLike, mode: str) -> Path:
    """The `mode` teacher's latest checkpoint (what distillation and inference use)."""
    return teacher_checkpoint_dir(logdir, mode) / LAST_CHECKPOINT


def distill_checkpoint_dir(logdir: str | os.PathLike) -> Path:
    """Where `fcdiffusion_distill.py` writes its checkpoints and the student file."""
    return Path(logdir) / DISTILL_CHECKPOINT_DIR


def student_file(logdir: str | os.PathLike) -> Path:
    """The distilled student's self-describing weights file."""
    return distill_checkpoint_dir(logdir) / STUDENT_FILE

SD_CHECKPOINT = "models/v2-1_512-ema-pruned.ckpt"
OPENCLIP_CHECKPOINT = "CLIP-ViT-H-14/open_clip_pytorch_model.bin"
INIT_CHECKPOINT = "models/fcdiffusion_init.ckpt"

DOWNLOAD_HELP = f"""\
The real weights are not part of this repository. Download them and place them as follows:
  - Stable Diffusion 2.1-base: v2-1_512-ema-pruned.ckpt from huggingface.co/stabilityai/stable-diffusion-2-1-base
      -> {SD_CHECKPOINT}
  - OpenCLIP ViT-H-14: open_clip_pytorch_model.bin from huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K
      -> {OPENCLIP_CHECKPOINT}
  - then build the initial FCDiffusion checkpoint:
      python tool_add_control_sd21.py {SD_CHECKPOINT} {INIT_CHECKPOINT}
To try the whole pipeline without any download, use the tiny configs instead: `make quickstart`, or
  python fcdiffusion_train.py --config configs/model_config_tiny.yaml (after the quickstart has built its files)."""


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` made absolute, or its nearest parent that exists (where a new output would be created)."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def check_writable(folder: str | os.PathLike, flag: str, need_bytes: int = 0) -> None:
    """Raise a ValueError naming `flag` when outputs could not be written in `folder` (which need not exist yet):
    a file in the way, no permission, a read-only file system (a probe file is created and removed in the nearest
    existing folder, so nothing is left behind), or less free space than `need_bytes`."""
    existing = nearest_existing(folder)
    where = f"cannot write outputs to {flag} {folder}"
    if not existing.is_dir():
        raise ValueError(f"{where}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: {existing} is not writable")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".write-check-")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"{where}: {error.strerror or error} ({existing})") from None
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ValueError(f"{where}: {free / 2**20:,.1f} MiB free on its disk, the outputs need about "
                         f"{need_bytes / 2**20:,.1f} MiB; free some space or pick another folder")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (or folder): the same inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_not_input(output: str | os.PathLike, flag: str, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Raise a ValueError when the output `flag` names the same file or folder as one of `inputs` (flag -> path,
    None: not given), by whatever path: no command writes over what it reads."""
    for name, path in inputs.items():
        if path is not None and same_file(output, path):
            raise ValueError(f"{flag} {output} is also {name}: the output would replace what the command reads; "
                             "write it elsewhere")
