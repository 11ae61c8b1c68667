"""The per-GPU memory plan: ZeRO accounting, offload, activation checkpointing, and the recommendation."""

from __future__ import annotations

import pytest

from engines_standin import tiny_spec_dict
from of_ds.perf.memory import GiB, ModelDims, estimate, parse_size, recommend
from of_ds.spec import RunSpec

# roughly the 3B recipe: 2.56 B parameters, 1.05 B trainable, MPT-1B LM, ViT-L-14
DIMS = ModelDims(total_params=2_559_000_000, trainable_params=1_047_000_000, lm_dim=2048, lm_layers=24, xattn_blocks=24,
                 xattn_heads=8, vocab=50280, vis_dim=1024, vis_tokens=257, vis_layers=24, latents=64, perceiver_depth=6,
                 xattn_gated_in=(512, 4 * 2048))


def recipe_spec(tmp_path, precision="bf16") -> RunSpec:
    d = tiny_spec_dict("tok", str(tmp_path))
    d["data"]["datasets"][0].update(batch_size=64, max_tokens=32)
    d["data"]["datasets"][1].update(batch_size=32, max_tokens=256, max_images=6)
    d["engine"] = {"kind": "deepspeed", "precision": precision}
    return RunSpec.from_dict(d)


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB and parse_size("80GB") == 80e9 and parse_size("16") == 16 * GiB


def test_model_states_follow_zero_accounting(tmp_path):
    s = recipe_spec(tmp_path)
    e0, e1, e2, e3 = (estimate(DIMS, s, 8, st) for st in range(4))
    pt, pall = DIMS.trainable_params, DIMS.total_params
    assert e0.params_gib * GiB == pytest.approx(2 * pall) and e0.grads_gib * GiB == pytest.approx(2 * pt)
    assert e0.optimizer_gib * GiB == pytest.approx(12 * pt)
    assert e1.optimizer_gib == pytest.approx(e0.optimizer_gib / 8) and e1.grads_gib == e0.grads_gib
    assert e2.grads_gib == pytest.approx(e0.grads_gib / 8)
    assert e3.params_gib == pytest.approx(e0.params_gib / 8)
    assert e0.total_gib > e1.total_gib > e2.total_gib > e3.total_gib
    off = estimate(DIMS, s, 8, 2, "cpu")
    assert off.optimizer_gib == 0 and off.host_gib > 0
    ckpt = estimate(DIMS, s, 8, 2, checkpointing=True)
    assert ckpt.activations_gib < e2.activations_gib / 2


def test_recommendation(tmp_path):
    s = recipe_spec(tmp_path)
    big = recommend(DIMS, s, 8, parse_size("141GiB"))
    assert big.fits.zero_stage == 0 and not big.fits.activation_checkpointing
    small = recommend(DIMS, s, 8, parse_size("24GiB"))
    assert small.fits is not None and small.fits.total_gib <= 24 * 0.9
    assert (small.fits.zero_stage, small.fits.activation_checkpointing) != (0, False)
    assert "recommended for 24.0 GiB" in small.describe()
    none = recommend(DIMS, s, 1, parse_size("1GiB"))
    assert none.fits is None and "lower data.datasets" in none.describe()


@pytest.mark.parametrize("spec_name,sets,stage,measured_gib", [
    ("openflamingo-3b.yaml", [], 2, 50.47),
    ("openflamingo-9b.yaml", [], 2, 79.91),
    ("openflamingo-9b.yaml", ["engine.activation_checkpointing=true", "data.datasets.mmc4.batch_size=192",
                              "data.datasets.laion.batch_size=384"], 3, 94.4),
])
def test_estimate_matches_h200_measurements(tmp_path, spec_name, sets, stage, measured_gib):
    """Peak memory (max_memory_allocated) that tools/bench_step measured on one H200 (docs/performance.md): the
    estimate is within 20%, and not below it by more than 5% (the plan must not promise what does not fit)."""
    from pathlib import Path

    from of_ds.perf.bench_step import bench_spec
    from of_ds.perf.memory import model_dims
    from of_ds.model import build_flamingo

    repo = Path(__file__).resolve().parents[2]
    spec = bench_spec(str(repo / "launch" / "specs" / spec_name), sets, False, tmp_path)
    meta, _, _ = build_flamingo(spec.model, meta=True)
    got = estimate(model_dims(meta, spec), spec, 1, stage).total_gib
    assert 0.95 * measured_gib <= got <= 1.2 * measured_gib, (got, measured_gib)


