"""DINO structure distance: how far a translation moved away from its source's layout.

Nothing here downloads: the DINO ViT is read from a local folder in transformers' layout (`local_files_only`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from transformers import ViTModel

from ldm.checkpoint import CheckpointMismatchError

DINO_FOLDER = "models/dino-vitb8"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dino_weights_hint(folder: str | os.PathLike) -> str:
    """Where to get DINO ViT-B/8 and where it goes (appended to a missing-folder error)."""
    return (f"Download config.json and the weights of huggingface.co/facebook/dino-vitb8 (transformers layout) "
            f"into the folder {os.fspath(folder)}.")


def last_key_projection(model: ViTModel) -> nn.Linear:
    """The key projection of the last layer's self-attention (its input is that layer's layernorm'd tokens)."""
    if hasattr(model, "layers"):  # transformers >= 5
        return model.layers[-1].attention.k_proj
    return model.encoder.layer[-1].attention.attention.key


def keys_self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Keys (B, T, heads * head_dim) -> their cosine self-similarity (B, T, T)."""
    keys = F.normalize(keys, dim=-1)
    return keys @ keys.transpose(1, 2)


class DinoStructureDistance:
    """The structure distance of Tumanyan et al. 2022 ("Splicing ViT Features for Semantic Appearance Transfer"),
    as pix2pix-Turbo reports it: MSE between the source's and the output's self-similarity matrices of DINO
    ViT-B/8 keys.

    The keys are those of the last layer's self-attention for all tokens (CLS included), heads concatenated;
    the matrix is their pairwise cosine similarity. Images (B, 3, H, W) in [0, 1] are resized with
    `Resize(224)` (shorter side 224, aspect kept; other sizes interpolate the position embeddings) and
    normalised with ImageNet's mean and std. `folder` holds the model in transformers' layout (`save_pretrained`).

    `pixel_scale` multiplies the [0, 1] images before the normalisation: 1 as pix2pix-Turbo (ToTensor, then
    Normalize); PIE-Bench's evaluation normalises pixel values in [0, 255] (`pixel_scale=255`), and its published
    structure distances are of that input.
    """

    def __init__(self, folder: str | os.PathLike = DINO_FOLDER, device: str | torch.device = "cpu",
                 pixel_scale: float = 1.0):
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"DINO model not found: {os.fspath(folder)} (no config.json)\n"
                                    + dino_weights_hint(folder))
        model, info = ViTModel.from_pretrained(os.fspath(folder), add_pooling_layer=False, local_files_only=True,
                                               output_loading_info=True)
        if info["missing_keys"] or info.get("mismatched_keys"):
            raise CheckpointMismatchError(
                f"{os.fspath(folder)} does not match its ViT config: missing {sorted(info['missing_keys'])}, "
                f"mis-shaped {sorted(info.get('mismatched_keys') or [])}")
        self.model = model.float().to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.patch_size = model.config.patch_size
        self.pixel_scale = pixel_scale
        self.transform = transforms.Compose([
            transforms.Resize(224, antialias=True),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    @torch.no_grad()
    def keys(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> last-layer keys (B, 1 + patches, heads * head_dim)."""
        pixels = self.transform(images.to(self.device, torch.float32) * self.pixel_scale)
        captured = []
        hook = last_key_projection(self.model).register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(pixel_values=pixels, interpolate_pos_encoding=True)
        finally:
            hook.remove()
        return captured[0].float()

    def self_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> cosine self-similarity of their keys (B, T, T)."""
        return keys_self_similarity(self.keys(images))

    def tokens(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid DINO sees for an (height, width) image after `Resize(224)`."""
        short, long = sorted((height, width))
        long = int(224 * long / short)  # torchvision's Resize rounding of the longer side
        h, w = (224, long) if height <= width else (long, 224)
        return h // self.patch_size, w // self.patch_size

    def __call__(self, sources: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """One distance per (source, output) pair, (B,) on the CPU; 0 for identical images."""
        if sources.shape[0] != outputs.shape[0]:
            raise ValueError(f"{sources.shape[0]} sources but {outputs.shape[0]} outputs")
        grids = self.tokens(*sources.shape[-2:]), self.tokens(*outputs.shape[-2:])
        if grids[0] != grids[1]:
            raise ValueError(
                f"sources {tuple(sources.shape[-2:])} and outputs {tuple(outputs.shape[-2:])} give DINO patch grids "
                f"{grids[0]} and {grids[1]}: their self-similarity matrices cannot be compared; resize the outputs "
                "to the sources' size first")
        diff = self.self_similarity(sources) - self.self_similarity(outputs)
        return diff.pow(2).mean(dim=(1, 2)).cpu()
