"""Folders of images with same-named `.txt` captions: the one home of the image suffixes and caption reading.

`training_data_prepare.py` indexes such a folder (recursively, img2dataset's `files` layout, optionally holding out
a fixed fraction for validation) and `test_distillation.py` translates one (its captions are the prompts).
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from fcdiffusion.core.inference import check_prompt

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # a GIF gives its first frame
SKIP_REASONS = ("no_caption", "empty_caption", "unreadable_caption", "corrupt_image")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root` (recursively, hidden entries ignored), sorted by path.

    Symlinked folders are followed (shards often live on other disks), each real folder once: a second link
    to it, or a link cycle, adds nothing.
    """
    found, visited = [], set()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            subdirs[:] = []
            continue
        visited.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # sorted: the first name of a folder wins
        found.extend(
            Path(directory, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        )
    return sorted(found)


def read_caption(image: Path) -> str | None:
    """The caption beside `image` with whitespace runs collapsed; None when there is no caption file.

    UTF-8, with or without the byte-order mark some editors write (which would otherwise start the prompt).
    """
    caption = image.with_suffix(".txt")
    if not caption.is_file():
        return None
    return " ".join(caption.read_text(encoding="utf-8-sig").split())


def image_is_valid(path: Path) -> bool:
    """Whether PIL recognises and verifies the file (a cheap structural check, not a full decode)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        return False


def check_pair(image: Path) -> tuple[str | None, str]:
    """(skip reason or None, caption) for one image."""
    try:
        caption = read_caption(image)
    except (OSError, UnicodeDecodeError):
        return "unreadable_caption", ""
    if caption is None:
        return "no_caption", ""
    if not caption:
        return "empty_caption", ""
    if not image_is_valid(image):
        return "corrupt_image", ""
    return None, caption


def relative_to(path: Path, base: Path) -> str:
    """`path` (absolute) relative to `base` with forward slashes, or absolute when no relative path exists."""
    try:
        return Path(os.path.relpath(path, base.resolve())).as_posix()
    except ValueError:
        return path.as_posix()


def held_out(relative_path: Path, fraction: float) -> bool:
    """Whether the image at `relative_path` (from the data root) belongs to the held-out `fraction`.

    Decided by the SHA-256 of the path alone, so an image stays on its side whatever else the crawl gains or
    loses, on every machine and Python version.
    """
    digest = hashlib.sha256(relative_path.as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def collect_pairs(
    data_root: str | os.PathLike, base_dir: str | os.PathLike, workers: int = 4, val_fraction: float = 0.0
) -> tuple[list[dict[str, str]], list[dict[str, str]], Counter]:
    """Records for every usable image under `data_root` (paths relative to `base_dir`): (training records,
    held-out records, skip counts); `val_fraction` of the images (by `held_out`) go to the second list.

    The root and `base_dir` are resolved; links inside the root are kept, so an image in a linked shard is
    recorded through the link and the folder and its index still move together.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {val_fraction}")
    root = Path(data_root)
    real_root = root.resolve()
    images = find_images(root)
    records, held, skipped = [], [], Counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checks = pool.map(check_pair, images)
        for image, (reason, caption) in tqdm(zip(images, checks), total=len(images), desc="checking", unit="img"):
            if reason:
                skipped[reason] += 1
            else:
                inside = image.relative_to(root)
                record = {"img_path": relative_to(real_root / inside, Path(base_dir)), "prompt": caption}
                (held if held_out(inside, val_fraction) else records).append(record)
    return records, held, skipped


def prompted_images(input_dir: str | os.PathLike, prompt: str | None = None
                    ) -> tuple[list[tuple[Path, str]], list[str]]:
    """(image, prompt) pairs of the images directly in `input_dir` (sorted), and a message per file skipped.

    The prompt is `prompt` when given (an empty one is a ValueError: `check_prompt`'s rule), else the image's
    caption; an image without a usable caption is skipped. Every other file is reported as skipped too, except
    `.txt` captions, hidden files and subfolders.
    """
    if prompt is not None:
        prompt = check_prompt(prompt)
    pairs, problems = [], []
    for path in sorted(Path(input_dir).iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() == ".txt":
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"skipping {path}: not a supported image type ({' '.join(IMAGE_SUFFIXES)})")
            continue
        if prompt is not None:
            pairs.append((path, prompt))
            continue
        try:
            caption = read_caption(path)
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"skipping {path}: unreadable caption {path.with_suffix('.txt').name} ({error})")
            continue
        if caption:
            pairs.append((path, caption))
        else:
            problems.append(f"skipping {path}: no prompt ({path.with_suffix('.txt').name} missing or empty; "
                            f"or pass --prompt)")
    return pairs, problems