def test_chunked_loss_saves_the_logits(tmp_path):
    """engine.loss_chunk_tokens: the fp32 logits of the whole batch are not kept, one chunk's are transient."""
    s = recipe_spec(tmp_path)
    d = s.to_dict()
    d["engine"]["loss_chunk_tokens"] = 4096
    chunked = RunSpec.from_dict(d)
    whole, part = estimate(DIMS, s, 1, 2), estimate(DIMS, chunked, 1, 2)
    mmc4 = 32 * 256  # LAION's 64 x 32 positions fit one chunk: computed at once, as before
    saved = (4 * mmc4 + 6 * mmc4 - 10 * 4096) * DIMS.vocab  # MMC4's kept log-softmax and logit gradients, less a chunk
    assert (whole.activations_gib - part.activations_gib) * GiB == pytest.approx(saved, rel=1e-6)


def test_compiled_loss_keeps_bf16_logits(tmp_path):
    """engine.compile_targets [loss]: 2 bytes per logit kept for backward instead of the fp32 log-softmax's 4."""
    s = recipe_spec(tmp_path)
    d = s.to_dict()
    d["engine"].update(compile=True, compile_targets=["lm_layers", "loss"])
    compiled = estimate(DIMS, RunSpec.from_dict(d), 1, 2)
    positions = 32 * 256 + 64 * 32
    assert (estimate(DIMS, s, 1, 2).activations_gib - compiled.activations_gib) * GiB == pytest.approx(2 * positions * DIMS.vocab, rel=1e-6)


def test_compiled_loss_and_chunked_loss_exclude_each_other(tmp_path):
    from of_ds.spec import SpecError

    d = recipe_spec(tmp_path).to_dict()
    d["engine"].update(compile=True, compile_targets=["loss"], loss_chunk_tokens=4096)
    with pytest.raises(SpecError, match="engine.compile_targets: 'loss' compiles the one-pass loss, which engine.loss_chunk_tokens"):
        RunSpec.from_dict(d)


def test_one_pass_for_both_datasets_adds_up_the_transients(tmp_path):
    """engine.fuse_datasets: one pass's logit gradients cover both datasets' rows, and every row's cross-attention
    scores 8 image slots (LAION's 8 packed rows) instead of 6 (MMC4) or 1 (LAION)."""
    s = recipe_spec(tmp_path)
    d = s.to_dict()
    d["engine"]["fuse_datasets"] = True
    separate, fused = estimate(DIMS, s, 1, 2), estimate(DIMS, RunSpec.from_dict(d), 1, 2)
    laion = 64 * 32  # the largest transient was MMC4's logit gradients; now LAION's positions are in the same pass
    keys = 2 * 2 * DIMS.xattn_heads * 256 * DIMS.latents * (32 * (8 - 6) + 8 * 8 - 64 * 32 / 256 * 1) * DIMS.xattn_blocks
    assert (fused.activations_gib - separate.activations_gib) * GiB == pytest.approx(6 * laion * DIMS.vocab + keys, rel=1e-6)
    d["engine"]["loss_chunk_tokens"] = 4096  # in chunks the transient is one chunk's, whatever the pass
    chunked_fused = estimate(DIMS, RunSpec.from_dict(d), 1, 2)
    d["engine"]["fuse_datasets"] = False
    chunked_separate = estimate(DIMS, RunSpec.from_dict(d), 1, 2)
    # separately, LAION's 2,048 positions were under a chunk and kept their log-softmax; in one pass they are chunked too
    assert (chunked_separate.activations_gib - chunked_fused.activations_gib) * GiB == pytest.approx(4 * laion * DIMS.vocab - keys, rel=1e-6)
