"""The frozen HF causal LM: loading (name, local path or config) and decoder-layer discovery."""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ..spec import LMSpec

# model_type -> dotted path of the decoder layer list (transformers 5); others need model.lm.decoder_layers_attr
DECODER_LAYERS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "mpt": "transformer.blocks",
    "mosaic_gpt": "transformer.blocks",  # of_ds.model.mosaic_gpt (the OpenFlamingo-3B releases' LM)
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
}


def build_language_model(spec: LMSpec, *, offline: bool, load_weights: bool = True) -> nn.Module:
    """An HF causal LM in fp32: from `spec.config` (random init), or by name/path (weights unless `load_weights`),
    with the attention kernel of `spec.attention`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import mosaic_gpt  # noqa: F401  (registers model_type mosaic_gpt with the Auto classes)

    if spec.config is not None:
        cfg = dict(spec.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        check_native_mpt_config(config)
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code, dtype=torch.float32, **_attn_kwargs(spec, config))
    else:
        remote = use_remote_code(spec, offline)
        common = dict(trust_remote_code=remote, cache_dir=spec.cache_dir, local_files_only=offline)
        config = AutoConfig.from_pretrained(spec.name_or_path, **common)
        check_native_mpt_config(config)
        if not load_weights:
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=remote, dtype=torch.float32, **_attn_kwargs(spec, config))
        else:
            lm = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=torch.float32, **_attn_kwargs(spec, config), **common)
    if spec.attention == "sdpa" and getattr(lm.config, "model_type", None) == "mpt":
        from .mpt_attention import use_sdpa_attention

        if use_sdpa_attention(lm) == 0:
            print(f"[of_ds] model.lm.attention=sdpa: {type(lm).__name__} is not transformers' MPT (remote code?); "
                  f"its attention is left as it is", flush=True)
    return lm


# families whose hub remote code of_ds replaces: MosaicGPT by of_ds.model.mosaic_gpt, MPT by transformers' own
NATIVE_FAMILIES = ("mosaic_gpt", "mpt")


def use_remote_code(spec: LMSpec, offline: bool) -> bool:
    """`model.lm.trust_remote_code`, except for the families implemented natively: their releases' remote code
    (MosaicGPT, llm-foundry's MPT) is never run, whatever the spec says."""
    if not spec.trust_remote_code:
        return False
    from transformers import PretrainedConfig

    cfg, _ = PretrainedConfig.get_config_dict(spec.name_or_path, cache_dir=spec.cache_dir, local_files_only=offline)
    if cfg.get("model_type") in NATIVE_FAMILIES:
        print(f"[of_ds] model.lm.trust_remote_code ignored: {spec.name_or_path} is model_type '{cfg['model_type']}', "
              f"which of_ds builds without remote code", flush=True)
        return False
    return True


# MPT config settings -> the values transformers' MptForCausalLM computes as llm-foundry's MPT (the released remote
# code) does; the first is what a config without the setting means. Settings not listed either change nothing of the
# function (attn_impl and fc_type pick a kernel, init_config/init_device the random init, use_cache, verbose,
# tokenizer_name, auto_map) or are implemented (d_model, n_heads, n_layers, vocab_size, max_seq_len, clip_qkv,
# softmax_scale, tie_word_embeddings); learned_pos_emb means nothing with ALiBi, which is required.
MPT_SUPPORTED = {
    # attention: multi-head, no normalisation of q and k, ALiBi with slopes for a maximum bias of 8 (transformers
    # always builds ALiBi, for 8), causal over the whole sequence
    "attn_config.attn_type": ("multihead_attention",),
    "attn_config.qk_ln": (False,),
    "attn_config.qk_gn": (False,),
    "attn_config.alibi": (True,),
    "attn_config.alibi_bias_max": (8,),
    "attn_config.rope": (False,),
    "attn_config.prefix_lm": (False,),
    "attn_config.attn_uses_sequence_id": (False,),
    "attn_config.sliding_window_size": (-1,),
    "attn_config.attn_logit_softcapping": (None,),
    # dropout (the LM runs in train mode while training): transformers has no embedding dropout, applies attn_pdrop
    # to the attention and MLP outputs too, and ignores resid_pdrop
    "attn_config.attn_pdrop": (0,),
    "resid_pdrop": (0,),
    "emb_pdrop": (0,),
    # the MLP: GELU(exact) over 4 x d_model
    "expansion_ratio": (4,),
    "ffn_config.ffn_type": ("mptmlp",),
    "ffn_config.ffn_hidden_size": (None,),
    "ffn_config.ffn_act_fn": (None, {"name": "gelu", "approximate": "none"}),
    # LayerNorm (eps 1e-5) without biases, no biases anywhere; low_precision_ only differs under autocast
    "norm_type": ("low_precision_layernorm", "layernorm"),
    "norm_eps": (1e-05,),
    "no_bias": (True,),
    # the output: tied embedding, logits as they are
    "logit_scale": (None,),
    "final_logit_softcapping": (None,),
    # GLM-130B's embedding gradient shrink: the same forward, the embedding rows' gradients times this fraction;
    # of_ds trains the new tokens' rows, which would learn at another rate than in the released code
    "embedding_fraction": (1.0,),
    # later llm-foundry: per-layer replacements of the block above
    "block_overrides": (None,),
}


def check_native_mpt_config(config) -> None:
    """transformers' MPT implements one MPT variant (MPT-7B's: multi-head attention with ALiBi for a maximum bias of
    8, no biases, LayerNorm, a 4x GELU MLP, tied embeddings) and accepts the settings of others without a word: QK
    LayerNorm (MPT-1B, e.g. anas-awadalla/mpt-1b-redpajama-200b converted from MosaicGPT, uses it), logit scales,
    prefix LM, RMSNorm, other MLPs, dropout where it has none. A config with any value outside `MPT_SUPPORTED`
    would load into a different function (or train differently); refuse it, naming each such setting."""
    if getattr(config, "model_type", None) != "mpt":
        return

    def setting(key: str, default):
        owner, _, name = key.rpartition(".")
        obj = getattr(config, owner, None) if owner else config
        if obj is None:
            return default
        return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)

    unsupported = {k: v for k, ok in MPT_SUPPORTED.items() if (v := setting(k, ok[0])) not in ok}
    if unsupported:
        allowed = "; ".join(f"{k}: {' or '.join(map(repr, MPT_SUPPORTED[k]))}" for k in unsupported)
        raise ValueError(
            f"model.lm: this MPT config sets {unsupported}, which transformers' MptForCausalLM does not implement "
            f"(it would compute another function than the checkpoint was trained with; it implements {allowed}). "
            "Use a checkpoint without these settings, or an LM family transformers implements fully."
        )


