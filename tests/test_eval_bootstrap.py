"""Percentile-bootstrap intervals against scipy.stats.bootstrap (its own resampling, so they agree to Monte Carlo
error: a few hundredths of the interval's width at 10,000 resamples)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap as scipy_bootstrap

from fcdiffusion.evaluation import bootstrap


def assert_close_intervals(ours: tuple[float, float], theirs, tolerance: float = 0.04) -> None:
    width = theirs.high - theirs.low
    assert ours[0] == pytest.approx(theirs.low, abs=tolerance * width)
    assert ours[1] == pytest.approx(theirs.high, abs=tolerance * width)


def test_mean_interval_matches_scipy():
    values = np.random.default_rng(0).gamma(2.0, size=60)  # skewed: the percentile interval is not symmetric
    ours = bootstrap.mean_interval(values)
    theirs = scipy_bootstrap((values,), np.mean, method="percentile", n_resamples=10_000, confidence_level=0.95,
                             random_state=np.random.default_rng(1)).confidence_interval
    assert_close_intervals(ours, theirs)
    assert ours[0] < values.mean() < ours[1]
    assert bootstrap.mean_interval(values) == ours  # a fixed seed: the same interval every run
    assert bootstrap.mean_interval(values, seed=1) != ours


def test_paired_difference_matches_scipys_paired_bootstrap():
    rng = np.random.default_rng(2)
    a = rng.normal(size=40)
    b = a + 0.3 + 0.2 * rng.normal(size=40)  # strongly paired: the paired interval is far narrower than unpaired
    mean, low, high = bootstrap.paired_difference(a, b)
    assert mean == pytest.approx(np.mean(b - a))
    theirs = scipy_bootstrap((a, b), lambda x, y: np.mean(y - x), paired=True, method="percentile",
                             n_resamples=10_000, random_state=np.random.default_rng(3)).confidence_interval
    assert_close_intervals((low, high), theirs)
    unpaired = np.subtract(bootstrap.mean_interval(b), bootstrap.mean_interval(a)[::-1])
    assert high - low < 0.5 * (unpaired[1] - unpaired[0]) and low > 0


def test_undefined_values_are_left_out_and_set_level_statistics_resample_indices():
    values = np.array([1.0, np.nan, 3.0, 2.0, np.nan, 5.0])
    assert bootstrap.mean_interval(values, 2000) == bootstrap.mean_interval(values[~np.isnan(values)], 2000)
    defined = values[~np.isnan(values)]
    assert bootstrap.statistic_interval(len(defined), lambda idx: defined[idx].mean(), 2000) == \
        bootstrap.mean_interval(defined, 2000)
    mean, low, high = bootstrap.paired_difference([1.0, 2.0, np.nan], [2.0, np.nan, 4.0])
    assert mean == low == high == 1.0  # one pair left
    with pytest.raises(ValueError, match="at least one image"):
        bootstrap.mean_interval([np.nan])
