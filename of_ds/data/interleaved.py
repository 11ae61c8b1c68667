"""Interleaved documents (MMC4 and ChatGPT-generated): raw tar sample -> `Document` -> `[B, T, 3, H, W]` batches.

`prepare_document` runs before the shuffle buffer and keeps only what a batch needs (the text with its `<image>`
markers and the bytes of the images it references, in text order), so the buffer never holds base64 JSON.
It reads both shard layouts: the original's (`image_info[i].image_base64`) and the converter's
(`image_info[i].member` = "000.jpg" naming the tar member `KEY.000.jpg`; `missing` marks absent images).

MMC4 follows the original main branch's `preprocess_interleaved`, with its order bug B1 fixed: image-sentence
pairs are sorted by sentence before keeping `max_images`, so the k-th `<image>` token is the k-th image.
ChatGPT documents (`is_gpt`) follow its `preprocess_gpt_interleaved` without the off-by-one B9 (all `max_images` images are kept).

Source text that spells a special token literally (`<image>`, `<|endofchunk|>`, the tokenizer's eos, pad...) is
dropped (`text_has_special_token`): only the markers placed here become `<image>` tokens. Each `Document` records
where its markers are (`anchors`), built alongside the text, and the batcher checks every kept row against them:
the k-th `<image>` token must be the marker of image k (`ImagePairingError` otherwise: a bug, never data).
"""

from __future__ import annotations

import binascii
import json
import random
import re
from typing import NamedTuple

import numpy as np
import orjson
import pybase64
import torch
from scipy.optimize import linear_sum_assignment

from ..model.labels import build_labels
from .drops import DropCounter, DropSample, ImagePairingError
from .images import ImageTransform, batch_pixels, open_image
from .tokens import EOC, MEDIA, TokenInfo

_GPT_PLACEHOLDER = re.compile(r"_!_IMAGE(\d+)_!_")


class Document(NamedTuple):
    key: str
    text: str  # with <image> / <|endofchunk|> markers and the final <|endofchunk|>{eos}
    images: list[bytes]  # the image of the k-th <image> marker at position k
    anchors: tuple[int, ...]  # character offset in `text` of image k's <image> marker, recorded as it was placed
    chatgpt: bool = False  # ChatGPT sequences skip the single-image rules (as the original)


class DocumentRules(NamedTuple):
    """The dataset spec's interleaved filters."""

    kind: str
    max_images: int
    min_images: int
    sim_threshold: float
    min_image_bytes: int
    single_image_drop_prob: float
    flip_prob: float
    max_tokens: int


def wants_member(ext: str) -> bool:
    """The tar members an interleaved sample needs: the JSON and converter image members (`000.jpg`)."""
    return ext == "json" or ext[:1].isdigit()


