"""Image / `<image>` pairing: source text that spells a special token is dropped and counted, never shifted; for
every kept row the k-th `<image>` token holds the image its text placed k-th (property tests over seeded random
documents of every kind); a pairing violation in our own stages raises instead of being counted."""

from __future__ import annotations

import base64
import functools
import json
import random
from collections import Counter

import pytest

from of_ds.data.drops import DataStalledError, ImagePairingError

from .helpers import gpt_members, mmc4_base64_members, mmc4_doc, run_dataset, write_tar
from .pairing import (PALETTE, Row, check_row, gpt_doc, laion_doc, mmc4_shard_doc, run_stages, slot_colour,
                      stage_plan, truncated)

SETTINGS = [dict(max_images=3, max_tokens=24), dict(max_images=6, max_tokens=40), dict(max_images=6, max_tokens=256)]
N_DOCS = 150  # per kind and setting


def expected_tags(tags: list[str | None], placed: list[str], row: Row, key: str) -> None:
    """The tags after the row's `<image>` tokens are the first places, in text order (the last may be cut)."""
    assert len(tags) <= len(placed), (key, tags, placed)
    for k, tag in enumerate(tags):
        assert tag == placed[k] or (tag is None and k == len(tags) - 1), (key, k, tags, placed)


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_chatgpt_pairing_property(tmp_path, tokenizer, setting):
    rules = SETTINGS[setting]
    rng = random.Random(1000 + setting)
    docs = {}
    for i in range(N_DOCS):
        _, d, _ = gpt_doc(rng, f"g{i:04d}", is_gpt=rng.random() < 0.7)  # kind chatgpt: is_gpt or not
        docs[d.key] = d
    shard = write_tar(tmp_path / "gpt.tar", [m for d in docs.values() for m in d.members])
    results = run_stages(stage_plan(tmp_path, tokenizer, "chatgpt", **rules), shard)
    assert set(results) == set(docs)
    seen = Counter()
    for key, got in results.items():
        d = docs[key]
        order, mapped, cap = d.meta["order"], d.meta["mapped"], rules["max_images"]
        if d.literal is not None:
            assert got == "text_has_special_token", (key, got)
            seen["literal"] += 1
        elif any(k not in mapped for k in order[:cap]):
            assert got == "missing_key", (key, got)
        elif isinstance(got, str):
            assert got == "too_few_images", (key, got)  # truncation left no <image>
        else:
            tags = check_row(tokenizer, got, d.colour_of, key)
            expected_tags(tags, [f"p{k}" for k in order[:cap]], got, key)
            if not truncated(tokenizer, got):
                assert got.num_images == min(len(order), cap), key
            seen["kept"] += 1
            seen["cut_at_max_images"] += len(order) > cap
            seen["unmapped_past_max_images"] += any(k not in mapped for k in order[cap:])
            seen["repeated_placeholder"] += len(set(order[:cap])) < len(order[:cap])
            seen["single_image"] += got.num_images == 1
            seen["truncated"] += truncated(tokenizer, got)
    assert seen["literal"] >= 20 and seen["kept"] >= 50, seen
    for case in ("cut_at_max_images", "repeated_placeholder", "single_image"):
        assert seen[case] >= 3, (case, seen)
    if setting < 2:
        assert seen["truncated"] >= 10, seen
    if setting == 0:
        assert seen["unmapped_past_max_images"] >= 1, seen


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_mmc4_pairing_property(tmp_path, tokenizer, setting):
    """MMC4 documents in both layouts, with ChatGPT sequences (`is_gpt`) mixed in, as `kind: mmc4` reads them."""
    rules = SETTINGS[setting]
    rng = random.Random(2000 + setting)
    docs = {}
    for i in range(N_DOCS):
        if rng.random() < 0.15:
            _, d, _ = gpt_doc(rng, f"g{i:04d}")
        else:
            d = mmc4_shard_doc(rng, f"m{i:04d}")
        docs[d.key] = d
    shard = write_tar(tmp_path / "mmc4.tar", [m for d in docs.values() for m in d.members])
    results = run_stages(stage_plan(tmp_path, tokenizer, "mmc4", **rules), shard)
    assert set(results) == set(docs)
    seen = Counter()
    cap = rules["max_images"]
    for key, got in results.items():
        d = docs[key]
        if d.literal is not None:
            assert got == "text_has_special_token", (key, got)
            seen["literal"] += 1
            continue
        if d.kind == "chatgpt":
            if any(k not in d.meta["mapped"] for k in d.meta["order"][:cap]):
                assert got == "missing_key", (key, got)
            elif isinstance(got, str):
                assert got == "too_few_images", (key, got)
            else:
                tags = check_row(tokenizer, got, d.colour_of, key)
                expected_tags(tags, [f"p{k}" for k in d.meta["order"][:cap]], got, key)
                seen["gpt_kept"] += 1
            continue
        placed = [f"s{j}" for j in d.meta["kept_sentences"]]
        if not placed:
            assert got == "no_images_above_threshold", (key, got)
        elif isinstance(got, str):
            assert got in ("too_few_images", "single_image_at_end"), (key, got)
        else:
            tags = check_row(tokenizer, got, d.colour_of, key)
            expected_tags(tags, placed[:cap], got, key)
            if not truncated(tokenizer, got):
                assert got.num_images == min(len(placed), cap), key
            seen["kept"] += 1
            seen["cut_at_max_images"] += len(placed) > cap
            seen["single_image"] += got.num_images == 1
            seen["truncated"] += truncated(tokenizer, got)
    assert seen["literal"] >= 15 and seen["kept"] >= 40 and seen["gpt_kept"] >= 3 and seen["single_image"] >= 3, seen
    if cap == 3:
        assert seen["cut_at_max_images"] >= 3, seen
    if setting < 2:
        assert seen["truncated"] >= 10, seen


