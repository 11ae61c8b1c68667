"""Media semantics: which image each token sees, checked against brute force and plain-math references.

fp32 tolerance for the SDPA paths against plain math: atol 1e-5 (tiny dims; the two differ only in summation order).
"""

import torch

from of_ds.model.cross_attention import GatedCrossAttentionBlock, build_media_context
from of_ds.model.perceiver import PerceiverResampler

from .conftest import encode

ATOL = 1e-5


def brute_force_xattn(block: GatedCrossAttentionBlock, x, latents, text_time, num_images):
    """The block computed one token at a time: token (b, l) with text time t uses only image t-1 of row b."""
    attn = block.attn
    h = attn.heads
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for l in range(x.shape[1]):
            t = int(text_time[b, l])
            if not 1 <= t <= int(num_images[b]):
                continue  # no image to attend: exact zero
            q = attn.to_q(attn.norm(x[b, l])).view(h, -1)  # [h, d]
            k, v = attn.to_kv(latents[b, t - 1]).chunk(2, dim=-1)  # [n, h*d]
            k, v = k.view(-1, h, q.shape[-1]), v.view(-1, h, q.shape[-1])
            heads = []
            for i in range(h):
                w = torch.softmax(k[:, i] @ q[i] / q.shape[-1] ** 0.5, dim=0)
                heads.append(w @ v[:, i])
            out[b, l] = attn.to_out(torch.cat(heads))
    y = out * block.attn_gate.tanh() + x
    return block.ff(y) * block.ff_gate.tanh() + y


def test_model_cross_attention_matches_brute_force(llama):
    model, tok = llama
    texts = [
        "a cat <image>a photo of a cat<|endofchunk|> the dog<image>a rocket launches<|endofchunk|>",
        "text before any image <image>a cup of coffee<|endofchunk|>",
        "no image in this row at all",
    ]
    ids, mask = encode(tok, texts)
    px = torch.randn(3, 2, 3, 32, 32)
    num_images = torch.tensor([2, 1, 0])
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append((m, a[0], o))) for b in model.cross_attention_blocks()]
    try:
        with torch.no_grad():
            model(px, ids, mask, num_images=num_images)
            latents = model.encode_images(px, num_images)
    finally:
        for hk in hooks:
            hk.remove()
    text_time = (ids == model.media_token_id).cumsum(-1)
    assert text_time[0].max() == 2 and text_time[2].max() == 0
    assert len(seen) == 2
    for block, x, out in seen:
        ref = brute_force_xattn(block, x, latents, text_time, num_images)
        assert torch.allclose(out, ref, atol=ATOL)
        # no-image tokens get only the (ungated-by-media) feed-forward: their attention part is zero (to fp32
        # rounding: on fewer rows the ff gate scales the output instead of the weight)
        none = text_time == 0
        y = x[none]
        torch.testing.assert_close(out[none], block.ff(y) * block.ff_gate.tanh() + y, rtol=1e-6, atol=1e-6)


def test_text_before_first_image_is_untouched(tiny_tokenizer_dir):
    """With the ff gate closed, tokens before the first <image> have exactly the bare LM's logits."""
    from .conftest import build_tiny, open_gates

    model, _, tok = build_tiny(tiny_tokenizer_dir, "llama")
    ids, mask = encode(tok, ["a photo of a cat <image>on a red sofa"])
    px = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        closed = model(px, ids, mask).logits
        open_gates(model, attn=0.9, ff=0.0)
        opened = model(px, ids, mask).logits
    first = int((ids[0] == model.media_token_id).nonzero()[0])
    assert torch.equal(opened[:, :first], closed[:, :first])
    assert not torch.allclose(opened[:, first:], closed[:, first:], atol=1e-3)


def test_kth_image_token_pairs_with_image_k(llama):
    """Image order matters exactly as the <image> order: the original's image-index bug (B1) is not repeated."""
    model, tok = llama
    a, b = torch.randn(1, 1, 3, 32, 32), torch.randn(1, 1, 3, 32, 32)
    ids, mask = encode(tok, ["<image>a cat<|endofchunk|><image>a dog<|endofchunk|>"])
    second = int((ids[0] == model.media_token_id).nonzero()[1])
    with torch.no_grad():
        ab = model(torch.cat((a, b), 1), ids, mask).logits
        ba = model(torch.cat((b, a), 1), ids, mask).logits
        only_a = model(a, ids[:, :second], mask[:, :second]).logits
        only_b = model(b, ids[:, :second], mask[:, :second]).logits
    assert torch.allclose(ab[:, :second], only_a, atol=ATOL)
    assert torch.allclose(ba[:, :second], only_b, atol=ATOL)
    assert not torch.allclose(ab[:, second:], ba[:, second:], atol=1e-3)