def prepare_document(sample: dict, rules: DocumentRules, tokens: TokenInfo, counter: DropCounter) -> Document:
    """Parse, validate and select: one `Document` or DropSample (reason). Image-level skips go to `counter`.

    Under `kind: chatgpt` every document is a ChatGPT sequence; under `kind: mmc4`, those with an `is_gpt` key."""
    if "json" not in sample:
        raise DropSample("missing_json", sample["__key__"])
    try:
        doc = orjson.loads(sample["json"])
    except orjson.JSONDecodeError:  # orjson is stricter (NaN, huge integers...): the standard library decides
        try:
            doc = json.loads(sample["json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DropSample("invalid_json", f"{sample['__key__']}: {e}") from None
    if not isinstance(doc, dict):
        raise DropSample("invalid_json", f"{sample['__key__']}: top level is not an object")
    if "is_gpt" in doc or rules.kind == "chatgpt":
        return _prepare_gpt(sample, doc, rules, tokens)
    return _prepare_mmc4(sample, doc, rules, tokens, counter)


def _image_bytes(sample: dict, info: dict, base64_field: str) -> bytes | None:
    """The bytes of one image entry (base64 field or converter member); None when the entry has no image."""
    if base64_field in info:
        if not isinstance(info[base64_field], str):
            raise DropSample("image_bad_base64")
        return decode_base64(info[base64_field])
    member = info.get("member")
    if isinstance(member, str):
        if member.lower() not in sample:
            raise DropSample("image_missing_member")
        return sample[member.lower()]
    return None


def decode_base64(text: str) -> bytes:
    """base64.b64decode's result (lenient: characters outside the alphabet are skipped) or DropSample.

    Plain base64 goes through pybase64's SIMD decoder in strict mode (about 40x faster; whatever it accepts, the
    lenient decoder decodes to the same bytes); anything it refuses gets the standard library's lenient decoder."""
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return binascii.a2b_base64(text)  # = base64.b64decode, without an ASCII copy of the str
    except (binascii.Error, ValueError):
        raise DropSample("image_bad_base64") from None


def _image_size(sample: dict, info: dict) -> int:
    """Byte size of an image entry without decoding it (base64: from the text length); DropSample if absent."""
    if "image_base64" in info:
        b64 = info["image_base64"]
        if not isinstance(b64, str):
            raise DropSample("image_bad_base64")
        return len(b64) * 3 // 4 - (len(b64) - len(b64.rstrip("=")))
    member = info.get("member")
    if isinstance(member, str):
        if member.lower() not in sample:
            raise DropSample("image_missing_member")
        return len(sample[member.lower()])
    raise DropSample("image_missing")


def _check_source_text(texts: list[str], tokens: TokenInfo, key: str) -> None:
    """DropSample if any source text spells a special token: it would tokenize as that token, not as text."""
    for text in texts:
        found = tokens.special_in(text)
        if found is not None:
            raise DropSample("text_has_special_token", f"{key}: {found!r} in the text")


def _prepare_mmc4(sample: dict, doc: dict, rules: DocumentRules, tokens: TokenInfo, counter: DropCounter) -> Document:
    key = sample["__key__"]
    for field in ("text_list", "image_info"):
        if field not in doc:
            raise DropSample("missing_key", f"{key}: no '{field}'")
    sentences, image_info = doc["text_list"], doc["image_info"]
    if not (isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)):
        raise DropSample("bad_document", f"{key}: text_list is not a list of strings")
    if not (isinstance(image_info, list) and all(isinstance(i, dict) for i in image_info)):
        raise DropSample("bad_document", f"{key}: image_info is not a list of objects")
    if not image_info:  # whatever its similarity matrix looks like (MMC4 writes [] for these)
        raise DropSample("no_images", key)
    if "similarity_matrix" not in doc:
        raise DropSample("missing_key", f"{key}: no 'similarity_matrix'")
    _check_source_text(sentences, tokens, key)
    try:
        sim = np.asarray(doc["similarity_matrix"], dtype=np.float64)
    except (ValueError, TypeError):
        raise DropSample("bad_similarity_matrix", key) from None
    if sim.shape != (len(image_info), len(sentences)):
        raise DropSample("bad_similarity_shape", f"{key}: {sim.shape} for {len(image_info)} images x {len(sentences)} sentences")
    if not np.isfinite(sim).all():
        raise DropSample("bad_similarity_matrix", f"{key}: non-finite similarities")

    candidates = []
    for i, info in enumerate(image_info):
        try:
            if _image_size(sample, info) <= rules.min_image_bytes:
                raise DropSample("image_too_small")
        except DropSample as e:
            counter.image(e.reason)
            continue
        candidates.append(i)
    data: dict[int, bytes] = {}
    while True:  # assign, then fetch only the kept images; one that turns out bad is excluded and we re-assign
        if not candidates:  # each image's own reason is counted above
            raise DropSample("no_usable_images", key)
        sub = sim[candidates]
        rows, cols = linear_sum_assignment(-sub)  # one image per sentence and vice versa, maximising similarity
        pairs = sorted((int(c), candidates[r]) for r, c in zip(rows, cols) if sub[r, c] >= rules.sim_threshold)
        if not pairs:
            raise DropSample("no_images_above_threshold", key)
        pairs = pairs[: rules.max_images]  # text order (B1): the first images of the document, not of image_info
        bad = []
        for _, i in pairs:
            if i not in data:
                try:
                    data[i] = _image_bytes(sample, image_info[i], "image_base64")
                    open_image(data[i])
                except DropSample as e:
                    counter.image(e.reason if e.reason.startswith("image_") else "image_undecodable")
                    bad.append(i)
        if not bad:
            break
        candidates = [i for i in candidates if i not in bad]

    eoc, media = _sentinels(sentences)
    marked = list(sentences)
    for sentence_ix, _ in pairs:
        marked[sentence_ix] = f"{eoc}{media}{marked[sentence_ix]}"
    text, anchors = _expand(_cleanup(" ".join(marked), eoc, media), eoc, media)
    return Document(key, f"{text}{EOC}{tokens.eos_token}", [data[i] for _, i in pairs], anchors)


def _prepare_gpt(sample: dict, doc: dict, rules: DocumentRules, tokens: TokenInfo) -> Document:
    key = sample["__key__"]
    for field in ("example", "image_map"):
        if field not in doc:
            raise DropSample("missing_key", f"{key}: no '{field}'")
    text, image_map = doc["example"], doc["image_map"]
    if not isinstance(text, str) or not isinstance(image_map, dict):
        raise DropSample("bad_document", f"{key}: example must be a string and image_map an object")
    _check_source_text([text], tokens, key)
    # B9: keep max_images, not one fewer; the text from the next placeholder on is cut, so those need no entry
    placeholders = _GPT_PLACEHOLDER.findall(text)[: rules.max_images]
    images = []
    for number in placeholders:
        entry = image_map.get(f"_!_IMAGE{number}_!_")
        if not isinstance(entry, dict):
            raise DropSample("missing_key", f"{key}: image_map has no _!_IMAGE{number}_!_")
        try:
            raw = _image_bytes(sample, entry, "base64_image")
        except DropSample as e:
            raise DropSample(e.reason.removeprefix("image_"), key) from None
        if raw is None:
            raise DropSample("missing_key", f"{key}: _!_IMAGE{number}_!_ has no image")
        open_image(raw)
        images.append(raw)
    eoc, media = _sentinels([text])
    marked = _cleanup(_GPT_PLACEHOLDER.sub(f"{eoc}{media}", text), eoc, media)
    starts = [m.start() for m in re.finditer(re.escape(media), marked)]  # one per placeholder, in text order
    if len(starts) > rules.max_images:
        marked = marked[: starts[rules.max_images]].removesuffix(eoc)  # cut before the first image beyond max_images
    text, anchors = _expand(marked, eoc, media)
    return Document(key, f"{text}{EOC}{tokens.eos_token}", images, anchors, chatgpt=True)


def _sentinels(texts: list[str]) -> tuple[str, str]:
    """Two private-use characters that occur in none of `texts`: the markers while the text is assembled, so that
    only the markers placed here (never a source character) become `<|endofchunk|>` / `<image>`."""
    found = []
    for code in range(0xE000, 0xF900):
        ch = chr(code)
        if not any(ch in t for t in texts):
            found.append(ch)
            if len(found) == 2:
                return found[0], found[1]
    raise DropSample("bad_document", "the text uses every private-use character")


def _cleanup(text: str, eoc: str = EOC, media: str = MEDIA) -> str:
    """The original's marker cleanup: drop the first `<|endofchunk|>`, and spaces around the markers."""
    text = text.replace(eoc, "", 1)
    return text.replace(f" {eoc}", eoc).replace(f"{media} ", media).replace(f" {media}", media)


def _expand(marked: str, eoc: str, media: str) -> tuple[str, tuple[int, ...]]:
    """Sentinels -> `<|endofchunk|>` / `<image>`; returns the text and the offset of each `<image>` marker."""
    parts, anchors, pos = [], [], 0
    for i, piece in enumerate(re.split(f"({re.escape(eoc)}|{re.escape(media)})", marked)):
        if i % 2:
            if piece == media:
                anchors.append(pos)
                piece = MEDIA
            else:
                piece = EOC
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), tuple(anchors)


