"""QuickGELU: built where the pretrained weights were trained with it, and run folded into one SiLU pass."""

import copy

import pytest
import torch
from open_clip.transformer import QuickGELU

from of_ds.model.vision import RescaledLinear, build_vision_encoder, fold_quick_gelu, register_open_clip_config, uses_quick_gelu
from of_ds.spec import VisionSpec

from .conftest import TINY_VIT, tiny_spec

QG_VIT = {**TINY_VIT, "quick_gelu": True, "vision_cfg": {**TINY_VIT["vision_cfg"], "layers": 3, "width": 48, "head_width": 16, "mlp_ratio": 4.0}}


def unfolded_tower(name: str, config: dict, seed: int = 0):
    import open_clip

    register_open_clip_config(name, config)
    torch.manual_seed(seed)
    visual = open_clip.create_model(name, pretrained=None).visual.eval()
    visual.output_tokens = visual.final_ln_after_pool = True  # as build_vision_encoder sets them
    return visual


def activations(visual) -> list:
    return [type(m.mlp.gelu) for m in visual.transformer.resblocks]


def test_the_openai_tags_get_quick_gelu_others_what_they_were_trained_with():
    assert uses_quick_gelu(VisionSpec(name="ViT-L-14", pretrained="openai"))
    assert uses_quick_gelu(VisionSpec(name="ViT-B-32", pretrained="openai"))
    assert not uses_quick_gelu(VisionSpec(name="ViT-L-14", pretrained="laion2b_s32b_b82k"))
    assert not uses_quick_gelu(VisionSpec(name="ViT-L-14", pretrained=None))
    assert uses_quick_gelu(VisionSpec(name="ViT-L-14", pretrained=None, quick_gelu=True))  # e.g. OpenAI weights as a file
    assert not uses_quick_gelu(VisionSpec(name="ViT-L-14", pretrained="openai", quick_gelu=False))
    assert uses_quick_gelu(VisionSpec(name="ViT-B-32-quickgelu", pretrained=None))
    with pytest.raises(ValueError, match=r"model\.vision\.quick_gelu: false.*'ViT-B-32-quickgelu'"):
        uses_quick_gelu(VisionSpec(name="ViT-B-32-quickgelu", pretrained=None, quick_gelu=False))
    assert uses_quick_gelu(VisionSpec(name="custom-qg", pretrained=None, config=QG_VIT))  # a custom config's key
    assert not uses_quick_gelu(VisionSpec(name="custom-plain", pretrained=None, config=TINY_VIT))


def test_a_meta_build_needs_no_weights_where_it_runs():
    """Dry runs and counts build on the meta device: a checkpoint path that exists only on the cluster is fine
    there (the real build names the field when the file is missing)."""
    spec = VisionSpec(name="ViT-L-14", pretrained="/cluster/weights/ViT-L-14.pt", quick_gelu=True)
    with torch.device("meta"):
        visual, _, _ = build_vision_encoder(spec, load_weights=False, device="meta")
    assert activations(visual) == [torch.nn.SiLU] * 24
    with pytest.raises(ValueError, match=r"model\.vision\.pretrained: '/cluster/weights/ViT-L-14.pt' is neither"):
        build_vision_encoder(spec, load_weights=True)


def test_the_openai_recipe_tower_is_built_with_quick_gelu_without_its_weights():
    """The 3B/9B recipes' tower (ViT-L-14, openai), built as the counts and the bench build it (meta, no download):
    open_clip 3 alone would build GELU here, a function those weights were not trained with."""
    with torch.device("meta"):
        visual, _, width = build_vision_encoder(VisionSpec(name="ViT-L-14", pretrained="openai"), load_weights=False, device="meta")
    assert width == 1024 and activations(visual) == [torch.nn.SiLU] * 24
    mlp = visual.transformer.resblocks[0].mlp
    assert isinstance(mlp.c_fc, RescaledLinear) and mlp.c_fc.weight_scale == mlp.c_fc.bias_scale == 1.702
    assert isinstance(mlp.c_proj, RescaledLinear) and mlp.c_proj.weight_scale == pytest.approx(1 / 1.702) and mlp.c_proj.bias_scale == 1.0
    with torch.device("meta"):
        gelu, _, _ = build_vision_encoder(VisionSpec(name="ViT-L-14", pretrained="laion2b_s32b_b82k"), load_weights=False, device="meta")
    assert activations(gelu) == [torch.nn.GELU] * 24


def test_folding_is_the_same_function_and_the_same_state_dict():
    plain = unfolded_tower("qg-vit-fold", QG_VIT)
    assert activations(plain) == [QuickGELU] * 3
    folded = copy.deepcopy(plain)
    assert fold_quick_gelu(folded) == 3 and activations(folded) == [torch.nn.SiLU] * 3
    assert fold_quick_gelu(folded) == 0  # idempotent
    sd_plain, sd_folded = plain.state_dict(), folded.state_dict()
    assert list(sd_plain) == list(sd_folded) and all(torch.equal(sd_plain[k], sd_folded[k]) for k in sd_plain)

    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = plain(x)[1]
        torch.testing.assert_close(folded(x)[1], ref, rtol=1e-5, atol=1e-5)
        # bf16: the folded tower is as close to the fp32 function as open_clip's QuickGELU module is
        err_plain = (copy.deepcopy(plain).bfloat16()(x.bfloat16())[1].float() - ref).abs().mean()
        err_folded = (copy.deepcopy(folded).bfloat16()(x.bfloat16())[1].float() - ref).abs().mean()
    assert err_folded < 1.25 * err_plain

    # a checkpoint of the unfolded tower loads into the folded one, and the other way round
    other = unfolded_tower("qg-vit-fold", QG_VIT, seed=5)
    folded.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(folded(x)[1], other(x)[1], rtol=1e-5, atol=1e-5)
    plain.load_state_dict(folded.state_dict())
    assert torch.equal(plain.transformer.resblocks[2].mlp.c_fc.weight, other.transformer.resblocks[2].mlp.c_fc.weight)


def test_a_flamingo_with_a_quick_gelu_tower_encodes_as_open_clip_does(tiny_tokenizer_dir):
    """`model.vision.quick_gelu: true` on a config without the key: the Flamingo's tower is folded, its patch
    tokens equal open_clip's QuickGELU tower's with the same weights."""
    from of_ds.model.vision import encode_patch_tokens

    from of_ds.model import build_flamingo

    spec = tiny_spec(tiny_tokenizer_dir, "llama")
    spec = spec.updated({"vision.quick_gelu": True})
    model, _, _ = build_flamingo(spec)
    assert activations(model.vision_encoder) == [torch.nn.SiLU]
    plain = unfolded_tower("qg-vit-plain", {**TINY_VIT, "quick_gelu": True})
    plain.load_state_dict(model.vision_encoder.state_dict())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(encode_patch_tokens(model.vision_encoder, x), encode_patch_tokens(plain, x), rtol=1e-5, atol=1e-5)


def test_the_bench_keeps_the_recipes_activation(tmp_path):
    from of_ds.perf.bench_step import bench_spec

    spec = bench_spec("launch/specs/openflamingo-3b.yaml", [], tiny=False, tmp=tmp_path)
    assert spec.model.vision.pretrained is None and spec.model.vision.quick_gelu is True
    tiny = bench_spec("launch/specs/openflamingo-3b.yaml", [], tiny=True, tmp=tmp_path / "tiny")
    assert tiny.model.vision.quick_gelu is False