def _attn_kwargs(spec: LMSpec, config) -> dict:
    """transformers picks SDPA by itself where a family supports it; `eager` is asked for explicitly. MPT (eager
    only in transformers) is switched after loading (`mpt_attention`)."""
    if spec.attention == "eager" and getattr(config, "model_type", None) != "mpt":
        return {"attn_implementation": "eager"}
    return {}


def get_by_path(root: nn.Module, path: str):
    node = root
    for part in path.split("."):
        node = getattr(node, part)
    return node


def set_by_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(get_by_path(root, parent) if parent else root, last, value)


def find_decoder_layers_path(lm: nn.Module, override: Optional[str] = None) -> str:
    """The dotted path of `lm`'s decoder layer list: `override`, else the table entry for its model_type."""
    model_type = getattr(lm.config, "model_type", None)
    path = override or DECODER_LAYERS.get(model_type)
    if path is None:
        raise ValueError(
            f"cannot find the decoder layers of {type(lm).__name__} (model_type '{model_type}'): set "
            f"model.lm.decoder_layers_attr to the dotted path of its layer list (e.g. model.layers); "
            f"known model types: {sorted(DECODER_LAYERS)}"
        )
    try:
        layers = get_by_path(lm, path)
    except AttributeError:
        layers = None
    if not isinstance(layers, nn.ModuleList):
        where = "model.lm.decoder_layers_attr" if override else f"the known path for model_type '{model_type}'"
        raise ValueError(
            f"{where} '{path}' is not a layer list (nn.ModuleList) on {type(lm).__name__}; "
            f"set model.lm.decoder_layers_attr to the dotted path of its decoder layers"
        )
    return path


def module_path(root: nn.Module, target: nn.Module) -> str:
    """The dotted name of submodule `target` inside `root`."""
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def hidden_size(lm: nn.Module) -> int:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for key in ("d_model", "hidden_size", "n_embd"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    raise ValueError(f"cannot read the hidden size of {type(lm).__name__} from its config")


def forward_arg_names(module: nn.Module) -> set[str]:
    return set(inspect.signature(module.forward).parameters)
