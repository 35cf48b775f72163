"""CLIP score: how well each translated image matches its prompt, from an open_clip model read from a local file.

Nothing here downloads: open_clip only builds the architecture (`pretrained=None`), the tokenizer is the one
open_clip bundles for the architecture, and both towers' weights come from the local weights file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import open_clip
import torch
from PIL import Image

from ldm.checkpoint import check_state_dict, load_state_dict
from ldm.modules.encoders.modules import _quiet_random_init, causal_mask, register_open_clip_config

# The backbones the compared papers score with. OpenAI's CLIP uses QuickGELU: open_clip's "-quickgelu" architectures
# (`pretrained=None` would otherwise build the GELU variant the OpenAI weights were not trained with).
CLIP_B32 = "ViT-B-32-quickgelu"  # OpenAI ViT-B/32: pix2pix-Turbo (`clip.load("ViT-B/32")` in its training code)
CLIP_B32_WEIGHTS = "models/clip-vit-b-32-openai/open_clip_pytorch_model.bin"
CLIP_L14 = "ViT-L-14-quickgelu"  # OpenAI ViT-L/14: PIE-Bench (torchmetrics CLIPScore "openai/clip-vit-large-patch14")
CLIP_L14_WEIGHTS = "models/clip-vit-l-14-openai/open_clip_pytorch_model.bin"
CLIP_SOURCES = {
    "ViT-H-14": "open_clip_pytorch_model.bin of huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    CLIP_B32: "open_clip_pytorch_model.bin of huggingface.co/timm/vit_base_patch32_clip_224.openai "
              "(OpenAI's CLIP ViT-B/32 in open_clip's key names)",
    CLIP_L14: "open_clip_pytorch_model.bin of huggingface.co/timm/vit_large_patch14_clip_224.openai "
              "(OpenAI's CLIP ViT-L/14 in open_clip's key names)",
}


def clip_weights_hint(arch: str, path: str | os.PathLike) -> str:
    """Where to get the open_clip weights of `arch` and where they go (appended to a missing-file error)."""
    source = CLIP_SOURCES.get(arch, f"the open_clip weights of {arch}")
    return f"Download {source} and place it at {os.fspath(path)} (image and text towers, open_clip's key names)."


class CLIPScore:
    """CLIPScore of Hessel et al. 2021 ("CLIPScore: A Reference-free Evaluation Metric for Image Captioning"),
    with w = 100 as torchmetrics' `CLIPScore` (PIE-Bench's implementation) computes it: 100 * max(cos(E_image,
    E_text), 0) per pair (pix2pix-Turbo's CLIP similarity is 100 * cos with the same backbone; they differ only
    where the cosine is negative).

    `arch` is an open_clip architecture, `weights` a local open_clip state dict holding both towers, loaded
    strictly; the default is OpenAI's ViT-B/32 (pix2pix-Turbo's); PIE-Bench scores with OpenAI's ViT-L/14. Images
    go through open_clip's validation preprocessing of `arch` (resize, centre crop, CLIP normalisation), prompts
    through its tokenizer.
    `arch_config` registers a custom architecture JSON under `arch` (the tests' tiny ones).
    """

    def __init__(
        self,
        arch: str = CLIP_B32,
        weights: str | os.PathLike = CLIP_B32_WEIGHTS,
        device: str | torch.device = "cpu",
        arch_config: str | os.PathLike | None = None,
    ):
        if arch_config is not None:
            register_open_clip_config(arch, arch_config)
        state_dict = load_state_dict(weights, hint=clip_weights_hint(arch, weights))
        # Built on the meta device and given the file's tensors: no throwaway random init of a ~1B model.
        with torch.device("meta"), _quiet_random_init():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=None, device=torch.get_default_device()
            )
        model_state = model.state_dict()
        check_state_dict(model_state, state_dict, os.fspath(weights))
        model.load_state_dict({k: v.to(model_state[k].dtype) for k, v in state_dict.items()}, strict=True,
                              assign=True)
        # The causal text mask is a non-persistent buffer: no file restores it, so the meta build left it empty.
        model.register_buffer("attn_mask", causal_mask(model.context_length), persistent=False)
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = torch.device(device)

    @torch.no_grad()
    def embeddings(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm image and text embeddings (B, embed_dim) of the pairs."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        image_features = self.model.encode_image(pixels).float()
        text_features = self.model.encode_text(tokens).float()
        return (torch.nn.functional.normalize(image_features, dim=-1),
                torch.nn.functional.normalize(text_features, dim=-1))

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One score per (image, prompt) pair, (B,) on the CPU, in [0, 100]."""
        image_features, text_features = self.embeddings(images, prompts)
        return (100 * (image_features * text_features).sum(-1).clamp(min=0)).cpu()