def check_pairing(doc: Document, ids: list[int], mask: list[int], offsets: list[tuple[int, int]] | None,
                  media_id: int) -> int:
    """The number of `<image>` tokens in a tokenized row, after checking that the k-th of them is image k's marker.

    Text level: every `<image>` in the text is a marker placed for an image, in image order. Token level: no more
    `<image>` tokens than images; with offsets, the k-th one spans marker k, and every marker inside the kept
    (untruncated) text has its token. Raises ImagePairingError: a violation is a bug in our stages."""
    placed = [m.start() for m in re.finditer(re.escape(MEDIA), doc.text)]
    if len(doc.anchors) != len(doc.images) or placed != list(doc.anchors):
        raise ImagePairingError(f"{doc.key}: {len(doc.images)} images, markers placed at {list(doc.anchors)}, "
                                f"<image> found in the text at {placed}")
    positions = [i for i, t in enumerate(ids) if t == media_id]
    n = len(positions)
    if n > len(doc.images):
        raise ImagePairingError(f"{doc.key}: {n} <image> tokens for {len(doc.images)} images")
    if offsets is not None:
        starts = [offsets[i][0] for i in positions]
        kept_end = max((e for (_, e), m in zip(offsets, mask) if m), default=0)
        if starts != list(doc.anchors[:n]) or (n < len(doc.anchors) and doc.anchors[n] < kept_end):
            raise ImagePairingError(f"{doc.key}: <image> tokens at characters {starts}, markers at "
                                    f"{list(doc.anchors)}, text kept up to character {kept_end}")
    return n


