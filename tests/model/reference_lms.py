"""The reference implementations of the MPT-family LMs OpenFlamingo released, for side-by-side tests at tiny sizes.

- `llm_foundry_mpt`: llm-foundry 0.1.0's `MPTForCausalLM`, the code mosaicml/mpt-7b's (and so anas-awadalla/mpt-7b's)
  hub remote code was flattened from. `make test` installs the wheel apart (--no-deps, into .venv/reference;
  `OF_REFERENCE_PACKAGE` overrides where it is read from).
- `mosaic_gpt_reference`: MosaicGPT as anas-awadalla/mpt-1b-redpajama-200b runs it: the mosaicml/examples code of
  April 2023 (read at test time from a git mirror, `OF_MOSAICGPT_MIRROR`) when there is one, else llm-foundry 0.1.0's
  MPT built with the equivalent MPT config and a key map between the two layouts (`test_mpt_release.py` checks that
  both compute the same function).
- `write_hub_release`: a hub-layout folder (config.json + pytorch_model.bin) as the releases are.

Nothing of the reference code lives in this repo. It is imported from its own files, with stand-ins for only the
names it imports from composer and omegaconf (used by the Composer training wrappers, never by the model classes)
and for its HF prefix-LM converter, which imports transformers 4.x internals (it converts other HF models to prefix
LMs; the model classes do not use it). Every stand-in raises when used, so no behaviour of the models is replaced.
Without the llm-foundry install these helpers skip the test, or fail it under CI, where `make test` installs it.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
REFERENCE_PACKAGE = Path(os.environ.get("OF_REFERENCE_PACKAGE", REPO / ".venv" / "reference"))
MOSAICGPT_MIRROR = Path(os.environ.get("OF_MOSAICGPT_MIRROR", "") or os.devnull)  # a bare git dir of mosaicml/examples, if any
# mosaicml/examples just before its 2023-04-25 ALiBi-slope change: the MosaicGPT code of the April 2023 release
MOSAICGPT_COMMIT = "fbfdf68f^"
MOSAICGPT_PATHS = [
    "examples/llm/src/models/mosaic_gpt/__init__.py",
    "examples/llm/src/models/mosaic_gpt/configuration_mosaic_gpt.py",
    "examples/llm/src/models/mosaic_gpt/mosaic_gpt.py",
    "examples/llm/src/models/layers",
    "examples/llm/src/models/utils",
]


def _missing(why: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)


# --- stand-ins -----------------------------------------------------------------------------------------------------


class _WrapperOnly:
    """A composer/omegaconf name that the reference imports for its Composer training wrapper only."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is a stand-in: the reference's Composer wrapper is not usable here")


