"""Random documents for the image-pairing property tests, and the check that every kept row pairs each `<image>`
token with the image its text placed there.

Every image is a flat colour from a 27-colour palette (identifiable exactly after the transform), and the text right
after each image's place names it: `@p{k}#` after `_!_IMAGEk_!_` (ChatGPT), `@s{j}#` at the start of sentence j
(MMC4), `@L{i}#` at the start of LAION caption i. For a kept row, the text after its k-th `<image>` token therefore
says which image slot k must hold, independently of how the loader counts; a shifted pairing shows as a wrong
colour, or as an `<image>` token followed by no tag at all (a literal one in the source text).
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .helpers import IMAGE_SPEC, RUNTIME, make_spec, transformed, write_tar

WORDS = ["the", "dog", "runs", "across", "a", "green", "park", "cup", "of", "coffee", "rocket", "sky", "cat", "sofa",
         "caf\u00e9", "\ue000", "\ue001x", "<im", "age>", "endofchunk", "|>", "_!_IMAGE", "s>", "<", ">"]
# literal special tokens a source text may spell (the tiny test tokenizer's eos is </s>, bos <s>, pad <PAD>)
LITERALS = ["<image>", "<|endofchunk|>", "</s>", "<PAD>", "<s>"]
FLAMINGO_LITERALS = ("<image>", "<|endofchunk|>")
TAG = re.compile(r"\s*@([pesL])(\d+)#")


def palette() -> list[bytes]:
    """27 flat-colour 8x8 PNGs, all different."""
    out = []
    for r in (0, 128, 255):
        for g in (0, 128, 255):
            for b in (0, 128, 255):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (r, g, b)).save(buf, "PNG")
                out.append(buf.getvalue())
    return out


PALETTE = palette()
_MEANS = np.stack([transformed(p).mean(axis=(1, 2)) for p in PALETTE])


def slot_colour(pixels: np.ndarray) -> int | None:
    """The palette index of one transformed image slot, or None for a zero (padding) slot."""
    if not pixels.any():
        return None
    d = np.abs(_MEANS - pixels.mean(axis=(1, 2))).max(axis=1)
    c = int(d.argmin())
    assert d[c] < 1e-4 and pixels.std(axis=(1, 2)).max() < 1e-4, "slot holds no palette image"
    return c


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


PLACEHOLDER = re.compile(r"_!_IMAGE\d+_!_")


def with_literal(rng: random.Random, text: str, literals: list[str] = LITERALS) -> str:
    """`text` with one literal special token inserted at a random character position (inside words and tags
    too, never inside a ChatGPT placeholder: the documents' placeholders stay what the generator recorded)."""
    inside = {i for m in PLACEHOLDER.finditer(text) for i in range(m.start() + 1, m.end())}
    i = rng.choice([i for i in range(len(text) + 1) if i not in inside])
    return text[:i] + rng.choice(literals) + text[i:]


def spaces(rng: random.Random) -> str:
    return rng.choice(["", " ", " ", " ", "  "])


# ------------------------------------------------------------------------------------------------ documents
@dataclass
class Doc:
    key: str
    kind: str  # laion | mmc4 | chatgpt
    members: list[tuple[str, bytes]]  # tar members (name, data)
    colour_of: dict[str, int]  # tag ("p3", "s2", "L7") -> palette index of the image placed there
    literal: str | None = None  # a special token spelled in the source text
    meta: dict = field(default_factory=dict)


def gpt_doc(rng: random.Random, key: str, *, urls: bool = False, is_gpt: bool = True,
            literals: list[str] = LITERALS) -> tuple[dict, Doc, dict[str, bytes]]:
    """A ChatGPT sequence: placeholders (repeated, out of order, some without a map entry), map entries no
    placeholder names, a prefix before the first placeholder, random spacing, sometimes a literal special token.

    Returns the JSON document, the Doc, and (with `urls`) url -> image bytes for the converter."""
    k_max = rng.randint(1, 9)
    colours = rng.sample(range(len(PALETTE)), k_max + 2)
    n_places = rng.choice([1, 1, 2, 3, rng.randint(4, 11)])
    order = [rng.randint(1, k_max) for _ in range(n_places)]
    text = words(rng, rng.choice([0, 1, 3, 12])) + spaces(rng)
    for k in order:
        text += f"_!_IMAGE{k}_!_{spaces(rng)}@p{k}# {words(rng, rng.randint(0, 8))}{spaces(rng)}"
    literal = None
    if rng.random() < 0.25:
        text = with_literal(rng, text, literals)
        literal = next(t for t in literals if t in text)
    image_map, files = {}, {}
    for k in range(1, k_max + 3):  # k_max+1, k_max+2: entries no placeholder names
        if k <= k_max and rng.random() < 0.12:
            continue  # a placeholder without a map entry
        png = PALETTE[colours[k - 1]]
        if urls:
            url = f"http://img.example/{key}/{k}.png"
            files[url] = png
            image_map[f"_!_IMAGE{k}_!_"] = rng.choice([{"url": url}, url])
        elif k > k_max and rng.random() < 0.5:
            image_map[f"_!_IMAGE{k}_!_"] = {"url": "never fetched"}  # no image: never needed
        else:
            image_map[f"_!_IMAGE{k}_!_"] = {"base64_image": base64.b64encode(png).decode()}
    doc = {"example": text, "image_map": image_map}
    if is_gpt:
        doc["is_gpt"] = True
    d = Doc(key, "chatgpt", [(f"{key}.json", json.dumps(doc).encode())],
            {f"p{k}": colours[k - 1] for k in range(1, k_max + 1) if f"_!_IMAGE{k}_!_" in image_map}, literal,
            {"order": order, "mapped": {k for k in range(1, k_max + 1) if f"_!_IMAGE{k}_!_" in image_map}})
    return doc, d, files


def mmc4_doc(rng: random.Random, key: str, *, literals: list[str] = LITERALS) -> tuple[dict, Doc, list[bytes]]:
    """An MMC4 document whose similarity matrix has one clear sentence per image (some below the 0.24 threshold),
    in random image order; sometimes more images than sentences allow, sometimes a literal special token.

    Returns the JSON document (no image payloads), the Doc (no members yet) and the images in image_info order."""
    n_sent = rng.randint(1, 9)
    n_img = rng.randint(1, min(n_sent, 8))
    placed = rng.sample(range(n_sent), n_img)  # image i <-> sentence placed[i]
    colours = rng.sample(range(len(PALETTE)), n_img)
    above = [rng.random() < 0.8 for _ in range(n_img)]
    sim = [[0.0] * n_sent for _ in range(n_img)]
    for i, s in enumerate(placed):
        sim[i][s] = 0.5 if above[i] else 0.1
    sentences = [f"@s{j}# {words(rng, rng.randint(0, 10))}{spaces(rng)}" for j in range(n_sent)]
    literal = None
    if rng.random() < 0.25:
        j = rng.randrange(n_sent)
        sentences[j] = with_literal(rng, sentences[j], literals)
        literal = next(t for t in literals if t in sentences[j])
    doc = {"text_list": sentences, "similarity_matrix": sim, "url": f"http://doc.example/{key}",
           "image_info": [{"image_name": f"{key}-{i}.png", "raw_url": f"http://img.example/{key}/{i}.png"}
                          for i in range(n_img)]}
    d = Doc(key, "mmc4", [], {f"s{s}": colours[i] for i, s in enumerate(placed) if above[i]}, literal,
            {"kept_sentences": sorted(s for i, s in enumerate(placed) if above[i])})
    return doc, d, [PALETTE[c] for c in colours]


def mmc4_shard_doc(rng: random.Random, key: str) -> Doc:
    """An MMC4 document in a loader shard, in either layout."""
    doc, d, images = mmc4_doc(rng, key)
    if rng.random() < 0.5:
        for info, png in zip(doc["image_info"], images):
            info["image_base64"] = base64.b64encode(png).decode()
        d.members = [(f"{key}.json", json.dumps(doc).encode())]
    else:
        for i, info in enumerate(doc["image_info"]):
            info["member"] = f"{i:03d}.png"
        d.members = [(f"{key}.json", json.dumps(doc).encode())] + [
            (f"{key}.{i:03d}.png", png) for i, png in enumerate(images)]
    return d


def laion_doc(rng: random.Random, key: str, i: int) -> Doc:
    colour = rng.randrange(len(PALETTE))
    caption = f"{spaces(rng)}@L{i}# {words(rng, rng.randint(0, 15))}"
    literal = None
    if rng.random() < 0.25:
        caption = with_literal(rng, caption)
        literal = next(t for t in LITERALS if t in caption.strip())
    members = [(f"{key}.png", PALETTE[colour]), (f"{key}.txt", caption.encode())]
    return Doc(key, "laion", members, {f"L{i}": colour}, literal)


# ------------------------------------------------------------------------------------------- running the stages
def stage_plan(tmp: Path, tokenizer, kind: str, **fields):
    """The loader's configured stages (prepare, batcher) for one dataset of `kind`."""
    from of_ds.data import build_stream_plan

    shard = write_tar(tmp / f"placeholder-{kind}-{len(list(tmp.glob('placeholder-*')))}.tar", [])
    base = dict(name="d", kind=kind, shards=str(shard), batch_size=4, samples_per_epoch=4,
                single_image_drop_prob=0.0, flip_prob=0.0, min_image_bytes=0)
    spec = make_spec({**base, **fields})
    return build_stream_plan(spec.dataset("d"), 0, tokenizer, IMAGE_SPEC, RUNTIME)


@dataclass
class Row:
    ids: list[int]
    mask: list[int]
    pixels: np.ndarray  # [T, 3, H, W]
    num_images: int
    labels: list[int]


def run_stages(plan, shard: Path) -> dict[str, Row | str]:
    """Every sample of `shard` through the plan's prepare and batcher, in order: key -> Row, or the drop reason."""
    from of_ds.data.drops import DropCounter, DropSample
    from of_ds.data.shards import iter_tar_samples

    counter = DropCounter("d", 10**9)
    batcher = plan.make_batcher()
    out: dict[str, Row | str] = {}
    pending: list[str] = []

    def flush():
        batch = batcher.finish()
        for r, key in enumerate(pending):
            out[key] = Row(batch["input_ids"][r].tolist(), batch["attention_mask"][r].tolist(),
                           batch["pixel_values"][r].numpy().copy(), int(batch["num_images"][r]),
                           batch["labels"][r].tolist())
        pending.clear()

    for position, sample in enumerate(iter_tar_samples(str(shard), counter, plan.wanted)):
        key = sample["__key__"]
        try:
            item = plan.prepare(sample, counter)
            full = batcher.add(item, random.Random(position))
        except DropSample as e:
            out[key] = e.reason
            continue
        pending.append(key)
        if full:
            flush()
    if pending:
        flush()
    return out


def check_row(tokenizer, row: Row, colour_of: dict[str, int], key: str) -> list[str]:
    """Check one kept row: the k-th `<image>` token's image is the one its text placed there; returns the tags
    found after the `<image>` tokens, in order. Asserts (with the key) on any violation."""
    vocab = tokenizer.get_vocab()
    media, specials = vocab["<image>"], set(tokenizer.all_special_ids) | {vocab["<image>"], vocab["<|endofchunk|>"]}
    real = sum(row.mask)
    ids = row.ids[:real]
    positions = [i for i, t in enumerate(ids) if t == media]
    assert row.num_images == len(positions), (key, row.num_images, len(positions))
    tags = []
    for k, p in enumerate(positions):
        q = p + 1
        while q < real and ids[q] not in specials:
            q += 1
        after = tokenizer.decode(ids[p + 1:q])
        m = TAG.match(after)
        if m is None:  # only a tag cut by truncation may be missing
            assert q == real and re.fullmatch(r"\s*(@([pesL]\d*)?)?", after), (key, k, after)
            tag = None
        else:
            tag = m.group(1) + m.group(2)
        tags.append(tag)
        got = slot_colour(row.pixels[k])
        if tag is not None:
            assert tag in colour_of, (key, k, tag)
            assert got == colour_of[tag], (key, k, tag, got, colour_of[tag])
        else:
            assert got in colour_of.values(), (key, k, got)
    for k in range(len(positions), row.pixels.shape[0]):
        assert slot_colour(row.pixels[k]) is None, (key, k)  # images whose <image> was cut are not decoded
    return tags


def truncated(tokenizer, row: Row) -> bool:
    """Whether the row was cut at max_tokens (its text did not reach the final eos)."""
    real = sum(row.mask)
    return row.ids[real - 1] != tokenizer.eos_token_id or real < 2 or row.ids[real - 2] != tokenizer.get_vocab()["<|endofchunk|>"]
