"""Where transformers 5 differs silently from the original's transformers 4: the tokenizer's pad, MPT settings."""

import json

import pytest
from transformers import AutoConfig

from of_ds.model.language import check_native_mpt_config
from of_ds.model.tokenizer import load_tokenizer


def neox_style_tokenizer(out, pad_in: str | None = None):
    """A tiny byte-level BPE laid out as GPT-NeoX's (MPT's tokenizer): `<|endoftext|>` 0, `<|padding|>` 1, files
    naming bos/eos/unk and, only where `pad_in` says, the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a cat sat on the mat", "two dogs ran in the park"] * 20, trainer=trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {**special, "tokenizer_class": "GPTNeoXTokenizer", "add_prefix_space": False}
    if pad_in == "tokenizer_config":
        config["pad_token"] = "<|padding|>"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if pad_in == "special_tokens_map":
        (out / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<|padding|>"}))
    return out, tok.get_vocab_size()


def test_a_neox_tokenizer_without_a_pad_in_its_files_gets_the_originals_pad(tmp_path):
    """transformers 5's GPTNeoXTokenizer has `<|padding|>` as a default pad; transformers 4's had none, and the
    original added `<PAD>` after `<|endofchunk|>` and `<image>` (MPT: 50277, 50278, 50279; 50280 rows)."""
    from transformers import AutoTokenizer

    path, base = neox_style_tokenizer(tmp_path / "neox")
    assert AutoTokenizer.from_pretrained(path).pad_token == "<|padding|>"  # the library default this guards against
    tok = load_tokenizer(str(path), offline=True)
    assert tok.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"]) == [base, base + 1, base + 2]
    assert tok.pad_token == "<PAD>" and len(tok) == base + 3
    assert tok("<image>a cat", padding="max_length", max_length=6)["input_ids"][-1] == base + 2


@pytest.mark.parametrize("pad_in", ["tokenizer_config", "special_tokens_map"])
def test_a_pad_named_in_the_files_is_kept(tmp_path, pad_in):
    path, base = neox_style_tokenizer(tmp_path / "neox", pad_in=pad_in)
    tok = load_tokenizer(str(path), offline=True)
    assert tok.pad_token == "<|padding|>" and tok.pad_token_id == 1 and len(tok) == base + 2


def test_mpt_settings_transformers_ignores_are_refused():
    tiny = dict(d_model=32, n_layers=2, n_heads=4)
    check_native_mpt_config(AutoConfig.for_model("mpt", **tiny))  # the recipes' settings (mosaicml/mpt-7b's too)
    for kw, name in [(dict(attn_config={"qk_ln": True}), "qk_ln"), (dict(logit_scale=2.0), "logit_scale"),
                     (dict(attn_config={"alibi": False}), "alibi"), (dict(attn_config={"alibi_bias_max": 16}), "alibi_bias_max"),
                     (dict(no_bias=False), "no_bias"), (dict(attn_config={"attn_type": "multiquery_attention"}), "attn_type")]:
        with pytest.raises(ValueError, match=rf"model\.lm: .*{name}"):
            check_native_mpt_config(AutoConfig.for_model("mpt", **tiny, **kw))


def test_an_mpt_spec_with_qk_layernorm_fails_at_build(tiny_tokenizer_dir):
    from of_ds.model import build_flamingo

    from .conftest import tiny_spec

    spec = tiny_spec(tiny_tokenizer_dir, "mpt")
    spec = spec.updated({"lm.config": {**spec.lm.config, "attn_config": {"qk_ln": True}}})
    with pytest.raises(ValueError, match=r"model\.lm: .*qk_ln"):
        build_flamingo(spec)
