"""The frozen text encoder of SD 2.x: OpenCLIP ViT-H-14's text tower, read from a local weights file.

Nothing here downloads: open_clip only builds the architecture (`pretrained=None`), the tokenizer is the BPE
vocabulary bundled with open_clip, and weights come from the file named by `version`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn as nn

from ldm.checkpoint import check_state_dict, load_state_dict

OPEN_CLIP_WEIGHTS_HINT = (
    "Download open_clip_pytorch_model.bin of laion/CLIP-ViT-H-14-laion2B-s32B-b79K from Hugging Face and place it "
    "at CLIP-ViT-H-14/open_clip_pytorch_model.bin (the path SD 2.x configs pass as `version`)."
)


def register_open_clip_config(arch: str, path: str | os.PathLike) -> None:
    """Make open_clip know architecture `arch` from the model-config JSON `path` (open_clip's schema).

    open_clip names a config after its file, so the file must be `<arch>.json`. Registering again is a no-op.
    """
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if open_clip.get_model_config(arch) == config:
        return
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
    if missing or Path(path).stem != arch:
        raise ValueError(
            f"cannot register {path} as open_clip architecture '{arch}': the file must be named '{arch}.json'"
            f" and hold 'embed_dim', 'vision_cfg' and 'text_cfg' (missing: {sorted(missing)})"
        )
    open_clip.add_model_config(path)


@contextlib.contextmanager
def _quiet_random_init():
    """Drop open_clip's 'No pretrained weights loaded' warning: weights come from `version` (or are meant random)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def causal_mask(length: int) -> torch.Tensor:
    """Additive attention mask letting token i see tokens <= i only (CLIP's text attention).

    Built on the CPU even under a meta-device context: it is a non-persistent buffer that no weights file
    restores, so a model built on meta and then loaded must still find real values here.
    """
    return torch.full((length, length), float("-inf"), device="cpu").triu_(1)


@functools.cache
def _bpe() -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's bundled BPE tokenizer (the one `open_clip.tokenize` uses), built once."""
    return open_clip.tokenizer.SimpleTokenizer()


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompts -> SD 2.x cross-attention context (B, 77, width) from an OpenCLIP text transformer.

    `self.model` is the open_clip CLIP model without its visual tower, so the state dict keys are SD's
    `cond_stage_model.model.*`. `layer='penultimate'` (SD 2.x) skips the last transformer block; ln_final is
    applied either way. `version` is a local open_clip weights file (.bin/.safetensors; its `visual.*` keys are
    ignored), or None for random weights. `arch_config` registers a custom architecture JSON under `arch`.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str | os.PathLike | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        arch_config: str | os.PathLike | None = None,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"unknown layer '{layer}'; valid: {', '.join(repr(v) for v in self.LAYERS)}")
        if arch_config is not None:
            register_open_clip_config(arch, arch_config)
        weights = None if version is None else self._text_weights(version)
        # With a weights file, build on the meta device and adopt the file's tensors: no throwaway random init
        # of the (much larger) visual tower. pretrained_hf=False keeps open_clip from fetching HF text towers.
        with torch.device("meta") if weights is not None else contextlib.nullcontext(), _quiet_random_init():
            model = open_clip.create_model(
                arch, pretrained=None, device=torch.get_default_device(), pretrained_hf=False
            )
        del model.visual
        if weights is not None:
            model_state = model.state_dict()
            check_state_dict(model_state, weights, os.fspath(version))
            model.load_state_dict({k: v.to(model_state[k].dtype) for k, v in weights.items()}, assign=True)
        if max_length != model.context_length:
            raise ValueError(
                f"max_length {max_length} differs from the text tower's context length {model.context_length}"
            )
        # SD conditions through a causal mask whatever the config says; rebuilt here because a meta build leaves
        # the (non-persistent) buffer without data.
        model.register_buffer("attn_mask", causal_mask(model.context_length), persistent=False)
        self.model = model
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)
        if freeze:
            self.freeze()

    @staticmethod
    def _text_weights(version: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The text-tower tensors of an open_clip weights file (its `visual.*` keys dropped)."""
        state_dict = load_state_dict(version, hint=OPEN_CLIP_WEIGHTS_HINT)
        return {k: v for k, v in state_dict.items() if not k.startswith("visual.")}

    def freeze(self) -> None:
        """Eval mode and no gradients: the text encoder is never trained."""
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> embeddings (B, 77, width): embed, the chosen transformer blocks, ln_final."""
        model = self.model
        x = model.token_embedding(tokens.to(model.positional_embedding.device)) + model.positional_embedding
        # open_clip >= 2.2x runs its blocks batch-first; older releases expect (L, B, D).
        batch_first = getattr(model.transformer, "batch_first", False)
        if not batch_first:
            x = x.transpose(0, 1)
        blocks = model.transformer.resblocks
        for block in blocks[: len(blocks) - self.layer_idx]:
            x = block(x, attn_mask=model.attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return model.ln_final(x)

    def dropped_tokens(self, text: Sequence[str]) -> list[int]:
        """Per prompt, how many of its tokens `encode` cuts off: those past the context length (`max_length`, which
        counts the start and end tokens)."""
        return [max(0, len(_bpe().encode(t)) + 2 - self.max_length) for t in text]

    def encode(self, text: Sequence[str]) -> torch.Tensor:
        """Prompts -> embeddings (B, 77, width), tokenised with open_clip's bundled BPE tokenizer (a prompt longer
        than the context is cut: `dropped_tokens` says by how much)."""
        return self.encode_tokens(open_clip.tokenize(list(text), context_length=self.max_length))

    def forward(self, text: Sequence[str]) -> torch.Tensor:
        return self.encode(text)
