"""`tools/bench_step --skeleton`: the recipe's structure at tiny widths (a CPU proxy for what a step dispatches)."""

from __future__ import annotations

from pathlib import Path

from of_ds.perf.bench_step import bench_spec

REPO = Path(__file__).resolve().parents[2]


def test_skeleton_keeps_every_count_and_shape_and_shrinks_widths(tmp_path):
    full = bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), [], False, tmp_path / "a")
    skel = bench_spec(str(REPO / "launch" / "specs" / "openflamingo-3b.yaml"), [], False, tmp_path / "b", skeleton=True)
    lm, vision = skel.model.lm.config, skel.model.vision.config["vision_cfg"]
    assert lm["n_layers"] == full.model.lm.config["n_layers"] == 24 and lm["d_model"] == 32
    assert vision["layers"] == 24 and (vision["image_size"] // vision["patch_size"]) ** 2 == (224 // 14) ** 2
    assert skel.model.perceiver.depth == full.model.perceiver.depth and skel.model.perceiver.num_latents == 64
    assert skel.model.cross_attn.every_n_layers == full.model.cross_attn.every_n_layers
    assert [(d.batch_size, d.max_images, d.effective_max_tokens()) for d in skel.data.datasets] == \
        [(d.batch_size, d.max_images, d.effective_max_tokens()) for d in full.data.datasets]
