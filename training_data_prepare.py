"""Index an image-caption folder into the JSON-lines file that `fcdiffusion.dataset` reads.

Layout (img2dataset's ``files`` output, as in the FCDiffusion README): images anywhere under the root,
directly or in subfolders, each with a same-named caption, e.g. ``00000/000000001.jpg`` +
``00000/000000001.txt``. Each output line is ``{"img_path": ..., "prompt": ...}``.

``img_path`` is written relative to the output file's directory (POSIX separators), so the dataset
folder and its index can be moved together; where no relative path exists (another drive on
Windows) it is absolute. `FCDiffusionDataset` resolves relative paths against the same directory.

Images without a caption, empty captions, undecodable captions and files PIL cannot verify are
skipped and counted. Lines are sorted by path and the file is replaced atomically, so a re-run
writes a byte-identical file rather than appending duplicates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm import tqdm

from ldm.util import atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SKIP_REASONS = ("no_caption", "empty_caption", "unreadable_caption", "corrupt_image")


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under `root` (recursively, hidden entries ignored), sorted by path."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(
            Path(directory, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        )
    return sorted(found)


def read_caption(image: Path) -> str | None:
    """The caption beside `image` with whitespace runs collapsed; None when there is no caption file."""
    caption = image.with_suffix(".txt")
    if not caption.is_file():
        return None
    return " ".join(caption.read_text(encoding="utf-8").split())


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
    """`path` relative to `base` with forward slashes, or absolute when no relative path exists."""
    try:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def collect_pairs(
    data_root: str | os.PathLike, base_dir: str | os.PathLike, workers: int = 4
) -> tuple[list[dict[str, str]], Counter]:
    """Records for every usable image under `data_root` (paths relative to `base_dir`) and skip counts."""
    images = find_images(data_root)
    records, skipped = [], Counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checks = pool.map(check_pair, images)
        for image, (reason, caption) in tqdm(zip(images, checks), total=len(images), desc="checking", unit="img"):
            if reason:
                skipped[reason] += 1
            else:
                records.append({"img_path": relative_to(image, Path(base_dir)), "prompt": caption})
    return records, skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_root", default="datasets/laion_aesthetics_6.5", help="folder of image + caption pairs")
    parser.add_argument("--output", default="datasets/training_data.json", help="JSON-lines index to write")
    parser.add_argument("--workers", type=int, default=4, help="threads verifying images")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.data_root):
        print(f"error: data root {args.data_root!r} is not a directory", file=sys.stderr)
        return 1
    output = Path(args.output)
    records, skipped = collect_pairs(args.data_root, output.parent, args.workers)
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    print(f"found {len(records) + sum(skipped.values())} images under {args.data_root}")
    print(f"wrote {len(records)} pairs to {output}")
    for reason in SKIP_REASONS:
        print(f"skipped {reason}: {skipped[reason]}")
    return 0 if records else 1


if __name__ == "__main__":
    sys.exit(main())