class InterleavedBatcher:
    """Tokenizes each document, applies the image-count rules, then decodes only the images whose `<image>`
    tokens survived truncation, straight into the zero-padded `[B, max_images, 3, H, W]` batch array."""

    def __init__(self, batch_size: int, transform: ImageTransform, tokenizer, tokens: TokenInfo, rules: DocumentRules):
        self.batch_size, self.transform, self.tokenizer, self.tokens, self.rules = batch_size, transform, tokenizer, tokens, rules
        self._reset()

    def _reset(self) -> None:
        h, w = self.transform.size
        self.pixels, self._pixels_tensor = batch_pixels((self.batch_size, self.rules.max_images, 3, h, w), shared=True)
        self.ids: list[list[int]] = []
        self.masks: list[list[int]] = []
        self.counts: list[int] = []

    def add(self, doc: Document, rng: random.Random) -> bool:
        """Add one document (or DropSample with the reason); True when the batch is full."""
        enc = self.tokenizer(doc.text, max_length=self.rules.max_tokens, truncation=True, padding="max_length",
                             return_offsets_mapping=self.tokens.offsets)
        ids = enc["input_ids"]
        n = check_pairing(doc, ids, enc["attention_mask"], enc.get("offset_mapping"), self.tokens.media_id)
        if n < self.rules.min_images:
            raise DropSample("too_few_images", doc.key)
        if n == 1 and not doc.chatgpt:
            if rng.random() < self.rules.single_image_drop_prob:
                raise DropSample("single_image", doc.key)
            if ids[-1] == self.tokens.media_id:  # its labels would all be masked
                raise DropSample("single_image_at_end", doc.key)
        row = len(self.ids)
        flip = rng.random() < self.rules.flip_prob  # one decision per document, as the original
        try:
            for k in range(n):
                self.transform(doc.images[k], self.pixels[row, k], flip)
        except DropSample:
            self.pixels[row] = 0.0
            raise
        self.ids.append(ids)
        self.masks.append(enc["attention_mask"])
        self.counts.append(n)
        return len(self.ids) == self.batch_size

    def finish(self) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.ids, dtype=torch.long)
        mask = torch.tensor(self.masks, dtype=torch.long)
        batch = {
            "pixel_values": self._pixels_tensor,
            "num_images": torch.tensor(self.counts, dtype=torch.long),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": build_labels(ids, mask, self.rules.kind, self.tokens.media_id, self.tokens.eoc_id, self.tokens.pad_id),
        }
        self._reset()
        return batch
