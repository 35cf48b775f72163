"""The evaluation suite over a results folder: per-image metrics, means per mode, a table and a plot.

Each metric is defined in its own module (the definitions and their sources are there); this module reads the
images, runs the selected metrics in batches, and writes `metrics.json`, `metrics.md` and `metrics.png`.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fcdiffusion.core.band_fidelity import band_retrieval, band_scores, latent_band_scores, pixel_thresholds
from fcdiffusion.core.inference import encode_images
from fcdiffusion.evaluation.pairs import Pair, match_pairs
from fcdiffusion.train.dataset import load_image
from ldm.util import atomic_path, atomic_write_text

METRICS = ("band", "band_retrieval", "teacher_agreement", "clip_score", "dino_structure", "lpips", "fid")
NEEDS_REFERENCE = ("teacher_agreement", "fid")  # compare with another results folder (evaluate.py --reference)
SET_LEVEL = ("band_retrieval", "fid")  # one figure per mode from all of its images


@dataclass
class Settings:
    """What the metrics need besides the images: the model (band fidelity, agreement) and local weight files."""

    model: Any = None
    clip_arch: str = "ViT-H-14"
    clip_weights: str = "CLIP-ViT-H-14/open_clip_pytorch_model.bin"
    clip_arch_config: str | None = None
    dino_weights: str = "models/dino-vitb8"
    lpips_net: str = "alex"
    lpips_weights: str | None = None
    inception_weights: str = "models/pt_inception-2015-12-05-6726825d.pth"
    fid_dims: int = 2048
    kid_subset_size: int = 50
    device: str = "cpu"
    files: dict[str, str] = field(default_factory=dict)


def read_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1], resized and centre-cropped as the translation script prepares its inputs."""
    return torch.from_numpy(load_image(path, size)).permute(2, 0, 1)


def _uint8(paths: Sequence[Path]) -> torch.Tensor:
    """The PNGs at `paths` as they are, (N, 3, H, W) uint8: what FID and KID read."""
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths])


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


class Evaluator:
    """Runs the selected `metrics` over pairs of (source, result[, reference]) images."""

    def __init__(self, metrics: Sequence[str], settings: Settings):
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
        needs_model = {"band", "band_retrieval", "teacher_agreement"} & set(metrics)
        if needs_model and settings.model is None:
            raise ValueError(f"{', '.join(sorted(needs_model))} need the model whose VAE and band edges they use "
                             "(--model: a student or teacher weights file)")
        self.metrics, self.settings = list(metrics), settings
        self._built: dict[str, Callable] = {}

    def _metric(self, name: str) -> Callable:
        """The metric object, built once from its local weights (a missing file fails here, before any work)."""
        if name not in self._built:
            s = self.settings
            if name == "clip_score":
                from fcdiffusion.evaluation.clip_score import CLIPScore

                self._built[name] = CLIPScore(s.clip_arch, s.clip_weights, device=s.device,
                                               arch_config=s.clip_arch_config)
                s.files["clip_score"] = s.clip_weights
            elif name == "dino_structure":
                from fcdiffusion.evaluation.dino_structure import DinoStructureDistance

                self._built[name] = DinoStructureDistance(s.dino_weights, device=s.device)
                s.files["dino_structure"] = s.dino_weights
            elif name == "lpips":
                from fcdiffusion.evaluation.lpips_distance import LPIPSDistance, default_backbone_weights

                weights = s.lpips_weights or default_backbone_weights(s.lpips_net)
                self._built[name] = LPIPSDistance(net=s.lpips_net, backbone_weights=weights, device=s.device)
                s.files["lpips"] = str(weights)
        return self._built[name]

    def prepare(self) -> None:
        """Build every selected metric now, so a missing weights file is reported before any image is read."""
        for name in ("clip_score", "dino_structure", "lpips"):
            if name in self.metrics:
                self._metric(name)
        if "fid" in self.metrics and not os.path.isfile(self.settings.inception_weights):
            from fcdiffusion.evaluation.fid import INCEPTION_HELP

            raise FileNotFoundError(f"Inception weights for FID/KID not found: {self.settings.inception_weights}\n"
                                    f"{INCEPTION_HELP}")

    @torch.no_grad()
    def per_image(self, pairs: Sequence[Pair], batch_size: int = 8) -> list[dict[str, Any]]:
        """One record per pair: name, mode and one value per metric (those that are defined per image)."""
        records: list[dict[str, Any]] = []
        for start in tqdm(range(0, len(pairs), batch_size), desc="evaluating", unit="batch"):
            chunk = pairs[start:start + batch_size]
            size = Image.open(chunk[0].result).size[0]
            for mode in dict.fromkeys(p.mode for p in chunk):
                group = [p for p in chunk if p.mode == mode]
                records += self._score(group, mode, size)
        return records

    def _score(self, group: Sequence[Pair], mode: str, size: int) -> list[dict[str, Any]]:
        sources = torch.stack([read_image(p.source, size) for p in group])
        results = torch.stack([read_image(p.result, size) for p in group])
        values: dict[str, torch.Tensor] = {}
        model = self.settings.model
        if "band" in self.metrics:
            values["band_error_latent"], values["band_freedom_latent"] = latent_band_scores(
                model, sources, results, mode)
            edges = pixel_thresholds(model.frequency_thresholds, size, model.image_size)
            values["band_error_pixel"], values["band_freedom_pixel"] = band_scores(sources, results, mode, **edges)
        if "clip_score" in self.metrics:
            values["clip_score"] = self._metric("clip_score")(_to_pil(results), [p.prompt for p in group])
        if "dino_structure" in self.metrics:
            values["dino_structure"] = self._metric("dino_structure")((sources + 1) / 2, (results + 1) / 2)
        if "lpips" in self.metrics:
            values["lpips_source"] = self._metric("lpips")(sources, results)
        references = [p.reference for p in group]
        if all(r is not None for r in references):
            refs = torch.stack([read_image(r, size) for r in references])
            if "teacher_agreement" in self.metrics:
                agreement = encode_images(model, results) - encode_images(model, refs)
                values["teacher_latent_mse"] = agreement.pow(2).mean((1, 2, 3)).cpu()
            if "lpips" in self.metrics:
                values["lpips_reference"] = self._metric("lpips")(results, refs)
        return [{"name": p.name, "mode": mode, **{k: float(v[i]) for k, v in values.items()}}
                for i, p in enumerate(group)]

    def set_level(self, pairs: Sequence[Pair]) -> dict[str, dict[str, float]]:
        """Per mode, the figures computed from all of its images: band retrieval accuracy (in the latent space) and
        FID and KID between the results and the reference folder."""
        out: dict[str, dict[str, float]] = defaultdict(dict)
        for mode in dict.fromkeys(p.mode for p in pairs):
            group = [p for p in pairs if p.mode == mode]
            if "band_retrieval" in self.metrics and len(group) > 1:
                out[mode].update(self._retrieval(group, mode))
            if "fid" in self.metrics and group[0].reference is not None:
                from fcdiffusion.evaluation.fid import fid_kid

                s = self.settings
                s.files["fid"] = s.inception_weights
                figures = fid_kid(_uint8([p.result for p in group]), _uint8([p.reference for p in group]),
                                  s.inception_weights, kid_subset_size=s.kid_subset_size, dims=s.fid_dims,
                                  device=s.device)
                out[mode].update({k: float(v) for k, v in figures.items()})
        return dict(out)

    @torch.no_grad()
    def _retrieval(self, group: Sequence[Pair], mode: str) -> dict[str, float]:
        """Band retrieval accuracy of a mode's results among their sources, and chance (1 / number of sources)."""
        model = self.settings.model
        size = Image.open(group[0].result).size[0]
        sources = encode_images(model, torch.stack([read_image(p.source, size) for p in group]))
        results = encode_images(model, torch.stack([read_image(p.result, size) for p in group]))
        hits = band_retrieval(sources, results, mode, **model.frequency_thresholds)
        return {"band_retrieval_latent": hits.float().mean().item(), "band_retrieval_chance": 1.0 / len(group)}


