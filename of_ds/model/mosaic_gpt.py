"""MosaicGPT, natively: the LM of the OpenFlamingo-3B releases (`anas-awadalla/mpt-1b-redpajama-200b` and `-dolly`).

Those releases ship MosaicML's MosaicGPT as hub remote code (`model_type: mosaic_gpt`), which takes no input
embeddings and needs `trust_remote_code`. This module computes the same function from the release's own
`config.json` and weights, under the same parameter names (`transformer.wte`, `transformer.blocks.<i>.{ln_1,
attn.Wqkv, attn.q_ln, attn.k_ln, attn.out_proj, ln_2, mlp.mlp_up, mlp.mlp_down}`, `transformer.ln_f`; logits
through the tied `wte`), and is registered with transformers' Auto classes, so `AutoModelForCausalLM
.from_pretrained(<release>)` builds it without remote code.

Pre-LayerNorm blocks; attention with optional QK LayerNorm (over the full width), ALiBi or learned positions,
optional q/k/v clipping; `no_bias` removes every bias, LayerNorms' included; GELU MLP. Attention runs through
`scaled_dot_product_attention` (`attn_implementation="sdpa"`, the default) or as matmul + softmax (`"eager"`), with
one additive bias (ALiBi, causal and padding mask) built per forward and shared by every block. KV cache: a
transformers `DynamicCache`. Settings it does not implement (prefix LM, sequence-id attention, logit scaling) are
refused by name.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast


# transformers renamed the outputs' cache field (past_key_values -> cache) within the supported releases
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class MosaicGPTConfig(PretrainedConfig):
    """The release's `config.json` fields, with MosaicGPT's defaults; training-only fields (init, device) are kept
    so a config round-trips."""

    model_type = "mosaic_gpt"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers", "max_position_embeddings": "max_seq_len"}

    def __init__(
        self,
        d_model: int = 2048,
        n_heads: int = 16,
        n_layers: int = 24,
        mlp_ratio: int = 4,
        max_seq_len: int = 2048,
        vocab_size: int = 50368,
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        emb_pdrop: float = 0.0,
        attn_impl: str = "triton",
        attn_qk_ln: bool = False,
        attn_clip_qkv: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        prefix_lm: bool = False,
        attn_uses_sequence_id: bool = False,
        alibi: bool = False,
        alibi_bias_max: int = 8,
        init_device: str = "cpu",
        logit_scale: Optional[Union[float, str]] = None,
        no_bias: bool = False,
        verbose: int = 0,
        param_init_fn: str = "kaiming_normal_",
        init_div_is_residual: Union[int, float, str, bool] = True,
        init_std: float = 0.02,
        emb_init_std: Optional[float] = None,
        emb_init_uniform_lim=None,
        init_gain: float = 0.0,
        fan_mode: str = "fan_in",
        init_nonlinearity: str = "relu",
        embedding_fraction: float = 1.0,
        low_precision_layernorm: bool = True,
        use_cache: bool = False,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.d_model, self.n_heads, self.n_layers, self.mlp_ratio = d_model, n_heads, n_layers, mlp_ratio
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.attn_pdrop, self.resid_pdrop, self.emb_pdrop = attn_pdrop, resid_pdrop, emb_pdrop
        self.attn_impl, self.attn_qk_ln, self.attn_clip_qkv, self.softmax_scale = attn_impl, attn_qk_ln, attn_clip_qkv, softmax_scale
        self.prefix_lm, self.attn_uses_sequence_id = prefix_lm, attn_uses_sequence_id
        self.alibi, self.alibi_bias_max = alibi, alibi_bias_max
        self.init_device, self.logit_scale, self.no_bias, self.verbose = init_device, logit_scale, no_bias, verbose
        self.param_init_fn, self.init_div_is_residual, self.init_std = param_init_fn, init_div_is_residual, init_std
        self.emb_init_std, self.emb_init_uniform_lim, self.init_gain = emb_init_std, emb_init_uniform_lim, init_gain
        self.fan_mode, self.init_nonlinearity = fan_mode, init_nonlinearity
        self.embedding_fraction, self.low_precision_layernorm = embedding_fraction, low_precision_layernorm
        self.use_cache, self.tie_word_embeddings = use_cache, tie_word_embeddings
        kwargs.pop("name", None)
        kwargs.pop("loss_fn", None)
        super().__init__(**kwargs)


# settings this implementation computes only at these values (MosaicGPT's own defaults)
UNSUPPORTED_UNLESS = {"prefix_lm": False, "attn_uses_sequence_id": False, "logit_scale": None, "tie_word_embeddings": True}


def check_mosaic_gpt_config(config: MosaicGPTConfig) -> None:
    """Refuse, by name, settings that would make this a different function than the reference MosaicGPT."""
    bad = {k: getattr(config, k) for k, v in UNSUPPORTED_UNLESS.items() if getattr(config, k) != v}
    if bad:
        raise ValueError(f"model.lm: this MosaicGPT config sets {bad}, which of_ds's MosaicGPT does not implement "
                         f"(supported: {UNSUPPORTED_UNLESS})")
    if config.d_model % config.n_heads:
        raise ValueError(f"model.lm: MosaicGPT d_model {config.d_model} is not divisible by n_heads {config.n_heads}")
    if not 0 < config.embedding_fraction <= 1:
        raise ValueError(f"model.lm: MosaicGPT embedding_fraction {config.embedding_fraction} is not in (0, 1]")


class LowPrecisionLayerNorm(nn.LayerNorm):
    """MosaicGPT's `low_precision_layernorm`: under autocast the norm runs in the autocast dtype (not fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        with torch.autocast(device_type=device, enabled=False):
            return F.layer_norm(cast(x), self.normalized_shape, cast(self.weight), cast(self.bias), self.eps)


