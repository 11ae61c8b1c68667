"""Activation checkpointing, generation with cached media, and FLOP counting."""

import pytest
import torch

from of_ds.model.build import build_flamingo
from of_ds.model.flops import count_step_flops, forward_flops_by_part

from .conftest import LM_CONFIGS, build_tiny, encode, open_gates, tiny_spec


@pytest.mark.parametrize("family", ["llama", "gpt2", "mosaic_gpt"])
def test_activation_checkpointing_same_loss_and_grads(tiny_tokenizer_dir, family):
    model, _, tok = build_tiny(tiny_tokenizer_dir, family)
    open_gates(model)
    model.train()
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a dog runs<|endofchunk|>", "<image>a cup<|endofchunk|>"])
    px = torch.randn(2, 2, 3, 32, 32)
    num_images = torch.tensor([2, 1])

    def run(enabled: bool):
        model.zero_grad(set_to_none=True)
        model.set_activation_checkpointing(enabled)
        recomputed = []
        hooks = [b.register_forward_hook(lambda *a: recomputed.append(1)) for b in model.cross_attention_blocks()]
        torch.manual_seed(0)  # gpt2 has dropout in train mode: same masks in both runs (recomputation restores RNG)
        loss = model(px, ids, mask, labels=ids, num_images=num_images).loss
        loss.backward()
        for h in hooks:
            h.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, len(recomputed)

    loss0, grads0, calls0 = run(False)
    loss1, grads1, calls1 = run(True)
    n_blocks = len(model.cross_attention_blocks())
    assert (calls0, calls1) == (n_blocks, 2 * n_blocks)  # the blocks really ran again in backward
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for n in grads0:
        assert torch.allclose(grads0[n], grads1[n], atol=1e-6, rtol=1e-5), n
    model.set_activation_checkpointing(False)


def sequence_logprob(model, px, ids, prompt_len):
    with torch.no_grad():
        logp = torch.log_softmax(model(px, ids, torch.ones_like(ids)).logits.float(), -1)
    gen = ids[:, prompt_len:]
    return logp[:, prompt_len - 1 : -1].gather(-1, gen[..., None]).sum().item()


def test_greedy_generation_matches_full_forward_and_stops_at_eos(llama):
    model, tok = llama
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a"])
    px = torch.randn(1, 2, 3, 32, 32)
    out = model.generate(px, ids, mask, max_new_tokens=6, eos_token_id=-1)
    assert out.shape == (1, ids.shape[1] + 6) and torch.equal(out[:, : ids.shape[1]], ids)
    # the cached decode equals argmax of an uncached forward over the whole sequence (new tokens see image 2)
    with torch.no_grad():
        full = model(px, out, torch.ones_like(out)).logits
    assert torch.equal(full[0, ids.shape[1] - 1 : -1].argmax(-1), out[0, ids.shape[1] :])
    # stopping: make the 3rd generated token the eos
    eos = int(out[0, ids.shape[1] + 2])
    stopped = model.generate(px, ids, mask, max_new_tokens=6, eos_token_id=eos)
    new = stopped[0, ids.shape[1] :].tolist()
    assert new[-1] == eos and len(new) == new.index(eos) + 1 <= 3
    # default eos is <|endofchunk|>; greedy never runs past max_new_tokens
    assert model.generate(px, ids, mask, max_new_tokens=4).shape[1] <= ids.shape[1] + 4


@pytest.mark.parametrize("family", list(LM_CONFIGS))
def test_cached_generation_matches_uncached_forward_per_family(tiny_tokenizer_dir, family):
    """Left-padded batch, KV cache, two images in one row: each decoded token is the argmax of a full forward."""
    model, _, tok = build_tiny(tiny_tokenizer_dir, family)
    open_gates(model)
    tok.padding_side = "left"
    try:
        ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a", "<image>the"])
    finally:
        tok.padding_side = "right"
    px, n = torch.randn(2, 2, 3, 32, 32), torch.tensor([2, 1])
    out = model.generate(px, ids, mask, max_new_tokens=4, eos_token_id=-1, num_images=n)
    for r in range(2):
        real = mask[r].bool()
        seq = torch.cat((ids[r, real], out[r, ids.shape[1]:]))[None]
        with torch.no_grad():
            full = model(px[r : r + 1], seq, torch.ones_like(seq), num_images=n[r : r + 1]).logits
        assert torch.equal(full[0, int(real.sum()) - 1 : -1].argmax(-1), out[r, ids.shape[1]:])
    assert model.generate(px, ids, mask, max_new_tokens=3, num_beams=3, num_images=n).shape[0] == 2


