"""Image-caption training data in the SD layout: ``{"jpg": HxWx3 float32 in [-1, 1], "txt": prompt}``.

The index is the JSON-lines file written by ``training_data_prepare.py``; a relative ``img_path`` is
resolved against the directory of that file (the convention the script writes), not the working
directory.

A sample that fails to load (missing, truncated or corrupt file) is logged, counted and replaced by the
next index, so one bad file in a large crawl never stops training; the shard stream (`fcdiffusion.train.shards`) skips
and counts bad members the same way (`SkipsUnreadable`). Counts live on the dataset object:
each DataLoader worker process holds its own copy, so with ``num_workers > 0`` the counters of the
dataset in the main process stay at zero and each worker's copy counts what that worker saw (they
persist across epochs only with ``persistent_workers=True``); the warnings in the log are the
complete record.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)
# Image sizes must be multiples of this: 8x VAE downsampling times the UNet's 8x (SD 2.1-base and the tiny config).
LATENT_GRID = 64


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, high-bit-depth greyscale scaled rather than clipped.

    PIL's own conversion clips the 32-bit integer and float modes (16-bit PNGs and TIFFs open as ``I;16`` or
    ``I``) to 0..255, so nearly every pixel of a 16-bit photo turns white. Integers are taken on the 16-bit scale
    (0..65535, where a 32-bit integer image from a file almost always is) and floats on 0..1; values outside are
    clipped. Other modes (RGBA, P, LA, CMYK, ...) use PIL's conversion.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        white = 1.0 if image.mode == "F" else 65535.0
        values = np.nan_to_num(np.asarray(image, dtype=np.float64)) * (255.0 / white)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return image.convert("RGB")


@dataclass(frozen=True)
class Augment:
    """Random square crops and horizontal flips, for training on few images (the quickstart's photos).

    A crop's side is a uniform fraction in `crop_scale` of the image's shorter side, at a uniform position; it is
    then resized to the training resolution. Draws come from torch's global generator, which Lightning seeds per
    run and per data-loader worker (`seed_everything(..., workers=True)`).
    """

    crop_scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {list(self.crop_scale)}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Augment | None:
        """An `Augment` from a `train.augment` entry ({crop_scale: [low, high], hflip: bool}), or None."""
        if not config:
            return None
        unknown = set(config) - {"crop_scale", "hflip"}
        if unknown:
            raise ValueError(f"unknown augment entries {sorted(unknown)}; valid: crop_scale, hflip")
        scale: Sequence[float] = config.get("crop_scale", (1.0, 1.0))
        return cls(crop_scale=(float(scale[0]), float(scale[1])), hflip=bool(config.get("hflip", False)))

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        low, high = self.crop_scale
        side = max(1, round(min(width, height) * (low + (high - low) * torch.rand(()).item())))
        left = int(torch.randint(0, width - side + 1, ()).item())
        top = int(torch.randint(0, height - side + 1, ()).item())
        image = image.crop((left, top, left + side, top + side))
        if self.hflip and torch.rand(()).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def prepare_image(image: Image.Image, resolution: int, augment: Augment | None = None) -> np.ndarray:
    """RGB image (`to_rgb`) resized (Lanczos) so its shorter side is `resolution`, centre-cropped to a square;
    with `augment`, a random crop (and flip) of it resized to `resolution` instead.

    Returns float32 (resolution, resolution, 3) in [-1, 1].
    """
    image = to_rgb(image)
    if augment is not None:
        image = augment(image).resize((resolution, resolution), Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def decode_image(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """The picture in the file at `path` (or an open binary file) as RGB (`to_rgb`), its EXIF orientation applied."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def load_image(path: str | os.PathLike | BinaryIO, resolution: int, augment: Augment | None = None) -> np.ndarray:
    """`prepare_image` of the file at `path` (or an open binary file), after applying its EXIF orientation."""
    return prepare_image(decode_image(path), resolution, augment)


def read_index(json_path: str | os.PathLike) -> list[dict[str, str]]:
    """Records of a JSON-lines index, each img_path resolved against the index file's directory."""
    base = Path(json_path).parent
    records = []
    with open(json_path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records.append({"img_path": str(base / record["img_path"]), "prompt": str(record["prompt"])})
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{json_path}:{number}: not an img_path/prompt record: {error}") from error
    return records


class SkipsUnreadable:
    """Counts and logs the samples a dataset could not read: `failures` per name, `skipped` their total."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()

    @property
    def skipped(self) -> int:
        """Number of failed image loads (each replaced by another sample) in this process."""
        return sum(self.failures.values())

    def skip(self, name: str, error: BaseException) -> None:
        """Record one failed load of `name` and say why in the log."""
        self.failures[name] += 1
        logger.warning("skipping unreadable image %s (%s: %s)", name, type(error).__name__, error)


class FCDiffusionDataset(SkipsUnreadable, Dataset):
    """Training pairs from a ``training_data.json`` index, robust to unreadable images.

    Items are ``{"jpg": float32 (resolution, resolution, 3) in [-1, 1], "txt": prompt, "path": file}``;
    "path" names the image actually returned (a replacement after a failure). After `max_retries`
    consecutive failures from one index a RuntimeError says the data is broken rather than looping.
    `failures` counts failed loads per path and `skipped` is their total (per process, see module doc).
    `augment` (random crops and flips) is for small datasets; SD and FCDiffusion train on centre crops.
    `cache_images` is for small datasets too: each image is decoded once and kept (the prepared array without
    `augment`, the decoded picture with it), which saves the decoding at every step and changes no pixel; each
    data-loader worker keeps its own cache.
    """

    def __init__(self, json_path: str | os.PathLike, resolution: int = 512, max_retries: int = 32,
                 augment: Augment | None = None, cache_images: bool = False) -> None:
        super().__init__()
        self.records = read_index(json_path)
        if not self.records:
            raise ValueError(f"no samples in {json_path}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.resolution, self.augment = resolution, augment
        self.max_retries = max_retries
        self.cache: dict[str, Image.Image | np.ndarray] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        idx = range(len(self.records))[idx]  # IndexError past the end, so plain iteration stops
        attempts = min(self.max_retries + 1, len(self.records))
        for offset in range(attempts):
            record = self.records[(idx + offset) % len(self.records)]
            path = record["img_path"]
            try:
                image = self.load(path)
            except Exception as error:  # any decode failure (OSError, SyntaxError, DecompressionBombError, ...)
                self.skip(path, error)
                continue
            return {"jpg": image, "txt": record["prompt"], "path": path}
        raise RuntimeError(
            f"{attempts} consecutive images failed to load starting at index {idx} "
            f"({self.records[idx]['img_path']}); check the dataset and the paths in the index, "
            "which are relative to the index file's directory"
        )

    def load(self, path: str) -> np.ndarray:
        """The training array of the image at `path` (`load_image`), from `cache` when it is kept."""
        if self.cache is None:
            return load_image(path, self.resolution, self.augment)
        if path not in self.cache:
            decoded = decode_image(path)
            self.cache[path] = decoded if self.augment is not None else prepare_image(decoded, self.resolution)
        kept = self.cache[path]
        return prepare_image(kept, self.resolution, self.augment) if self.augment is not None else kept.copy()
