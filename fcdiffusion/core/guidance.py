"""The classifier-free guidance scale w (`guidance_scale`) and the range a guidance-conditioned student takes it in
(`guidance_range`): the one place that says which values are valid, for models, the distiller and scripts alike."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def check_guidance_range(valid_range: Sequence[float]) -> list[float]:
    """`valid_range` as [lo, hi] floats, if 0 <= lo <= hi; else a ValueError."""
    bounds = [float(v) for v in valid_range]
    if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1]:
        raise ValueError(f"guidance_range must be [lo, hi] with 0 <= lo <= hi, got {list(valid_range)}")
    return bounds


def check_guidance_scale(value: float, valid_range: Sequence[float] | None = None) -> float:
    """`value` as a float, if it is a guidance scale (finite, >= 0; 1 is no guidance) within `valid_range` [lo, hi]
    when one is given (a guidance-conditioned student's `guidance_range`); else a ValueError saying why."""
    if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1: no guidance), got {value!r}")
    if valid_range is not None:
        low, high = check_guidance_range(valid_range)
        if not low <= value <= high:
            raise ValueError(f"guidance_scale={value:g} is outside the range [{low:g}, {high:g}] of guidance scales "
                             "the guidance-conditioned student is distilled on (its guidance_range)")
    return float(value)
