"""Frequency control signals: orthonormal 2-D DCT of a latent, band filtering on i + j, inverse DCT.

FCDiffusion filters the DCT spectrum of the 4x64x64 SD latent by the index sum i + j of each
coefficient (row i, column j; 0..126 on a 64x64 latent) and feeds the inverse transform to the
control net. Each mode keeps an inclusive band of anti-diagonals; the band edges are keyword
arguments so configs can override them (a YAML dict passed as ``**thresholds``):

==================  =======  ====================================================
keyword             default  meaning
==================  =======  ====================================================
``mini_threshold``  10       ``mini_pass`` keeps i + j <= mini_threshold, shuffled
``low_threshold``   30       ``low_pass`` keeps i + j <= low_threshold
``mid_low``         20       ``mid_pass`` keeps mid_low <= i + j ...
``mid_high``        40       ... <= mid_high
``high_threshold``  50       ``high_pass`` keeps i + j >= high_threshold
==================  =======  ====================================================

All five keywords are accepted for every mode (a config can carry them all); an unknown name or a
non-integer value raises TypeError, a negative one ValueError, and so does a band that keeps no coefficient
of the latent (past i + j = H + W - 2: an all-zero control is never what a config means). The DCT is two
matrix products with cached basis matrices; band masks and the anti-diagonal ordering the shuffle needs are
cached too, so a training step does no host-to-device copies (except mini_pass driven by a CPU generator on a
GPU latent, which copies one H*W index vector so that the result depends only on the seed).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache

import torch


class ControlMode(StrEnum):
    """The four control modes, each a DCT band and a task. `ControlMode(text)` is the one check of a mode name
    (configs, flags, weight files): an unknown one raises a ValueError listing the valid ones. Members are strings,
    so they compare, hash and print as their names."""

    MINI_PASS = "mini_pass"  # style-guided content creation
    LOW_PASS = "low_pass"  # semantic manipulation
    MID_PASS = "mid_pass"  # scene translation
    HIGH_PASS = "high_pass"  # style translation

    def __repr__(self) -> str:
        return repr(self.value)  # messages quote a mode as the text that names it: 'low_pass'

    @classmethod
    def _missing_(cls, value: object) -> ControlMode:
        raise ValueError(f"unknown control_mode {value!r}; valid modes: {', '.join(cls)}")


CONTROL_MODES: tuple[ControlMode, ...] = tuple(ControlMode)
DEFAULT_THRESHOLDS = {"mini_threshold": 10, "low_threshold": 30, "mid_low": 20, "mid_high": 40, "high_threshold": 50}


@lru_cache(maxsize=64)
def _dct_matrix_cached(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built outside inference mode so a first call under torch.inference_mode() still yields a
    # tensor that autograd may save for backward in a later training step.
    with torch.inference_mode(False):
        k = torch.arange(n, dtype=torch.float64)[:, None]
        m = torch.arange(n, dtype=torch.float64)[None, :]
        basis = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        basis[0] /= math.sqrt(2.0)
        return basis.to(device=device, dtype=dtype)


def dct_matrix(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (n x n), C @ x transforms a column; cached per (n, device, dtype)."""
    if n < 1:
        raise ValueError(f"DCT size must be positive, got {n}")
    return _dct_matrix_cached(int(n), torch.device(device or "cpu"), dtype)


def clear_caches() -> None:
    """Forget every cached basis, mask and ordering: they are tensors of the mode they were made in, so work on
    fake tensors (`fcdiffusion.apps.tensor_memory.fake_tensors`) must neither use nor leave real or fake ones."""
    for cached in (_dct_matrix_cached, _index_sum_cached, _band_mask_cached, _level_order_cached):
        cached.cache_clear()


def _check_float(x: torch.Tensor) -> None:
    if x.dim() < 2 or not x.is_floating_point():
        raise TypeError(f"expected a floating tensor with >= 2 dims, got {x.dtype} of shape {tuple(x.shape)}")


