"""`tools/bench_step` measures each recipe with its release's LM architecture (of_ds.model.releases.LM_CONFIGS, at
random init): the same modules and shapes as the dry run counts, `--skeleton` for every recipe's LM family, and the
meta-device traffic count for the 3B recipe's MosaicGPT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from of_ds.perf.bench_step import bench_spec, bench_lm_config
from of_ds.model import build_flamingo
from of_ds.model.releases import LM_CONFIGS
from of_ds.spec import RunSpec

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "launch" / "specs"
RECIPES = ["openflamingo-3b.yaml", "openflamingo-4b.yaml", "openflamingo-9b.yaml"]


def shapes(model) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("spec_name", RECIPES)
def test_the_bench_builds_the_release_architecture(spec_name, tmp_path):
    recipe = RunSpec.from_yaml(str(SPECS / spec_name), [f"model.lm.cache_dir={tmp_path / 'empty'}"])
    bench = bench_spec(str(SPECS / spec_name), [f"model.lm.cache_dir={tmp_path / 'empty'}"], False, tmp_path)
    published = dict(LM_CONFIGS[recipe.model.lm.name_or_path])
    del published["torch_dtype"]  # built in fp32 (as a loaded LM), cast by the engine
    assert bench.model.lm.config == published
    released, _, _ = build_flamingo(recipe.model, meta=True)  # the dry run's model: the published config
    benched, _, _ = build_flamingo(bench.model, meta=True)
    assert type(benched.lang_encoder) is type(released.lang_encoder)
    assert shapes(benched) == shapes(released)
    assert {p.dtype for p in benched.parameters()} == {p.dtype for p in released.parameters()} == {torch.float32}
    if spec_name == "openflamingo-3b.yaml":  # MosaicGPT with QK LayerNorm, not an MPT without it
        assert benched.lang_encoder.config.model_type == "mosaic_gpt" and benched.lang_encoder.config.attn_qk_ln
        assert "lang_encoder.transformer.blocks.0.decoder_layer.attn.q_ln.weight" in shapes(benched)


def test_the_bench_builds_a_local_lm_from_its_own_config(tmp_path):
    """An LM given as a local directory (the demo's) is benched with its own config, not a release's."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=300,
                tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(tmp_path / "lm")
    bench = bench_spec(str(SPECS / "demo.yaml"), [f"model.lm.name_or_path={tmp_path / 'lm'}"], False, tmp_path)
    lm = bench.model.lm.config
    assert (lm["model_type"], lm["hidden_size"], lm["num_hidden_layers"], lm["vocab_size"]) == ("llama", 48, 3, 300)
    assert "torch_dtype" not in lm and "dtype" not in lm
    model, _, tokenizer = build_flamingo(bench.model, meta=True)
    assert model.lang_dim == 48 and len(model.flamingo_layers()) == 3
    assert len(tokenizer) == 300 + 3  # the word-level stand-in at the LM's size, + <image>, <|endofchunk|>, <PAD>


@pytest.mark.parametrize("spec_name", RECIPES)
def test_the_skeleton_shrinks_every_recipes_lm(spec_name, tmp_path):
    full = bench_spec(str(SPECS / spec_name), [], False, tmp_path / "a")
    skel = bench_spec(str(SPECS / spec_name), [], False, tmp_path / "b", skeleton=True)
    big, _, _ = build_flamingo(full.model, meta=True)
    small, _, _ = build_flamingo(skel.model, meta=True)
    assert len(small.flamingo_layers()) == len(big.flamingo_layers()) > 0
    assert len(small.cross_attention_blocks()) == len(big.cross_attention_blocks()) > 0
    assert small.lang_dim == 32 and sum(p.numel() for p in small.parameters()) < 2e6
    assert type(small.lang_encoder) is type(big.lang_encoder)


def test_the_traffic_count_runs_the_3b_recipes_mosaic_gpt_on_the_meta_device(tmp_path):
    """`--traffic` counts on the meta device: MosaicGPT (QK LayerNorm, low-precision LayerNorms, ALiBi) must run
    there; at tiny widths its counted matmul FLOPs match the FLOP counter's, as for the other LMs."""
    from of_ds.perf.traffic import count_step_traffic
    from of_ds.model.flops import count_step_flops
    from of_ds.model.flops import batch_shapes

    tiny = {**bench_lm_config("anas-awadalla/mpt-1b-redpajama-200b", str(tmp_path / "empty")), "d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 1000}
    lm = "{" + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in tiny.items() if not isinstance(v, (dict, list))) + "}"
    spec = bench_spec(str(SPECS / "openflamingo-3b.yaml"), ["engine.precision=bf16", f"model.lm.config={lm}"], True, tmp_path)
    assert spec.model.lm.config["model_type"] == "mosaic_gpt" and spec.model.lm.config["attn_qk_ln"] is True
    traffic = count_step_traffic(spec)
    meta, _, _ = build_flamingo(spec.model, meta=True)
    size = meta.vision_encoder.image_size
    flops = count_step_flops(meta, batch_shapes(spec, int(size[0] if isinstance(size, (tuple, list)) else size)))
    assert traffic.kinds["gemm"].flops + traffic.kinds["attention"].flops == pytest.approx(flops, rel=0.02)
    assert traffic.ops["native_layer_norm"].calls >= 2 * 2 + 2 * 2  # ln_1, ln_2 and q_ln, k_ln in each of 2 layers
    assert torch.device("meta") == next(meta.parameters()).device
