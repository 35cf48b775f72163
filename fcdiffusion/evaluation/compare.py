"""Two runs of `evaluate.py` side by side: per group (control mode, PIE-Bench edit type) and metric, the mean paired
difference B - A over the images both runs scored (matched by name) with its paired-bootstrap interval; FID and
KID paired the same way from the Inception features each run saved, when both ran FID against one reference."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fcdiffusion.evaluation import bootstrap
from fcdiffusion.evaluation.report import LABELS, as_float, interval_caption, write_outputs


def metrics_file(run: str | os.PathLike) -> Path:
    """A run's metrics.json: the path itself, or `metrics.json` inside a folder."""
    path = Path(run)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation found at {run} (a metrics.json, or a folder holding one)")
    return path


def _groups(run: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """group -> image name -> metric -> value; PIE-Bench runs also have every image under "overall"."""
    key = run["settings"].get("group_by", "mode")
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for record in run["per_image"]:
        values = {k: as_float(v) for k, v in record.items() if k not in LABELS}
        out[record[key]][record["name"]] = values
        if key == "editing_type":
            out["overall"][record["name"]] = values
    return out


def _paired_fid(path_a: Path, path_b: Path, run_a: dict, run_b: dict, resamples: int,
                seed: int) -> dict[str, dict[str, list[float]]]:
    """group -> {"fid", "kid"} -> [difference, low, high] from both runs' saved features (same reference only)."""
    from fcdiffusion.evaluation.clean_fid import Reference

    fid_a, fid_b = run_a["settings"].get("fid"), run_b["settings"].get("fid")
    if not fid_a or not fid_b:
        return {}
    features_a = np.load(path_a.with_name(fid_a["features"]))
    features_b = np.load(path_b.with_name(fid_b["features"]))
    if features_a["reference"].shape != features_b["reference"].shape or not np.array_equal(
            features_a["reference"], features_b["reference"]):
        raise ValueError(f"FID of {path_a} and {path_b} were computed against different reference photos "
                         f"({fid_a['reference']}, {fid_b['reference']}): their difference would mean nothing")
    reference = Reference(features_a["reference"])
    out: dict[str, dict[str, list[float]]] = {}
    for group in sorted({k.split("/")[0] for k in features_a.files if k.endswith("/names")}):
        if f"{group}/names" not in features_b.files:
            continue
        names_a, names_b = list(features_a[f"{group}/names"]), list(features_b[f"{group}/names"])
        shared = sorted(set(names_a) & set(names_b))
        if len(shared) < 2:
            continue
        x_a = features_a[f"{group}/features"][[names_a.index(n) for n in shared]]
        x_b = features_b[f"{group}/features"][[names_b.index(n) for n in shared]]
        out[group] = {}
        for name, point, resampled in (("fid", Reference.fid, Reference.resampled_fid),
                                       ("kid", lambda r, x: r.kid(x, seed=seed), Reference.resampled_kid)):
            figure_a, figure_b = resampled(reference, x_a), resampled(reference, x_b)
            low, high = bootstrap.statistic_interval(len(shared), lambda idx: figure_b(idx) - figure_a(idx),
                                                     resamples, seed)
            out[group][name] = [point(reference, x_b) - point(reference, x_a), low, high]
    return out


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, out: str | os.PathLike | None = None,
                 resamples: int = bootstrap.RESAMPLES, set_level_resamples: int = bootstrap.SET_LEVEL_RESAMPLES,
                 seed: int = bootstrap.SEED) -> str:
    """Write `out` (default: `compare.json` beside run B's metrics.json) with its table and plot; return the table."""
    path_a, path_b = metrics_file(run_a), metrics_file(run_b)
    a, b = (json.loads(p.read_text()) for p in (path_a, path_b))
    groups_a, groups_b = _groups(a), _groups(b)
    differences: dict[str, dict[str, float]] = {}
    intervals: dict[str, dict[str, list[float]]] = {}
    matched: dict[str, int] = {}
    for group in [g for g in groups_a if g in groups_b]:
        names = sorted(set(groups_a[group]) & set(groups_b[group]))
        matched[group] = len(names)
        if not names:
            continue
        metrics = [m for m in groups_a[group][names[0]] if all(m in groups_b[group][n] and m in groups_a[group][n]
                                                                for n in names)]
        differences[group], intervals[group] = {}, {}
        for metric in metrics:
            values_a = [groups_a[group][n][metric] for n in names]
            values_b = [groups_b[group][n][metric] for n in names]
            if np.isnan(np.asarray(values_b) - np.asarray(values_a)).all():
                continue
            mean, low, high = bootstrap.paired_difference(values_a, values_b, resamples, seed)
            differences[group][metric], intervals[group][metric] = mean, [low, high]
    for group, figures in _paired_fid(path_a, path_b, a, b, set_level_resamples, seed).items():
        for name, (difference, low, high) in figures.items():
            differences.setdefault(group, {})[name] = difference
            intervals.setdefault(group, {})[name] = [low, high]
    if not differences:
        raise ValueError(f"{path_a} and {path_b} share no image (matched by name within a group)")
    settings = {"run_a": os.fspath(path_a), "run_b": os.fspath(path_b), "matched_images": matched,
                "difference": "B - A", "bootstrap": bootstrap.settings(resamples, set_level_resamples, seed)}
    caption = (f"B - A, B = {path_b}, A = {path_a}; means over the images both scored, per group "
               f"({', '.join(f'{g}: {n}' for g, n in matched.items())}). "
               + interval_caption(settings["bootstrap"]).replace("percentile bootstrap", "paired percentile bootstrap"))
    out = Path(out) if out else path_b.with_name("compare.json")
    first = "edit type" if b["settings"].get("group_by") == "editing_type" else "mode"
    return write_outputs(out, {"differences": differences, "intervals": intervals, "settings": settings},
                         differences, intervals, None, first, caption)
