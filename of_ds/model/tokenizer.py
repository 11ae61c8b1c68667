"""Tokenizer loading (HF name or local dir) and a small BPE trainer for local test/demo tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def load_tokenizer(name_or_path: str, *, offline: bool = False, trust_remote_code: bool = False, cache_dir: str | None = None):
    """Load an HF tokenizer and add `<image>`, `<|endofchunk|>` and, as the original did, `<PAD>` where the
    tokenizer's files name no pad token (or pad is eos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        name_or_path, local_files_only=offline, trust_remote_code=trust_remote_code, cache_dir=cache_dir
    )
    add_flamingo_tokens(tok, pad_in_files=pad_token_in_files(name_or_path, offline=offline, cache_dir=cache_dir))
    return tok


def pad_token_in_files(name_or_path: str, *, offline: bool = False, cache_dir: str | None = None) -> bool:
    """Whether the tokenizer's own files (tokenizer_config.json, special_tokens_map.json) name a pad token.

    transformers 5 gives some tokenizer classes a pad token by default (GPT-NeoX, MPT's tokenizer: `<|padding|>`),
    which transformers 4, the original's, did not: there the original added `<PAD>`, so its MPT vocabulary (and
    every released MPT checkpoint's matrix) has 50280 rows, where the class default would give 50279."""
    from transformers.models.auto.tokenization_auto import get_tokenizer_config
    from transformers.utils import cached_file

    if get_tokenizer_config(name_or_path, cache_dir=cache_dir, local_files_only=offline).get("pad_token") is not None:
        return True
    path = cached_file(
        name_or_path, "special_tokens_map.json", cache_dir=cache_dir, local_files_only=offline,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
    )
    return path is not None and json.loads(Path(path).read_text()).get("pad_token") is not None


def add_flamingo_tokens(tok, *, pad_in_files: bool = True) -> None:
    """Add the media and end-of-chunk tokens, and a real pad token (pad=eos would make eos unlearnable): `<PAD>`
    where the tokenizer has none, pad is eos, or its pad is a class default rather than in its files."""
    new = [t for t in (EOC_TOKEN, MEDIA_TOKEN) if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id or not pad_in_files:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    tok.padding_side = "right"


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on `texts` and save it as an HF tokenizer dir (eos `</s>`, bos `<s>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