def _stand_in_module(name: str, *class_names: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so that its submodules' stand-ins import
    for cls in class_names:
        setattr(mod, cls, type(cls, (_WrapperOnly,), {"__module__": name}))
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def _unusable(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in: the reference's HF prefix-LM converter is not importable here")

    fn.__name__ = name
    return fn


def _composer_stand_ins(lp_layer_norm: Optional[type] = None) -> dict[str, types.ModuleType]:
    mods = {
        "composer": _stand_in_module("composer"),
        "composer.metrics": _stand_in_module(
            "composer.metrics", "InContextLearningLMAccuracy", "InContextLearningLMExpectedCalibrationError",
            "InContextLearningMCExpectedCalibrationError", "InContextLearningMultipleChoiceAccuracy",
            "InContextLearningQAAccuracy"),
        "composer.metrics.nlp": _stand_in_module("composer.metrics.nlp", "LanguageCrossEntropy", "LanguagePerplexity"),
        "composer.models": _stand_in_module("composer.models", "HuggingFaceModel"),
        "omegaconf": _stand_in_module("omegaconf", "DictConfig", "OmegaConf"),
    }
    if lp_layer_norm is not None:
        # MosaicGPT's layer norms are composer's LPLayerNorm: not a stand-in but the same class, which llm-foundry
        # copied into its layers/norm.py (a LayerNorm computed outside autocast; without autocast, nn.LayerNorm)
        for name in ("composer.algorithms", "composer.algorithms.low_precision_layernorm"):
            mods[name] = _stand_in_module(name)
        name = "composer.algorithms.low_precision_layernorm.low_precision_layernorm"
        mods[name] = _stand_in_module(name, LPLayerNorm=lp_layer_norm)
    return mods


def _prefixlm_converter_stand_in(name: str) -> types.ModuleType:
    return _stand_in_module(name, add_bidirectional_mask_if_missing=_unusable("add_bidirectional_mask_if_missing"),
                            convert_hf_causal_lm_to_prefix_lm=_unusable("convert_hf_causal_lm_to_prefix_lm"))


def _import_from(root: Path, bare_packages: list[str], stand_ins: dict[str, types.ModuleType], module: str):
    """Import `module` from the source tree at `root`: `bare_packages` as empty packages (their __init__ files
    import the training stack), `stand_ins` in sys.modules only while importing."""
    saved = {name: sys.modules.get(name) for name in stand_ins}
    for pkg in bare_packages:
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(root.joinpath(*pkg.split(".")))]
        sys.modules[pkg] = mod
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


# --- llm-foundry 0.1.0 ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _llm_foundry_modules(root: str):
    stand_ins = _composer_stand_ins()
    stand_ins["llmfoundry.models.utils.hf_prefixlm_converter"] = _prefixlm_converter_stand_in(
        "llmfoundry.models.utils.hf_prefixlm_converter")
    modeling = _import_from(Path(root), ["llmfoundry", "llmfoundry.models"], stand_ins, "llmfoundry.models.mpt.modeling_mpt")
    norm = importlib.import_module("llmfoundry.models.layers.norm")
    config = importlib.import_module("llmfoundry.models.mpt.configuration_mpt")
    return modeling, config, norm


def llm_foundry():
    """(modeling_mpt, configuration_mpt, layers.norm) of the installed llm-foundry 0.1.0; skips (fails under CI)
    without it."""
    if not (REFERENCE_PACKAGE / "llmfoundry" / "models" / "mpt" / "modeling_mpt.py").is_file():
        _missing(f"llm-foundry 0.1.0 is not installed at {REFERENCE_PACKAGE} (`make test` installs it)")
    return _llm_foundry_modules(str(REFERENCE_PACKAGE))


def llm_foundry_mpt(config: dict) -> nn.Module:
    """llm-foundry 0.1.0's MPTForCausalLM from an MPTConfig dict (`model_type`, `architectures`, `auto_map` and the
    like are accepted and kept, as in a release's config.json): random init by its own init_config, fp32, eval mode,
    `attn_impl` torch (its flash/triton kernels need CUDA)."""
    modeling, configuration, _ = llm_foundry()
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    cfg["attn_config"] = {**configuration.attn_config_defaults, **cfg.get("attn_config", {}), "attn_impl": "torch"}
    cfg["init_device"] = "cpu"
    # transformers 4's PretrainedConfig defaulted tie_word_embeddings to True (MPTForCausalLM requires it and the
    # releases' config.json leave it out); transformers 5's sets no default
    cfg.setdefault("tie_word_embeddings", True)
    model = modeling.MPTForCausalLM(configuration.MPTConfig(**cfg))
    return model.float().eval()


# --- MosaicGPT -----------------------------------------------------------------------------------------------------


def mosaicgpt_mirror_available() -> bool:
    return MOSAICGPT_MIRROR.is_dir()


@functools.lru_cache(maxsize=None)
def _examples_modules(mirror: str, lp_layer_norm: type):
    dest = Path(tempfile.mkdtemp(prefix="of_ds_mosaicgpt_"))
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    archive = subprocess.run(["git", f"--git-dir={mirror}", "archive", MOSAICGPT_COMMIT, *MOSAICGPT_PATHS],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    stand_ins = _composer_stand_ins(lp_layer_norm)
    stand_ins["examples.llm.src.models.utils.hf_prefixlm_converter"] = _prefixlm_converter_stand_in(
        "examples.llm.src.models.utils.hf_prefixlm_converter")
    bare = ["examples", "examples.llm", "examples.llm.src", "examples.llm.src.models"]
    modeling = _import_from(dest, bare, stand_ins, "examples.llm.src.models.mosaic_gpt.mosaic_gpt")
    configuration = importlib.import_module("examples.llm.src.models.mosaic_gpt.configuration_mosaic_gpt")
    return modeling, configuration


def examples_mosaic_gpt(config: dict) -> nn.Module:
    """The mosaicml/examples MosaicGPT of April 2023 from the git mirror (skips without it, also under CI: the mirror
    is this machine's, not CI's): random init, fp32, eval mode, attn_impl torch. Its forward needs a bool
    attention_mask."""
    if not mosaicgpt_mirror_available():
        pytest.skip(f"no mosaicml/examples git mirror at {MOSAICGPT_MIRROR} (OF_MOSAICGPT_MIRROR)")
    _, _, norm = llm_foundry()
    modeling, configuration = _examples_modules(str(MOSAICGPT_MIRROR), norm.LPLayerNorm)
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    cfg.update(attn_impl="torch", init_device="cpu")
    return modeling.MosaicGPT(configuration.MosaicGPTConfig(**cfg)).float().eval()


# MosaicGPTConfig's defaults (mosaicml/examples, April 2023) for the settings that shape the function
MOSAICGPT_DEFAULTS = dict(
    mlp_ratio=4, attn_pdrop=0.0, resid_pdrop=0.0, emb_pdrop=0.0, attn_qk_ln=False, attn_clip_qkv=None,
    softmax_scale=None, prefix_lm=False, attn_uses_sequence_id=False, alibi=False, alibi_bias_max=8,
    logit_scale=None, no_bias=False, embedding_fraction=1.0, low_precision_layernorm=True, max_seq_len=2048,
)


def mosaicgpt_to_mpt_config(config: dict) -> dict:
    """The llm-foundry MPTConfig dict computing the same function as a MosaicGPTConfig dict."""
    c = {**MOSAICGPT_DEFAULTS, **{k: v for k, v in config.items() if k != "model_type"}}
    return dict(
        d_model=c["d_model"], n_heads=c["n_heads"], n_layers=c["n_layers"], expansion_ratio=c["mlp_ratio"],
        max_seq_len=c["max_seq_len"], vocab_size=c["vocab_size"], resid_pdrop=c["resid_pdrop"],
        emb_pdrop=c["emb_pdrop"], learned_pos_emb=not c["alibi"], logit_scale=c["logit_scale"],
        no_bias=c["no_bias"], embedding_fraction=c["embedding_fraction"],
        norm_type="low_precision_layernorm" if c["low_precision_layernorm"] else "layernorm",
        attn_config=dict(
            attn_type="multihead_attention", attn_pdrop=c["attn_pdrop"], attn_impl="torch", qk_ln=c["attn_qk_ln"],
            clip_qkv=c["attn_clip_qkv"], softmax_scale=c["softmax_scale"], prefix_lm=c["prefix_lm"],
            attn_uses_sequence_id=c["attn_uses_sequence_id"], alibi=c["alibi"], alibi_bias_max=c["alibi_bias_max"],
        ),
    )


def mosaicgpt_key_map(config: dict) -> dict[str, str]:
    """MosaicGPT state_dict key -> llm-foundry MPT key, for every parameter of a MosaicGPT with this config."""
    c = {**MOSAICGPT_DEFAULTS, **config}
    bias = ("weight",) if c["no_bias"] else ("weight", "bias")
    out = {"transformer.wte.weight": "transformer.wte.weight"}
    if not c["alibi"]:
        out["transformer.wpe.weight"] = "transformer.wpe.weight"
    renames = [("ln_1", "norm_1"), ("attn.Wqkv", "attn.Wqkv"), ("attn.out_proj", "attn.out_proj"),
               ("ln_2", "norm_2"), ("mlp.mlp_up", "ffn.up_proj"), ("mlp.mlp_down", "ffn.down_proj")]
    if c["attn_qk_ln"]:
        renames += [("attn.q_ln", "attn.q_ln"), ("attn.k_ln", "attn.k_ln")]
    for i in range(c["n_layers"]):
        for ours, theirs in renames:
            for p in bias:
                out[f"transformer.blocks.{i}.{ours}.{p}"] = f"transformer.blocks.{i}.{theirs}.{p}"
    for p in bias:
        out[f"transformer.ln_f.{p}"] = f"transformer.norm_f.{p}"
    return out


def mosaic_gpt_reference(config: dict) -> tuple[nn.Module, dict[str, str]]:
    """A reference MosaicGPT for a MosaicGPTConfig dict (random init, fp32, eval mode, attn_impl torch) and the map
    from MosaicGPT state_dict keys to its keys: the mosaicml/examples MosaicGPT from the git mirror (identity map)
    when there is one, else llm-foundry 0.1.0's MPT with `mosaicgpt_to_mpt_config(config)`, which computes the
    same function (`test_mpt_release.py`; n_heads a power of two: llm-foundry 0.1.0 takes ALiBi slopes for other
    head counts from the next power of two, as MPT-7B does, the April 2023 MosaicGPT did not). Both take input_ids
    and a bool attention_mask and return `.logits`; caching (`use_cache=True`) returns (key, value) pairs of shape
    (batch, seq, d_model) per layer. To run weights of a MosaicGPT-keyed model `m` in the reference:
    `ref.load_state_dict({key_map[k]: v for k, v in m.state_dict().items()})`."""
    if mosaicgpt_mirror_available():
        model = examples_mosaic_gpt(config)
        return model, {k: k for k in model.state_dict()}
    model = llm_foundry_mpt(mosaicgpt_to_mpt_config(config))
    key_map = mosaicgpt_key_map(config)
    assert sorted(key_map.values()) == sorted(model.state_dict()), "the MosaicGPT -> MPT key map misses keys"
    return model, key_map


# --- releases ------------------------------------------------------------------------------------------------------


def write_hub_release(directory, config_dict: dict, state_dict: dict, tokenizer_dir=None) -> Path:
    """A hub-layout model folder as OpenFlamingo's LM releases are: config.json exactly as given, pytorch_model.bin
    (torch.save of the state_dict) and, given `tokenizer_dir`, that folder's tokenizer files. -> the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    torch.save({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, directory / "pytorch_model.bin")
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name not in ("config.json", "pytorch_model.bin"):
                shutil.copy(f, directory / f.name)
    return directory
