"""LPIPS, the learned perceptual image patch similarity of Zhang et al. 2018 ("The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric"), as the reference `lpips` package (version 0.1) computes it.

The learned linear layers ship inside the pip package; the ImageNet backbone (torchvision's VGG16, AlexNet or
SqueezeNet 1.1 `features`) is read from a local file instead of being downloaded by torchvision.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import lpips
import torch

from ldm.checkpoint import load_state_dict

BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
}


def default_backbone_weights(net: str) -> Path:
    """Where the torchvision weights file of the `net` backbone goes: `models/<torchvision's file name>`."""
    return Path("models") / BACKBONE_FILES[net][0]


def backbone_help(net: str) -> str:
    """How to get the `net` backbone's weights file: its name, where to download it, where to put it."""
    name, url = BACKBONE_FILES[net]
    return (f"LPIPS ({net}) needs torchvision's ImageNet weights: download {name} from {url}\n"
            f"  -> {default_backbone_weights(net)}")


def lpips_backbone_state_dict(torchvision_state_dict: Mapping[str, torch.Tensor],
                              backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """torchvision's `features.N.*` tensors under the names of lpips' slices (`sliceK.N.*`, lpips'
    pretrained_networks.py: slice K holds the same `features[N]` modules under their index N); the classifier's
    tensors are dropped."""
    state_dict = {}
    for key in backbone.state_dict():
        match = re.fullmatch(r"slice\d+\.(\d+\..+)", key)
        source = f"features.{match.group(1)}" if match else key
        if source in torchvision_state_dict:
            state_dict[key] = torchvision_state_dict[source]
    return state_dict


class LPIPSDistance:
    """`LPIPSDistance(net)(a, b)`: the LPIPS distance (B,) between images a and b (B, 3, H, W) in [-1, 1].

    `net` is "vgg" (VGG16, the backbone of the paper's perceptual-loss use), "alex" (AlexNet, the paper's
    recommended forward metric) or "squeeze" (SqueezeNet 1.1, PIE-Bench's); `backbone_weights` is torchvision's
    ImageNet file for it, loaded strictly.
    """

    def __init__(self, net: str = "vgg", backbone_weights: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu"):
        if net not in BACKBONE_FILES:
            raise ValueError(f"LPIPS backbone must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
        path = default_backbone_weights(net) if backbone_weights is None else Path(backbone_weights)
        torchvision_state_dict = load_state_dict(path, hint=backbone_help(net))
        # pnet_rand=True builds the backbone without torchvision's download; pretrained=True loads the learned
        # linear layers (weights/v0.1/<net>.pth inside the package).
        self.model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
        self.model.net.load_state_dict(lpips_backbone_state_dict(torchvision_state_dict, self.model.net), strict=True)
        self.model.requires_grad_(False).eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS(a[i], b[i]) for each i, on the CPU: (B,)."""
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS compares two (B, 3, H, W) batches of one shape, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        a, b = (x.to(self.device, torch.float32) for x in (a, b))
        return self.model(a, b).flatten().cpu()
