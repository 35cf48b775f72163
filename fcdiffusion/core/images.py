"""Converting model tensors to pictures: PNGs and labelled grids, written atomically."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ldm.util import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 array(s) HWC."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 HWC array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write one (3, H, W) image in [-1, 1] as PNG."""
    save_png(to_uint8(image), path)


def image_grid(rows: Sequence[torch.Tensor], padding: int = 2) -> np.ndarray:
    """Rows of equally sized (N, 3, H, W) images in [-1, 1] -> one uint8 grid, a row per entry."""
    stacked = torch.cat([r.detach().float().cpu() for r in rows])
    grid = make_grid(stacked, nrow=rows[0].shape[0], padding=padding, normalize=False, pad_value=1.0)
    return to_uint8(grid)


def labelled_grid(columns: Mapping[str, torch.Tensor], row_labels: Sequence[str] | None = None) -> np.ndarray:
    """A grid whose columns are named (a header line) and whose rows are optional labels; images (N, 3, H, W)."""
    names = list(columns)
    n = next(iter(columns.values())).shape[0]
    rows = [torch.stack([columns[name][i] for name in names]) for i in range(n)]
    grid = Image.fromarray(image_grid(rows))
    h, w = next(iter(columns.values())).shape[-2:]
    header, margin = 14, (90 if row_labels else 0)
    canvas = Image.new("RGB", (grid.width + margin, grid.height + header), "white")
    canvas.paste(grid, (margin, header))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((margin + 2 + j * (w + 2), 1), name[: max(4, w // 6)], fill="black")
    for i, label in enumerate(row_labels or []):
        draw.text((2, header + 2 + i * (h + 2) + h // 2 - 5), label[:14], fill="black")
    return np.asarray(canvas)
