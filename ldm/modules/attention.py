"""Transformer layers of the SD 2.x UNet: cross-attention, GEGLU feed-forward and the spatial transformer.

Module and parameter names follow the original latent-diffusion code so SD checkpoints load unchanged.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.diffusionmodules.util import checkpoint, zero_module


class GEGLU(nn.Module):
    """Linear projection to 2*dim_out split into value and gate: value * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Gated feed-forward (GEGLU, 4x expansion) as used in every SD transformer block."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when `context` is None)."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual connection."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` by cross-attention.

    GroupNorm, projection in (1x1 conv, or Linear when `use_linear` as in SD 2.x), `depth` transformer blocks,
    zero-initialised projection out, residual. The norm is a plain GroupNorm with eps 1e-6, as in SD (the
    ResBlocks' `normalization` uses eps 1e-5).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        proj = nn.Linear if use_linear else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = proj(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = zero_module(proj(inner_dim, in_channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h
