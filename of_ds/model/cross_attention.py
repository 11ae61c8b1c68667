"""Gated cross-attention from text to image latents, the media context, and the FlamingoLayer wrapper.

Media semantics (OpenFlamingo's `only_attend_immediate_media=True`): a token's *text time* is the number of
`<image>` tokens at or before it, so the `<image>` token belongs to the image it introduces. A token with text time
k attends only to the latents of image k (`latents[row, k-1]`); tokens with text time 0 (before the first image),
or pointing past the row's real images, get an exact zero cross-attention output.

Layout: keys/values are all of a row's image latents ([B, T*n]); an additive SDPA bias (-inf elsewhere) keeps each
token's own image. With one image per row (LAION) the mask is dropped, so SDPA can take its fastest (flash) path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .perceiver import ScaledLinear, build_feed_forward, merge_heads, split_heads


@dataclass
class MediaContext:
    """What the cross-attention blocks of one LM forward need; built by `build_media_context`."""

    latents: torch.Tensor  # [B, T, n, D_vis]
    attn_mask: Optional[torch.Tensor]  # [B, 1, L, T*n] additive bias (0: attend, -inf: not), None when T == 1
    has_media: torch.Tensor  # [B, L, 1] bool: the token has a real image to attend to
    text_time: torch.Tensor  # [B, L] int64: 1-based image index per token (0: none)


def compute_text_time(input_ids: torch.Tensor, media_token_id: int, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, L] count of `<image>` tokens at or before each position, plus `offset` [B] (images already seen)."""
    t = (input_ids == media_token_id).cumsum(dim=-1)
    return t if offset is None else t + offset[:, None]


def build_media_context(
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    media_token_id: int,
    num_images: Optional[torch.Tensor] = None,
    time_offset: Optional[torch.Tensor] = None,
) -> MediaContext:
    """Pair tokens with images: the k-th `<image>` of a row (counting `time_offset` earlier ones) uses `latents[row, k-1]`."""
    text_time, has_media = token_media_times(input_ids, media_token_id, latents.shape[1], num_images, time_offset)
    return media_context(latents, text_time, has_media)


def token_media_times(
    input_ids: torch.Tensor,
    media_token_id: int,
    slots: int,
    num_images: Optional[torch.Tensor] = None,
    time_offset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its text time [B, L] and whether that image is real [B, L] (at most `num_images`, or `slots`, per row)."""
    text_time = compute_text_time(input_ids, media_token_id, time_offset)
    b = input_ids.shape[0]
    # a host tensor (as the loaders yield it) is copied without waiting for the device
    limit = torch.full((b,), slots, device=input_ids.device) if num_images is None else num_images.clamp(max=slots).to(input_ids.device, non_blocking=True)
    return text_time, (text_time >= 1) & (text_time <= limit[:, None])


def media_context(latents: torch.Tensor, text_time: torch.Tensor, has_media: torch.Tensor) -> MediaContext:
    """The context from per-token image slots: `text_time` [B, L] (1-based slot in `latents` [B, T, n, D]; 0 none)
    and `has_media` [B, L]."""
    t_img, n = latents.shape[1:3]
    attn_mask = None
    if t_img > 1:
        key_time = torch.arange(1, t_img + 1, device=text_time.device).repeat_interleave(n)
        # rows without media may attend anywhere (their output is zeroed), which keeps softmax free of all-masked rows
        keep = ((text_time[:, :, None] == key_time) | ~has_media[:, :, None]).unsqueeze(1)
        # as an additive bias in the attention's dtype, built once: given a bool mask, SDPA's efficient and math
        # kernels convert it in every block's call and keep each copy for backward
        attn_mask = torch.zeros(keep.shape, dtype=_attention_dtype(latents), device=keep.device).masked_fill_(~keep, float("-inf"))
    return MediaContext(latents=latents, attn_mask=attn_mask, has_media=has_media.unsqueeze(-1), text_time=text_time)


def _attention_dtype(latents: torch.Tensor) -> torch.dtype:
    """The dtype the blocks' queries will have: autocast's where it is on, else the latents' (the model's)."""
    device = latents.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return latents.dtype


class MaskedCrossAttention(nn.Module):
    """Text queries over image-latent keys/values; parameter names as OpenFlamingo's `MaskedCrossAttention`."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = ScaledLinear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, attn_mask: Optional[torch.Tensor], has_media: torch.Tensor,
                scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, L, D], latents [B, T, n, D_vis] -> [B, L, D], times `scale` (through `to_out`'s weight)."""
        q = split_heads(self.to_q(self.norm(x)), self.heads)
        k, v = self.to_kv(latents.flatten(1, 2).to(q.dtype)).chunk(2, dim=-1)
        if attn_mask is not None and attn_mask.dtype not in (q.dtype, torch.bool):
            attn_mask = attn_mask.to(q.dtype)  # SDPA takes a bias only in the queries' dtype
        out = F.scaled_dot_product_attention(q, split_heads(k, self.heads), split_heads(v, self.heads), attn_mask=attn_mask)
        return self.to_out(merge_heads(out).masked_fill(~has_media, 0.0), scale)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(attn_gate) * xattn(x) then x + tanh(ff_gate) * ff(x); gates start at 0, so the block starts as the
    identity. Each gate scales its branch's output projection weight rather than the branch's output (the same
    product; a [tokens, dim] pass fewer each way, and the output is not kept for the gate's gradient)."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = build_feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor, latents: torch.Tensor, attn_mask: Optional[torch.Tensor], has_media: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, latents, attn_mask, has_media, scale=self.attn_gate.tanh()) + x
        return self.ff(x, scale=self.ff_gate.tanh()) + x


def should_add_cross_attention(layer_index: int, every_n_layers: int) -> bool:
    """The original's placement: a block before decoder layer i when (i + 1) % N == 0."""
    return (layer_index + 1) % every_n_layers == 0


class MediaSlot:
    """Holds the current `MediaContext` for one forward; shared by all FlamingoLayers of a model (not a module)."""

    def __init__(self) -> None:
        self.current: Optional[MediaContext] = None


class FlamingoLayer(nn.Module):
    """`gated_cross_attn_layer` (or None) then the LM's own `decoder_layer`; unknown attributes read through to it."""

    def __init__(self, gated_cross_attn_layer: Optional[GatedCrossAttentionBlock], decoder_layer: nn.Module, media: MediaSlot):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self._media = media
        self.activation_checkpointing = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # LMs read per-layer facts (e.g. Qwen2's `attention_type`) off their layer list
            return getattr(super().__getattr__("decoder_layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        ctx = self._media.current
        if self.gated_cross_attn_layer is not None and ctx is None:
            raise RuntimeError("FlamingoLayer ran without a media context: call the LM through Flamingo.forward/generate")
        media = (ctx.latents, ctx.attn_mask, ctx.has_media) if ctx is not None else (None, None, None)
        if self.activation_checkpointing and torch.is_grad_enabled():
            # media tensors are explicit inputs: recomputation runs in backward, after the context was cleared
            return checkpoint(self._run, hidden_states, *media, *args, use_reentrant=False, **kwargs)
        return self._run(hidden_states, *media, *args, **kwargs)

    def compile_body(self, **compile_kwargs) -> None:
        """`torch.compile` the block + decoder layer body as one function (the media are explicit inputs)."""
        self._run = torch.compile(self._run, **compile_kwargs)

    def _run(self, hidden_states, latents, attn_mask, has_media, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            hidden_states = self.gated_cross_attn_layer(hidden_states, latents, attn_mask, has_media)
        return self.decoder_layer(hidden_states, *args, **kwargs)
