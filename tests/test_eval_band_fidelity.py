"""Frequency-band fidelity against an independent scipy computation, and its defining properties."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from scipy.fft import dctn

from fcdiffusion.core.band_fidelity import (
    band_retrieval,
    band_scores,
    band_similarity,
    latent_band_scores,
    pixel_thresholds,
)
from fcdiffusion.core.frequency import CONTROL_MODES, band_limits, band_mask, dct_2d, filter_dct, idct_2d
from tests.helpers import teacher_paths

THRESHOLDS = {"mini_threshold": 2, "low_threshold": 7, "mid_low": 5, "mid_high": 10, "high_threshold": 12}


def photos(size: int = 16) -> torch.Tensor:
    """Two real photo crops as (2, 3, size, size) in [-1, 1]."""
    crops = [getattr(skimage.data, name)()[100:100 + size, 120:120 + size] for name in ("astronaut", "coffee")]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).double() / 127.5 - 1


def scipy_scores(source: np.ndarray, output: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The module docstring's definition, written independently with scipy's orthonormal DCT."""
    s, y = dctn(source, axes=(-2, -1), norm="ortho"), dctn(output, axes=(-2, -1), norm="ortho")
    h, w = s.shape[-2:]
    level = np.add.outer(np.arange(h), np.arange(w))
    low, high = band_limits(mode, **THRESHOLDS)
    inside = (level >= low) & (level <= (h + w if high is None else high))
    if mode == "mini_pass":
        levels = range(low, min(high, h + w - 2) + 1)
        e_s = np.stack([(s[..., level == n] ** 2).sum((1, 2)) for n in levels], 1)
        e_y = np.stack([(y[..., level == n] ** 2).sum((1, 2)) for n in levels], 1)
        error = ((np.sqrt(e_y) - np.sqrt(e_s)) ** 2).sum(1) / e_s.sum(1)
    else:
        error = ((y - s) ** 2 * inside).sum((1, 2, 3)) / (s ** 2 * inside).sum((1, 2, 3))
    freedom = ((y - s) ** 2 * ~inside).sum((1, 2, 3)) / (s ** 2 * ~inside).sum((1, 2, 3))
    return error, freedom


