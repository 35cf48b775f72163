"""Tiny-model helpers shared by the tests (the fixtures that use them live in conftest.py)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import skimage.data
import torch
from omegaconf import OmegaConf
from PIL import Image

from fcdiffusion.core.frequency import CONTROL_MODES
from fcdiffusion.core.paths import teacher_checkpoint
from fcdiffusion.core.weights import build_on_meta
from ldm.checkpoint import load_weights, save_state_dict
from ldm.util import instantiate_from_config, load_config, without_text_encoder_file

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = "configs/model_config_tiny.yaml"
TINY_DISTILL_CONFIG = ROOT / "configs" / "distill_config_tiny.yaml"
SD_DISTILL_CONFIG = ROOT / "configs" / "distill_config.yaml"
DEMO_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
TINY_CLIP_ARCH = "ViT-tiny-test"  # an open_clip architecture with both towers, small enough for tests
TINY_CLIP_CONFIG = ROOT / "configs" / "open_clip" / f"{TINY_CLIP_ARCH}.json"
PHOTOS = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "chelsea": "a cat"}  # distillation tests


def tiny_model(files: SimpleNamespace, *overrides: str, ckpt: Path | None = None):
    """The tiny FCDiffusion teacher, loaded strictly from `ckpt` (default: the init checkpoint)."""
    config = load_config(TINY_CONFIG, [*files.overrides, *overrides])
    model = instantiate_from_config(OmegaConf.to_container(config.model, resolve=True))
    load_weights(model, ckpt or files.init)
    return model


def with_params(config: dict[str, Any], **params: Any) -> dict[str, Any]:
    """A copy of a `{target, params}` config with `params` updated and no text-encoder weights file."""
    config = without_text_encoder_file(copy.deepcopy(config))
    config["params"].update(params)
    return config


def teacher_paths(logdir: Path) -> dict[str, Path]:
    return {mode: teacher_checkpoint(logdir, mode) for mode in CONTROL_MODES}


def write_random_teachers(logdir: Path, model_config: dict[str, Any]) -> None:
    """One random tiny FCDiffusion (its zero-initialised layers randomised so the networks do something), saved
    once per mode with its control net's output layers perturbed differently and the metadata a trained teacher
    records, where `fcdiffusion_train.py` would write it."""
    torch.manual_seed(0)
    base = instantiate_from_config(with_params(model_config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in base.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    state = base.state_dict()
    for i, (mode, path) in enumerate(teacher_paths(logdir).items()):
        generator = torch.Generator().manual_seed(100 + i)
        teacher = {k: v + 0.05 * torch.randn(v.shape, generator=generator)
                   if k.startswith("control_model.") and ("zero_convs" in k or "middle_block_out" in k) else v
                   for k, v in state.items()}
        metadata = build_on_meta(with_params(model_config, control_mode=mode)).weights_metadata()
        save_state_dict(teacher, path, metadata)


def write_photos(folder: Path, index: Path | None = None) -> None:
    """`PHOTOS` as quarter-size PNGs with .txt prompts in `folder`, and optionally a training index."""
    folder.mkdir(parents=True)
    lines = []
    for name, prompt in PHOTOS.items():
        Image.fromarray(np.asarray(getattr(skimage.data, name)())[::4, ::4]).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(prompt)
        lines.append(json.dumps({"img_path": f"{folder.name}/{name}.png", "prompt": prompt}))
    if index is not None:
        index.write_text("\n".join(lines) + "\n")


def distill_args(workdir: Path, logdir: Path, max_steps: int, *extra: str) -> list[str]:
    """fcdiffusion_distill.py arguments for the tiny config on the workdir's teachers and photos; the trajectory
    objective's teacher solve shortened to 4 steps (its 50 are the quickstart's, not a test's)."""
    paths = teacher_paths(workdir / "logs")
    return ["--config", str(TINY_DISTILL_CONFIG), "--data", str(workdir / "data.json"), "--logdir", str(logdir),
            "--max_steps", str(max_steps), "--checkpoint_every", "1", "--batch_size", "2",
            "--student_init", str(paths["mid_pass"]),
            *[a for m in CONTROL_MODES for a in (f"--teacher_{m}", str(paths[m]))], "--teacher_steps", "4", *extra]


def train_args(files: SimpleNamespace, logdir: Path, *extra: str) -> list[str]:
    """fcdiffusion_train.py arguments: the tiny high_pass teacher from the init checkpoint, checkpoints every 2."""
    return ["--config", TINY_CONFIG, "--control_mode", "high_pass", "--resume_path", str(files.init),
            "--data", str(files.data), "--logdir", str(logdir), "--batch_size", "2", "--checkpoint_every", "2",
            "--log_images_every", "2", *extra, *files.overrides]


def write_shards(photos: Path, folder: Path, per_shard: int = 2, corrupt_in: int | None = None) -> str:
    """The images under `photos` and their captions as WebDataset tar shards in img2dataset's layout
    (`00000.tar`, ... holding `<key>.jpg` + `<key>.txt`), `per_shard` each; with `corrupt_in`, that shard also holds
    a `.jpg` member that is not an image. Returns the brace spec of the shards."""
    import io

    import webdataset as wds

    from fcdiffusion.train.image_folder import find_images, read_caption

    images = find_images(photos)
    groups = [images[i:i + per_shard] for i in range(0, len(images), per_shard)]
    folder.mkdir(parents=True, exist_ok=True)
    for n, group in enumerate(groups):
        with wds.TarWriter(str(folder / f"{n:05d}.tar")) as sink:
            for i, image in enumerate(group):
                encoded = io.BytesIO()
                Image.open(image).convert("RGB").save(encoded, format="JPEG")
                sink.write({"__key__": f"{n:05d}{i:04d}", "jpg": encoded.getvalue(), "txt": read_caption(image)})
            if n == corrupt_in:
                sink.write({"__key__": f"{n:05d}9999", "jpg": b"not a jpeg at all", "txt": "a corrupt member"})
    return str(folder / f"{{00000..{len(groups) - 1:05d}}}.tar")