def _layer_norm(config: MosaicGPTConfig) -> nn.LayerNorm:
    cls = LowPrecisionLayerNorm if config.low_precision_layernorm else nn.LayerNorm
    return cls(config.d_model, bias=not config.no_bias)


def alibi_slopes(n_heads: int, alibi_bias_max: int) -> torch.Tensor:
    """MosaicGPT's per-head slopes 2^-(alibi_bias_max * h / n_heads), h = 1..n_heads (fp32)."""
    return 2.0 ** -(torch.arange(1, n_heads + 1, dtype=torch.float32) * (alibi_bias_max / n_heads))


class MosaicGPTAttention(nn.Module):
    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        d, self.n_heads, self.layer_idx = config.d_model, config.n_heads, layer_idx
        self.head_dim = d // config.n_heads
        self.clip_qkv = config.attn_clip_qkv
        self.softmax_scale = config.softmax_scale or 1 / math.sqrt(self.head_dim)
        self.dropout = config.attn_pdrop
        self.Wqkv = nn.Linear(d, 3 * d, bias=not config.no_bias)
        if config.attn_qk_ln:  # the reference builds these as plain LayerNorms, whatever low_precision_layernorm says
            self.q_ln = nn.LayerNorm(d, bias=not config.no_bias)
            self.k_ln = nn.LayerNorm(d, bias=not config.no_bias)
        self.out_proj = nn.Linear(d, d, bias=not config.no_bias)
        self.config = config  # its attention implementation (sdpa or eager) is read per call

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor], cache: Optional[DynamicCache]) -> torch.Tensor:
        b, length, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=2)
        if hasattr(self, "q_ln"):
            q, k = self.q_ln(q).to(q.dtype), self.k_ln(k).to(k.dtype)
        q, k, v = (t.reshape(b, length, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            weights = torch.softmax(q @ k.transpose(-1, -2) * self.softmax_scale + (0 if attn_bias is None else attn_bias), dim=-1)
            out = F.dropout(weights, p=dropout, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout, scale=self.softmax_scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, -1))


class MosaicGPTMLP(nn.Module):
    def __init__(self, config: MosaicGPTConfig):
        super().__init__()
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model, bias=not config.no_bias)
        self.mlp_act = nn.GELU(approximate="none")
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_down(self.mlp_act(self.mlp_up(x)))


class MosaicGPTBlock(nn.Module):
    """`x + attn(ln_1(x))`, then `+ mlp(ln_2(.))`; returns the hidden states (the cache is updated in place)."""

    def __init__(self, config: MosaicGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = _layer_norm(config)
        self.attn = MosaicGPTAttention(config, layer_idx)
        self.ln_2 = _layer_norm(config)
        self.mlp = MosaicGPTMLP(config)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, past_key_values: Optional[DynamicCache] = None, **_) -> torch.Tensor:
        x = hidden_states + self.resid_attn_dropout(self.attn(self.ln_1(hidden_states), attn_bias, past_key_values))
        return x + self.resid_mlp_dropout(self.mlp(self.ln_2(x)))