@pytest.mark.parametrize("mode", CONTROL_MODES)
def test_band_scores_match_scipy(mode):
    source = photos()
    output = source + 0.3 * torch.randn(source.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    error, freedom = band_scores(source, output, mode, **THRESHOLDS)
    expected_error, expected_freedom = scipy_scores(source.numpy(), output.numpy(), mode)
    np.testing.assert_allclose(error.numpy(), expected_error, rtol=1e-5)
    np.testing.assert_allclose(freedom.numpy(), expected_freedom, rtol=1e-5)


@pytest.mark.parametrize("mode", CONTROL_MODES)
def test_a_kept_band_scores_zero_error_and_free_elsewhere(mode):
    source = photos()
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outside_only = noise - band_part(noise, mode)
    error, freedom = band_scores(source, source + outside_only, mode, **THRESHOLDS)
    assert error.max() < 1e-10 and (freedom > 1e-3).all()
    error, _ = band_scores(source, source + band_part(noise, mode), mode, **THRESHOLDS)
    assert (error > 1e-3).all()
    error, freedom = band_scores(source, source, mode, **THRESHOLDS)
    assert not error.any() and not freedom.any()


def band_part(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The part of `x` in `mode`'s band (no shuffle)."""
    low, high = band_limits(mode, **THRESHOLDS)
    return idct_2d(dct_2d(x) * band_mask(*x.shape[-2:], low, high))


def test_mini_pass_compares_energies_so_its_shuffle_keeps_fidelity():
    source = photos()
    shuffled = idct_2d(filter_dct(dct_2d(source), "mini_pass", torch.Generator().manual_seed(3), **THRESHOLDS))
    kept = shuffled + (source - band_part(source, "mini_pass"))  # the band shuffled, the rest as it was
    assert not torch.allclose(kept, source)
    error, freedom = band_scores(source, kept, "mini_pass", **THRESHOLDS)
    assert error.max() < 1e-10 and freedom.max() < 1e-10
    error, _ = band_scores(source, kept, "low_pass", **THRESHOLDS)  # coefficient-wise, the shuffle shows
    assert (error > 1e-5).all()


def test_pixel_thresholds_scale_with_the_image_and_latent_scores_use_the_model(workdir):
    assert pixel_thresholds(THRESHOLDS, 128, 16) == {k: 8 * v for k, v in THRESHOLDS.items()}
    from fcdiffusion.core.weights import load_teacher

    teacher = load_teacher(teacher_paths(workdir / "logs")["low_pass"]).eval()
    images = photos(128).float()
    error, freedom = latent_band_scores(teacher, images, images, "low_pass")
    assert error.shape == (2,) and not error.any() and not freedom.any()
    error, freedom = latent_band_scores(teacher, images, images.flip(0), "low_pass")
    assert (error > 0).all() and (freedom > 0).all()


@pytest.mark.parametrize("mode", ["low_pass", "mid_pass", "high_pass"])
def test_band_retrieval_finds_the_source_whose_band_was_kept(mode):
    generator = torch.Generator().manual_seed(2)
    sources = torch.randn(5, 4, 16, 16, generator=generator, dtype=torch.float64)
    noise = torch.randn(sources.shape, generator=generator, dtype=torch.float64)
    kept = band_part(sources, mode) + (noise - band_part(noise, mode))  # own band, anything elsewhere
    assert band_retrieval(sources, kept, mode, **THRESHOLDS).all()
    swapped = kept.roll(1, dims=0)  # result i keeps source i-1's band
    assert not band_retrieval(sources, swapped, mode, **THRESHOLDS).any()
    with pytest.raises(ValueError, match="differ in shape"):
        band_retrieval(sources, kept[:3], mode, **THRESHOLDS)


def scipy_similarity(sources: np.ndarray, outputs: np.ndarray, mode: str) -> np.ndarray:
    """The module docstring's band cosine, written independently with scipy's DCT: (N_outputs, N_sources)."""
    def vectors(x: np.ndarray) -> np.ndarray:
        spectrum = dctn(x, axes=(-2, -1), norm="ortho")
        h, w = spectrum.shape[-2:]
        level = np.add.outer(np.arange(h), np.arange(w))
        low, high = band_limits(mode, **THRESHOLDS)
        high = h + w - 2 if high is None else min(high, h + w - 2)
        if mode == "mini_pass":
            return np.stack([np.sqrt((spectrum[..., level == n] ** 2).sum((1, 2))) for n in range(low, high + 1)], 1)
        return spectrum[..., (level >= low) & (level <= high)].reshape(len(x), -1)

    s, y = vectors(sources), vectors(outputs)
    return (y @ s.T) / np.outer(np.linalg.norm(y, axis=1), np.linalg.norm(s, axis=1))


@pytest.mark.parametrize("mode", CONTROL_MODES)
def test_band_similarity_matches_scipy(mode):
    generator = torch.Generator().manual_seed(4)
    sources = torch.randn(4, 3, 16, 16, generator=generator, dtype=torch.float64)
    outputs = torch.randn(3, 3, 16, 16, generator=generator, dtype=torch.float64)
    expected = scipy_similarity(sources.numpy(), outputs.numpy(), mode)
    np.testing.assert_allclose(band_similarity(sources, outputs, mode, **THRESHOLDS).numpy(), expected, rtol=1e-10)
    # Scale-free: neither a louder output nor a louder source changes a similarity.
    np.testing.assert_allclose(band_similarity(7 * sources, 0.1 * outputs, mode, **THRESHOLDS).numpy(), expected,
                               rtol=1e-10)


@pytest.mark.parametrize("mode", ["low_pass", "mid_pass", "high_pass"])
def test_retrieval_finds_a_weak_band_source_that_band_error_misses(mode):
    """Source 0's band has a tenth of the others' amplitude; every result keeps its own source's band under in-band
    noise of 0.15 times the strong bands' norm (more than the weak band itself). Retrieval by smallest band_error
    (the old definition, written out here) sends result 0 to a loud candidate, whose large band energy divides the
    error; the cosine (0.55 with its own source, at most 0.2 with another) retrieves every result."""
    generator = torch.Generator().manual_seed(5)
    sources = torch.randn(6, 4, 16, 16, generator=generator, dtype=torch.float64)
    sources[0] = band_part(sources[0:1], mode)[0] * 0.1 + (sources[0] - band_part(sources[0:1], mode)[0])
    noise = band_part(torch.randn(sources.shape, generator=generator, dtype=torch.float64), mode)
    noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    strong = band_part(sources[1:], mode).flatten(1).norm(dim=1).mean()
    results = sources + 0.15 * strong * noise  # each keeps its own band, plus in-band noise

    errors = torch.stack([band_scores(sources[j].expand_as(results), results, mode, **THRESHOLDS)[0]
                          for j in range(len(sources))], dim=1)
    old_hits = errors.argmin(1) == torch.arange(len(sources))
    assert not old_hits[0] and old_hits[1:].all()
    assert band_retrieval(sources, results, mode, **THRESHOLDS).all()
