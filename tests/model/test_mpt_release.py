"""OpenFlamingo's MPT LMs without remote code, against their reference code at tiny sizes (`reference_lms`).

- anas-awadalla/mpt-7b (mosaicml/mpt-7b's config and weights): a hub-layout folder holding llm-foundry 0.1.0's
  MPTForCausalLM, with every field the release's config.json sets, loads through `build_language_model` into
  transformers' MptForCausalLM and computes the reference's logits, padded and with a KV cache, with of_ds's SDPA
  attention and with transformers' eager one.
- `check_native_mpt_config` refuses, by name, every MPT setting transformers' MPT does not implement, and accepts
  the ones it does (those that only change the kernel, the initialisation or nothing).
- the two MosaicGPT references (mosaicml/examples' MosaicGPT, llm-foundry's MPT through a key map) compute the same
  function for the MosaicGPT release's settings.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from transformers import AutoConfig

from of_ds.model.language import MPT_SUPPORTED, build_language_model, check_native_mpt_config
from of_ds.spec import LMSpec

from . import reference_lms as ref

# mosaicml/mpt-7b's config.json (anas-awadalla/mpt-7b's), field for field
MPT7B_CONFIG = {
    "architectures": ["MPTForCausalLM"],
    "attn_config": {
        "alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None, "prefix_lm": False,
        "qk_ln": False, "softmax_scale": None,
    },
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "d_model": 4096, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
    "init_config": {
        "emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in", "init_div_is_residual": True,
        "init_gain": 0, "init_nonlinearity": "relu", "init_std": 0.02, "name": "kaiming_normal_", "verbose": 0,
    },
    "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 2048, "model_type": "mpt",
    "n_heads": 32, "n_layers": 32, "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16", "transformers_version": "4.28.1",
    "use_cache": False, "verbose": 0, "vocab_size": 50432,
}
TINY = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=24, vocab_size=96)


def tiny_release_config(**attn_overrides) -> dict:
    cfg = copy.deepcopy(MPT7B_CONFIG)
    cfg.update(TINY)
    cfg["attn_config"].update(attn_overrides)
    return cfg


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value (the layer norms' ones included), so that a weight loaded
    into the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def reference_and_release(tmp_path, config: dict, seed: int = 0):
    """llm-foundry's MPT for `config` (perturbed weights) and its hub-layout release folder."""
    torch.manual_seed(seed)
    model = perturbed(ref.llm_foundry_mpt(config), seed)
    folder = ref.write_hub_release(tmp_path / "mpt-7b", config, model.state_dict())
    return model, folder


def load_native(folder, attention: str):
    lm = build_language_model(LMSpec(name_or_path=str(folder), trust_remote_code=False, attention=attention), offline=True)
    return lm.eval()


def right_padded(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


def cache_argument(lm) -> str:
    """The KV cache's keyword: `cache` from transformers 5.24 on, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return reference_and_release(tmp_path_factory.mktemp("release"), tiny_release_config())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_mpt7b_release_loads_natively_with_the_reference_logits(release, attention):
    from transformers.models.mpt.modeling_mpt import MptForCausalLM

    reference, folder = release
    lm = load_native(folder, attention)
    assert type(lm) is MptForCausalLM
    assert any(hasattr(m, "_of_ds_bias") for m in lm.modules()) == (attention == "sdpa")
    # every tensor of the release landed in its place; the output head is the tied input embedding
    ours = lm.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr()

    ids, mask = right_padded(TINY["vocab_size"])
    with torch.no_grad():
        want = reference(ids, attention_mask=mask.bool()).logits
        got = lm(input_ids=ids, attention_mask=mask).logits
        want_unpadded = reference(ids).logits
        got_unpadded = lm(input_ids=ids).logits
    assert want.abs().max() > 1  # not a degenerate function
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_unpadded, want_unpadded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want_unpadded[1], want[1], atol=1e-3)  # the mask matters


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_mpt7b_release_cached_decoding_matches_the_reference(release, attention):
    """Left-padded prompts, then one token at a time through each model's KV cache."""
    reference, folder = release
    lm = load_native(folder, attention)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, TINY["vocab_size"], (2, 6), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    steps = torch.randint(0, TINY["vocab_size"], (2, 5), generator=g)
    with torch.no_grad():
        r = reference(prompt, attention_mask=mask.bool(), use_cache=True)
        o = lm(input_ids=prompt, attention_mask=mask, use_cache=True)
        torch.testing.assert_close(o.logits[mask.bool()], r.logits[mask.bool()], rtol=1e-5, atol=1e-5)
        r_past, o_past = r.past_key_values, returned_cache(o)
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            tok = steps[:, t:t + 1]
            r = reference(tok, past_key_values=r_past, attention_mask=mask.bool(), use_cache=True)
            o = lm(input_ids=tok, attention_mask=mask, use_cache=True, **{cache_argument(lm): o_past})
            r_past, o_past = r.past_key_values, returned_cache(o)
            torch.testing.assert_close(o.logits, r.logits, rtol=1e-5, atol=1e-5, msg=f"step {t}")
        # the cached path is the uncached one
        full = reference(torch.cat([prompt, steps], dim=1), attention_mask=mask.bool()).logits[:, -1:]
    torch.testing.assert_close(r.logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_clip_qkv_and_softmax_scale_are_honoured(tmp_path, attention):
    """Two settings the release leaves at null that transformers' MPT (and of_ds's SDPA path) do implement."""
    config = tiny_release_config(clip_qkv=0.3, softmax_scale=0.7)
    reference, folder = reference_and_release(tmp_path, config)
    check_native_mpt_config(AutoConfig.from_pretrained(folder))
    lm = load_native(folder, attention)
    ids, mask = right_padded(TINY["vocab_size"])
    plain = ref.llm_foundry_mpt(tiny_release_config())
    plain.load_state_dict(reference.state_dict())
    with torch.no_grad():
        want = reference(ids, attention_mask=mask.bool()).logits
        got = lm(input_ids=ids, attention_mask=mask).logits
        without = plain(ids, attention_mask=mask.bool()).logits
    assert not torch.allclose(without, want, atol=1e-2)  # the two settings change the function
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_write_hub_release_writes_the_release_layout(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    state = {"transformer.wte.weight": torch.randn(4, 2)[:, :1], "transformer.norm_f.weight": torch.ones(3)}
    folder = ref.write_hub_release(tmp_path / "release", MPT7B_CONFIG, state, tokenizer_dir=tiny_tokenizer_dir)
    assert json.loads((folder / "config.json").read_text()) == MPT7B_CONFIG
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items())
    assert len(AutoTokenizer.from_pretrained(folder)) == len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))


