"""The evaluation suite over a results folder: per-image metrics, means per mode with bootstrap intervals, a table
and a plot.

Each metric is defined in its own module (the definitions and their sources are there); this module reads the
images, runs the selected metrics in batches, and writes `metrics.json` (`per_image`, `per_mode`, `intervals`,
`settings`), `metrics.md` and `metrics.png`; with FID, the Inception features behind it (`metrics_features.npz`,
what `evaluate.py --compare` pairs two runs' FIDs with).
"""
from __future__ import annotations

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
from fcdiffusion.evaluation import bootstrap
from fcdiffusion.evaluation.clean_fid import CLEAN_FID_WEIGHTS
from fcdiffusion.evaluation.clip_score import CLIP_B32, CLIP_B32_WEIGHTS
from fcdiffusion.evaluation.pairs import Pair, match_pairs
from fcdiffusion.evaluation.report import Intervals, interval_caption, summarize, write_outputs
from fcdiffusion.evaluation.report import markdown_table as markdown_table
from fcdiffusion.train.dataset import load_image
from ldm.util import atomic_path

METRICS = ("band", "band_retrieval", "teacher_agreement", "clip_score", "dino_structure", "lpips", "fid")
NEEDS_REFERENCE = ("teacher_agreement", "fid")  # another folder: --reference (agreement), --fid_reference (FID/KID)
NEEDS_MODEL = ("band", "band_retrieval", "teacher_agreement")  # the model's VAE and band edges
SET_LEVEL = ("band_retrieval", "fid")  # one figure per mode from all of its images


def check_metric_inputs(metrics: Sequence[str], model: bool, fid_reference: bool,
                        reference: bool | None = None) -> None:
    """Raise a ValueError when one of `metrics` lacks what it is computed from: the model (`NEEDS_MODEL`), the
    reference results (teacher_agreement: --reference) or the reference photos (fid: --fid_reference); `reference`
    None: not known yet. The one check of evaluate.py (before any model is loaded) and of the suite itself."""
    needs_model = [m for m in NEEDS_MODEL if m in metrics]
    if needs_model and not model:
        raise ValueError(f"{', '.join(needs_model)} need the model whose VAE and band edges they use "
                         "(--model: a student or teacher weights file)")
    if "teacher_agreement" in metrics and reference is False:
        raise ValueError("teacher_agreement compares the results with another run's (--reference: e.g. the "
                         "teacher's results folder); pass one, or leave the metric out")
    if "fid" in metrics and not fid_reference:
        raise ValueError("fid needs a folder of reference photos to compare the results with (--fid_reference)")


@dataclass
class Settings:
    """What the metrics need besides the images: the model (band fidelity, agreement), local weight files, the FID
    reference folder and how the intervals are drawn."""

    model: Any = None
    clip_arch: str = CLIP_B32
    clip_weights: str = CLIP_B32_WEIGHTS
    clip_arch_config: str | None = None
    dino_weights: str = "models/dino-vitb8"
    lpips_net: str = "alex"
    lpips_weights: str | None = None
    inception_weights: str = os.fspath(CLEAN_FID_WEIGHTS)
    fid_reference: str | None = None
    resamples: int = bootstrap.RESAMPLES
    set_level_resamples: int = bootstrap.SET_LEVEL_RESAMPLES
    seed: int = bootstrap.SEED
    device: str = "cpu"
    files: dict[str, str] = field(default_factory=dict)


def read_image(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) in [-1, 1], resized and centre-cropped as the translation script prepares its inputs."""
    return torch.from_numpy(load_image(path, size)).permute(2, 0, 1)


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


@dataclass
class SetLevel:
    """What a mode's whole set gives: figures (FID, KID, retrieval's N and chance), their intervals, per-image
    retrieval hits (name -> 0/1), and the results' Inception features (names, features)."""

    figures: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    intervals: Intervals = field(default_factory=lambda: defaultdict(dict))
    hits: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    features: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    reference: np.ndarray | None = None