def per_mode_means(records: Sequence[dict[str, Any]], set_level: dict[str, dict[str, float]]) -> dict[str, dict]:
    """mode -> metric -> mean over that mode's images (plus the set-level figures of the mode)."""
    grouped: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for key, value in record.items():
            if key not in ("name", "mode"):
                grouped[record["mode"]][key].append(value)
    means = {mode: {k: float(np.mean(v)) for k, v in metrics.items()} for mode, metrics in grouped.items()}
    for mode, figures in set_level.items():
        means.setdefault(mode, {}).update(figures)
    return means


def markdown_table(per_mode: dict[str, dict[str, float]]) -> str:
    """The means per mode as a Markdown table, a column per metric."""
    columns = list(dict.fromkeys(k for figures in per_mode.values() for k in figures))
    lines = ["| mode | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for mode, figures in per_mode.items():
        lines.append(f"| {mode} | " + " | ".join(f"{figures[c]:.4g}" if c in figures else "" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(per_mode: dict[str, dict[str, float]], path: str | os.PathLike) -> None:
    """One bar chart per metric, modes side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(dict.fromkeys(k for figures in per_mode.values() for k in figures))
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 2.8), squeeze=False)
    for ax, column in zip(axes[0], columns):
        modes = [m for m in per_mode if column in per_mode[m]]
        ax.bar(range(len(modes)), [per_mode[m][column] for m in modes], color="tab:blue")
        ax.set_xticks(range(len(modes)), [m.replace("_pass", "") for m in modes])
        ax.set_title(column, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_outputs(out: str | os.PathLike, records: list[dict], per_mode: dict, settings: dict[str, Any]) -> None:
    """`metrics.json` (per_image, per_mode, settings), `metrics.md` and `metrics.png` beside it."""
    out = Path(out)
    atomic_write_text(out, json.dumps({"per_image": records, "per_mode": per_mode, "settings": settings},
                                      indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown_table(per_mode))
    if per_mode:
        plot(per_mode, out.with_suffix(".png"))


def evaluate_folder(evaluator: Evaluator, results: str | os.PathLike, input_dir: str | os.PathLike,
                    prompt: str | None = None, reference: str | os.PathLike | None = None,
                    out: str | os.PathLike | None = None, batch_size: int = 8) -> tuple[dict, list[str]]:
    """Match, score and write: the per-mode means and the messages of what was left out.

    Writes `out` (default `<results>/metrics.json`) with the table and the plot beside it; the one path of
    `evaluate.py` and `test_distillation.py --evaluate`.
    """
    pairs, problems = match_pairs(results, input_dir, prompt, reference)
    if not pairs:
        raise ValueError(f"no result in {results} matches a source in {input_dir}")
    records = evaluator.per_image(pairs, batch_size)
    per_mode = per_mode_means(records, evaluator.set_level(pairs))
    model = evaluator.settings.model
    settings = {"results": os.fspath(results), "input_dir": os.fspath(input_dir),
                "reference": None if reference is None else os.fspath(reference), "metrics": evaluator.metrics,
                "weight_files": evaluator.settings.files, "skipped": problems,
                "model_modes": None if model is None else list(model.modes)}
    write_outputs(out or Path(results) / "metrics.json", records, per_mode, settings)
    return per_mode, problems

