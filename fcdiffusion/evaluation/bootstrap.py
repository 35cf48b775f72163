"""95% percentile-bootstrap intervals over images (Efron & Tibshirani 1993, "An Introduction to the Bootstrap",
ch. 13): resample the images with replacement, recompute the figure, and take the 2.5th and 97.5th percentiles
(numpy's linear interpolation) of the recomputed figures.

Per-image metrics use `RESAMPLES` resamples of their mean; set-level figures that are recomputed from features
per resample (FID, KID) use `SET_LEVEL_RESAMPLES`. Both draw from `numpy.random.default_rng(SEED)`, so a run's
intervals are reproducible. A paired comparison resamples the images two runs share (matched by name) with the
same indices for both runs and takes the interval of the difference.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 10_000
SET_LEVEL_RESAMPLES = 1_000
SEED = 0
LEVEL = 0.95


def settings(resamples: int = RESAMPLES, set_level_resamples: int = SET_LEVEL_RESAMPLES, seed: int = SEED,
             level: float = LEVEL) -> dict[str, object]:
    """How the intervals were drawn, for an output's settings."""
    return {"method": "percentile bootstrap over images", "resamples": resamples,
            "set_level_resamples": set_level_resamples, "seed": seed, "level": level}


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) indices into n images, drawn with replacement."""
    if n < 1:
        raise ValueError("a bootstrap needs at least one image")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(statistics: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of the resampled statistics."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(np.asarray(statistics, dtype=np.float64), [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> tuple[float, float]:
    """Interval of the mean of per-image values (NaNs, images a metric is undefined for, left out first)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return percentile_interval(values[resample_indices(len(values), resamples, seed)].mean(1), level)


def statistic_interval(n: int, statistic: Callable[[np.ndarray], float], resamples: int = SET_LEVEL_RESAMPLES,
                       seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Interval of a set-level `statistic(indices)` of n images, recomputed on each resample of their indices."""
    return percentile_interval([statistic(idx) for idx in resample_indices(n, resamples, seed)], level)


def paired_difference(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                      level: float = LEVEL) -> tuple[float, float, float]:
    """(mean of b - a, interval) over images matched pairwise (pairs with a NaN on either side left out)."""
    difference = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    difference = difference[~np.isnan(difference)]
    return (float(difference.mean()),
            *percentile_interval(difference[resample_indices(len(difference), resamples, seed)].mean(1), level))
