"""MPT's attention through SDPA (`of_ds.model.mpt_attention`, the default) against transformers' eager path:
the same weights give the same logits, gradients and cached decoding; the ALiBi + mask bias is built once per
forward."""

from __future__ import annotations

import pytest
import torch

from of_ds.model import mpt_attention
from of_ds.spec import LMSpec

from .conftest import encode, lm_config, open_gates, tiny_spec


def build_pair(tokenizer_dir, n_layers: int = 3):
    """Two tiny MPT Flamingos with identical weights: SDPA attention and eager attention."""
    from of_ds.model import build_flamingo

    models = {}
    for mode in ("sdpa", "eager"):
        cfg = {**lm_config(tokenizer_dir, "mpt"), "n_layers": n_layers}
        spec = tiny_spec(tokenizer_dir, "mpt", every_n_layers=1)
        spec = spec.model_copy(update={"lm": LMSpec(name_or_path=None, config=cfg, attention=mode)})
        torch.manual_seed(0)
        model, _, tok = build_flamingo(spec)
        open_gates(model)
        models[mode] = model
    models["eager"].load_state_dict(models["sdpa"].state_dict())
    return models, tok


def batch(tok):
    # right-padded rows of different lengths: the mask matters
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a dog on a red sofa", "<image>a cup<|endofchunk|>"])
    g = torch.Generator().manual_seed(1)
    return dict(pixel_values=torch.randn(2, 2, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask,
                labels=ids.masked_fill(mask == 0, -100), num_images=torch.tensor([2, 1]))


def test_sdpa_is_the_default_and_switches_every_layer(tiny_tokenizer_dir):
    from transformers.models.mpt.modeling_mpt import MptAttention

    models, _ = build_pair(tiny_tokenizer_dir)
    attn = {mode: [m for m in model.modules() if isinstance(m, MptAttention)] for mode, model in models.items()}
    assert LMSpec().attention == "sdpa"
    assert len(attn["sdpa"]) == 3 and all(hasattr(m, "_of_ds_bias") for m in attn["sdpa"])
    assert not any(hasattr(m, "_of_ds_bias") for m in attn["eager"])


def test_same_loss_logits_and_gradients_as_eager(tiny_tokenizer_dir):
    models, tok = build_pair(tiny_tokenizer_dir)
    b = batch(tok)
    out = {}
    for mode, model in models.items():
        model.train()
        o = model(**b)
        o.loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        out[mode] = (o.loss.detach(), o.logits.detach(), grads)
    (l1, z1, g1), (l2, z2, g2) = out["sdpa"], out["eager"]
    real = b["attention_mask"].bool()
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z1[real], z2[real], rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_bf16_close_to_eager(tiny_tokenizer_dir):
    models, tok = build_pair(tiny_tokenizer_dir)
    b = batch(tok)
    b["pixel_values"] = b["pixel_values"].bfloat16()
    with torch.no_grad():
        losses = {mode: float(model.to(torch.bfloat16)(**b).loss) for mode, model in models.items()}
    assert losses["sdpa"] == pytest.approx(losses["eager"], rel=1e-2)


def test_cached_generation_matches_eager(tiny_tokenizer_dir):
    """Left-padded prompts and a KV cache: the bias takes the cache's key length."""
    models, tok = build_pair(tiny_tokenizer_dir)
    tok.padding_side = "left"
    ids, mask = encode(tok, ["<image>a photo of", "<image>a cup of tea and a"])
    pixels = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = {mode: model.generate(pixels, ids, mask, max_new_tokens=6, num_images=torch.ones(2, dtype=torch.long)) for mode, model in models.items()}
    assert torch.equal(out["sdpa"], out["eager"])
    assert out["sdpa"].shape[1] > ids.shape[1]


def test_the_bias_is_built_once_per_forward(tiny_tokenizer_dir, monkeypatch):
    models, tok = build_pair(tiny_tokenizer_dir, n_layers=3)
    calls = []
    build = mpt_attention.build_attention_bias
    monkeypatch.setattr(mpt_attention, "build_attention_bias", lambda *a: calls.append(1) or build(*a))
    with torch.no_grad():
        models["sdpa"](**batch(tok))
        models["sdpa"](**batch(tok))
    assert len(calls) == 2  # one per forward, not one per layer (3 layers)


def test_bf16_long_sequences_as_accurate_as_eager(tiny_tokenizer_dir):
    """ALiBi is built relative to each query in fp32 before the bf16 cast: rounding transformers' end-relative
    values (about -slope x S) to bf16 would flatten its steps between neighbouring keys at long S."""
    from of_ds.model.language import build_language_model

    cfg = {**lm_config(tiny_tokenizer_dir, "mpt"), "n_layers": 2, "max_seq_len": 1024}
    lms = {}
    for mode in ("sdpa", "eager"):
        torch.manual_seed(0)
        lms[mode] = build_language_model(LMSpec(name_or_path=None, config=cfg, attention=mode), offline=True).eval()
    lms["sdpa"].load_state_dict(lms["eager"].state_dict())
    ids = torch.randint(0, cfg["vocab_size"], (2, 1024), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = lms["eager"](input_ids=ids).logits.float()
        err = {mode: (lm.to(torch.bfloat16)(input_ids=ids).logits.float() - ref).abs().max().item() for mode, lm in lms.items()}
    assert err["sdpa"] <= 1.5 * err["eager"], err


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_kv_cache_is_used_under_either_name(tiny_tokenizer_dir, name):
    """transformers' MptBlock hands the layer's KV cache over as `cache` (5.24) or `past_key_values` (5.17, the GPU
    machine's): a decoding step with the cache equals the last row of the whole sequence at once."""
    from transformers import DynamicCache
    from transformers.models.mpt.modeling_mpt import MptAttention

    models, _ = build_pair(tiny_tokenizer_dir, n_layers=1)
    attn = next(m for m in models["sdpa"].modules() if isinstance(m, MptAttention)).eval()
    x = torch.randn(2, 6, attn.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole, _ = attn(x, position_bias=None)  # no mask: the last row attends to every key, as a step does
        cache = DynamicCache()
        attn(x[:, :5], position_bias=None, **{name: cache})
        step, _ = attn(x[:, 5:], position_bias=None, **{name: cache})
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(step[:, 0], whole[:, -1], rtol=1e-5, atol=1e-6)
