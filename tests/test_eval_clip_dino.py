"""CLIP score and DINO structure distance on small random-weight networks of the real architectures, saved in the
real file layouts (an open_clip `.bin` state dict, a transformers `save_pretrained` folder), checked against
independent computations on the same weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data
from transformers import ViTModel

from fcdiffusion.evaluation.clip_score import CLIP_B32, CLIP_L14, CLIPScore
from fcdiffusion.evaluation.dino_structure import DinoStructureDistance
from ldm.checkpoint import load_state_dict
from tests.helpers import TINY_CLIP_ARCH as TINY_ARCH
from tests.helpers import TINY_CLIP_CONFIG as TINY_CONFIG

PROMPTS = ["an astronaut in a white suit", "a cup of coffee on a saucer", "a cat lying down"]


def photos(size: tuple[int, int] | None = None) -> list[Image.Image]:
    """skimage's astronaut, coffee and chelsea as RGB PIL images, resized to (width, height) if given."""
    images = [Image.fromarray(f()).convert("RGB") for f in (data.astronaut, data.coffee, data.chelsea)]
    return [im.resize(size, Image.BICUBIC) for im in images] if size else images


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 for im in images])


def reference_clip_score(path: Path, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """100 * max(cos, 0) straight from open_clip: a normally built model, the file's weights, its own transforms."""
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=None)
    model.load_state_dict(load_state_dict(path), strict=True)
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text = model.encode_text(open_clip.get_tokenizer(TINY_ARCH)(prompts))
    cos = F.cosine_similarity(image, text, dim=-1)
    return 100 * cos.clamp(min=0)


def reference_dino_distance(folder: Path, sources: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Keys recomputed from the last layer's input (hidden states) with its layernorm and key projection."""
    model = ViTModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def similarity(images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        size = (224, 224 * w // h) if h <= w else (224 * h // w, 224)
        pixels = (F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False) - mean) / std
        with torch.no_grad():
            hidden = model(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
            last = model.layers[-1]
            keys = last.attention.k_proj(last.layernorm_before(hidden.hidden_states[-2]))
        keys = keys / keys.norm(dim=-1, keepdim=True)
        return torch.einsum("btd,bsd->bts", keys, keys)

    return ((similarity(sources) - similarity(outputs)) ** 2).mean(dim=(1, 2))


def test_clip_score_matches_open_clip(clip_file):
    scorer = CLIPScore(TINY_ARCH, clip_file)
    images = photos()
    scores = scorer(images, PROMPTS)
    assert scores.shape == (3,)
    assert ((scores > 0) & (scores <= 100)).all()
    torch.testing.assert_close(scores, reference_clip_score(clip_file, images, PROMPTS), atol=1e-5, rtol=0)
    # Image order matters: the score is per pair, not per batch.
    torch.testing.assert_close(scorer(images[::-1], PROMPTS[::-1]), scores.flip(0), atol=1e-5, rtol=0)


def test_clip_score_checks_pairs(clip_file):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        CLIPScore(TINY_ARCH, clip_file)(photos(), PROMPTS[:2])


def test_clip_missing_weights_say_where_to_get_them(tmp_path):
    missing = tmp_path / "CLIP-ViT-H-14" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError) as error:
        CLIPScore("ViT-H-14", missing)
    message = str(error.value)
    assert str(missing) in message and "huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in message
    with pytest.raises(FileNotFoundError, match=f"the open_clip weights of {TINY_ARCH}"):
        CLIPScore(TINY_ARCH, missing, arch_config=TINY_CONFIG)
    # The compared papers' backbones: OpenAI's ViT-B/32 (the default) and ViT-L/14, with OpenAI's QuickGELU.
    for arch, repo in ((CLIP_B32, "timm/vit_base_patch32_clip_224.openai"),
                       (CLIP_L14, "timm/vit_large_patch14_clip_224.openai")):
        assert open_clip.get_model_config(arch)["quick_gelu"]
        with pytest.raises(FileNotFoundError, match=repo):
            CLIPScore(arch, tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="models/clip-vit-b-32-openai/open_clip_pytorch_model.bin"):
        CLIPScore()


@pytest.mark.parametrize("size", [(96, 96), (144, 96)], ids=["square", "landscape"])
def test_dino_distance_matches_recomputed_keys(dino_folder, size):
    metric = DinoStructureDistance(dino_folder)
    images = as_tensor(photos(size))
    sources, outputs = images, images.roll(1, dims=0)
    distance = metric(sources, outputs)
    assert distance.shape == (3,) and (distance > 0).all()
    torch.testing.assert_close(distance, reference_dino_distance(dino_folder, sources, outputs), atol=1e-5, rtol=0)
    assert metric(sources, sources).abs().max() == 0
    assert metric.self_similarity(sources).shape[-1] == 1 + np.prod(metric.tokens(size[1], size[0]))


def test_dino_rejects_mismatched_token_grids(dino_folder):
    metric = DinoStructureDistance(dino_folder)
    with pytest.raises(ValueError, match="patch grids"):
        metric(as_tensor(photos((96, 96))), as_tensor(photos((144, 96))))


def test_dino_missing_folder_says_where_to_get_it(tmp_path):
    missing = tmp_path / "models" / "dino-vitb8"
    with pytest.raises(FileNotFoundError) as error:
        DinoStructureDistance(missing)
    assert str(missing) in str(error.value) and "huggingface.co/facebook/dino-vitb8" in str(error.value)
