"""The recipe specs of the released OpenFlamingo models (launch/specs/openflamingo-{3b,4b,9b}.yaml): each names its
release's LM and tokenizer without remote code, and `--dry-run` counts the release's parameters offline, from the
LM's published config where its files are not available locally.

The expected counts are derived here from the original's module definitions and the published configs, by
formula, not by our counting code."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from of_ds.model.releases import GPT_NEOX_TOKENS, LM_CONFIGS, RELEASES
from of_ds.spec import RunSpec

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "launch" / "specs"

# the original's PerceiverResampler(dim=1024) (depth 6, 8 heads of 64, 64 latents, ff x4, no media/frame embeddings)
PERCEIVER_1024 = 63_019_008
# one GatedCrossAttentionBlock(dim, dim_visual=1024, dim_head=64, heads=8, ff_mult=4), by LM width
XATTN = {2048: 36_708_354, 2560: 56_109_058, 4096: 139_476_994}
FLAMINGO_TOKENS = 3  # <|endofchunk|>, <image>, <PAD>: each release's tokenizer has 50280 entries


def xattn_block(d: int, dim_visual: int = 1024, inner: int = 8 * 64, ff_mult: int = 4) -> int:
    attn = 2 * d + d * inner + dim_visual * 2 * inner + inner * d + 1  # norm, to_q, to_kv, to_out, attn_gate
    ff = 2 * d + d * ff_mult * d + ff_mult * d * d + 1  # norm, two bias-free linears, ff_gate
    return attn + ff


def vit_visual(cfg: dict) -> int:
    """open_clip's VisionTransformer (what the original keeps of CLIP: `.visual`, projection included)."""
    v = cfg["vision_cfg"]
    w, layers, patch, out = v["width"], v["layers"], v["patch_size"], cfg["embed_dim"]
    mlp = int(w * v.get("mlp_ratio", 4.0))
    tokens = (v["image_size"] // patch) ** 2 + 1
    block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * mlp + mlp) + (mlp * w + w)
    return 3 * patch * patch * w + w + tokens * w + 2 * w + layers * block + 2 * w + w * out


def lm_params(cfg: dict) -> tuple[int, int, int, bool]:
    """(parameters, width, layers, output head tied) of a published LM config."""
    kind = cfg["model_type"]
    if kind == "mosaic_gpt":  # MosaicGPT, no_bias: LayerNorms without biases; QK LayerNorm over the full width
        d, L, V = cfg["d_model"], cfg["n_layers"], cfg["vocab_size"]
        assert cfg["no_bias"] and cfg["alibi"]  # no biases, no position table
        block = d + 3 * d * d + (2 * d if cfg["attn_qk_ln"] else 0) + d * d + d + 2 * cfg["mlp_ratio"] * d * d
        return V * d + L * block + d, d, L, True
    if kind == "mpt":  # MPT (transformers' MptForCausalLM): bias-free LayerNorms and linears, ALiBi, tied head
        d, L, V = cfg["d_model"], cfg["n_layers"], cfg["vocab_size"]
        assert cfg["no_bias"] and cfg["attn_config"]["alibi"]
        block = d + 3 * d * d + d * d + d + 2 * cfg["expansion_ratio"] * d * d
        return V * d + L * block + d, d, L, True
    if kind == "gpt_neox":  # GPT-NeoX: biases everywhere, rotary (no table), untied embed_in / embed_out
        d, L, V, f = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["intermediate_size"]
        assert not cfg["tie_word_embeddings"]
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
        return 2 * V * d + L * block + 2 * d, d, L, False
    raise AssertionError(kind)


def expected_counts(release_lm: str, every: int) -> tuple[int, int]:
    import open_clip

    lm, d, layers, tied = lm_params(LM_CONFIGS[release_lm])
    blocks = layers // every
    new_tokens = FLAMINGO_TOKENS * d * (1 if tied else 2)  # of_ds's new-token tables (input; output when untied)
    trainable = PERCEIVER_1024 + blocks * XATTN[d] + new_tokens
    return vit_visual(open_clip.get_model_config("ViT-L-14")) + lm + trainable, trainable


RECIPES = {  # spec -> (release LM, cross-attention interval, total, trainable)
    "openflamingo-3b.yaml": ("anas-awadalla/mpt-1b-redpajama-200b", 1, 2_559_434_800, 944_025_648),
    "openflamingo-4b.yaml": ("togethercomputer/RedPajama-INCITE-Base-3B-v1", 2, 4_040_609_824, 960_779_296),
    "openflamingo-9b.yaml": ("anas-awadalla/mpt-7b", 4, 8_132_100_112, 1_178_847_248),
}


def test_the_formulas_reproduce_the_original_module_sizes():
    assert {d: xattn_block(d) for d in XATTN} == XATTN
    for name, (lm, every, total, trainable) in RECIPES.items():
        assert expected_counts(lm, every) == (total, trainable), name