def dct_2d(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dims (scipy's ``dctn(..., norm='ortho')``)."""
    _check_float(x)
    h, w = x.shape[-2:]
    return dct_matrix(h, x.device, x.dtype) @ x @ dct_matrix(w, x.device, x.dtype).T


def idct_2d(X: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct_2d` (orthonormal DCT-III), so ``idct_2d(dct_2d(x)) == x``."""
    _check_float(X)
    h, w = X.shape[-2:]
    return dct_matrix(h, X.device, X.dtype).T @ X @ dct_matrix(w, X.device, X.dtype)


@lru_cache(maxsize=64)
def _index_sum_cached(h: int, w: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return (torch.arange(h)[:, None] + torch.arange(w)[None, :]).to(device)


def index_sum(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The (h, w) int64 grid of i + j, the anti-diagonal (frequency level) of each coefficient."""
    return _index_sum_cached(int(h), int(w), torch.device(device or "cpu"))


@lru_cache(maxsize=256)
def _band_mask_cached(h: int, w: int, low: int, high: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        level = index_sum(h, w, device)
        return (level >= low) & (level <= high)


def band_mask(
    h: int, w: int, low: int = 0, high: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean (h, w) mask of coefficients with ``low <= i + j <= high`` (inclusive; None = no upper edge)."""
    high = h + w - 2 if high is None else high
    return _band_mask_cached(int(h), int(w), int(low), int(high), torch.device(device or "cpu"))


def band_limits(mode: str, **thresholds: int) -> tuple[int, int | None]:
    """Inclusive (low, high) band on i + j kept by `mode`; high is None for an open upper edge.

    Raises ValueError for an unknown mode, TypeError for an unknown or non-integer threshold keyword.
    """
    mode = ControlMode(mode)
    unknown = sorted(set(thresholds) - set(DEFAULT_THRESHOLDS))
    if unknown:
        raise TypeError(f"unknown threshold keyword(s) {unknown}; valid: {sorted(DEFAULT_THRESHOLDS)}")
    t = dict(DEFAULT_THRESHOLDS)
    for name, value in thresholds.items():
        if isinstance(value, bool):
            raise TypeError(f"threshold {name} must be an integer, got {value!r}")
        t[name] = operator.index(value)
        if t[name] < 0:
            raise ValueError(f"threshold {name} must be >= 0, got {value}")
    if mode == ControlMode.MINI_PASS:
        return 0, t["mini_threshold"]
    if mode == ControlMode.LOW_PASS:
        return 0, t["low_threshold"]
    if mode == ControlMode.HIGH_PASS:
        return t["high_threshold"], None
    if t["mid_low"] > t["mid_high"]:
        raise ValueError(f"mid_low ({t['mid_low']}) must not exceed mid_high ({t['mid_high']})")
    return t["mid_low"], t["mid_high"]


def scale_thresholds(thresholds: Mapping[str, int] | None, size: int, reference_size: int = 64) -> dict[str, int]:
    """Band edges set for a `reference_size` latent (SD's 64x64), scaled to a `size` x `size` one.

    The rule of the tiny configs (16x16 latents): each edge times size / reference_size, rounded down.
    """
    edges = {**DEFAULT_THRESHOLDS, **dict(thresholds or {})}
    return {name: value * size // reference_size for name, value in edges.items()}


# The keyword setting the lower edge of the bands that can miss a latent (low_pass and mini_pass start at 0).
LOWER_EDGE = {"mid_pass": "mid_low", "high_pass": "high_threshold"}


def check_band(mode: str, h: int, w: int, **thresholds: int) -> tuple[int, int | None]:
    """`band_limits` of `mode`, or a ValueError naming the mode, the band and the size if the band keeps no
    coefficient of an h x w latent (whose i + j runs from 0 to h + w - 2)."""
    low, high = band_limits(mode, **thresholds)
    top = h + w - 2
    if low > top:
        band = f"i + j >= {low}" if high is None else f"{low} <= i + j <= {high}"
        raise ValueError(f"control mode {mode!r} keeps the DCT band {band}, which is empty on a {h}x{w} latent "
                         f"(i + j <= {top} there): lower {LOWER_EDGE[mode]} to at most {top} for this size")
    return low, high


@lru_cache(maxsize=64)
def _level_order_cached(h: int, w: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.argsort(index_sum(h, w, device).flatten(), stable=True)


def shuffle_index(
    h: int, w: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Flat gather index over h*w that permutes coefficients randomly within every anti-diagonal.

    ``X.flatten(-2)[..., idx]`` moves into each position a coefficient drawn from the same
    anti-diagonal i + j = n, one uniform permutation per anti-diagonal. Random keys are drawn on the
    generator's device (or `device` without one), so a seeded generator reproduces the index whatever
    device the latent is on.
    """
    device = torch.device(device or "cpu")
    draw_device = generator.device if generator is not None else device
    keys = torch.rand(h * w, generator=generator, device=draw_device, dtype=torch.float64)
    by_key = torch.argsort(keys)
    # Stable sort by level of the key-shuffled positions: grouped by anti-diagonal, random within it.
    shuffled = by_key[torch.argsort(index_sum(h, w, draw_device).flatten()[by_key], stable=True)]
    shuffled = shuffled.to(device)
    index = torch.empty_like(shuffled)
    index[_level_order_cached(h, w, device)] = shuffled
    return index


def filter_dct(
    X: torch.Tensor, mode: str, generator: torch.Generator | None = None, **thresholds: int
) -> torch.Tensor:
    """Apply `mode`'s band (and the mini_pass shuffle) to a DCT spectrum over its last two dims.

    A band that keeps none of the spectrum's coefficients raises ValueError (`check_band`).
    """
    h, w = X.shape[-2:]
    low, high = check_band(mode, h, w, **thresholds)
    if mode == ControlMode.MINI_PASS:
        X = X.flatten(-2)[..., shuffle_index(h, w, generator, X.device)].unflatten(-1, (h, w))
    return torch.where(band_mask(h, w, low, high, X.device), X, 0.0)


def frequency_control(
    z: torch.Tensor, mode: str, generator: torch.Generator | None = None, **thresholds: int
) -> torch.Tensor:
    """Control signal ``idct_2d(filter_dct(dct_2d(z)))`` for one of :data:`CONTROL_MODES`.

    `z` is (..., H, W), typically the (B, 4, 64, 64) SD latent; `generator` only affects mini_pass,
    whose shuffle is shared across batch and channels. Threshold keywords: see the module docstring.
    """
    return idct_2d(filter_dct(dct_2d(z), mode, generator, **thresholds))
