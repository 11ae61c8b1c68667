"""LAION image-text pairs: raw tar sample -> (key, image bytes, caption) -> `[B, 1, 3, H, W]` batches.

Caption template and tokenization follow the original trainer (its `train/data.py`, `preprocess_laion_text`):
`<image>{caption.strip()}<|endofchunk|>{eos}`, right padding to the longest row, truncation at `max_tokens`.
A caption that spells a special token literally is dropped (`text_has_special_token`); every batch row is checked
to hold exactly one `<image>` token, the caption's first marker (`ImagePairingError` otherwise: a bug).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from ..model.labels import build_labels
from .drops import DropSample, ImagePairingError
from .images import ImageTransform, batch_pixels
from .tokens import EOC, MEDIA, TokenInfo

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")  # the original's "jpg;png;jpeg" order, for a key with several
WANTED_EXTS = frozenset(IMAGE_EXTS + ("txt",))

class LaionPair(NamedTuple):
    key: str
    image: bytes
    caption: str

def prepare_laion(sample: dict, tokens: TokenInfo) -> LaionPair:
    """Check a raw sample has an image and a non-empty caption without special tokens (cheap; runs before the
    shuffle buffer)."""
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        raise DropSample("missing_image", sample["__key__"])
    if "txt" not in sample:
        raise DropSample("missing_caption", sample["__key__"])
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DropSample("bad_caption", sample["__key__"]) from None
    if not caption:
        raise DropSample("empty_caption", sample["__key__"])
    found = tokens.special_in(caption)
    if found is not None:
        raise DropSample("text_has_special_token", f"{sample['__key__']}: {found!r} in the caption")
    return LaionPair(sample["__key__"], image, caption)

class LaionBatcher:
    """Collects pairs into one batch: images decoded straight into the batch array, captions tokenized together."""

    def __init__(self, batch_size: int, transform: ImageTransform, tokenizer, tokens: TokenInfo, max_tokens: int, flip_prob: float):
        self.batch_size, self.transform, self.tokenizer = batch_size, transform, tokenizer
        self.tokens, self.max_tokens, self.flip_prob = tokens, max_tokens, flip_prob
        self._reset()

    def _reset(self) -> None:
        h, w = self.transform.size
        self.pixels, self._pixels_tensor = batch_pixels((self.batch_size, 1, 3, h, w), shared=False)
        self.texts: list[str] = []

    def add(self, pair: LaionPair, rng: random.Random) -> bool:
        """Add one pair (DropSample if its image does not decode); True when the batch is full."""
        flip = rng.random() < self.flip_prob
        self.transform(pair.image, self.pixels[len(self.texts), 0], flip)
        self.texts.append(f"{MEDIA}{pair.caption}{EOC}{self.tokens.eos_token}")
        return len(self.texts) == self.batch_size

    def finish(self) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(self.texts, max_length=self.max_tokens, padding="longest", truncation="only_first",
                             return_tensors="pt", return_offsets_mapping=self.tokens.offsets)
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
        self._check_pairing(ids, enc.get("offset_mapping"))
        batch = {
            "pixel_values": self._pixels_tensor,
            "num_images": torch.ones(self.batch_size, dtype=torch.long),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": build_labels(ids, mask, "laion", self.tokens.media_id, self.tokens.eoc_id, self.tokens.pad_id),
        }
        self._reset()
        return batch

    def _check_pairing(self, ids: torch.Tensor, offsets: torch.Tensor | None) -> None:
        """Each row's one image belongs to its one `<image>` token, the marker at the start of its text."""
        media = ids == self.tokens.media_id
        counts = media.sum(dim=1)
        bad = (counts != 1).nonzero().flatten().tolist()
        if not bad and offsets is not None:
            bad = (offsets[media][:, 0] != 0).nonzero().flatten().tolist()
        if bad:
            row = bad[0]
            raise ImagePairingError(f"LAION batch row {row}: {int(counts[row])} <image> tokens for one image, "
                                    f"text {self.texts[row]!r}")
