"""The token facts the data stages need from a tokenizer, looked up once."""

from __future__ import annotations

from typing import NamedTuple

MEDIA = "<image>"
EOC = "<|endofchunk|>"


class TokenInfo(NamedTuple):
    media_id: int
    eoc_id: int
    pad_id: int
    eos_token: str


def token_info(tokenizer) -> TokenInfo:
    """Ids of `<image>`, `<|endofchunk|>` and pad; raises if the tokenizer lacks the Flamingo tokens."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (MEDIA, EOC) if t not in vocab]
    if missing or tokenizer.pad_token_id is None or tokenizer.eos_token is None:
        raise ValueError(f"tokenizer lacks {missing or 'a pad or eos token'}; build it with of_ds.model.tokenizer.load_tokenizer")
    if tokenizer.padding_side != "right":
        raise ValueError("tokenizer.padding_side must be 'right' (the batch contract pads on the right)")
    return TokenInfo(vocab[MEDIA], vocab[EOC], tokenizer.pad_token_id, tokenizer.eos_token)