def test_every_release_has_a_recipe_spec_naming_its_lm_without_remote_code():
    recipes = {}
    for name, release in RELEASES.items():
        path = REPO / release.spec
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        spec = RunSpec.from_yaml(str(path), [])
        assert spec.model.cross_attn.every_n_layers == release.cross_attn_every_n_layers, name
        assert spec.model.vision.name == "ViT-L-14" and spec.model.vision.pretrained == "openai"
        assert spec.model.lm.trust_remote_code is False and spec.model.lm.config is None
        assert release.lm in text, (name, "names its LM, at least as the -langinstruct variant's override")
        if not name.endswith("-langinstruct"):
            assert spec.model.lm.name_or_path == release.lm and spec.model.tokenizer == release.tokenizer, name
        recipes[path.name] = spec
    assert set(recipes) == set(RECIPES)
    # the same data and optimizer recipe (the original's README / run_train.sh) for every release
    base = recipes["openflamingo-3b.yaml"].to_dict()
    for name, spec in recipes.items():
        d = spec.to_dict()
        assert (d["data"], d["optim"], d["engine"]) == (base["data"], base["optim"], base["engine"]), name


def _train_main():
    loader = importlib.util.spec_from_file_location("of_ds_launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("spec_name", list(RECIPES))
def test_dry_run_counts_the_release_offline(spec_name, tmp_path, capsys, monkeypatch):
    """Nothing cached (an empty cache dir, the hub offline): the dry run counts from the published config and
    GPT-NeoX's tokenizer size, and says so."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    lm, _, total, trainable = RECIPES[spec_name]
    main = _train_main()
    # --no-preflight: the recipe is a template (its shards are placeholders); the plan needs none of its files
    assert main(["--spec", str(SPECS / spec_name), "--dry-run", "--no-preflight", "--set", f"model.lm.cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "not available locally" in line]
    assert len(said) == 1 and lm in said[0] and "published config.json" in said[0] and f"{GPT_NEOX_TOKENS:,}" in said[0], said
    assert f"# parameters: total {total:,}, trainable {trainable:,} " in out, re.findall(r"# parameters: .*", out)


def test_a_local_copy_of_the_config_is_used_instead(tmp_path, capsys):
    """A release LM whose config.json is in the HF cache is counted from that file (here a 2-layer edit of it); the
    tokenizer, not cached, is still stood in for."""
    from of_ds.model import build_flamingo, count_parameters

    name = "anas-awadalla/mpt-1b-redpajama-200b"
    snapshot = tmp_path / ("models--" + name.replace("/", "--")) / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps({**LM_CONFIGS[name], "n_layers": 2}))
    spec = RunSpec.from_yaml(str(SPECS / "openflamingo-3b.yaml"), [f"model.lm.cache_dir={tmp_path}"])
    model, _, tokenizer = build_flamingo(spec.model, meta=True)
    said = [line for line in capsys.readouterr().out.splitlines() if "not available locally" in line]
    assert len(said) == 1 and "published config.json" not in said[0] and "tokenizer" in said[0], said
    assert len(tokenizer) == GPT_NEOX_TOKENS + FLAMINGO_TOKENS
    total, trainable = expected_counts(name, 1)
    lm_full, d, layers, _ = lm_params(LM_CONFIGS[name])
    lm_two, _, _, _ = lm_params({**LM_CONFIGS[name], "n_layers": 2})
    two_layers = total - (lm_full - lm_two) - (layers - 2) * XATTN[d]
    assert count_parameters(model) == {"total": two_layers, "trainable": trainable - (layers - 2) * XATTN[d]}


def test_a_real_build_without_the_files_fails_naming_the_field(tmp_path, tiny_tokenizer_dir):
    """Only meta builds stand in for missing files: building the model for real fails, naming the spec field."""
    from of_ds.model import build_flamingo

    sets = ["model.offline=true", f"model.lm.cache_dir={tmp_path}"]
    spec = RunSpec.from_yaml(str(SPECS / "openflamingo-3b.yaml"), sets)
    with pytest.raises(OSError, match="model.tokenizer 'anas-awadalla/mpt-1b-redpajama-200b'"):
        build_flamingo(spec.model)
    tiny_vit = ("model.vision.config={embed_dim: 16, vision_cfg: {image_size: 32, layers: 1, width: 24, head_width: 12, "
                "patch_size: 16}, text_cfg: {context_length: 8, vocab_size: 16, width: 16, heads: 2, layers: 1}}")
    spec = RunSpec.from_yaml(str(SPECS / "openflamingo-3b.yaml"), sets + [
        f"model.tokenizer={tiny_tokenizer_dir}", "model.vision.name=release-test-vit", "model.vision.pretrained=null", tiny_vit])
    with pytest.raises(OSError, match="model.lm.name_or_path 'anas-awadalla/mpt-1b-redpajama-200b'"):
        build_flamingo(spec.model)
