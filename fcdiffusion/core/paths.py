"""Where files live: the downloaded weights (and the message that tells a user how to get them), and the
checkpoints the training scripts write under a log folder."""
from __future__ import annotations

import os
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