def test_beam_search_finds_at_least_the_greedy_score(llama):
    model, tok = llama
    ids, mask = encode(tok, ["<image>a photo of"])
    px = torch.randn(1, 1, 3, 32, 32)
    greedy = model.generate(px, ids, mask, max_new_tokens=5, eos_token_id=-1)
    beam = model.generate(px, ids, mask, max_new_tokens=5, num_beams=4, eos_token_id=-1)
    assert beam.shape == greedy.shape
    n = ids.shape[1]
    assert sequence_logprob(model, px, beam, n) >= sequence_logprob(model, px, greedy, n) - 1e-4
    beams2 = model.generate(px.expand(2, -1, -1, -1, -1), ids.expand(2, -1), mask.expand(2, -1), max_new_tokens=5, num_beams=4, eos_token_id=-1)
    assert torch.equal(beams2[0], beam[0]) and torch.equal(beams2[1], beam[0])


def test_flops_meta_equals_real_and_scale_with_batch(tiny_tokenizer_dir):
    real, _, _ = build_tiny(tiny_tokenizer_dir, "llama")
    meta, _, _ = build_flamingo(tiny_spec(tiny_tokenizer_dir, "llama"), meta=True)
    shapes = [{"pixel_values": (2, 3, 3, 32, 32), "input_ids": (2, 24)}, {"pixel_values": (4, 1, 3, 32, 32), "input_ids": (4, 8)}]
    f_real, f_meta = count_step_flops(real, shapes), count_step_flops(meta, shapes)
    assert f_real == f_meta > 0
    assert all(p.grad is None for p in real.parameters())
    double = [{k: (2 * v[0],) + tuple(v[1:]) for k, v in s.items()} for s in shapes]
    # to a few FLOPs: transformers 5.17's llama computes its rotary angles for one row per dataset (256 FLOPs here)
    assert count_step_flops(meta, double) == pytest.approx(2 * f_meta, rel=1e-5)
    parts = forward_flops_by_part(meta, shapes)
    assert all(v > 0 for v in parts.values()) and sum(parts.values()) == 2 * parts["total"]
    # the LM head: 2 * tokens * hidden * vocab (LM matrix + new-token table)
    tokens = 2 * 24 + 4 * 8
    assert parts["lm_head"] == 2 * tokens * real.lang_dim * (real.new_tokens.base_vocab_size + len(real.token_ids.new))
    # backward costs about twice the trainable parts' forward (frozen tower: forward only), so the step is < 3x forward
    assert 2 * parts["total"] < f_meta < 3 * parts["total"]


def test_loss_is_mean_over_labelled_tokens_and_zero_when_none(llama):
    model, tok = llama
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|>"])
    px = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        out = model(px, ids, mask, labels=ids)
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        expected = -logp.gather(-1, ids[0, 1:, None]).mean()
        assert torch.allclose(out.loss, expected, atol=1e-6)
        assert model(px, ids, mask, labels=torch.full_like(ids, -100)).loss.item() == 0.0


def test_bad_batch_shapes_name_the_tensor(llama):
    model, tok = llama
    ids, mask = encode(tok, ["<image>a cat", "<image>a dog"])
    px = torch.randn(2, 1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"pixel_values: expected \[B=2"):
        model(px[:1], ids, mask)
    with pytest.raises(ValueError, match="labels: expected shape"):
        model(px, ids, mask, labels=ids[:, :-1])
    with pytest.raises(ValueError, match="num_images: expected shape"):
        model(px, ids, mask, num_images=torch.tensor([1]))


def test_bf16_and_autocast_paths(tiny_tokenizer_dir):
    """What the engines run: DeepSpeed casts the whole module to bf16; DDP/FSDP amp_* use autocast."""
    model, _, tok = build_tiny(tiny_tokenizer_dir, "llama")
    open_gates(model)
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a dog", "<image>a cup<|endofchunk|>"])
    px, n = torch.randn(2, 2, 3, 32, 32), torch.tensor([2, 1])
    ref = model(px, ids, mask, labels=ids, num_images=n).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model(px, ids, mask, labels=ids, num_images=n)
    amp.loss.backward()
    assert amp.logits.dtype == torch.bfloat16 and abs(amp.loss.item() - ref.item()) < 0.05
    model.zero_grad(set_to_none=True)
    model.to(torch.bfloat16)
    assert model.new_tokens.slot_of_id.dtype == torch.long
    out = model(px.bfloat16(), ids, mask, labels=ids, num_images=n)
    out.loss.backward()
    assert abs(out.loss.item() - ref.item()) < 0.05
    assert model.perceiver.latents.grad.dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_cross_attention_matches_eager(tiny_tokenizer_dir):
    model, _, tok = build_tiny(tiny_tokenizer_dir, "llama")
    open_gates(model)
    ids, mask = encode(tok, ["<image>a photo of a cat<|endofchunk|><image>a dog", "<image>a cup<|endofchunk|>"])
    px, n = torch.randn(2, 2, 3, 32, 32), torch.tensor([2, 1])

    def run():
        model.zero_grad(set_to_none=True)
        out = model(px, ids, mask, labels=ids, num_images=n)
        out.loss.backward()
        return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    eager_logits, eager_grads = run()
    model.compile_cross_attention()
    logits, grads = run()
    assert torch.allclose(logits, eager_logits, atol=1e-5)
    for k in eager_grads:
        assert torch.allclose(grads[k], eager_grads[k], atol=1e-5), k
