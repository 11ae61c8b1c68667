"""Perceiver resampler: a fixed number of latents per image, read from that image's patch tokens.

Same math and parameter names as OpenFlamingo's `PerceiverResampler` (keys/values over concat(media, latents),
no biases, pre-LayerNorms, final LayerNorm, no media-time or frame embeddings), with attention through
`scaled_dot_product_attention` instead of explicit einsums.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ScaledLinear(nn.Linear):
    """nn.Linear whose output can be scaled by a scalar tensor `s`. Where the output has more elements than the
    weight, through the weight: `F.linear(x, W·s)` is `linear(x)·s` without a pass over the output, nor, in backward,
    the two over it for the gradients of x and s, and the output is not kept for s's gradient. Elsewhere (few
    tokens, a wide weight) the output is scaled, which is then the cheaper pass."""

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        if scale is None:
            return super().forward(x)
        if x.numel() // x.shape[-1] * self.out_features <= self.weight.numel():
            return super().forward(x) * scale
        scale = scale.to(self.weight.dtype)
        return F.linear(x, self.weight * scale, None if self.bias is None else self.bias * scale)


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim), no biases (indices 0, 1, 3 as the
    original); `scale` multiplies the output (through the last weight, `ScaledLinear`)."""

    def __init__(self, dim: int, mult: int):
        inner = int(dim * mult)
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), ScaledLinear(inner, dim, bias=False))

    def forward(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self[3](self[2](self[1](self[0](x))), scale)


def build_feed_forward(dim: int, mult: int) -> FeedForward:
    return FeedForward(dim, mult)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, S, heads*d] -> [N, heads, S, d]."""
    n, s, _ = x.shape
    return x.view(n, s, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[N, heads, S, d] -> [N, S, heads*d]."""
    n, h, s, d = x.shape
    return x.transpose(1, 2).reshape(n, s, h * d)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media, latents)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [N, v, D], latents [N, n, D] -> [N, n, D] (the residual is added by the caller)."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((media, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        return self.to_out(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class PerceiverResampler(nn.Module):
    """[N, v, D] patch tokens of N images -> [N, num_latents, D]; each image is resampled independently."""

    def __init__(self, *, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64, ff_mult: int = 4):
        super().__init__()
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), build_feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(media.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(media, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)
