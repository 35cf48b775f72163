"""FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium")
and KID (Bińkowski et al. 2018, "Demystifying MMD GANs") between two image sets, as torchmetrics'
`FrechetInceptionDistance` and `KernelInceptionDistance` compute them, on the 2048-d pool features (by default) of
torch-fidelity's "inception-v3-compat" (the TensorFlow FID Inception) read from a local weights file.

FID is biased upwards on small sets (its expectation falls with the number of images), so a few dozen images give
a number comparable only to one from as many images; KID is unbiased and is the one to read on small sets.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS = Path("models") / INCEPTION_FILE

INCEPTION_HELP = (f"FID/KID need torch-fidelity's Inception weights: download {INCEPTION_URL}\n"
                  f"  -> {INCEPTION_WEIGHTS}")


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N, 3, H, W) -> their Inception features (N, dims): torch-fidelity's
    `FeatureExtractorInceptionV3` ("inception-v3-compat", resized to 299 px inside) with the weights of a local file.

    `dims` picks the layer as torchmetrics' integer `feature` does: 2048 (the pool features of the FID/KID papers,
    the default), or 64, 192, 768 (earlier layers)."""

    def __init__(self, weights: str | os.PathLike = INCEPTION_WEIGHTS, dims: int = 2048):
        super().__init__()
        if dims not in (64, 192, 768, 2048):
            raise ValueError(f"Inception features have 64, 192, 768 or 2048 dimensions, got {dims}")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"Inception weights not found: {weights}\n{INCEPTION_HELP}")
        self.num_features = dims
        self.extractor = FeatureExtractorInceptionV3(
            name="inception-v3-compat", features_list=[str(dims)], feature_extractor_weights_path=os.fspath(weights))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images)[0]


class GivenFeatures(torch.nn.Identity):
    """The custom `feature` module of the torchmetrics metrics when they are updated with features already
    extracted (once for both metrics) rather than with images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def as_uint8_batch(images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A (N, 3, H, W) uint8 tensor of a list of (3, H, W) uint8 images (of one size) or of such a tensor."""
    batch = images if torch.is_tensor(images) else torch.stack(list(images))
    if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
        raise ValueError(f"FID/KID take uint8 images (N, 3, H, W), got {batch.dtype} {tuple(batch.shape)}")
    return batch


@torch.no_grad()
def fid_kid(outputs: torch.Tensor | Sequence[torch.Tensor], references: torch.Tensor | Sequence[torch.Tensor],
            inception_weights: str | os.PathLike = INCEPTION_WEIGHTS, kid_subset_size: int = 1000,
            kid_subsets: int = 100, dims: int = 2048, batch_size: int = 32,
            device: torch.device | str = "cpu") -> dict[str, float]:
    """{"fid", "kid_mean", "kid_std"} of `outputs` against `references` (uint8 images, see `as_uint8_batch`).

    KID averages the unbiased MMD² estimate (cubic polynomial kernel) over `kid_subsets` random subsets of
    min(kid_subset_size, number of images) images of each set (torchmetrics' defaults otherwise). `dims` picks
    the Inception layer (`InceptionFeatures`); each image's features are extracted once and given to both metrics.
    """
    outputs, references = as_uint8_batch(outputs), as_uint8_batch(references)
    extractor = InceptionFeatures(inception_weights, dims).to(device)
    subset_size = min(kid_subset_size, len(outputs), len(references))
    fid = FrechetInceptionDistance(feature=GivenFeatures(dims)).to(device)
    kid = KernelInceptionDistance(feature=GivenFeatures(dims), subsets=kid_subsets, subset_size=subset_size).to(device)
    for images, real in ((references, True), (outputs, False)):
        for batch in images.split(batch_size):
            features = extractor(batch.to(device))
            fid.update(features, real=real)
            kid.update(features, real=real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
