"""LPIPS reads its backbone from a local file (random weights here, saved in torchvision's layout) and agrees with
a hand computation of its formula and with torchmetrics' own LPIPS on those weights."""
from __future__ import annotations

import os
from pathlib import Path

import lpips
import numpy as np
import pytest
import skimage.data
import torch
import torchvision

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


def test_lpips_squeeze_matches_torchmetrics_on_the_same_backbone(tmp_path, monkeypatch):
    """PIE-Bench's LPIPS: torchmetrics' `LearnedPerceptualImagePatchSimilarity(net_type="squeeze")` (its own copy
    of the networks and linear weights), given the same random SqueezeNet 1.1 instead of a download."""
    import torchmetrics.functional.image.lpips as tm_lpips
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    torch.manual_seed(0)
    squeezenet = torchvision.models.squeezenet1_1(weights=None)
    torch.save(squeezenet.state_dict(), tmp_path / "squeezenet1_1-b8a52dc0.pth")
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: squeezenet.features)
    oracle = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
    a, b = signed(crops(64)), signed(crops(64, offset=100))
    ours = LPIPSDistance("squeeze", tmp_path / "squeezenet1_1-b8a52dc0.pth")(a, b)
    assert (ours > 0).all()
    expected = torch.stack([oracle(a[i:i + 1], b[i:i + 1]) for i in range(len(a))])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_missing_weight_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        LPIPSDistance("alex", tmp_path / "alexnet-owt-7be5be79.pth")
    message = str(error.value)
    assert "alexnet-owt-7be5be79.pth" in message and "download.pytorch.org/models" in message
    assert os.path.join("models", "alexnet-owt-7be5be79.pth") in message
