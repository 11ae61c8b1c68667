"""Tiny Flamingo builders for the model tests: open_clip ViT and HF LMs from configs, the shared local tokenizer;
the original OpenFlamingo code, released or from a git mirror (`original`)."""

import functools
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from of_ds.spec import CrossAttnSpec, LMSpec, ModelSpec, PerceiverSpec, VisionSpec

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 24, "head_width": 12, "patch_size": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 16, "heads": 2, "layers": 1},
}
# family -> tiny config. vocab_size "exact": the LM matrix has the tokenizer's rows, new tokens are appended past
# it; "padded": 16 spare rows (as MPT's 50432 for 50277 tokens), the new tokens fall in those padding rows
LM_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size="exact", hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size="padded", n_embd=32, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=1),
    "opt": dict(model_type="opt", vocab_size="exact", hidden_size=32, ffn_dim=48, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=1),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size="padded", hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", vocab_size="exact", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", vocab_size="exact", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gptj": dict(model_type="gptj", vocab_size="exact", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, bos_token_id=0, eos_token_id=1),
    "mpt": dict(model_type="mpt", vocab_size="padded", d_model=32, n_layers=2, n_heads=4),
    # the OpenFlamingo-3B releases' LM (of_ds.model.mosaic_gpt), with the release's settings
    "mosaic_gpt": dict(model_type="mosaic_gpt", vocab_size="padded", d_model=32, n_layers=4, n_heads=4, max_seq_len=128, alibi=True, attn_qk_ln=True, no_bias=True, attn_impl="torch", low_precision_layernorm=True),
}
MAIN_FAMILIES = ["llama", "gpt2", "opt", "gpt_neox"]


@functools.lru_cache
def base_vocab(tokenizer_dir: str) -> int:
    """The tokenizer's size before the Flamingo tokens are added."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


def lm_config(tokenizer_dir: str, family: str) -> dict:
    cfg = dict(LM_CONFIGS[family])
    cfg["vocab_size"] = base_vocab(tokenizer_dir) + (16 if cfg["vocab_size"] == "padded" else 0)
    return cfg


def tiny_spec(tokenizer_dir: str, family: str = "llama", every_n_layers: int = 2, quick_gelu: bool | None = None, **overrides) -> ModelSpec:
    return ModelSpec(
        vision=VisionSpec(name="test-vit-tiny", pretrained=None, config=TINY_VIT, quick_gelu=quick_gelu),
        lm=LMSpec(name_or_path=None, config=lm_config(tokenizer_dir, family)),
        tokenizer=tokenizer_dir,
        perceiver=PerceiverSpec(depth=2, heads=2, dim_head=8, num_latents=4, ff_mult=2),
        cross_attn=CrossAttnSpec(every_n_layers=every_n_layers, heads=2, dim_head=8, ff_mult=2),
        offline=True,
        **overrides,
    )


def build_tiny(tokenizer_dir: str, family: str = "llama", seed: int = 0, **kw):
    from of_ds.model import build_flamingo

    torch.manual_seed(seed)
    model, processor, tok = build_flamingo(tiny_spec(tokenizer_dir, family, **kw))
    return model.eval(), processor, tok


def open_gates(model, attn: float = 0.8, ff: float = 0.6) -> None:
    with torch.no_grad():
        for block in model.cross_attention_blocks():
            block.attn_gate.fill_(attn)
            block.ff_gate.fill_(ff)


def encode(tok, texts: list[str]):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


@pytest.fixture(scope="module")
def llama(tiny_tokenizer_dir):
    """A tiny llama Flamingo (cross-attention every 2 layers) with open gates; tests must not modify it."""
    model, processor, tok = build_tiny(tiny_tokenizer_dir, "llama")
    open_gates(model)
    return model, tok


REPO = Path(__file__).resolve().parents[2]
# the original, released: `make test` installs open-flamingo 2.0.1 there (--no-deps; its model code is main's)
ORIGINAL_PACKAGE = Path(os.environ.get("OF_ORIGINAL_PACKAGE", REPO / ".venv" / "original"))
# or main, from a bare git mirror of its repository (OF_ORIGINAL_MIRROR)
MIRROR = Path(os.environ.get("OF_ORIGINAL_MIRROR", "") or os.devnull)  # a bare git dir of its repository, if any


@pytest.fixture(scope="module")
def original_tree(tmp_path_factory) -> Path:
    """A folder holding the original's `open_flamingo/src` and `open_flamingo/train/train_utils.py`: copied from the
    installed release at ORIGINAL_PACKAGE, else read from main in the git mirror at MIRROR (nothing of it lives in
    this repo). Without either the test skips, or fails under CI, where `make test` installs the release."""
    dest = tmp_path_factory.mktemp("open_flamingo")
    wanted = ["open_flamingo/src", "open_flamingo/train/train_utils.py"]
    if (ORIGINAL_PACKAGE / "open_flamingo").is_dir():
        for part in wanted:
            src, out = ORIGINAL_PACKAGE / part, dest / part
            out.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copy)(src, out)
    elif MIRROR.is_dir():  # (os.devnull, the default, is not)
        archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "main", *wanted], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    else:
        why = f"the original OpenFlamingo code is neither installed at {ORIGINAL_PACKAGE} (`make test` installs it) nor mirrored at {MIRROR}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    return dest


@pytest.fixture(scope="module")
def original(original_tree):
    """The original's `Flamingo`, `FlamingoLMMixin` and `extend_instance`, imported from `original_tree`."""
    import einops

    # the original imports einops_exts.rearrange_many (a one-liner over einops) for its einsum attention
    shim = types.ModuleType("einops_exts")
    shim.rearrange_many = lambda ts, pattern, **kw: tuple(einops.rearrange(t, pattern, **kw) for t in ts)
    sys.modules.setdefault("einops_exts", shim)
    sys.path.insert(0, str(original_tree))
    try:
        from open_flamingo.src.flamingo import Flamingo
        from open_flamingo.src.flamingo_lm import FlamingoLMMixin
        from open_flamingo.src.utils import extend_instance
    finally:
        sys.path.remove(str(original_tree))
    return Flamingo, FlamingoLMMixin, extend_instance
