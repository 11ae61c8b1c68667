"""The token facts the data stages need from a tokenizer, looked up once."""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

MEDIA = "<image>"
EOC = "<|endofchunk|>"
FLAMINGO_TOKENS = (MEDIA, EOC)


class TokenInfo(NamedTuple):
    media_id: int
    eoc_id: int
    pad_id: int
    eos_token: str
    # every text the tokenizer turns into a special token wherever it appears: <image>, <|endofchunk|>, eos, pad,
    # bos, unk and the tokenizer's other special added tokens (longest first)
    special_texts: tuple[str, ...] = FLAMINGO_TOKENS
    offsets: bool = False  # the tokenizer can map tokens back to character spans (fast tokenizers)

    def special_in(self, text: str) -> str | None:
        """The first special token that `text` spells literally, or None."""
        m = _special_pattern(self.special_texts).search(text)
        return m.group(0) if m else None


@functools.lru_cache(maxsize=8)
def _special_pattern(texts: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in texts))


def special_texts(tokenizer) -> tuple[str, ...]:
    """The texts that `tokenizer` matches as special tokens inside any text (not plain words)."""
    texts = set(FLAMINGO_TOKENS) | set(tokenizer.all_special_tokens)
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if added.special:
            texts.add(added.content)
    return tuple(sorted((t for t in texts if t), key=lambda t: (-len(t), t)))


def token_info(tokenizer) -> TokenInfo:
    """Ids of `<image>`, `<|endofchunk|>` and pad; raises if the tokenizer lacks the Flamingo tokens."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (MEDIA, EOC) if t not in vocab]
    if missing or tokenizer.pad_token_id is None or tokenizer.eos_token is None:
        raise ValueError(f"tokenizer lacks {missing or 'a pad or eos token'}; build it with of_ds.model.tokenizer.load_tokenizer")
    if tokenizer.padding_side != "right":
        raise ValueError("tokenizer.padding_side must be 'right' (the batch contract pads on the right)")
    return TokenInfo(vocab[MEDIA], vocab[EOC], tokenizer.pad_token_id, tokenizer.eos_token,
                     special_texts(tokenizer), bool(getattr(tokenizer, "is_fast", False)))