# --- check_native_mpt_config -----------------------------------------------------------------------------------------

# (setting, a value transformers' MPT would not honour)
REFUSED = [
    ("attn_config.attn_type", "multiquery_attention"),
    ("attn_config.qk_ln", True),
    ("attn_config.qk_gn", True),
    ("attn_config.alibi", False),
    ("attn_config.alibi_bias_max", 16),
    ("attn_config.prefix_lm", True),
    ("attn_config.attn_uses_sequence_id", True),
    ("attn_config.attn_pdrop", 1),
    ("attn_config.rope", True),
    ("attn_config.sliding_window_size", 64),
    ("attn_config.attn_logit_softcapping", 30.0),
    ("logit_scale", 0.5),
    ("logit_scale", "inv_sqrt_d_model"),
    ("final_logit_softcapping", 30.0),
    ("no_bias", False),
    ("expansion_ratio", 2),
    ("resid_pdrop", 0.1),
    ("emb_pdrop", 0.1),
    ("embedding_fraction", 0.5),
    ("norm_type", "rmsnorm"),
    ("norm_type", "low_precision_rmsnorm"),
    ("norm_eps", 1e-6),
    ("ffn_config.ffn_type", "mptglu"),
    ("ffn_config.ffn_hidden_size", 48),
    ("ffn_config.ffn_act_fn", {"name": "silu"}),
    ("block_overrides", {"order": []}),
]
# values other than the release's that compute the same function in transformers' MPT
ACCEPTED = [
    ("attn_config.attn_impl", "flash"),
    ("attn_config.attn_impl", "triton"),
    ("attn_config.clip_qkv", 6.0),
    ("attn_config.softmax_scale", 0.125),
    ("learned_pos_emb", False),  # with ALiBi no release code builds a position table, whatever this says
    ("norm_type", "layernorm"),  # the same LayerNorm; low_precision_ only changes the dtype under autocast
    ("ffn_config.ffn_type", "mptmlp"),
    ("ffn_config.ffn_act_fn", {"name": "gelu", "approximate": "none"}),
    ("init_config", {"name": "baseline_", "init_std": 0.01}),
    ("init_device", "meta"),
    ("verbose", 2),
    ("use_cache", True),
]


