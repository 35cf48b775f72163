"""PIE-Bench (Ju et al. 2024, "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of Code", ICLR): its
700 images, prompts and edit masks, and its seven metrics in its units, as its own evaluation code
(PnPInversion's evaluation/evaluate.py and matrics_calculator.py) computes them.

Layout read (PIE-Bench's own): `DATA/mapping_file.json`, per key an `image_path` (under `DATA/annotation_images/`),
`original_prompt` and `editing_prompt` (edited words in [brackets], removed before use), `editing_instruction`,
`editing_type_id` ("0"-"9"), `blended_word` and `mask`, the edited region run-length encoded (`decode_mask`).
Results are `RESULTS/<key>.png` at the source's size.

Metrics per image (src, res in [0, 1]; keep = 1 - edit mask, the background; mean over all H x W x 3 values):
  structure_distance  x10^3  DINO ViT-B/8 self-similarity distance of the whole images (`DinoStructureDistance`),
                             with PIE-Bench's input: pixel values in [0, 255] ImageNet-normalised
  psnr                       10 log10(1 / mean((src * keep - res * keep)^2)) (torchmetrics PSNR, data range 1)
  lpips               x10^3  LPIPS v0.1, SqueezeNet, of src * keep and res * keep mapped to [-1, 1]
  mse                 x10^4  mean((src * keep - res * keep)^2)
  ssim                x10^2  SSIM (Wang et al. 2004, "Image Quality Assessment: From Error Visibility to Structural
                             Similarity") of src * keep and res * keep (`ssim`)
  clip_whole                 CLIPScore (100 max(cos, 0)) of the result and the editing prompt, OpenAI CLIP ViT-L/14
  clip_edited                the same of uint8(result * edit mask)
The background metrics are undefined (null) where the mask covers the whole image, clip_edited where it is empty;
means leave those images out. PSNR is infinite for a background kept exactly.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fcdiffusion.evaluation import bootstrap
from fcdiffusion.evaluation.clip_score import CLIP_L14, CLIP_L14_WEIGHTS, CLIPScore
from fcdiffusion.evaluation.dino_structure import DINO_FOLDER, DinoStructureDistance
from fcdiffusion.evaluation.lpips_distance import LPIPSDistance, default_backbone_weights
from fcdiffusion.evaluation.report import interval_caption, summarize, write_outputs

MAPPING_FILE = "mapping_file.json"
IMAGE_FOLDER = "annotation_images"
EDIT_TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
              "4": "change content", "5": "change pose", "6": "change color", "7": "change material",
              "8": "change background", "9": "change style"}
OVERALL = "overall"
# metric -> (column header, factor from the metric's natural unit to PIE-Bench's)
COLUMNS = {"structure_distance": ("Structure distance x10^3", 1e3), "psnr": ("PSNR", 1.0),
           "lpips": ("LPIPS x10^3", 1e3), "mse": ("MSE x10^4", 1e4), "ssim": ("SSIM x10^2", 1e2),
           "clip_whole": ("CLIP whole", 1.0), "clip_edited": ("CLIP edited", 1.0)}


@dataclass(frozen=True)
class PieEntry:
    """One PIE-Bench image and its annotation (prompts without their [brackets])."""

    key: str
    image: Path
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    editing_type_id: str
    blended_word: str
    mask: tuple[int, ...]

    @property
    def editing_type(self) -> str:
        return EDIT_TYPES.get(self.editing_type_id, f"type {self.editing_type_id}")


def plain_prompt(prompt: str) -> str:
    """A PIE-Bench prompt without the brackets that mark its edited words."""
    return prompt.replace("[", "").replace("]", "")


def read_mapping(data: str | os.PathLike) -> list[PieEntry]:
    """The entries of `DATA/mapping_file.json`, in its order; a missing file or field is an error naming it."""
    path = Path(data) / MAPPING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"PIE-Bench mapping file not found: {path} (--data is the folder holding "
                                f"{MAPPING_FILE} and {IMAGE_FOLDER}/, as PIE-Bench is distributed)")
    entries = []
    for key, item in json.loads(path.read_text(encoding="utf-8")).items():
        try:
            entries.append(PieEntry(key, Path(data) / IMAGE_FOLDER / item["image_path"],
                                    plain_prompt(item["original_prompt"]), plain_prompt(item["editing_prompt"]),
                                    item["editing_instruction"], str(item["editing_type_id"]), item["blended_word"],
                                    tuple(int(v) for v in item["mask"])))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: entry {key} is not a PIE-Bench annotation: {error!r}") from error
    return entries


def decode_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """PIE-Bench's run-length encoded edit mask -> bool (height, width).

    The code is a flat list of (start, length) pairs over the row-major flattened image, runs of 1 (edited);
    runs past the end are cut. As PIE-Bench's decoder does, the outermost rows and columns are then set to 1 (its
    annotations are unreliable there), so they never count as background.
    """
    if len(rle) % 2:
        raise ValueError(f"a PIE-Bench mask is (start, length) pairs, got {len(rle)} numbers")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(rle[::2], rle[1::2]):
        flat[start:start + max(length, 0)] = True
    mask = flat.reshape(height, width)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return mask


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two (1, C, H, W) images in [0, 1], as PIE-Bench's torchmetrics computed it in 2023: a Gaussian window
    of 11 x 11, sigma 1.5, per channel, K1 = 0.01, K2 = 0.03, averaged over the pixels whose window lies inside the
    image (Wang et al.'s and scikit-image's border; torchmetrics stopped cropping the border in its PR #2721 of
    September 2024, so today's torchmetrics gives other figures)."""
    taps = torch.arange(11, dtype=torch.float64) - 5
    gauss = torch.exp(-taps ** 2 / (2 * 1.5 ** 2))
    gauss = gauss / gauss.sum()
    channels = a.shape[1]
    window = torch.outer(gauss, gauss).expand(channels, 1, 11, 11)
    a, b = a.double(), b.double()
    mean_a, mean_b, aa, bb, ab = (torch.nn.functional.conv2d(x, window, groups=channels)
                                  for x in (a, b, a * a, b * b, a * b))
    var_a, var_b, cov = aa - mean_a ** 2, bb - mean_b ** 2, ab - mean_a * mean_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    index = (2 * mean_a * mean_b + c1) * (2 * cov + c2) / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class PieMetrics:
    """The seven PIE-Bench metrics of one (source, result) pair, from local weight files (see the module docstring)."""

    def __init__(self, clip_arch: str = CLIP_L14, clip_weights: str | os.PathLike = CLIP_L14_WEIGHTS,
                 clip_arch_config: str | os.PathLike | None = None, dino_weights: str | os.PathLike = DINO_FOLDER,
                 lpips_weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.lpips_weights = lpips_weights or default_backbone_weights("squeeze")
        self.dino = DinoStructureDistance(dino_weights, device, pixel_scale=255)
        self.lpips = LPIPSDistance("squeeze", self.lpips_weights, device)
        self.clip = CLIPScore(clip_arch, clip_weights, device, clip_arch_config)

    @torch.no_grad()
    def __call__(self, source: np.ndarray, result: np.ndarray, edited: np.ndarray,
                 prompt: str) -> dict[str, float | None]:
        """uint8 (H, W, 3) source and result, bool (H, W) edit mask, the editing prompt -> metric -> value (PIE units;
        None where undefined)."""
        if source.shape != result.shape or source.shape[:2] != edited.shape:
            raise ValueError(f"source {source.shape}, result {result.shape} and mask {edited.shape} differ in size")
        src, res = (torch.from_numpy(x).permute(2, 0, 1)[None].double() / 255 for x in (source, result))
        values: dict[str, float | None] = {"structure_distance": float(self.dino(src, res)[0])}
        keep = torch.from_numpy(~edited).double()
        if keep.any():
            a, b = src * keep, res * keep
            mse = float((a - b).pow(2).mean())
            values.update(psnr=10 * math.log10(1 / mse) if mse > 0 else math.inf,
                          lpips=float(self.lpips(a * 2 - 1, b * 2 - 1)[0]), mse=mse,
                          ssim=ssim(a, b))
        else:
            values.update(psnr=None, lpips=None, mse=None, ssim=None)
        values["clip_whole"] = float(self.clip([Image.fromarray(result)], [prompt])[0])
        values["clip_edited"] = (float(self.clip([Image.fromarray(result * edited[..., None])], [prompt])[0])
                                 if edited.any() else None)
        return {k: None if v is None else v * COLUMNS[k][1] for k, v in values.items()}


@torch.no_grad()
def translate(entries: Sequence[PieEntry], model: Any, mode: str, out_dir: str | os.PathLike,
              resolution: int = 512, steps: int | None = None, seed: int = 0, batch_size: int = 4) -> None:
    """Translate every entry's image with its editing prompt in `mode` (`Translator`), writing `<key>.png` at the
    source's size. Entry i gets the noise seed `seed + i` (its position in the mapping file), whatever the batch."""
    from fcdiffusion.core.images import save_png, to_uint8
    from fcdiffusion.core.inference import Translator

    translator = Translator(model)
    model.check_mode(mode)
    os.makedirs(out_dir, exist_ok=True)
    for start in tqdm(range(0, len(entries), batch_size), desc="PIE-Bench translation", unit="batch"):
        batch = entries[start:start + batch_size]
        sources = [read_rgb(e.image) for e in batch]
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(s).resize(
            (resolution, resolution), Image.BICUBIC))).permute(2, 0, 1).float() / 127.5 - 1 for s in sources])
        results = translator(pixels, [e.editing_prompt for e in batch], [mode],
                             seed=[seed + start + i for i in range(len(batch))], steps=steps,
                             decode_control=False)[mode].image
        for entry, source, image in zip(batch, sources, to_uint8(results)):
            size = (source.shape[1], source.shape[0])
            save_png(np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC)) if image.shape != source.shape
                     else image, Path(out_dir) / f"{entry.key}.png")


