"""Exact token, label and image layouts of LAION pairs, MMC4 documents and ChatGPT sequences."""

import numpy as np
import pytest
import torch

from .helpers import (gpt_members, laion_members, mmc4_base64_members, mmc4_doc, run_dataset, transformed)

IGNORE = -100


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok(tokenizer):
    v = tokenizer.get_vocab()
    return dict(media=v["<image>"], eoc=v["<|endofchunk|>"], eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)


def test_laion_caption_template_labels_and_image(tmp_path, tokenizer, tok, photos):
    members = laion_members("k0", photos["coffee"], "  a cup of coffee  ") + laion_members("k1", photos["rocket"], "a rocket")
    (batch,), drops = run_dataset(tmp_path, members, tokenizer, kind="laion", batch_size=2)
    cap0, cap1 = ids_of(tokenizer, "a cup of coffee"), ids_of(tokenizer, "a rocket")
    row0 = [tok["media"], *cap0, tok["eoc"], tok["eos"]]
    row1 = [tok["media"], *cap1, tok["eoc"], tok["eos"]]
    row1 += [tok["pad"]] * (len(row0) - len(row1))  # right padding to the longest row
    assert batch["input_ids"].tolist() == [row0, row1]
    assert batch["attention_mask"].tolist() == [[1] * len(row0), [1] * (len(cap1) + 3) + [0] * (len(cap0) - len(cap1))]
    assert batch["labels"].tolist() == [
        [IGNORE, *cap0, tok["eoc"], tok["eos"]],
        [IGNORE, *cap1, tok["eoc"], tok["eos"]] + [IGNORE] * (len(cap0) - len(cap1)),
    ]
    assert batch["pixel_values"].shape == (2, 1, 3, 64, 64) and batch["num_images"].tolist() == [1, 1]
    assert np.array_equal(batch["pixel_values"][0, 0].numpy(), transformed(photos["coffee"]))
    assert drops == {}


def test_laion_key_with_several_images_takes_the_originals_choice(tokenizer):
    """The original reads a LAION sample's image as the first of jpg, png, jpeg ("jpg;png;jpeg")."""
    from of_ds.data.laion import prepare_laion
    from of_ds.data.tokens import token_info

    tokens = token_info(tokenizer)
    sample = {"__key__": "k", "jpeg": b"jpeg", "png": b"png", "webp": b"webp", "txt": b"a cat"}
    assert prepare_laion(sample, tokens).image == b"png"
    assert prepare_laion({**sample, "jpg": b"jpg"}, tokens).image == b"jpg"
    assert prepare_laion({k: v for k, v in sample.items() if k != "png"}, tokens).image == b"jpeg"


def test_laion_long_caption_is_truncated_to_max_tokens(tmp_path, tokenizer, tok, photos):
    long = " ".join(["the dog runs across the green park"] * 10)
    (batch,), _ = run_dataset(tmp_path, laion_members("k", photos["camera"], long), tokenizer, kind="laion")
    assert batch["input_ids"].shape == (1, 32)
    assert batch["input_ids"][0].tolist() == [tok["media"], *ids_of(tokenizer, long)[:31]]


def test_mmc4_layout_follows_text_order_not_image_order(tmp_path, tokenizer, tok, photos):
    """B1: image 0 matches sentence 2 and image 1 sentence 0, so the first <image> is image 1."""
    sentences = ["a cat sat.", "the dog runs.", "a cup of coffee.", "the park."]
    sim = [[0.1, 0.1, 0.9, 0.1], [0.8, 0.1, 0.1, 0.1]]
    doc = mmc4_doc(sentences, [photos["coffee"], photos["chelsea"]], sim)
    (batch,), drops = run_dataset(tmp_path, mmc4_base64_members("d0", doc), tokenizer)
    p1, p2 = ids_of(tokenizer, "a cat sat. the dog runs."), ids_of(tokenizer, "a cup of coffee. the park.")
    body = [tok["media"], *p1, tok["eoc"], tok["media"], *p2, tok["eoc"], tok["eos"]]
    assert batch["input_ids"][0].tolist() == body + [tok["pad"]] * (256 - len(body))
    assert batch["attention_mask"][0].tolist() == [1] * len(body) + [0] * (256 - len(body))
    trained = [IGNORE, *p1, tok["eoc"], IGNORE, *p2, tok["eoc"], IGNORE]  # eos after the last chunk is masked
    assert batch["labels"][0].tolist() == trained + [IGNORE] * (256 - len(body))
    pix = batch["pixel_values"][0].numpy()
    assert pix.shape == (6, 3, 64, 64) and batch["num_images"].tolist() == [2]
    assert np.array_equal(pix[0], transformed(photos["chelsea"]))
    assert np.array_equal(pix[1], transformed(photos["coffee"]))
    assert not pix[2:].any()
    assert drops == {}


