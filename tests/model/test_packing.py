"""One LM pass for both datasets (`engine.fuse_datasets`, `of_ds.model.packing`): the packed batch gives each
dataset the loss and the gradients its own pass gives, for every LM family that can take it."""

from __future__ import annotations

import pytest
import torch

from of_ds.model.packing import pack_datasets, pack_factor

from .conftest import open_gates, tiny_spec

WEIGHTS = {"mmc4": 1.0, "laion": 0.2}


def build(tokenizer_dir, family: str, attention: str = "sdpa", **kw):
    from of_ds.model import build_flamingo
    from of_ds.spec import LMSpec

    spec = tiny_spec(tokenizer_dir, family, every_n_layers=1, **kw)
    spec = spec.model_copy(update={"lm": LMSpec(name_or_path=None, config=spec.lm.config, attention=attention)})
    torch.manual_seed(0)
    model, _, tok = build_flamingo(spec)
    open_gates(model)
    return model.eval(), tok


def tokens(tok, texts, length):
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    assert tok.padding_side == "right"
    return enc.input_ids, enc.attention_mask


def datasets(tok, laion_rows: int = 6, laion_len: int = 8, mmc4_len: int = 24):
    """An MMC4-like batch (3 slots; rows with 3, 1 and 2 images, one row naming more images than it has) and a
    LAION-like one (1 image a row, right-padded, some rows cut at `laion_len`)."""
    g = torch.Generator().manual_seed(1)
    ids, mask = tokens(tok, [
        "<image>a cat sat<|endofchunk|><image>a dog ran<|endofchunk|><image>a bird",
        "some text first<image>a cup of tea<|endofchunk|>",
        "<image>a red sofa<|endofchunk|><image>a flag<|endofchunk|><image>one too many",
    ], mmc4_len)
    mmc4 = dict(pixel_values=torch.randn(3, 3, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask,
                labels=ids.masked_fill(mask == 0, -100), num_images=torch.tensor([3, 1, 2]))
    captions = ["a rocket", "a very long caption about a big house by a lake", "a tree", "two cats", "x", "a blue car on a road"]
    ids, mask = tokens(tok, [f"<image>{c}<|endofchunk|>" for c in captions[:laion_rows]] * (laion_rows // len(captions) + 1), laion_len)
    ids, mask = ids[:laion_rows], mask[:laion_rows]
    laion = dict(pixel_values=torch.randn(laion_rows, 1, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask,
                 labels=ids.masked_fill(mask == 0, -100), num_images=torch.ones(laion_rows, dtype=torch.long))
    return {"mmc4": mmc4, "laion": laion}


def separate(model, batches, weights=WEIGHTS):
    model.zero_grad(set_to_none=True)
    losses = {name: model(**b).loss for name, b in batches.items()}
    sum(weights[n] * l for n, l in losses.items()).backward()
    return {n: l.detach() for n, l in losses.items()}, grads(model)


def packed(model, batches, weights=WEIGHTS):
    model.zero_grad(set_to_none=True)
    p = pack_datasets(batches, model.media_token_id, model.pad_token_id)
    out = model(p.images, p.input_ids, p.attention_mask, labels=p.labels, layout=p.layout)
    assert out.loss is None and set(out.group_losses) == set(batches)
    sum(weights[n] * l for n, l in out.group_losses.items()).backward()
    return {n: l.detach() for n, l in out.group_losses.items()}, grads(model), p


def grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(ref, got, tol=1e-5):
    (ref_losses, ref_grads), (losses, g) = ref, got
    for name in ref_losses:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=tol, atol=tol)
    assert set(g) == set(ref_grads)
    for k in ref_grads:
        scale = ref_grads[k].abs().max().clamp(min=1e-6)
        assert (g[k] - ref_grads[k]).abs().max() / scale < 1e-4, k


@pytest.mark.parametrize("family,attention", [("mpt", "sdpa"), ("mpt", "eager"), ("llama", "sdpa"), ("llama", "eager"),
                                              ("gpt2", "sdpa"), ("opt", "sdpa"), ("gpt_neox", "sdpa"),
                                              ("mosaic_gpt", "sdpa"), ("mosaic_gpt", "eager")])
def test_packed_pass_equals_separate_passes(tiny_tokenizer_dir, family, attention):
    model, tok = build(tiny_tokenizer_dir, family, attention)
    batches = datasets(tok)
    ref = separate(model, batches)
    losses, g, p = packed(model, batches)
    assert_same(ref, (losses, g))
    # 6 LAION rows of 8 tokens -> 2 rows of 24 (3 segments), after the 3 MMC4 rows; 3 image slots a row
    assert p.input_ids.shape == (5, 24) and p.layout.slots_per_row == 3
    assert p.layout.groups == (("mmc4", 0, 3, 1), ("laion", 3, 5, 3))
    assert p.images.shape[0] == 3 + 1 + 2 + 6  # real images only


def test_packed_rows_padded_at_the_end_and_chunked_loss(tiny_tokenizer_dir):
    """4 LAION rows of 7 tokens: 2 per 24-token row (14 tokens + 10 of padding); the loss in chunks of 5 positions."""
    model, tok = build(tiny_tokenizer_dir, "mpt")
    batches = datasets(tok, laion_rows=4, laion_len=7)
    ref = separate(model, batches)
    model.set_loss_chunking(5)
    losses, g, p = packed(model, batches)
    assert_same(ref, (losses, g))
    assert p.input_ids.shape == (5, 24)
    assert (p.attention_mask[3:, 14:] == 0).all() and (p.labels[3:, 14:] == -100).all()
    assert p.layout.segment_ids[3].tolist() == [0] * 7 + [1] * 17


@pytest.mark.slow
@pytest.mark.parametrize("targets,mode", [(["loss"], "default"), (["lm_layers", "loss"], "max-autotune-no-cudagraphs")])
def test_compiled_loss_equals_eager_separate_and_packed(tiny_tokenizer_dir, targets, mode):
    """engine.compile_targets [loss]: the head's fp32 cross-entropy compiled gives the eager losses and gradients,
    a pass per dataset and packed; no logits come out. Also with the layers, in engine.compile_mode max-autotune."""
    model, tok = build(tiny_tokenizer_dir, "mpt")
    batches = datasets(tok)
    ref = separate(model, batches)
    model.compile_parts(targets, **({} if mode == "default" else {"mode": mode}))
    assert model.loss_compiled and model(**batches["mmc4"]).logits is None
    for _ in range(2):  # the second call runs the cached graphs
        assert_same(ref, separate(model, batches))
        losses, g, _ = packed(model, batches)
        assert_same(ref, (losses, g))
    out = model(**{k: v for k, v in batches["mmc4"].items() if k != "labels"})
    assert out.loss is None and out.logits is not None  # without labels: the logits, as before


def test_pack_factor():
    assert pack_factor(64, 32, 256) == 8
    assert pack_factor(60, 32, 256) == 6  # the largest divisor of 60 that fits 8
    assert pack_factor(7, 32, 256) == 7
    assert pack_factor(5, 100, 256) == 1
    assert pack_factor(32, 256, 256) == 1


def test_layout_puts_each_image_in_its_rows_slot(tiny_tokenizer_dir):
    """Token -> slot: a LAION segment j attends to slot j of its packed row; MMC4 rows keep theirs; slots past a
    row's images hold nothing a token attends to."""
    model, tok = build(tiny_tokenizer_dir, "llama")
    batches = datasets(tok)
    p = pack_datasets(batches, model.media_token_id, model.pad_token_id)
    lay = p.layout
    # LAION packed row 3: segments 0, 1, 2 -> slots 1, 2, 3 (1-based) wherever they have media
    for j in range(3):
        seg = lay.segment_ids[3] == j
        assert set(lay.text_time[3][seg & lay.has_media[3]].tolist()) == {j + 1}
    # MMC4 row 1 has text before its one image: no media there; row 2 names a 3rd image it does not have
    assert not lay.has_media[1, 0]
    assert lay.text_time[2].max() == 3 and not lay.has_media[2][lay.text_time[2] == 3].any()
    # flat slots of the real images: row 0 slots 0-2, row 1 slot 0, row 2 slots 0-1, LAION rows 3-4 slots 0-2
    assert lay.image_slots.tolist() == [0, 1, 2, 3, 6, 7, 9, 10, 11, 12, 13, 14]
    # segment starts are never targets, and the MMC4 labels are otherwise unchanged
    assert (p.labels[3:, [0, 8, 16]] == -100).all()
    assert torch.equal(p.labels[:3, 1:], batches["mmc4"]["labels"][:, 1:])


def test_a_packed_forward_without_labels_is_refused(tiny_tokenizer_dir):
    model, tok = build(tiny_tokenizer_dir, "llama")
    batches = datasets(tok)
    del batches["laion"]["labels"]
    with pytest.raises(ValueError, match="laion: labels"):
        pack_datasets(batches, model.media_token_id, model.pad_token_id)


def test_three_datasets_rows_without_images_and_equal_lengths(tiny_tokenizer_dir):
    """A third dataset of 12-token rows with 2 image slots (2 rows per packed row: 4 slots) beside a second
    24-token one; a row without any image; counts given as ints (as the engines pass them)."""
    model, tok = build(tiny_tokenizer_dir, "mpt")
    batches = datasets(tok)
    g = torch.Generator().manual_seed(2)
    ids, mask = tokens(tok, ["<image>a<|endofchunk|><image>b", "no image at all", "<image>c d e", "x<image>y"], 12)
    batches["short"] = dict(pixel_values=torch.randn(4, 2, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask,
                            labels=ids.masked_fill(mask == 0, -100), num_images=torch.tensor([2, 0, 1, 1]))
    ids, mask = tokens(tok, ["<image>one more long row of text<|endofchunk|>", "plain words here"], 24)
    batches["long"] = dict(pixel_values=torch.randn(2, 1, 3, 32, 32, generator=g), input_ids=ids, attention_mask=mask,
                           labels=ids.masked_fill(mask == 0, -100), num_images=torch.tensor([1, 0]))
    weights = {**WEIGHTS, "short": 0.5, "long": 0.3}
    as_ints = {n: {**b, "num_images": b["num_images"].tolist()} for n, b in batches.items()}  # as the engines pass them
    ref = separate(model, as_ints, weights)
    losses, g2, p = packed(model, batches, weights)
    assert_same(ref, (losses, g2))
    assert [grp[3] for grp in p.layout.groups] == [1, 3, 2, 1] and p.layout.slots_per_row == 4


@pytest.mark.parametrize("window,refused", [(4, True), (64, False)])
def test_sliding_window_shorter_than_the_packed_rows_is_refused(tiny_tokenizer_dir, window, refused):
    """One 4D mask reaches every layer in a packed pass, so a sliding window shorter than the rows cannot be kept
    (the engines ask `packing_problem` before training starts; the packed forward refuses too)."""
    from of_ds.model import build_flamingo
    from of_ds.spec import LMSpec

    from .conftest import lm_config

    spec = tiny_spec(tiny_tokenizer_dir, "mistral", every_n_layers=1)
    spec = spec.model_copy(update={"lm": LMSpec(name_or_path=None, config={**lm_config(tiny_tokenizer_dir, "mistral"), "sliding_window": window})})
    model, _, tok = build_flamingo(spec)
    batches = datasets(tok)
    if refused:
        assert "sliding window of 4 tokens, shorter than the packed rows (24)" in model.packing_problem(24)
        with pytest.raises(ValueError, match="engine.fuse_datasets: .*sliding window"):
            packed(model, batches)
    else:
        assert model.packing_problem(24) is None
        assert_same(separate(model, batches), packed(model, batches)[:2])


def test_rows_padded_to_max_tokens_keep_one_layout(tiny_tokenizer_dir):
    """A LAION batch padded only to its longest caption (4 of max_tokens 8) packs as a full-length one would: 3 rows
    per packed row and 3 image slots, every step (static shapes, the memory plan's slots), with the same losses."""
    model, tok = build(tiny_tokenizer_dir, "llama")
    batches = datasets(tok, laion_len=4)
    ref = separate(model, batches)
    model.zero_grad(set_to_none=True)
    p = pack_datasets(batches, model.media_token_id, model.pad_token_id, row_lengths={"mmc4": 24, "laion": 8})
    assert p.layout.groups == (("mmc4", 0, 3, 1), ("laion", 3, 5, 3)) and p.layout.slots_per_row == 3
    loose = pack_datasets(batches, model.media_token_id, model.pad_token_id)
    assert loose.layout.slots_per_row == 6  # without row_lengths: 6 rows of 4 tokens per packed row
    out = model(p.images, p.input_ids, p.attention_mask, labels=p.labels, layout=p.layout)
    sum(WEIGHTS[n] * l for n, l in out.group_losses.items()).backward()
    assert_same(ref, ({n: l.detach() for n, l in out.group_losses.items()}, grads(model)))
    with pytest.raises(ValueError, match="laion: rows of 4 tokens, longer than its max_tokens 3"):
        pack_datasets(batches, model.media_token_id, model.pad_token_id, row_lengths={"laion": 3})