def test_laion_pairing_property(tmp_path, tokenizer):
    rng = random.Random(3000)
    docs = {}
    for i in range(2 * N_DOCS):
        d = laion_doc(rng, f"l{i:04d}", i)
        docs[d.key] = d
    shard = write_tar(tmp_path / "laion.tar", [m for d in docs.values() for m in d.members])
    seen = Counter()
    for max_tokens in (5, 32):
        results = run_stages(stage_plan(tmp_path, tokenizer, "laion", max_tokens=max_tokens), shard)
        assert set(results) == set(docs)
        media = tokenizer.get_vocab()["<image>"]
        for key, got in results.items():
            d = docs[key]
            if d.literal is not None:
                assert got == "text_has_special_token", (key, got)
                seen["literal"] += 1
            else:
                assert isinstance(got, Row), (key, got)
                (tag,) = check_row(tokenizer, got, d.colour_of, key)
                assert got.ids[0] == media and tag in (None, *d.colour_of), (key, tag)
                seen["kept"] += 1
                seen["cut"] += truncated(tokenizer, got)
    assert seen["literal"] >= 40 and seen["kept"] >= 300 and seen["cut"] >= 100, seen


def test_the_reported_shift_is_a_counted_drop_not_a_shifted_pairing(tmp_path, tokenizer):
    """A ChatGPT text with a literal `<image>` and more placeholders than max_images, and an MMC4 document with a
    literal `<image>` and a second image past the token limit: both were kept with every image one slot off."""
    images = {k: PALETTE[k] for k in range(1, 9)}
    example = "See the <image> below. " + " ".join(f"_!_IMAGE{k}_!_ caption {k}." for k in range(1, 9))
    doc = mmc4_doc(["a <image> here.", "first.", "second " + "words " * 40], [PALETTE[1], PALETTE[2]],
                   [[0.0, 0.5, 0.0], [0.0, 0.0, 0.5]])
    members = gpt_members("g", example, images) + mmc4_base64_members("m", doc)
    members += gpt_members("ok", "_!_IMAGE1_!_ a cat. _!_IMAGE2_!_ a cup.", {1: PALETTE[3], 2: PALETTE[4]})
    (batch,), drops = run_dataset(tmp_path, members, tokenizer, kind="mmc4", max_tokens=48, min_image_bytes=0)
    assert drops == {"text_has_special_token": 2}
    assert batch["num_images"].tolist() == [2]
    assert [slot_colour(batch["pixel_values"][0, k].numpy()) for k in range(2)] == [3, 4]


def test_chatgpt_placeholders_past_max_images_need_no_map_entry(tmp_path, tokenizer):
    example = "_!_IMAGE1_!_ one. _!_IMAGE2_!_ two. _!_IMAGE3_!_ three."
    members = gpt_members("g", example, {1: PALETTE[5], 2: PALETTE[6]})  # no _!_IMAGE3_!_ entry
    (batch,), drops = run_dataset(tmp_path, members, tokenizer, kind="chatgpt", max_images=2, min_image_bytes=0)
    assert drops == {} and batch["num_images"].tolist() == [2]
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text == "<image>one.<|endofchunk|><image>two.<|endofchunk|></s>"
    with pytest.raises(DataStalledError, match="missing_key=5"):  # within max_images the entry is needed
        run_dataset(tmp_path, members, tokenizer, kind="chatgpt", max_images=3, min_image_bytes=0,
                    max_consecutive_drops=5)


def test_documents_without_is_gpt_are_chatgpt_sequences_under_kind_chatgpt(tmp_path, tokenizer):
    doc = {"example": "_!_IMAGE1_!_ a cat.", "image_map": {"_!_IMAGE1_!_": {"base64_image": base64.b64encode(PALETTE[7]).decode()}}}
    members = [("g.json", json.dumps(doc).encode())]
    (batch,), drops = run_dataset(tmp_path, members, tokenizer, kind="chatgpt", min_image_bytes=0)
    assert drops == {} and batch["num_images"].tolist() == [1]
    with pytest.raises(DataStalledError, match="missing_key=5"):  # under kind mmc4 it is an MMC4 document without text_list
        run_dataset(tmp_path, members, tokenizer, kind="mmc4", min_image_bytes=0, max_consecutive_drops=5)


