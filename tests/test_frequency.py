"""DCT and frequency-control checks, with scipy as the transform oracle and skimage photos as data."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.fft
import skimage.data
import torch

from fcdiffusion.core.frequency import (
    CONTROL_MODES,
    band_mask,
    check_band,
    dct_2d,
    dct_matrix,
    filter_dct,
    frequency_control,
    idct_2d,
    scale_thresholds,
    shuffle_index,
)


def photo_batch(batch: int, height: int, width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(batch, 3, height, width) zero-mean crops of the astronaut photo at different offsets."""
    image = skimage.data.astronaut().astype(np.float64) / 255.0
    crops = [image[37 * b : 37 * b + height, 53 * b : 53 * b + width].transpose(2, 0, 1) for b in range(batch)]
    x = torch.from_numpy(np.stack(crops)).to(dtype)
    return x - x.mean(dim=(-2, -1), keepdim=True)


def latent_like() -> torch.Tensor:
    """(2, 3, 64, 64): the photo downsampled 4x, the scale of a 512 px image's SD latent."""
    image = skimage.data.astronaut().astype(np.float64) / 127.5 - 1.0
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    x = torch.nn.functional.avg_pool2d(x, 4)  # 128 x 128
    return torch.cat([x[..., :64, :64], x[..., 64:, 32:96]])


