"""Loss curves of training runs, read from the CSV files Lightning's CSVLogger writes, as one figure.

Each run logs `<logdir>/<run name>/version_<n>/metrics.csv`; a resumed run adds a version. `read_losses` joins
a run's versions by step (the latest version wins where they overlap) and `plot_losses` draws one panel per run.
"""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ldm.util import atomic_path


def read_losses(run_dir: str | os.PathLike, key: str = "train/loss") -> dict[int, float]:
    """step -> `key` over every `version_*/metrics.csv` under `run_dir` (empty if there is none)."""
    versions = sorted(Path(run_dir).glob("version_*/metrics.csv"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    losses: dict[int, float] = {}
    for path in versions:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get(key) not in (None, ""):
                    losses[int(row["step"])] = float(row[key])
    return dict(sorted(losses.items()))


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(runs: Mapping[str, Mapping[int, float]], path: str | os.PathLike, window: int = 10) -> None:
    """One panel per run: its loss per step (light) and a `window`-step moving average (dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: losses for name, losses in runs.items() if losses}
    if not runs:
        raise ValueError("no losses to plot: no run logged any")
    fig, axes = plt.subplots(1, len(runs), figsize=(2.8 * len(runs), 2.6), squeeze=False)
    for ax, (name, losses) in zip(axes[0], runs.items()):
        steps, values = list(losses), list(losses.values())
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
        ax.plot(steps, smooth(values, window), color="tab:blue", linewidth=1.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("training loss", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
