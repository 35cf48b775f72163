"""Feature distillation terms: the student's intermediate features and cross-attention maps against a teacher's.

A term is named after where it looks (see `FEATURE_NAMES`):

- `unet_out<i>`: the output of the UNet decoder's output block i (the frozen UNet is the same in teacher and
  student, so these differ only through the control signals and any trained decoder part);
- `control_in<i>`, `control_mid`: the output of the control net's input block i or middle block;
- `attn_<block>` (e.g. `attn_unet_out3`): the cross-attention maps (text tokens per pixel) of every transformer
  inside that block.

Block outputs are compared by MSE; attention maps by KL(teacher || student) of each query's distribution over the
prompt tokens, averaged over queries, heads and samples. `FeatureTap` records both with forward hooks while
active, so the networks' own code paths (scaled_dot_product_attention included) stay as they are: an attention
hook recomputes the softmax of q k^T / sqrt(d) from the layer's own projections, and only while recording. The
transformer layers whose maps are recorded run without gradient checkpointing meanwhile: a checkpointed layer
recomputes its forward in the backward pass, after the hook is gone, and could not recompute the maps.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer

FEATURE_NAMES = re.compile(r"(attn_)?(unet_out\d+|control_in\d+|control_mid)")


def check_feature_name(name: str) -> str:
    """`name` if it is a feature term's name (`FEATURE_NAMES`), else a ValueError listing the forms."""
    if not FEATURE_NAMES.fullmatch(name):
        raise ValueError(f"unknown feature term {name!r}; names: unet_out<i> (UNet decoder block i), control_in<i> "
                         "(control net input block i), control_mid, or attn_<one of those> (its cross-attention maps)")
    return name


def feature_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every block a feature term can name in `model` (an FCDiffusion teacher or student), by name."""
    unet, control = model.model.diffusion_model, model.control_model
    blocks = {f"unet_out{i}": block for i, block in enumerate(unet.output_blocks)}
    blocks.update({f"control_in{i}": block for i, block in enumerate(control.input_blocks)})
    blocks["control_mid"] = control.middle_block
    return blocks


def transformer_layers(block: nn.Module) -> list[BasicTransformerBlock]:
    """The transformer layers inside `block`, each with its cross-attention `attn2`."""
    return [layer for transformer in block.modules() if isinstance(transformer, SpatialTransformer)
            for layer in transformer.transformer_blocks]


def attention_log_probs(attention: CrossAttention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """log softmax(q k^T / sqrt(d)) of `attention` for its inputs: (batch, heads, queries, keys)."""
    context = x if context is None else context
    q, k = (rearrange(t, "b n (h d) -> b h n d", h=attention.heads)
            for t in (attention.to_q(x), attention.to_k(context)))
    scores = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * q.shape[-1] ** -0.5
    return scores.log_softmax(-1)


class FeatureTap:
    """Records the features that the terms `names` compare while `recording()` is active (see module docstring).

    `model` is a teacher or the student; a name whose block the model lacks, or an attention term of a block
    without a transformer, is a ValueError.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        blocks = feature_blocks(model)
        self.blocks: dict[str, nn.Module] = {}
        self.layers: dict[str, list[BasicTransformerBlock]] = {}
        for name in names:
            attention, block = check_feature_name(name).startswith("attn_"), name.removeprefix("attn_")
            if block not in blocks:
                raise ValueError(f"feature term {name!r}: this model has no block {block!r}; blocks: "
                                 f"{', '.join(blocks)}")
            if attention:
                self.layers[name] = transformer_layers(blocks[block])
                if not self.layers[name]:
                    raise ValueError(f"feature term {name!r}: block {block!r} has no cross-attention")
            else:
                self.blocks[name] = blocks[block]

    @contextlib.contextmanager
    def recording(self, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
        """While active, each forward pass puts the features of the terms `names` into the yielded dict:
        name -> [block output] or [log-attention map per cross-attention layer]."""
        store: dict[str, list[torch.Tensor]] = {}
        handles, unchecked = [], []

        def keep(name: str):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                store[name] = [output]
            return hook

        def attend(name: str, index: int, count: int):
            def hook(module: CrossAttention, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> None:
                x, context = args[0], args[1] if len(args) > 1 else kwargs.get("context")
                maps = store.setdefault(name, [None] * count)
                maps[index] = attention_log_probs(module, x, context)
            return hook

        try:
            for name in names:
                if name in self.blocks:
                    handles.append(self.blocks[name].register_forward_hook(keep(name)))
                layers = self.layers.get(name, [])
                for i, layer in enumerate(layers):
                    handles.append(layer.attn2.register_forward_hook(attend(name, i, len(layers)), with_kwargs=True))
                    unchecked.append((layer, layer.use_checkpoint))
                    layer.use_checkpoint = False
            yield store
        finally:
            for handle in handles:
                handle.remove()
            for layer, flag in reversed(unchecked):
                layer.use_checkpoint = flag


def feature_term(name: str, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """One term's value: mean MSE of block outputs, or mean KL(teacher || student) of log-attention maps."""
    if name.startswith("attn_"):
        return torch.stack([(t.exp() * (t - s)).sum(-1).mean() for s, t in zip(student, teacher)]).mean()
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher)]).mean()