class Evaluator:
    """Runs the selected `metrics` over pairs of (source, result[, reference]) images."""

    def __init__(self, metrics: Sequence[str], settings: Settings):
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; valid: {', '.join(METRICS)}")
        check_metric_inputs(metrics, settings.model is not None, settings.fid_reference is not None)
        self.metrics, self.settings = list(metrics), settings
        self._built: dict[str, Any] = {}

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
            elif name == "fid":
                from fcdiffusion.evaluation.clean_fid import load_inception

                self._built[name] = load_inception(s.inception_weights, s.device)
                s.files["fid"] = s.inception_weights
        return self._built[name]

    def prepare(self) -> None:
        """Build every selected metric now, so a missing weights file is reported before any image is read."""
        for name in ("clip_score", "dino_structure", "lpips", "fid"):
            if name in self.metrics:
                self._metric(name)

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

    def set_level(self, pairs: Sequence[Pair]) -> SetLevel:
        """Per mode, what is computed from all of its images: band retrieval (in the latent space) and FID and KID of
        the results against the --fid_reference photos, with their intervals."""
        out = SetLevel()
        s = self.settings
        if "fid" in self.metrics:
            from fcdiffusion.evaluation.clean_fid import folder_features

            out.reference = folder_features(s.fid_reference, self._metric("fid"), device=s.device)
        for mode in dict.fromkeys(p.mode for p in pairs):
            group = [p for p in pairs if p.mode == mode]
            if "band_retrieval" in self.metrics and len(group) > 1:
                hits = self._retrieval(group, mode)
                out.hits[mode] = {p.name: float(hit) for p, hit in zip(group, hits)}
                out.figures[mode].update({"band_retrieval_n": float(len(group)),
                                          "band_retrieval_chance": 1.0 / len(group)})
            if "fid" in self.metrics and len(group) > 1:
                self._fid(group, mode, out)
        return out

    def _fid(self, group: Sequence[Pair], mode: str, out: SetLevel) -> None:
        from fcdiffusion.evaluation.clean_fid import Reference, file_features

        s = self.settings
        features = file_features([p.result for p in group], self._metric("fid"), device=s.device)
        reference = Reference(out.reference)
        out.features[mode] = ([p.name for p in group], features)
        out.figures[mode].update({"fid": reference.fid(features), "kid": reference.kid(features, seed=s.seed)})
        for name, resampled in (("fid", reference.resampled_fid(features)), ("kid", reference.resampled_kid(features))):
            out.intervals[mode][name] = list(bootstrap.statistic_interval(len(features), resampled,
                                                                          s.set_level_resamples, s.seed))

    @torch.no_grad()
    def _retrieval(self, group: Sequence[Pair], mode: str) -> torch.Tensor:
        """Whether each of a mode's results is retrieved among their sources (`band_retrieval`, latent space)."""
        model = self.settings.model
        size = Image.open(group[0].result).size[0]
        sources = encode_images(model, torch.stack([read_image(p.source, size) for p in group]))
        results = encode_images(model, torch.stack([read_image(p.result, size) for p in group]))
        return band_retrieval(sources, results, mode, **model.frequency_thresholds).cpu()


def evaluate_folder(evaluator: Evaluator, results: str | os.PathLike, input_dir: str | os.PathLike,
                    prompt: str | None = None, reference: str | os.PathLike | None = None,
                    out: str | os.PathLike | None = None, batch_size: int = 8) -> tuple[dict, list[str]]:
    """Match, score and write: the per-mode means and the messages of what was left out.

    Writes `out` (default `<results>/metrics.json`) with the table and the plot beside it (elsewhere, said by an
    `OutputError`, when they cannot be written there); the one path of `evaluate.py` and `test_distillation.py
    --evaluate`.
    """
    s = evaluator.settings
    check_metric_inputs(evaluator.metrics, s.model is not None, s.fid_reference is not None, reference is not None)
    pairs, problems = match_pairs(results, input_dir, prompt, reference)
    if not pairs:
        raise ValueError(f"no result in {results} matches a source in {input_dir}")
    records = evaluator.per_image(pairs, batch_size)
    whole = evaluator.set_level(pairs)
    for record in records:
        if record["name"] in whole.hits.get(record["mode"], {}):
            record["band_retrieval_latent"] = whole.hits[record["mode"]][record["name"]]
    per_mode, intervals = summarize(records, lambda r: [r["mode"]], s.resamples, s.seed)
    for mode, figures in whole.figures.items():
        per_mode.setdefault(mode, {}).update(figures)
        intervals.setdefault(mode, {}).update(whole.intervals.get(mode, {}))
    out = Path(out or Path(results) / "metrics.json")
    model = s.model
    labels = {"clip_score": f"clip_score ({s.clip_arch})"} if "clip_score" in evaluator.metrics else {}
    settings = {"results": os.fspath(results), "input_dir": os.fspath(input_dir),
                "reference": None if reference is None else os.fspath(reference), "metrics": evaluator.metrics,
                "weight_files": s.files, "skipped": problems, "group_by": "mode",
                "model_modes": None if model is None else list(model.modes),
                "bootstrap": bootstrap.settings(s.resamples, s.set_level_resamples, s.seed)}
    caption = interval_caption(settings["bootstrap"], set_level="fid" in evaluator.metrics)
    if "clip_score" in evaluator.metrics:
        settings["clip"] = {"arch": s.clip_arch, "weights": s.clip_weights}
        caption += f" CLIP: {s.clip_arch} ({s.clip_weights})."
    extra = {}
    if "fid" in evaluator.metrics:
        features = out.stem + "_features.npz"
        arrays = {"reference": whole.reference, **{f"{mode}/{key}": value for mode, (names, feats) in
                                                   whole.features.items()
                                                   for key, value in (("names", np.array(names)), ("features", feats))}}

        def write_features(path: Path) -> None:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)

        extra[features] = write_features
        settings["fid"] = {"implementation": "clean-fid, mode clean", "reference": os.fspath(s.fid_reference),
                           "reference_images": len(whole.reference), "features": features}
        caption += f" FID/KID: clean-fid (clean) against {s.fid_reference} ({len(whole.reference)} photos)."
    write_outputs(out, {"per_image": records, "per_mode": per_mode, "intervals": intervals, "settings": settings},
                  per_mode, intervals, labels, "mode", caption, extra)
    return per_mode, problems