def test_mmc4_threshold_and_max_images_keep_the_earliest_sentences(tmp_path, tokenizer, photos):
    """8 images matched in reverse sentence order, 2 below the threshold, max_images=3 -> sentences 1, 2, 3."""
    imgs = [photos[n] for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")]
    imgs = imgs + imgs[:2]
    sentences = [f"sentence {i}." for i in range(8)]
    sim = [[0.0] * 8 for _ in range(8)]
    for i in range(8):
        sim[i][7 - i] = 0.3  # image i <-> sentence 7 - i
    sim[7][0] = 0.1  # sentence 0's image (image 7) falls under the threshold
    sim[3][4] = 0.2  # and sentence 4's (image 3)
    doc = mmc4_doc(sentences, imgs, sim)
    (batch,), _ = run_dataset(tmp_path, mmc4_base64_members("d", doc), tokenizer, max_images=3, sim_threshold=0.24)
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text == (
        "sentence 0.<image>sentence 1.<|endofchunk|><image>sentence 2.<|endofchunk|><image>sentence 3. sentence 4. "
        "sentence 5. sentence 6. sentence 7.<|endofchunk|></s>")
    pix = batch["pixel_values"][0].numpy()
    for k, image_ix in enumerate([6, 5, 4]):  # sentences 1, 2, 3 <- images 6, 5, 4
        assert np.array_equal(pix[k], transformed(imgs[image_ix]))
    assert not pix[3:].any()


def test_mmc4_min_images_single_image_rules_and_threshold_drops(tmp_path, tokenizer, photos):
    one = mmc4_doc(["one image here.", "no image."], [photos["rocket"]], [[0.3, 0.1]])
    two = mmc4_doc(["a.", "b."], [photos["rocket"], photos["coffee"]], [[0.3, 0.1], [0.1, 0.3]])
    low = mmc4_doc(["a.", "b."], [photos["rocket"]], [[0.1, 0.2]])
    members = (mmc4_base64_members("one", one) + mmc4_base64_members("low", low) + mmc4_base64_members("two", two))
    (batch,), drops = run_dataset(tmp_path, members, tokenizer, single_image_drop_prob=1.0)
    assert batch["num_images"].tolist() == [2]
    assert drops == {"single_image": 1, "no_images_above_threshold": 1}
    batches, drops = run_dataset(tmp_path, members, tokenizer, steps=2, min_images=2)
    assert [b["num_images"].item() for b in batches] == [2, 2] and drops == {"too_few_images": 2, "no_images_above_threshold": 2}
    batches, drops = run_dataset(tmp_path, members, tokenizer, steps=2, single_image_drop_prob=0.0)
    assert [b["num_images"].item() for b in batches] == [1, 2]


def test_mmc4_single_image_truncated_to_the_last_token_is_dropped(tmp_path, tokenizer, photos):
    first = "the dog runs across the green park."
    doc = mmc4_doc([first, "a rocket."], [photos["rocket"]], [[0.1, 0.3]])
    ok = mmc4_doc(["a.", "b."], [photos["rocket"], photos["coffee"]], [[0.3, 0.1], [0.1, 0.3]])
    n = len(ids_of(tokenizer, first)) + 1  # the <image> is the last token that fits
    members = mmc4_base64_members("end", doc) + mmc4_base64_members("ok", ok)
    (batch,), drops = run_dataset(tmp_path, members, tokenizer, max_tokens=n)
    assert drops == {"single_image_at_end": 1}
    assert batch["input_ids"].shape == (1, n)


def test_chatgpt_keeps_max_images_in_placeholder_order(tmp_path, tokenizer, photos):
    """B9: with 8 images and max_images=6 all 6 are kept (the original kept 5); text order decides the images."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "coffee", "rocket"]
    images = {k + 1: photos[n] for k, n in enumerate(names)}
    order = [2, 1, 3, 4, 5, 6, 7, 8]
    example = " ".join(f"_!_IMAGE{k}_!_ caption {k}." for k in order)
    (batch,), drops = run_dataset(tmp_path, gpt_members("g", example, images), tokenizer, kind="chatgpt")
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    expected = "".join(f"<|endofchunk|><image>caption {k}." for k in order[:6])[len("<|endofchunk|>"):]
    assert text == expected + "<|endofchunk|></s>"
    assert batch["num_images"].tolist() == [6]
    pix = batch["pixel_values"][0].numpy()
    for slot, k in enumerate(order[:6]):
        assert np.array_equal(pix[slot], transformed(images[k]))


def test_gpt_documents_inside_mmc4_shards_are_recognised_and_skip_the_single_image_rule(tmp_path, tokenizer, photos):
    members = gpt_members("g", "_!_IMAGE1_!_ a cat. _!_IMAGE2_!_ a cup.", {1: photos["chelsea"], 2: photos["coffee"]})
    members += gpt_members("one", "_!_IMAGE1_!_ a rocket.", {1: photos["rocket"]})
    batches, drops = run_dataset(tmp_path, members, tokenizer, steps=2, kind="mmc4", single_image_drop_prob=1.0)
    texts = [tokenizer.decode(b["input_ids"][0][b["attention_mask"][0].bool()]) for b in batches]
    assert texts == ["<image>a cat.<|endofchunk|><image>a cup.<|endofchunk|></s>", "<image>a rocket.<|endofchunk|></s>"]
    assert drops == {}


def test_both_mmc4_shard_layouts_give_identical_batches_even_mixed(tmp_path, tokenizer, photos):
    from of_ds.data import build_train_data

    from .corpus import build_corpus
    from .helpers import IMAGE_SPEC, RUNTIME, make_spec

    corpus = build_corpus(tmp_path, laion_shards=3, per_shard=6)
    b64 = corpus["mmc4"].replace("{000000..000002}", "{}")
    mem = corpus["mmc4_members"].replace("{000000..000002}", "{}")
    layouts = {
        "base64": corpus["mmc4"],
        "members": corpus["mmc4_members"],
        "mixed": [b64.format("000000"), mem.format("000001"), b64.format("000002")],
    }
    results = {}
    for label, shards in layouts.items():
        spec = make_spec(dict(name="mmc4", kind="mmc4", shards=shards, batch_size=3, samples_per_epoch=9, flip_prob=0.5,
                              single_image_drop_prob=0.5))
        results[label] = [b["mmc4"] for b in build_train_data(spec, tokenizer, IMAGE_SPEC, RUNTIME)]
    for label in ("members", "mixed"):
        assert len(results[label]) == len(results["base64"]) == 3
        for a, b in zip(results["base64"], results[label]):
            for key in a:
                assert torch.equal(a[key], b[key]), (label, key)
