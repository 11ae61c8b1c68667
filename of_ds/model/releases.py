"""The released OpenFlamingo models: where their files are and what their LMs are.

Each release is a `checkpoint.pt` (trainable weights, the original's key layout) on the hub, plus an LM, its
tokenizer and CLIP ViT-L-14 (openai). `LM_CONFIGS` holds each LM's `config.json` as published (MosaicGPT for the
3B models, GPT-NeoX for the 4B, llm-foundry's MPT for the 9B), so a spec naming a release can be counted and
planned (`--dry-run`) without its files.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

GPT_NEOX_TOKENS = 50277  # EleutherAI/gpt-neox-20b's tokenizer (every release's); + 3 Flamingo tokens = 50280

MPT_1B = {  # anas-awadalla/mpt-1b-redpajama-200b (and -dolly): MosaicGPT
    "architectures": ["MosaicGPT"],
    "auto_map": {"AutoConfig": "configuration_mosaic_gpt.MosaicGPTConfig", "AutoModelForCausalLM": "mosaic_gpt.MosaicGPT"},
    "model_type": "mosaic_gpt",
    "d_model": 2048, "n_heads": 16, "n_layers": 24, "mlp_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432,
    "alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_qk_ln": True, "attn_clip_qkv": None,
    "attn_pdrop": 0, "resid_pdrop": 0, "emb_pdrop": 0, "softmax_scale": None, "prefix_lm": False,
    "attn_uses_sequence_id": False, "logit_scale": None, "no_bias": True, "low_precision_layernorm": True,
    "embedding_fraction": 1.0, "init_device": "cpu", "param_init_fn": "kaiming_normal_", "init_std": 0.02,
    "init_div_is_residual": True, "emb_init_std": None, "emb_init_uniform_lim": None, "init_gain": 0,
    "fan_mode": "fan_in", "init_nonlinearity": "relu", "verbose": 0, "use_cache": False,
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16",
}
RPJ_3B = {  # togethercomputer/RedPajama-INCITE-{Base,Instruct}-3B-v1: GPT-NeoX
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "hidden_size": 2560, "num_attention_heads": 32, "num_hidden_layers": 32, "intermediate_size": 10240,
    "max_position_embeddings": 2048, "vocab_size": 50432, "hidden_act": "gelu", "layer_norm_eps": 1e-05,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "use_parallel_residual": False, "tie_word_embeddings": False,
    "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 0, "use_cache": True, "torch_dtype": "float16",
}
MPT_7B = {  # anas-awadalla/mpt-7b (mosaicml/mpt-7b's code and weights): llm-foundry's MPT
    "architectures": ["MPTForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "model_type": "mpt",
    "d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432,
    "resid_pdrop": 0, "emb_pdrop": 0, "learned_pos_emb": True,
    "attn_config": {"attn_type": "multihead_attention", "attn_pdrop": 0, "attn_impl": "torch", "qk_ln": False,
                    "clip_qkv": None, "softmax_scale": None, "prefix_lm": False, "attn_uses_sequence_id": False,
                    "alibi": True, "alibi_bias_max": 8},
    "init_device": "cpu", "logit_scale": None, "no_bias": True, "verbose": 0, "embedding_fraction": 1.0,
    "norm_type": "low_precision_layernorm", "use_cache": False,
    "init_config": {"name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu", "init_div_is_residual": True,
                    "emb_init_std": None, "emb_init_uniform_lim": None, "init_std": 0.02, "init_gain": 0},
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16",
}
LM_CONFIGS: dict[str, dict] = {
    "anas-awadalla/mpt-1b-redpajama-200b": MPT_1B,
    "anas-awadalla/mpt-1b-redpajama-200b-dolly": MPT_1B,
    "togethercomputer/RedPajama-INCITE-Base-3B-v1": RPJ_3B,
    "togethercomputer/RedPajama-INCITE-Instruct-3B-v1": RPJ_3B,
    "anas-awadalla/mpt-7b": MPT_7B,
    "mosaicml/mpt-7b": MPT_7B,
}


def fp32_lm_config(config: dict) -> dict:
    """An LM config as of_ds builds it at random init: a copy in fp32, as a loaded LM is (its dtype left out); the
    engine casts the model to `engine.precision`."""
    return {k: copy.deepcopy(v) for k, v in config.items() if k not in ("torch_dtype", "dtype")}


@dataclass(frozen=True)
class Release:
    """One released OpenFlamingo model: its hub repo (holding `checkpoint.pt`), LM, tokenizer, cross-attention
    interval and our recipe spec."""

    repo: str
    lm: str
    cross_attn_every_n_layers: int
    spec: str

    @property
    def tokenizer(self) -> str:
        return self.lm

    @property
    def lm_config(self) -> dict:
        return LM_CONFIGS[self.lm]


RELEASES: dict[str, Release] = {
    r.repo.split("/")[1]: r
    for r in (
        Release("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "anas-awadalla/mpt-1b-redpajama-200b", 1, "launch/specs/openflamingo-3b.yaml"),
        Release("openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct", "anas-awadalla/mpt-1b-redpajama-200b-dolly", 1, "launch/specs/openflamingo-3b.yaml"),
        Release("openflamingo/OpenFlamingo-4B-vitl-rpj3b", "togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, "launch/specs/openflamingo-4b.yaml"),
        Release("openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct", "togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 2, "launch/specs/openflamingo-4b.yaml"),
        Release("openflamingo/OpenFlamingo-9B-vitl-mpt7b", "anas-awadalla/mpt-7b", 4, "launch/specs/openflamingo-9b.yaml"),
    )
}
