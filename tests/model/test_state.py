"""State dicts: our trainable layout and the original OpenFlamingo key layout, both ways."""

import pytest
import torch

from of_ds.model.checkpoint_keys import load_openflamingo_state_dict, to_openflamingo_state_dict

from .conftest import build_tiny, encode, open_gates


def perturb_trainables(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, tok):
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>the dog"])
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(1, 2, 3, 32, 32), ids, mask).logits


@pytest.mark.parametrize("family", ["llama", "opt"])  # untied, tied
def test_trainable_state_dict_round_trip(tiny_tokenizer_dir, family):
    a, _, tok = build_tiny(tiny_tokenizer_dir, family, seed=0)
    open_gates(a)
    perturb_trainables(a, 0)
    b, _, _ = build_tiny(tiny_tokenizer_dir, family, seed=0)  # same frozen weights, other trainables
    sd = a.trainable_state_dict()
    assert all(k.startswith(("perceiver.", "new_tokens.")) or ".gated_cross_attn_layer." in k for k in sd)
    assert not any(k.startswith("vision_encoder.") for k in sd)
    assert not torch.equal(logits(a, tok), logits(b, tok))
    b.load_trainable_state_dict(sd)
    assert torch.equal(logits(a, tok), logits(b, tok))
    with pytest.raises(KeyError, match="missing"):
        b.load_trainable_state_dict({k: v for k, v in sd.items() if not k.startswith("perceiver.latents")})


def test_openflamingo_key_layout(tiny_tokenizer_dir):
    """Names as the original main branch's checkpoint.pt (read from open_flamingo/src/{helpers,flamingo_lm}.py)."""
    model, _, tok = build_tiny(tiny_tokenizer_dir, "llama")
    perturb_trainables(model, 0)
    sd = to_openflamingo_state_dict(model)
    for key in [
        "perceiver.latents",
        "perceiver.norm.weight",
        "perceiver.layers.0.0.norm_media.weight",
        "perceiver.layers.0.0.norm_latents.bias",
        "perceiver.layers.0.0.to_q.weight",
        "perceiver.layers.0.0.to_kv.weight",
        "perceiver.layers.0.0.to_out.weight",
        "perceiver.layers.1.1.0.weight",
        "perceiver.layers.1.1.1.weight",
        "perceiver.layers.1.1.3.weight",
        "lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate",
        "lang_encoder.model.layers.1.gated_cross_attn_layer.ff_gate",
        "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.norm.weight",
        "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_q.weight",
        "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_kv.weight",
        "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_out.weight",
        "lang_encoder.model.layers.3.gated_cross_attn_layer.ff.3.weight",
        "lang_encoder.model.embed_tokens.weight",
        "lang_encoder.lm_head.weight",  # untied: our trained output rows (the original's loader takes it as is)
    ]:
        assert key in sd, key
    assert not any("layers.0.gated" in k or "layers.2.gated" in k for k in sd)  # every 2 layers: before 1 and 3
    assert not any(k.startswith(("vision_encoder", "new_tokens")) or ".decoder_layer." in k for k in sd)
    emb = sd["lang_encoder.model.embed_tokens.weight"]
    assert emb.shape == (len(tok), model.lang_dim)
    new = list(model.token_ids.new)
    assert torch.equal(emb[new], model.new_tokens.input.weight)
    base = model.lang_encoder.get_input_embeddings().weight
    assert torch.equal(emb[: base.shape[0]], base)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "opt"])
def test_openflamingo_round_trip(tiny_tokenizer_dir, family):
    a, _, tok = build_tiny(tiny_tokenizer_dir, family, seed=0)
    open_gates(a)
    perturb_trainables(a, 0)
    b, _, _ = build_tiny(tiny_tokenizer_dir, family, seed=0)
    sd = to_openflamingo_state_dict(a)
    wrapped = {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in sd.items()}}  # a DDP checkpoint.pt
    report = load_openflamingo_state_dict(b, wrapped)
    assert report.ok
    assert torch.equal(logits(a, tok), logits(b, tok))


def test_openflamingo_load_reports_key_problems(tiny_tokenizer_dir):
    model, _, _ = build_tiny(tiny_tokenizer_dir, "llama")
    sd = to_openflamingo_state_dict(model)
    sd.pop("perceiver.latents")
    sd["lang_encoder.old_decoder_blocks.0.mlp.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing \['perceiver\.latents'\].*unexpected \['lang_encoder\.old_decoder_blocks"):
        load_openflamingo_state_dict(model, sd)
    report = load_openflamingo_state_dict(model, sd, strict=False)
    assert report.missing == ["perceiver.latents"] and report.unexpected == ["lang_encoder.old_decoder_blocks.0.mlp.weight"]
    sd["lang_encoder.model.embed_tokens.weight"] = sd["lang_encoder.model.embed_tokens.weight"][:-1]
    with pytest.raises(ValueError, match="embed_tokens.weight: shape"):
        load_openflamingo_state_dict(model, sd, strict=False)
