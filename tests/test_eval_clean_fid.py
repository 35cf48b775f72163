"""FID and KID against clean-fid itself: the same stand-in Inception (random weights, TorchScript) is placed where
clean-fid looks for it, so both sides run identical weights and nothing is downloaded."""
from __future__ import annotations

import os
import types
import urllib.request
from pathlib import Path

import cleanfid.features
import numpy as np
import pytest
import skimage.data
from cleanfid.fid import compute_fid, compute_kid, frechet_distance, kernel_distance
from PIL import Image

from fcdiffusion.evaluation.clean_fid import (
    CLEAN_FID_WEIGHTS,
    Reference,
    file_features,
    folder_features,
    load_inception,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")


def write_crops(folder: Path, size: int, offset: int, negative: bool = False) -> list[Path]:
    """One size x size crop (at `offset`) of each demo photo as a PNG, or its negative; sizes differ from 299, so
    the resize counts."""
    folder.mkdir()
    paths = []
    for name in PHOTOS:
        photo = np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
        paths.append(folder / f"{name}.png")
        crop = photo[offset:offset + size, offset:offset + size]
        Image.fromarray(255 - crop if negative else crop).save(paths[-1])
    return paths


@pytest.fixture
def clean_fid_sees(clean_inception_file, monkeypatch):
    """clean-fid on Linux reads /tmp/inception-2015-12-05.pt and downloads it when missing; on Windows it reads
    ./inception-2015-12-05.pt. Tell its feature module it runs on Windows, work in the stand-in's folder, and make
    any download fail."""
    monkeypatch.setattr(cleanfid.features, "platform", types.SimpleNamespace(system=lambda: "Windows"))
    monkeypatch.chdir(clean_inception_file.parent)

    def no_download(*args, **kwargs):
        raise AssertionError("clean-fid tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)


def test_fid_and_kid_equal_clean_fids_own(tmp_path, clean_inception_file, clean_fid_sees):
    """One clean-fid FID (its 2048 x 2048 sqrtm) takes about a minute on two CPU cores."""
    results = write_crops(tmp_path / "results", 160, 40)
    write_crops(tmp_path / "reference", 320, 100, negative=True)
    model = load_inception(clean_inception_file)
    reference = Reference(folder_features(tmp_path / "reference", model))
    ours = file_features(results, model, batch_size=4)
    expected = dict(mode="clean", num_workers=0, batch_size=4, device="cpu", verbose=False, use_dataparallel=False)
    fid = compute_fid(str(tmp_path / "results"), str(tmp_path / "reference"), **expected)
    assert fid > 0.01
    assert reference.fid(ours) == pytest.approx(fid, rel=1e-4)
    # Sets of one size (6 <= 1000): every clean-fid subset is the whole set, so its random draws do not matter.
    kid = compute_kid(str(tmp_path / "results"), str(tmp_path / "reference"), **expected)
    assert kid > 0
    # clean-fid sums its kernels in float32 (its features' dtype), 100 times over; here in float64, once.
    assert reference.kid(ours) == pytest.approx(kid, rel=1e-4)
    assert Reference(ours).fid(ours) == pytest.approx(0, abs=1e-6 * fid)


@pytest.mark.parametrize("n, m, d", [(7, 9, 16), (40, 30, 5)], ids=["fewer_images_than_dims", "more_images"])
def test_frechet_distance_equals_clean_fids_on_small_features(n, m, d):
    """Both ways of taking tr sqrt(S1 S2) (through the n x n or the d x d matrix) against clean-fid's sqrtm."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)), rng.normal(1.0, 2.0, size=(m, d))
    expected = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert Reference(y).fid(x) == pytest.approx(expected, rel=1e-6)


def test_kid_equals_clean_fids_kernel_distance_on_equal_sets():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 8)), rng.normal(0.5, 1.0, size=(12, 8))
    assert Reference(y).kid(x) == pytest.approx(kernel_distance(x, y), rel=1e-9)
    # Unequal sets draw random subsets: a fixed seed gives a fixed figure.
    bigger = Reference(rng.normal(size=(30, 8)))
    assert bigger.kid(x, seed=3) == bigger.kid(x, seed=3) != bigger.kid(x, seed=4)


def test_resampled_figures_equal_the_figures_of_the_resampled_set():
    rng = np.random.default_rng(2)
    x, reference = rng.normal(size=(10, 16)), Reference(rng.normal(0.3, 1.0, size=(10, 16)))
    fid, kid = reference.resampled_fid(x), reference.resampled_kid(x)
    everything = np.arange(10)
    # the two paths sum in different orders: 2e-9 apart on one CPU (a Zen 2 EPYC), far below any real difference
    assert fid(everything) == pytest.approx(reference.fid(x), rel=1e-7)
    assert kid(everything) == pytest.approx(reference.kid(x), rel=1e-9)
    idx = rng.integers(0, 10, size=10)
    assert fid(idx) == pytest.approx(reference.fid(x[idx]), rel=1e-6)  # sqrt of rounding-level eigenvalues
    # KID of a resample: the unbiased MMD² over pairs of distinct positions (a repeated image pairs with itself).
    k = (x[idx] @ x[idx].T / 16 + 1) ** 3
    cross = (x[idx] @ reference.features.T / 16 + 1) ** 3
    expected = (k.sum() - np.trace(k)) / 90 + reference.self_term - 2 * cross.mean()
    assert kid(idx) == pytest.approx(expected, rel=1e-9)


def test_missing_inception_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_inception(tmp_path / "inception-2015-12-05.pt")
    message = str(error.value)
    assert str(tmp_path) in message and "nvlabs-fi-cdn.nvidia.com" in message
    assert os.fspath(CLEAN_FID_WEIGHTS) in message
    (tmp_path / "other.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="inception-2015-12-05.pt"):
        load_inception(tmp_path / "other.pt")
