"""What every evaluation writes: the means per group (a control mode, an edit type) with their bootstrap intervals,
as `metrics.json`, a Markdown table and a bar plot with error bars."""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcdiffusion.core.errors import OutputError
from fcdiffusion.evaluation import bootstrap
from ldm.util import atomic_path, atomic_write_text

Intervals = dict[str, dict[str, list[float]]]  # group -> metric -> [low, high]
LABELS = ("name", "mode", "editing_type", "editing_type_id")  # record fields that are not metrics


def as_float(value: Any) -> float:
    """A record's value as a float; None (a metric undefined for the image) as NaN."""
    return math.nan if value is None else float(value)


def summarize(records: Sequence[Mapping[str, Any]], groups: Callable[[Mapping[str, Any]], Iterable[str]],
              resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED,
              level: float = bootstrap.LEVEL) -> tuple[dict[str, dict[str, float]], Intervals]:
    """Per group (`groups(record)` names the groups a record belongs to) and metric: the mean over the images it is
    defined for, and its percentile-bootstrap interval."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for group in groups(record):
            for key, value in record.items():
                if key not in LABELS:
                    values[group][key].append(as_float(value))
    means: dict[str, dict[str, float]] = {}
    intervals: Intervals = {}
    for group, metrics in values.items():
        defined = {k: np.asarray(v)[~np.isnan(v)] for k, v in metrics.items()}
        defined = {k: v for k, v in defined.items() if len(v)}
        means[group] = {k: float(v.mean()) for k, v in defined.items()}
        intervals[group] = {k: list(bootstrap.mean_interval(v, resamples, seed, level)) for k, v in defined.items()}
    return means, intervals


def _cell(value: float, interval: Sequence[float] | None) -> str:
    return f"{value:.4g}" + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval is not None else "")


def markdown_table(per_group: Mapping[str, Mapping[str, float]], intervals: Intervals | None = None,
                   labels: Mapping[str, str] | None = None, first: str = "mode", caption: str = "") -> str:
    """The means per group as a Markdown table, a column per metric (headed by `labels` where given), each cell
    `mean [low, high]` where an interval is known; `caption` below it."""
    labels, intervals = labels or {}, intervals or {}
    columns = list(dict.fromkeys(k for figures in per_group.values() for k in figures))
    lines = [f"| {first} | " + " | ".join(labels.get(c, c) for c in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for group, figures in per_group.items():
        cells = [_cell(figures[c], intervals.get(group, {}).get(c)) if c in figures else "" for c in columns]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + (f"\n{caption}\n" if caption else "")


def plot(per_group: Mapping[str, Mapping[str, float]], intervals: Intervals | None, path: str | os.PathLike,
         labels: Mapping[str, str] | None = None) -> None:
    """One bar chart per metric, groups side by side, the intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, intervals = labels or {}, intervals or {}
    columns = list(dict.fromkeys(k for figures in per_group.values() for k in figures))
    fig, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 3.0), squeeze=False)
    for ax, column in zip(axes[0], columns):
        groups = [g for g in per_group if column in per_group[g]]
        means = np.array([per_group[g][column] for g in groups])
        bounds = np.array([intervals.get(g, {}).get(column, [m, m]) for g, m in zip(groups, means)]).reshape(-1, 2)
        errors = np.stack([means - bounds[:, 0], bounds[:, 1] - means]).clip(min=0)
        ax.bar(range(len(groups)), means, yerr=errors, capsize=3, color="tab:blue", ecolor="black")
        ax.set_xticks(range(len(groups)), [g.replace("_pass", "") for g in groups], rotation=45, ha="right",
                      fontsize=7)
        ax.set_title(labels.get(column, column), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_outputs(out: str | os.PathLike, content: Mapping[str, Any], per_group: Mapping[str, Mapping[str, float]],
                  intervals: Intervals, labels: Mapping[str, str] | None = None, first: str = "mode",
                  caption: str = "", extra: Mapping[str, Callable[[Path], None]] | None = None) -> str:
    """`out` (JSON of `content`), the Markdown table (returned) and the plot beside it (`.md`, `.png`), and each of
    `extra` (file name -> writer of that path) beside them, every file atomically.

    The work behind them is never lost to a failed write (a full disk, a file system gone read-only): they are
    written to a new temporary folder instead and an `OutputError` says where.
    """
    table = markdown_table(per_group, intervals, labels, first, caption)
    try:
        _write_all(Path(out), content, table, per_group, intervals, labels, extra or {})
    except OSError as error:
        problem = f"could not write {error.filename2 or error.filename or out}: {error.strerror or error}"
        fallback = Path(tempfile.mkdtemp(prefix="fcdiffusion-results-")) / Path(out).name
        try:
            _write_all(fallback, content, table, per_group, intervals, labels, extra or {})
        except OSError as second:
            raise OutputError(f"{problem}; nor could a copy be written to {fallback.parent} "
                              f"({second.strerror or second}): the results are lost") from error
        raise OutputError(f"{problem}; the results were written to {fallback} instead (with its table and plot "
                          "beside it)") from error
    return table


def _write_all(out: Path, content: Mapping[str, Any], table: str, per_group: Mapping[str, Mapping[str, float]],
               intervals: Intervals, labels: Mapping[str, str] | None,
               extra: Mapping[str, Callable[[Path], None]]) -> None:
    for name, write in extra.items():
        write(out.with_name(name))
    atomic_write_text(out, json.dumps(content, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), table)
    if per_group:
        plot(per_group, intervals, out.with_suffix(".png"), labels)


def interval_caption(settings: Mapping[str, Any], set_level: bool = True) -> str:
    """How the bracketed intervals were drawn (`set_level`: FID/KID's resamples too), for a table's caption."""
    resamples = f"{settings['resamples']} resamples" + (
        f", {settings['set_level_resamples']} for FID/KID" if set_level else "")
    return f"[low, high]: {100 * settings['level']:g}% {settings['method']} ({resamples}; seed {settings['seed']})."
