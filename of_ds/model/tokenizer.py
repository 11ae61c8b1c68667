"""Tokenizer loading (HF name or local dir) and a small BPE trainer for local test/demo tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def load_tokenizer(name_or_path: str, *, offline: bool = False, trust_remote_code: bool = False, cache_dir: str | None = None):
    """Load an HF tokenizer and add `<image>`, `<|endofchunk|>` and (if missing) a pad token distinct from eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        name_or_path, local_files_only=offline, trust_remote_code=trust_remote_code, cache_dir=cache_dir
    )
    add_flamingo_tokens(tok)
    return tok


def add_flamingo_tokens(tok) -> None:
    """Add the media and end-of-chunk tokens, and a real pad token (pad=eos would make eos unlearnable)."""
    new = [t for t in (EOC_TOKEN, MEDIA_TOKEN) if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
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
