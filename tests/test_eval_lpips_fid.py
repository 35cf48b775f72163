"""LPIPS and FID/KID read their backbones from local files (random weights here, saved in the real layouts) and
agree with hand computations of their formulas on those weights."""
from __future__ import annotations

import os
from pathlib import Path

import lpips
import numpy as np
import pytest
import skimage.data
import torch
import torchvision

from fcdiffusion.evaluation.fid import INCEPTION_URL, InceptionFeatures, fid_kid
from fcdiffusion.evaluation.lpips_distance import LPIPSDistance

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def crops(size: int, offset: int = 0) -> torch.Tensor:
    """Two crops (size x size, at `offset` and below-right of it) of each demo photo: uint8 (8, 3, size, size)."""
    out = []
    for name in PHOTOS:
        photo = np.asarray(getattr(skimage.data, name)())
        for y, x in ((offset, offset), (offset + size, offset + size)):
            out.append(torch.from_numpy(photo[y:y + size, x:x + size].copy()).permute(2, 0, 1))
    return torch.stack(out)


def signed(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def hand_lpips(a: torch.Tensor, b: torch.Tensor, weights: Path) -> torch.Tensor:
    """LPIPS v0.1 by its formula (Zhang et al. 2018, eq. 1) on torchvision's AlexNet loaded from `weights`: scaled
    input, unit-normalised channels at the 5 ReLUs, squared difference, learned 1x1 weights, spatial mean, sum."""
    net = torchvision.models.alexnet(weights=None)
    net.load_state_dict(torch.load(weights))
    lins = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    relus = (1, 4, 7, 9, 11)
    total = torch.zeros(len(a), dtype=torch.float64)
    with torch.no_grad():
        x, y = (a - shift) / scale, (b - shift) / scale
        for i, layer in enumerate(net.features[:relus[-1] + 1]):
            x, y = layer(x), layer(y)
            if i in relus:
                fx, fy = (f.double() / (f.double().square().sum(1, keepdim=True).sqrt() + 1e-10) for f in (x, y))
                w = lins[f"lin{relus.index(i)}.model.1.weight"].double().flatten()
                total += torch.einsum("bchw,c->bhw", (fx - fy).square(), w).mean((1, 2))
    return total


def test_lpips_is_zero_for_identical_and_positive_for_different_photos(alexnet_file):
    lpips_distance = LPIPSDistance("alex", alexnet_file)
    images = signed(crops(64))
    assert lpips_distance(images, images).abs().max() < 1e-6
    distances = lpips_distance(images, images.roll(1, dims=0))
    assert distances.shape == (8,) and (distances > 0).all()


def test_lpips_matches_the_formula_on_the_loaded_backbone(alexnet_file):
    a, b = signed(crops(64)), signed(crops(64, offset=100))
    ours = LPIPSDistance("alex", alexnet_file)(a, b)
    torch.testing.assert_close(ours.double(), hand_lpips(a, b, alexnet_file), rtol=1e-5, atol=1e-5)


def test_lpips_vgg_loads_torchvision_layout_strictly(tmp_path):
    torch.manual_seed(0)
    state_dict = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(state_dict, tmp_path / "vgg16-397923af.pth")
    lpips_distance = LPIPSDistance("vgg", tmp_path / "vgg16-397923af.pth")
    loaded = lpips_distance.model.net.state_dict()
    torch.testing.assert_close(loaded["slice5.28.weight"], state_dict["features.28.weight"])
    torch.save({k: v for k, v in state_dict.items() if k.startswith("features.") and k != "features.28.bias"},
               tmp_path / "vgg16-397923af.pth")
    with pytest.raises(RuntimeError, match="slice5.28.bias"):
        LPIPSDistance("vgg", tmp_path / "vgg16-397923af.pth")


def test_missing_weight_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        LPIPSDistance("alex", tmp_path / "alexnet-owt-7be5be79.pth")
    message = str(error.value)
    assert "alexnet-owt-7be5be79.pth" in message and "download.pytorch.org/models" in message
    assert os.path.join("models", "alexnet-owt-7be5be79.pth") in message
    with pytest.raises(FileNotFoundError) as error:
        fid_kid(crops(16), crops(16), inception_weights=tmp_path / "inception.pth")
    message = str(error.value)
    assert "inception.pth" in message and INCEPTION_URL in message
    assert os.path.join("models", "pt_inception-2015-12-05-6726825d.pth") in message


def poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def test_fid_kid_match_their_formulas(inception_file):
    """On the 64-d features (the 2048-d FID's 2048x2048 eigendecomposition takes a minute on 2 CPU cores)."""
    outputs, references = crops(48), 255 - crops(48, offset=150)  # photos against their negatives
    with torch.no_grad():
        features = InceptionFeatures(inception_file, dims=64)
        f_out, f_ref = features(outputs).double(), features(references).double()
    same = fid_kid(list(outputs), outputs, inception_file, kid_subsets=3, dims=64, batch_size=5)
    other = fid_kid(outputs, references, inception_file, kid_subsets=3, dims=64)

    # Frechet distance of the Gaussians: tr sqrt(S1 S2) is the nuclear norm of X1 X2^T / (n - 1), X centred features.
    x1, x2 = f_out - f_out.mean(0), f_ref - f_ref.mean(0)
    n = len(x1)
    fid = ((f_out.mean(0) - f_ref.mean(0)).square().sum() + (x1.square().sum() + x2.square().sum()) / (n - 1)
           - 2 * torch.linalg.matrix_norm(x1 @ x2.T, ord="nuc") / (n - 1))
    assert other["fid"] > 0
    assert other["fid"] == pytest.approx(float(fid), rel=1e-4)
    assert abs(same["fid"]) < 1e-3 * other["fid"]

    # KID's subsets hold all 8 images here, so every subset gives the same unbiased MMD^2 estimate.
    k_oo, k_rr, k_or = poly_kernel(f_out, f_out), poly_kernel(f_ref, f_ref), poly_kernel(f_out, f_ref)

    def off(k: torch.Tensor) -> torch.Tensor:
        return (k.sum() - k.diagonal().sum()) / (n * (n - 1))

    kid = off(k_oo) + off(k_rr) - 2 * k_or.mean()
    assert other["kid_mean"] == pytest.approx(float(kid), rel=1e-4)
    assert other["kid_mean"] > 0 and other["kid_std"] < 1e-6 * other["kid_mean"]
    # A set against itself: the estimator's value for two identical samples, 2 (mean off-diagonal - mean diagonal)
    # kernel / n, near zero next to the distance to another set.
    assert same["kid_mean"] == pytest.approx(float(2 * off(k_oo) - 2 * k_oo.mean()), rel=1e-4, abs=1e-6)
    assert abs(same["kid_mean"]) < 0.5 * other["kid_mean"]