@dataclass
class PieSettings:
    """Where PIE-Bench, the results and the weights are, and how the intervals are drawn."""

    data: str
    results: str
    out: str | None = None
    clip_arch: str = CLIP_L14
    clip_weights: str = CLIP_L14_WEIGHTS
    clip_arch_config: str | None = None
    dino_weights: str = DINO_FOLDER
    lpips_weights: str | None = None
    resamples: int = bootstrap.RESAMPLES
    seed: int = bootstrap.SEED
    device: str = "cpu"
    translation: dict[str, Any] = field(default_factory=dict)


def evaluate(settings: PieSettings, entries: Sequence[PieEntry] | None = None) -> tuple[str, list[str]]:
    """Score `RESULTS/<key>.png` for every entry, write metrics.json (per_image, per_type with "overall",
    intervals, settings), the table and the plot; return the table and what was skipped."""
    entries = read_mapping(settings.data) if entries is None else entries
    metrics = PieMetrics(settings.clip_arch, settings.clip_weights, settings.clip_arch_config,
                         settings.dino_weights, settings.lpips_weights, settings.device)
    records, problems = [], []
    for entry in tqdm(entries, desc="PIE-Bench metrics", unit="image"):
        path = Path(settings.results) / f"{entry.key}.png"
        if not path.is_file():
            problems.append(f"skipping {entry.key}: no {path}")
            continue
        source, result = read_rgb(entry.image), read_rgb(path)
        if source.shape != result.shape:
            problems.append(f"skipping {entry.key}: {path} is {result.shape[1]}x{result.shape[0]}, its source "
                            f"{source.shape[1]}x{source.shape[0]}")
            continue
        edited = decode_mask(entry.mask, *source.shape[:2])
        records.append({"name": entry.key, "editing_type": entry.editing_type,
                        **metrics(source, result, edited, entry.editing_prompt)})
    if not records:
        raise ValueError(f"no PIE-Bench result found in {settings.results} (expected <key>.png per mapping entry)")
    order = [*EDIT_TYPES.values(), OVERALL]
    per_type, intervals = summarize(records, lambda r: [r["editing_type"], OVERALL], settings.resamples,
                                    settings.seed)
    per_type = {t: per_type[t] for t in sorted(per_type, key=lambda t: order.index(t) if t in order else -1)}
    content = {"per_image": records, "per_type": per_type, "intervals": intervals, "settings": {
        "benchmark": "PIE-Bench", "data": settings.data, "results": settings.results, "group_by": "editing_type",
        "units": {k: label for k, (label, _) in COLUMNS.items()}, "skipped": problems,
        "clip": {"arch": settings.clip_arch, "weights": settings.clip_weights},
        "weight_files": {"dino_structure": settings.dino_weights, "lpips (squeeze)": os.fspath(metrics.lpips_weights),
                         "clip": settings.clip_weights},
        "translation": settings.translation,
        "bootstrap": bootstrap.settings(settings.resamples, seed=settings.seed)}}
    labels = {k: label for k, (label, _) in COLUMNS.items()}
    labels = {**labels, **{k: f"{labels[k]} ({settings.clip_arch})" for k in ("clip_whole", "clip_edited")}}
    caption = (interval_caption(content["settings"]["bootstrap"], set_level=False) + f" {len(records)} images. CLIP: "
               f"{settings.clip_arch} ({settings.clip_weights}); background metrics outside PIE-Bench's edit masks.")
    out = settings.out or os.path.join(settings.results, "metrics.json")
    table = write_outputs(out, content, per_type, intervals, labels, "edit type", caption)
    return table, problems


def run(settings: PieSettings, model: Any = None, translation: dict[str, Any] | None = None) -> tuple[str, list[str]]:
    """`evaluate`, after translating PIE-Bench into `settings.results` with `model` when one is given.

    `translation` holds the model file's name (recorded), `mode` (default: the model's only one), `steps`, `seed`,
    `resolution` and `batch_size`.
    """
    entries = read_mapping(settings.data)
    if model is not None:
        translation = dict(translation or {})
        mode = translation.get("mode") or (model.modes[0] if len(model.modes) == 1 else None)
        if mode is None:
            raise ValueError(f"the model serves {', '.join(model.modes)}: name the mode to translate in (--mode)")
        settings.translation = {**translation, "mode": mode}
        translate(entries, model, mode, settings.results, translation.get("resolution", 512),
                  translation.get("steps"), translation.get("seed", 0), translation.get("batch_size", 4))
    return evaluate(settings, entries)