def with_setting(cfg: dict, key: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    owner, _, name = key.rpartition(".")
    (cfg.setdefault(owner, {}) if owner else cfg)[name] = value
    return cfg


def native_config(cfg: dict):
    cfg = dict(cfg)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def test_the_release_config_is_accepted_and_every_table_key_is_checked():
    check_native_mpt_config(native_config(MPT7B_CONFIG))
    assert {key for key, _ in REFUSED} == set(MPT_SUPPORTED)


@pytest.mark.parametrize("key,value", REFUSED, ids=[f"{k}={v}" for k, v in REFUSED])
def test_settings_transformers_mpt_ignores_are_refused_by_name(key, value):
    config = native_config(with_setting(tiny_release_config(), key, value))
    with pytest.raises(ValueError, match=rf"model\.lm: .*'{key}'"):
        check_native_mpt_config(config)


@pytest.mark.parametrize("key,value", ACCEPTED, ids=[f"{k}={v}" for k, v in ACCEPTED])
def test_settings_transformers_mpt_honours_are_accepted(key, value):
    check_native_mpt_config(native_config(with_setting(tiny_release_config(), key, value)))


def test_a_refused_release_fails_at_build(tmp_path):
    _, folder = reference_and_release(tmp_path, tiny_release_config(prefix_lm=True))
    with pytest.raises(ValueError, match=r"model\.lm: .*attn_config\.prefix_lm"):
        load_native(folder, "sdpa")


# --- the MosaicGPT references ----------------------------------------------------------------------------------------

# anas-awadalla/mpt-1b-redpajama-200b's settings (the 3B release's LM) at tiny size; 4 heads, a power of two as the
# release's 16
MOSAICGPT_RELEASE = dict(
    d_model=32, n_heads=4, n_layers=2, mlp_ratio=4, max_seq_len=24, vocab_size=96, attn_qk_ln=True, alibi=True,
    alibi_bias_max=8, no_bias=True, low_precision_layernorm=True, attn_clip_qkv=None, softmax_scale=None,
    logit_scale=None, prefix_lm=False, attn_uses_sequence_id=False, embedding_fraction=1.0, emb_pdrop=0,
    resid_pdrop=0, attn_pdrop=0, param_init_fn="kaiming_normal_", init_std=0.02,
)


def test_mosaicgpt_references_compute_the_same_function():
    """mosaicml/examples' MosaicGPT (git mirror; skipped without it) and llm-foundry's MPT built from the
    equivalent config, holding the same weights through `mosaicgpt_key_map`: the same logits, padded and cached."""
    if not ref.mosaicgpt_mirror_available():
        pytest.skip(f"no mosaicml/examples git mirror at {ref.MOSAICGPT_MIRROR} (OF_MOSAICGPT_MIRROR)")
    torch.manual_seed(0)
    mosaic = perturbed(ref.examples_mosaic_gpt(MOSAICGPT_RELEASE))
    mpt = ref.llm_foundry_mpt(ref.mosaicgpt_to_mpt_config(MOSAICGPT_RELEASE))
    key_map = ref.mosaicgpt_key_map(MOSAICGPT_RELEASE)
    assert sorted(key_map) == sorted(mosaic.state_dict())
    mpt.load_state_dict({key_map[k]: v for k, v in mosaic.state_dict().items()})

    ids, mask = right_padded(MOSAICGPT_RELEASE["vocab_size"])
    with torch.no_grad():
        want = mosaic(ids, attention_mask=mask.bool()).logits
        got = mpt(ids, attention_mask=mask.bool()).logits
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # a cached step
        a = mosaic(ids[:, :-1], attention_mask=mask[:, :-1].bool(), use_cache=True)
        b = mpt(ids[:, :-1], attention_mask=mask[:, :-1].bool(), use_cache=True)
        a = mosaic(ids[:, -1:], past_key_values=a.past_key_values, attention_mask=mask.bool(), use_cache=True)
        b = mpt(ids[:, -1:], past_key_values=b.past_key_values, attention_mask=mask.bool(), use_cache=True)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.logits, want[:, -1:], rtol=1e-5, atol=1e-5)


def test_mosaic_gpt_reference_without_the_mirror_takes_mosaicgpt_keys(monkeypatch, tmp_path):
    """The CI path of `mosaic_gpt_reference`: llm-foundry's MPT and a map from every MosaicGPT key to its keys."""
    monkeypatch.setattr(ref, "MOSAICGPT_MIRROR", tmp_path / "absent")
    model, key_map = ref.mosaic_gpt_reference(MOSAICGPT_RELEASE)
    assert type(model).__name__ == "MPTForCausalLM"
    names = {k.replace("transformer.blocks.1.", "transformer.blocks.0.") for k in key_map}
    assert names == {
        "transformer.wte.weight", "transformer.ln_f.weight",
        *(f"transformer.blocks.0.{m}.weight" for m in
          ["ln_1", "attn.Wqkv", "attn.q_ln", "attn.k_ln", "attn.out_proj", "ln_2", "mlp.mlp_up", "mlp.mlp_down"]),
    }
    assert sorted(key_map.values()) == sorted(model.state_dict())
    # with biases and learned positions, the map covers those too
    loose = {**MOSAICGPT_RELEASE, "no_bias": False, "alibi": False}
    model, key_map = ref.mosaic_gpt_reference(loose)
    assert sorted(key_map.values()) == sorted(model.state_dict())
    assert "transformer.wpe.weight" in key_map and "transformer.blocks.1.mlp.mlp_down.bias" in key_map