class MosaicGPTPreTrainedModel(PreTrainedModel):
    config_class = MosaicGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False  # of_ds checkpoints whole FlamingoLayers instead
    _no_split_modules = ["MosaicGPTBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Random init for configs without weights (tests, counting); released weights replace it."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, self.config.init_std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            if module.bias is not None:
                module.bias.zero_()


class MosaicGPTModel(MosaicGPTPreTrainedModel):
    """The body (`transformer.*`): embeddings, blocks, final norm; takes `input_ids` or `inputs_embeds`."""

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        check_mosaic_gpt_config(config)
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if not config.alibi:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList([MosaicGPTBlock(config, i) for i in range(config.n_layers)])
        self.ln_f = _layer_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        past_key_values: Optional[DynamicCache] = None,
        position_ids: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        **_,
    ) -> BaseModelOutputWithPast:
        """`attention_mask`: [B, S] with 1 for real tokens (S = cached + new), or a 4D mask [B, 1, L, S] (bool True
        = attend, or additive float) that replaces the causal one (packed rows)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("MosaicGPT: give exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = x.shape[1]
        if past + length > self.config.max_seq_len:
            raise ValueError(f"MosaicGPT: {past + length} positions, more than max_seq_len {self.config.max_seq_len}")
        if not self.config.alibi:
            x = x + self.wpe(self._positions(position_ids, attention_mask, past, length, x.device))
        if self.config.embedding_fraction != 1:  # scales the embeddings' gradient, not their value
            f = self.config.embedding_fraction
            x = x * f + x.detach() * (1 - f)
        x = self.emb_drop(x)
        bias = self.attention_bias(attention_mask, past, length, x.dtype, x.device)
        for block in self.blocks:
            x = block(x, attn_bias=bias, past_key_values=past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(x), **{CACHE_FIELD: past_key_values if use_cache else None})

    @staticmethod
    def _positions(position_ids, attention_mask, past: int, length: int, device) -> torch.Tensor:
        """Learned-position indices: given, else counted over real tokens (left padding does not shift them)."""
        if position_ids is not None:
            return position_ids
        pos = torch.arange(past, past + length, device=device)[None]
        if attention_mask is not None and attention_mask.ndim == 2:
            pads = torch.cumsum(attention_mask == 0, dim=1)[:, past:]
            pos = (pos - pads).clamp(min=0)
        return pos

    def attention_bias(self, attention_mask: Optional[torch.Tensor], past: int, length: int, dtype: torch.dtype, device) -> torch.Tensor:
        """[1 or B, H or 1, L, S] additive bias: ALiBi as -slope x (query - key) (per query row the softmax ignores
        a constant, so this equals MosaicGPT's bias measured from the last key, and stays small in bf16), masked
        positions at the dtype's minimum."""
        keys = past + length
        if attention_mask is not None and attention_mask.ndim == 4:
            allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        else:
            q = torch.arange(past, keys, device=device)
            allowed = (torch.arange(keys, device=device)[None, :] <= q[:, None])[None, None]  # [1, 1, L, S]
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, None, :].bool()
        bias = torch.zeros((), dtype=torch.float32, device=device)
        if self.config.alibi:
            distance = torch.arange(past, keys, device=device)[:, None] - torch.arange(keys, device=device)[None, :]
            slopes = alibi_slopes(self.config.n_heads, self.config.alibi_bias_max).to(device)
            bias = -slopes[None, :, None, None] * distance.float()[None, None]
        return bias.to(dtype).masked_fill(~allowed, torch.finfo(dtype).min)


class MosaicGPTForCausalLM(MosaicGPTPreTrainedModel):
    """MosaicGPT with its logits through the token embedding (`lm_head` is tied to `transformer.wte`)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MosaicGPTConfig):
        super().__init__(config)
        self.transformer = MosaicGPTModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None, position_ids=None, labels=None, use_cache=None, **kwargs) -> CausalLMOutputWithPast:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               past_key_values=past_key_values, position_ids=position_ids, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})


AutoConfig.register("mosaic_gpt", MosaicGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(MosaicGPTConfig, MosaicGPTForCausalLM, exist_ok=True)
