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
    """The additive bias of one LM forward (`build_attention_bias`), built by the first layer and reused by the
    others: every layer of one forward gets the same `alibi` and mask objects; a new forward passes new ones."""

    def __init__(self) -> None:
        self._inputs: tuple = ()
        self._bias: Optional[torch.Tensor] = None

    def __call__(self, position_bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], query_length: int, key_length: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        inputs = (position_bias, mask, query_length, key_length, dtype)
        if self._bias is not None and len(self._inputs) == len(inputs) and all(map(_same, self._inputs, inputs)):
            return self._bias
        bias = build_attention_bias(position_bias, mask, query_length, key_length, dtype)
        if not torch.compiler.is_compiling():
            self._inputs, self._bias = inputs, bias
        return bias

    def clear(self, *_) -> None:
        """Drop the cached bias (a forward hook on the LM body calls it: [B, H, L, S] can be large)."""
        self._inputs, self._bias = (), None


def _same(a, b) -> bool:
    """Tensors by identity (a new forward passes new ones), everything else by value."""
    return a is b if torch.is_tensor(a) or torch.is_tensor(b) else a == b


def build_attention_bias(position_bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], query_length: int, key_length: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """[1 or B, H, L, S] additive bias in `dtype`: ALiBi relative to each query, masked positions (`mask` True,
    [B, 1, L, S]) at the dtype's min. None when there is neither.

    transformers' ALiBi ([H, 1, S_max]) is measured from the end of the sequence, so its values reach -slope x S;
    rounded to bf16 (spacing 1 at 256, 8 at 2048) they lose the steps between neighbouring keys. Per query row the
    softmax ignores a constant, so subtract the query's own entry first, in fp32: what is left is -slope x distance,
    small where the weights are large. The queries are the last L of the S keys (a KV cache holds the rest)."""
    bias = None
    if position_bias is not None:
        if position_bias.ndim != 3:
            raise ValueError(f"Expecting position_bias shape to be 3 dimensions, got {position_bias.ndim}")
        alibi = position_bias[:, :, max(0, position_bias.size(2) - key_length):].float()  # [H, 1, S]
        bias = (alibi - alibi[:, :, -query_length:].transpose(1, 2)).to(dtype).unsqueeze(0)  # [1, H, L, S]
    if mask is None:
        return bias
    if bias is None:
        bias = torch.zeros((), dtype=dtype, device=mask.device)
    return bias.masked_fill(mask, torch.finfo(dtype).min)


def _sdpa_forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor, cache=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """`MptAttention.forward` with SDPA; returns (output, None): attention weights are never materialised."""
    if cache is None:  # transformers' MptBlock passes the cache as `past_key_values` in older 5.x releases (5.17)
        cache = kwargs.pop("past_key_values", None)
    batch_size, seq_length = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (t.reshape(batch_size, seq_length, self.n_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=2))
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    bias = self._of_ds_bias(position_bias, attention_mask, seq_length, k.shape[-2], q.dtype)
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
    if n:
        lm.base_model.register_forward_hook(shared.clear)  # the bias is not kept past the LM's forward
    return n
