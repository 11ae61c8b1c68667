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
    "mosaic_gpt": "transformer.blocks",  # MosaicGPT remote code (anas-awadalla/mpt-1b-redpajama-200b)
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
}


def build_language_model(spec: LMSpec, *, offline: bool, load_weights: bool = True) -> nn.Module:
    """An HF causal LM in fp32: from `spec.config` (random init), or by name/path (weights unless `load_weights`),
    with the attention kernel of `spec.attention`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.config is not None:
        cfg = dict(spec.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        check_native_mpt_config(config)
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code, **_attn_kwargs(spec, config))
    else:
        common = dict(trust_remote_code=spec.trust_remote_code, cache_dir=spec.cache_dir, local_files_only=offline)
        config = AutoConfig.from_pretrained(spec.name_or_path, **common)
        check_native_mpt_config(config)
        if not load_weights:
            lm = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code, **_attn_kwargs(spec, config))
        else:
            lm = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=torch.float32, **_attn_kwargs(spec, config), **common)
    if spec.attention == "sdpa" and getattr(lm.config, "model_type", None) == "mpt":
        from .mpt_attention import use_sdpa_attention

        if use_sdpa_attention(lm) == 0:
            print(f"[of_ds] model.lm.attention=sdpa: {type(lm).__name__} is not transformers' MPT (remote code?); "
                  f"its attention is left as it is", flush=True)
    return lm


# the only values of these MPT settings that transformers' MptForCausalLM implements
MPT_SUPPORTED = {
    "attn_config.qk_ln": False, "attn_config.alibi": True, "attn_config.alibi_bias_max": 8,
    "attn_config.attn_type": "multihead_attention", "logit_scale": None, "no_bias": True,
}


def check_native_mpt_config(config) -> None:
    """transformers' MPT implements one MPT variant and accepts the settings of others without a word: it has no
    QK LayerNorm (MPT-1B, e.g. anas-awadalla/mpt-1b-redpajama-200b converted from MosaicGPT, uses it), no logit
    scale, no biases, multi-head attention and ALiBi with a maximum bias of 8 only. A config with any other setting
    would load into a different function; refuse it, naming the setting."""
    if getattr(config, "model_type", None) != "mpt":
        return

    def setting(key: str, default):
        owner, _, name = key.rpartition(".")
        obj = config.attn_config if owner else config
        return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)

    values = {k: v for k, default in MPT_SUPPORTED.items() if (v := setting(k, default)) != default}
    if values:
        raise ValueError(
            f"model.lm: this MPT config sets {values}, which transformers' MptForCausalLM ignores (it would compute "
            "another function than the checkpoint was trained with). Use a checkpoint without these settings, or an "
            "LM family transformers implements fully."
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
