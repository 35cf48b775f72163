"""A tiny real-photo training set from the images that ship inside scikit-image (no download).

``export_demo_dataset(root)`` writes ``root/00000/<name>.png`` + ``<name>.txt`` with a hand-written
caption, the layout ``training_data_prepare.py`` indexes; smoke-test training and sampling with it:

    python -c "from fcdiffusion.train.demo_data import export_demo_dataset; export_demo_dataset('datasets/demo')"
    python training_data_prepare.py --data_root datasets/demo --output datasets/demo.json

Grayscale photos are replicated to three channels. Files whose content is already right are not
rewritten, so re-running is cheap and leaves modification times alone.
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from tqdm import tqdm

from ldm.util import atomic_path

CAPTIONS = {
    "astronaut": "a portrait photo of a smiling astronaut in an orange spacesuit holding a helmet, "
    "with the american flag and a space shuttle model behind her",
    "chelsea": "a close-up photo of a tabby cat with green eyes looking at the camera",
    "coffee": "a cup of espresso on a red saucer with a spoon, on a wooden table",
    "rocket": "a white rocket on its launch pad at dusk between tall lightning towers under a deep blue sky",
    "motorcycle_left": "a red motorcycle parked in a garage in front of shelves stacked with cardboard boxes",
    "hubble_deep_field": "a deep space telescope photo of countless colorful galaxies on a black sky",
    "immunohistochemistry": "a microscope photo of tissue stained brown and blue, with rows of cells lining glands",
    "retina": "a fundus photo of a human retina, orange-red with branching blood vessels and a bright optic disc",
    "camera": "a black and white photo of a man in a dark coat looking through a camera on a tripod on a lawn",
    "coins": "a black and white photo of rows of ancient coins on a dark background",
    "moon": "a black and white close-up photo of the cratered surface of the moon",
    "grass": "a black and white close-up photo of a grass lawn",
    "gravel": "a black and white close-up photo of small gravel stones",
    "brick": "a black and white photo of a wall of long narrow bricks",
}


# The quickstart's held-out photos: four of the classic test pictures (a portrait, an animal, an object, a grey
# scene), never trained on; every picture and figure of its report comes from them.
HELDOUT = ("astronaut", "chelsea", "coffee", "camera")


def load_photo(name: str) -> np.ndarray:
    """The scikit-image photo `name` as uint8 (H, W, 3) RGB."""
    if name not in CAPTIONS:
        raise ValueError(f"unknown demo photo {name!r}; available: {', '.join(CAPTIONS)}")
    image = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write `data` unless `path` already holds exactly it; return whether it wrote."""
    if path.is_file() and path.read_bytes() == data:
        return False
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return True


def export_demo_dataset(root: str | os.PathLike, names: Sequence[str] | None = None, folder: str = "00000",
                        max_side: int | None = None) -> int:
    """Write the photos `names` (default: all of CAPTIONS) under ``root/folder`` (`folder` "" for `root` itself),
    shrunk to at most `max_side` pixels on their longer side if given; return the number of files (re)written.

    Shrinking matters for training on a CPU: decoding the 1411 px retina each time costs more than a tiny model's
    step on it."""
    names = list(CAPTIONS) if names is None else list(names)
    unknown = [n for n in names if n not in CAPTIONS]
    if unknown:
        raise ValueError(f"unknown demo photo(s) {unknown}; available: {', '.join(CAPTIONS)}")
    target = Path(root, folder)
    written = 0
    for name in tqdm(names, desc="demo photos", unit="img"):
        png, image = io.BytesIO(), Image.fromarray(load_photo(name))
        if max_side is not None and max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        image.save(png, format="PNG")
        written += _write_if_changed(target / f"{name}.png", png.getvalue())
        written += _write_if_changed(target / f"{name}.txt", (CAPTIONS[name] + "\n").encode("utf-8"))
    return written