def test_a_pairing_violation_in_our_stages_raises_not_counted(tmp_path, tokenizer):
    """A prepare stage that let a literal `<image>` through (simulated by a token table without the special
    texts) must stop the loader with ImagePairingError, for interleaved and LAION batches alike."""
    from of_ds.data import build_train_data
    from of_ds.data.laion import LaionPair

    from .helpers import IMAGE_SPEC, RUNTIME, make_spec

    example = "See the <image> below. _!_IMAGE1_!_ one. _!_IMAGE2_!_ two."
    shard = write_tar(tmp_path / "g.tar", gpt_members("g", example, {1: PALETTE[1], 2: PALETTE[2]}))
    spec = make_spec(dict(name="d", kind="chatgpt", shards=str(shard), batch_size=1, samples_per_epoch=1,
                          min_image_bytes=0))
    data = build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)
    prepare = data.plans[0].prepare
    data.plans[0].prepare = functools.partial(prepare.func, *prepare.args,
                                              **{**prepare.keywords, "tokens": prepare.keywords["tokens"]._replace(special_texts=("\0never",))})
    with pytest.raises(ImagePairingError, match="g: 2 images"):
        list(data)

    plan = stage_plan(tmp_path, tokenizer, "laion")
    batcher = plan.make_batcher()
    batcher.batch_size = 1
    batcher._reset()
    batcher.add(LaionPair("l", PALETTE[0], "a <image> too many"), random.Random(0))
    with pytest.raises(ImagePairingError, match="row 0: 2 <image> tokens"):
        batcher.finish()


def original_mmc4_text(sentences: list[str], sentence_ixs: list[int], eos: str) -> str:
    """The original main branch's string operations for an MMC4 document (its pairs sorted by sentence, B1)."""
    sentences = list(sentences)
    for ix in sentence_ixs:
        sentences[ix] = f"<|endofchunk|><image>{sentences[ix]}"
    text = " ".join(sentences)
    text = text.replace("<|endofchunk|>", "", 1)
    text = text.replace(" <|endofchunk|>", "<|endofchunk|>").replace("<image> ", "<image>").replace(" <image>", "<image>")
    return f"{text}<|endofchunk|>{eos}"


def original_gpt_text(example: str, max_images: int, eos: str) -> str:
    """The original's ChatGPT string operations, keeping max_images (B9) and one final <|endofchunk|>."""
    import re

    text = re.sub(r"_!_IMAGE\d+_!_", "<|endofchunk|><image>", example)
    text = text.replace("<|endofchunk|>", "", 1)
    text = text.replace(" <|endofchunk|>", "<|endofchunk|>").replace("<image> ", "<image>").replace(" <image>", "<image>")
    indices = [m.start() for m in re.finditer("<image>", text)]
    if len(indices) > max_images:
        text = text[: indices[max_images]].removesuffix("<|endofchunk|>")
    return f"{text}<|endofchunk|>{eos}"


def test_texts_without_literal_tokens_are_the_originals(tokenizer):
    """Building the text with markers recorded as they are placed changes no text: for random documents (private-use
    characters, odd spacing, repeated placeholders included) the text is the original's string operations'."""
    from of_ds.data.drops import DropCounter
    from of_ds.data.interleaved import DocumentRules, prepare_document
    from of_ds.data.tokens import token_info

    from .pairing import mmc4_doc as random_mmc4_doc

    tokens = token_info(tokenizer)
    rng = random.Random(6000)
    checked = 0
    for i in range(300):
        cap = rng.choice([1, 3, 6])
        rules = DocumentRules("mmc4", cap, 1, 0.24, 0, 0.0, 0.0, 256)
        if i % 2:
            doc, d, _ = gpt_doc(rng, f"g{i}")
            if d.literal or any(k not in d.meta["mapped"] for k in d.meta["order"][:cap]):
                continue
            sample = {"__key__": d.key, "json": json.dumps(doc).encode()}
            expected = original_gpt_text(doc["example"], cap, tokens.eos_token)
        else:
            doc, d, images = random_mmc4_doc(rng, f"m{i}")
            if d.literal or not d.meta["kept_sentences"]:
                continue
            for info, png in zip(doc["image_info"], images):
                info["image_base64"] = base64.b64encode(png).decode()
            sample = {"__key__": d.key, "json": json.dumps(doc).encode()}
            expected = original_mmc4_text(doc["text_list"], d.meta["kept_sentences"][:cap], tokens.eos_token)
        got = prepare_document(sample, rules, tokens, DropCounter("d", 10))
        assert got.text == expected, d.key
        assert [got.text[a:a + 7] for a in got.anchors] == ["<image>"] * len(got.images)
        checked += 1
    assert checked >= 150