def test_num_images_skips_padding_and_matches_padded(llama):
    model, tok = llama
    ids, mask = encode(tok, ["<image>a cat<|endofchunk|>", "<image>a<|endofchunk|><image>b<|endofchunk|><image>c"])
    px = torch.randn(2, 3, 3, 32, 32)
    px[0, 1:] = 0  # zero padding, as the data pipeline pads
    encoded = []
    hook = model.vision_encoder.register_forward_hook(lambda m, a, o: encoded.append(a[0].shape[0]))
    try:
        with torch.no_grad():
            padded = model(px, ids, mask).logits
            skipped = model(px, ids, mask, num_images=torch.tensor([1, 3])).logits
    finally:
        hook.remove()
    assert encoded == [6, 4]
    assert torch.allclose(padded, skipped, atol=ATOL)


def test_more_image_tokens_than_images_get_zero(llama):
    model, tok = llama
    ids, _ = encode(tok, ["<image>a<image>b"])
    latents = torch.randn(1, 2, 4, model.vis_dim)
    ctx = build_media_context(latents, ids, model.media_token_id, num_images=torch.tensor([1]))
    second = int((ids[0] == model.media_token_id).nonzero()[1])
    assert ctx.has_media[0, :second].all() and not ctx.has_media[0, second:].any()


def plain_masked_xattn(attn, x, latents, text_time):
    """The original's formulation: scores over all T*n latents, -max fill outside the token's image, softmax, zero rows."""
    b, t_img, n, _ = latents.shape
    h = attn.heads
    q = attn.to_q(attn.norm(x))
    k, v = attn.to_kv(latents.reshape(b, t_img * n, -1)).chunk(2, dim=-1)
    q, k, v = (z.view(b, z.shape[1], h, -1).transpose(1, 2) for z in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
    media_time = torch.arange(1, t_img + 1).repeat_interleave(n)
    keep = text_time[:, None, :, None] == media_time[None, None, None, :]
    sim = sim.masked_fill(~keep, -torch.finfo(sim.dtype).max)
    w = (sim - sim.amax(-1, keepdim=True).detach()).softmax(-1)
    w = w.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = torch.einsum("bhij,bhjd->bhid", w, v).transpose(1, 2).reshape(b, x.shape[1], -1)
    return attn.to_out(out)


def test_cross_attention_sdpa_equals_plain_math():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=32, dim_visual=24, dim_head=8, heads=4)
    media_id = 7
    ids = torch.tensor([[1, 2, 7, 3, 4, 7, 5, 6], [1, 1, 1, 7, 2, 2, 2, 2]])
    x = torch.randn(2, 8, 32)
    for t_img in (1, 2, 3):
        latents = torch.randn(2, t_img, 5, 24)
        ctx = build_media_context(latents, ids, media_id)
        ours = block.attn(x, latents, ctx.attn_mask, ctx.has_media)
        # tokens pointing past the last image count as image-less (exact zeros) on our side
        ref = plain_masked_xattn(block.attn, x, latents, ctx.text_time * (ctx.text_time <= t_img))
        assert (ctx.attn_mask is None) == (t_img == 1)
        assert torch.allclose(ours, ref, atol=ATOL), t_img


def plain_perceiver(p: PerceiverResampler, media):
    latents = p.latents.expand(media.shape[0], -1, -1)
    for attn, ff in p.layers:
        m, lat = attn.norm_media(media), attn.norm_latents(latents)
        h = attn.heads
        q = attn.to_q(lat)
        k, v = attn.to_kv(torch.cat((m, lat), 1)).chunk(2, -1)
        q, k, v = (z.view(z.shape[0], z.shape[1], h, -1).transpose(1, 2) for z in (q, k, v))
        sim = torch.einsum("bhid,bhjd->bhij", q * q.shape[-1] ** -0.5, k)
        w = (sim - sim.amax(-1, keepdim=True).detach()).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", w, v).transpose(1, 2).flatten(2)
        latents = attn.to_out(out) + latents
        latents = ff(latents) + latents
    return p.norm(latents)


def test_perceiver_sdpa_equals_plain_math():
    torch.manual_seed(0)
    p = PerceiverResampler(dim=24, depth=3, dim_head=8, heads=4, num_latents=6, ff_mult=2)
    media = torch.randn(5, 9, 24)
    out = p(media)
    assert out.shape == (5, 6, 24)
    assert torch.allclose(out, plain_perceiver(p, media), atol=ATOL)
    # images are resampled independently
    assert torch.allclose(p(media[2:3]), out[2:3], atol=ATOL)