def level_grid(h: int, w: int) -> np.ndarray:
    return np.add.outer(np.arange(h), np.arange(w))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dct_and_inverse_match_scipy_on_non_square(dtype: torch.dtype, tol: float) -> None:
    x = photo_batch(2, 13, 21, dtype)
    X = dct_2d(x)
    assert X.dtype == dtype and X.shape == x.shape
    expected = scipy.fft.dctn(x.double().numpy(), axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(X.double().numpy(), expected, atol=tol, rtol=0)
    back = scipy.fft.idctn(X.double().numpy(), axes=(-2, -1), norm="ortho")
    np.testing.assert_allclose(idct_2d(X).double().numpy(), back, atol=tol, rtol=0)


def test_round_trip_and_parseval() -> None:
    x = photo_batch(2, 13, 21)
    X = dct_2d(x)
    torch.testing.assert_close(idct_2d(X), x, atol=1e-12, rtol=0)
    torch.testing.assert_close(X.square().sum(dim=(-2, -1)), x.square().sum(dim=(-2, -1)), atol=1e-10, rtol=1e-12)
    assert not torch.allclose(X, x)  # a real transform, not the identity


@pytest.mark.parametrize(
    "mode, keep",
    [
        ("low_pass", lambda s: s <= 30),
        ("mid_pass", lambda s: (s >= 20) & (s <= 40)),
        ("high_pass", lambda s: s >= 50),
    ],
)
def test_band_modes_keep_exactly_their_band(mode: str, keep) -> None:
    z = latent_like()
    inside = torch.from_numpy(keep(level_grid(64, 64)))
    out = frequency_control(z, mode)
    assert out.shape == z.shape and out.dtype == z.dtype
    original, filtered = dct_2d(z), dct_2d(out)
    torch.testing.assert_close(filtered[..., inside], original[..., inside], atol=1e-12, rtol=0)
    assert filtered[..., ~inside].abs().max() < 1e-12
    assert original[..., ~inside].abs().max() > 1e-3  # the filter removed something real
    torch.testing.assert_close(band_mask(64, 64, *{"low_pass": (0, 30), "mid_pass": (20, 40),
                                                   "high_pass": (50, None)}[mode]), inside)


def assert_shuffled_within_diagonals(original: torch.Tensor, shuffled: torch.Tensor, max_level: int) -> None:
    """Out-of-band is zero; every in-band anti-diagonal holds the original's values, per channel."""
    levels = torch.from_numpy(level_grid(*original.shape[-2:]))
    assert shuffled[..., levels > max_level].abs().max() < 1e-12
    for n in range(max_level + 1):
        on_diagonal = levels == n
        want = original[..., on_diagonal].sort(dim=-1).values
        got = shuffled[..., on_diagonal].sort(dim=-1).values
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_mini_pass_permutes_within_anti_diagonals() -> None:
    z = latent_like()
    out = frequency_control(z, "mini_pass", generator=torch.Generator().manual_seed(0))
    original, shuffled = dct_2d(z), dct_2d(out)
    assert_shuffled_within_diagonals(original, shuffled, 10)
    assert not torch.allclose(shuffled[..., :11, :11], original[..., :11, :11])  # actually shuffled


def test_mini_pass_on_clipped_diagonals_of_a_non_square_input() -> None:
    z = photo_batch(2, 13, 21)
    out = frequency_control(z, "mini_pass", generator=torch.Generator().manual_seed(3), mini_threshold=25)
    assert_shuffled_within_diagonals(dct_2d(z), dct_2d(out), 25)


def test_mini_pass_shares_one_permutation_over_batch_and_channels() -> None:
    z = latent_like()[:1]
    stacked = torch.cat([z, 2.0 * z, z.flip(1)])  # same spectrum layout, scaled and channel-swapped
    out = frequency_control(stacked, "mini_pass", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[1], 2.0 * out[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[2], out[0].flip(0), atol=1e-12, rtol=0)


def test_mini_pass_is_reproducible_per_seed() -> None:
    z = latent_like()
    run = lambda seed: frequency_control(z, "mini_pass", generator=torch.Generator().manual_seed(seed))  # noqa: E731
    torch.testing.assert_close(run(7), run(7), atol=0, rtol=0)
    assert not torch.allclose(run(7), run(8))


def test_shuffle_index_draws_every_permutation_of_a_diagonal() -> None:
    generator = torch.Generator().manual_seed(0)
    positions = [(0, 2), (1, 1), (2, 0)]  # anti-diagonal i + j = 2 of an 8 x 8 grid
    flat = [i * 8 + j for i, j in positions]
    seen = {tuple(shuffle_index(8, 8, generator)[flat].tolist()) for _ in range(200)}
    assert seen == set(itertools.permutations(flat))


def test_custom_thresholds() -> None:
    z = latent_like()
    levels = torch.from_numpy(level_grid(64, 64))
    cases = [
        ("low_pass", {"low_threshold": 5}, levels <= 5),
        ("mid_pass", {"mid_low": 3, "mid_high": 7}, (levels >= 3) & (levels <= 7)),
        ("high_pass", {"high_threshold": 100}, levels >= 100),
        ("mini_pass", {"mini_threshold": 0}, levels == 0),
    ]
    for mode, thresholds, inside in cases:
        X = dct_2d(z)
        kept = filter_dct(X, mode, **thresholds)
        torch.testing.assert_close(kept, torch.where(inside, X, 0.0), atol=0, rtol=0)
    # A full threshold dict is accepted by every mode; only the mode's own entries matter.
    everything = {"mini_threshold": 4, "low_threshold": 5, "mid_low": 1, "mid_high": 2, "high_threshold": 9}
    torch.testing.assert_close(filter_dct(X, "low_pass", **everything), torch.where(levels <= 5, X, 0.0))


def test_bad_mode_names_all_valid_modes() -> None:
    with pytest.raises(ValueError) as info:
        frequency_control(latent_like(), "band_pass")
    assert all(mode in str(info.value) for mode in CONTROL_MODES)


@pytest.mark.parametrize(
    "thresholds, error",
    [
        ({"low_treshold": 5}, TypeError),  # misspelt name
        ({"threshold": 5}, TypeError),
        ({"low_threshold": 5.5}, TypeError),
        ({"low_threshold": -1}, ValueError),
        ({"mid_low": 30, "mid_high": 20}, ValueError),
    ],
)
def test_bad_thresholds_are_rejected(thresholds: dict, error: type) -> None:
    mode = "mid_pass" if "mid_low" in thresholds else "low_pass"
    with pytest.raises(error):
        frequency_control(latent_like(), mode, **thresholds)


def test_bases_and_masks_are_cached() -> None:
    assert dct_matrix(13, "cpu", torch.float32) is dct_matrix(13, torch.device("cpu"), torch.float32)
    assert dct_matrix(13, "cpu", torch.float32) is not dct_matrix(13, "cpu", torch.float64)
    assert band_mask(64, 64, 20, 40) is band_mask(64, 64, 20, 40)
    basis = dct_matrix(21, "cpu", torch.float64)
    torch.testing.assert_close(basis @ basis.T, torch.eye(21, dtype=torch.float64), atol=1e-13, rtol=0)


def test_cached_tensors_from_inference_mode_still_support_backward() -> None:
    with torch.inference_mode():
        frequency_control(photo_batch(1, 17, 19), "mini_pass")  # first use of these sizes fills the caches
    z = photo_batch(1, 17, 19).requires_grad_()
    frequency_control(z, "mini_pass", generator=torch.Generator().manual_seed(0)).square().sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "mode, thresholds, band",
    [
        ("high_pass", {"high_threshold": 50}, "i + j >= 50"),  # the SD threshold on a tiny 16x16 latent
        ("high_pass", {"high_threshold": 31}, "i + j >= 31"),
        ("mid_pass", {"mid_low": 31, "mid_high": 40}, "31 <= i + j <= 40"),
    ],
)
def test_a_band_that_keeps_no_coefficient_is_an_error(mode: str, thresholds: dict, band: str) -> None:
    z = latent_like()[..., ::4, ::4]  # (2, 3, 16, 16)
    with pytest.raises(ValueError) as info:
        frequency_control(z, mode, **thresholds)
    assert f"control mode '{mode}' keeps the DCT band {band}, which is empty on a 16x16 latent" in str(info.value)
    with pytest.raises(ValueError, match="16x16"):
        filter_dct(dct_2d(z), mode, **thresholds)
    with pytest.raises(ValueError, match="13x21"):  # non-square: i + j <= 32
        frequency_control(photo_batch(1, 13, 21), mode, **{k: v + 2 for k, v in thresholds.items()})


def test_a_band_on_the_last_anti_diagonal_keeps_that_coefficient() -> None:
    z = latent_like()[..., ::4, ::4]
    kept = dct_2d(frequency_control(z, "high_pass", high_threshold=30))
    torch.testing.assert_close(kept[..., 15, 15], dct_2d(z)[..., 15, 15], atol=1e-12, rtol=0)
    assert kept[..., 15, 15].abs().min() > 0 and kept[..., :15, :].abs().max() < 1e-12
    for mode, thresholds in [("mid_pass", {"mid_low": 30, "mid_high": 40}), ("low_pass", {"low_threshold": 0}),
                             ("mini_pass", {"mini_threshold": 0})]:
        assert frequency_control(z, mode, **thresholds).abs().max() > 0


def test_scaled_thresholds_are_the_tiny_configs_and_keep_every_band():
    from omegaconf import OmegaConf

    tiny = OmegaConf.load("configs/model_config_tiny.yaml").model.params.frequency_thresholds
    assert scale_thresholds(None, 32) == dict(tiny)  # the tiny config's rule: 64x64 edges times 32/64
    assert scale_thresholds(dict(tiny), 32, reference_size=32) == dict(tiny)
    for size in (8, 16, 32):
        for mode in CONTROL_MODES:
            check_band(mode, size, size, **scale_thresholds(None, size))
