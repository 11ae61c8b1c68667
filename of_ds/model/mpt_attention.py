"""MPT attention through `torch.nn.functional.scaled_dot_product_attention`.

transformers' `MptAttention` has only an eager path: it materialises the [B, H, L, L] scores, adds ALiBi, fills the
mask, upcasts to fp32 for the softmax and casts back, about seven passes over the scores per layer, each saved or
recomputed for backward. Here the same computation is one fused SDPA call, with ALiBi and the mask folded into one
additive bias that is built once per LM forward and shared by every layer (they all receive the same `alibi` and
mask tensors). Same weights, same parameter names; results equal to the eager path up to float rounding
(`tests/model/test_mpt_attention.py`).
"""

from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SharedAttentionBias:
    """The additive bias of one LM forward: ALiBi [H, 1, S] where attended, the dtype's min where masked (as the
    eager path's `masked_fill`). Cached for the same `alibi` and mask objects (every layer of one forward gets the
    same ones); a new forward passes new objects."""

    def __init__(self) -> None:
        self._inputs: tuple = ()
        self._bias: Optional[torch.Tensor] = None

    def __call__(self, position_bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], key_length: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        inputs = (position_bias, mask, key_length, dtype)
        if self._bias is not None and len(self._inputs) == 4 and all(a is b for a, b in zip(self._inputs, inputs)):
            return self._bias
        bias = build_attention_bias(position_bias, mask, key_length, dtype)
        if not torch.compiler.is_compiling():
            self._inputs, self._bias = inputs, bias
        return bias


def build_attention_bias(position_bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], key_length: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """ALiBi's last `key_length` columns ([1, H, 1, S]) with masked positions (`mask` True: [B, 1, L, S]) set to the
    dtype's min; None when there is neither."""
    bias = None
    if position_bias is not None:
        if position_bias.ndim != 3:
            raise ValueError(f"Expecting position_bias shape to be 3 dimensions, got {position_bias.ndim}")
        bias = position_bias[:, :, max(0, position_bias.size(2) - key_length):].to(dtype).unsqueeze(0)
    if mask is None:
        return bias
    if bias is None:
        bias = torch.zeros((), dtype=dtype, device=mask.device)
    return bias.masked_fill(mask, torch.finfo(dtype).min)


def _sdpa_forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor, cache=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """`MptAttention.forward` with SDPA; returns (output, None): attention weights are never materialised."""
    batch_size, seq_length = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(batch_size, seq_length, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    bias = self._of_ds_bias(position_bias, attention_mask, k.shape[-2], q.dtype)
    dropout = self.attn_dropout_p if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.softmax_scale)
    return self.out_proj(out.transpose(1, 2).reshape(batch_size, seq_length, -1)), None


def use_sdpa_attention(lm: nn.Module) -> int:
    """Route every transformers `MptAttention` in `lm` through SDPA (in place); returns how many were switched."""
    from transformers.models.mpt.modeling_mpt import MptAttention

    shared = SharedAttentionBias()
    n = 0
    for module in lm.modules():
        if isinstance(module, MptAttention):
            module._of_ds_bias = shared
            module.forward = types.MethodType(_sdpa_forward, module)
            n += 1
    return n
