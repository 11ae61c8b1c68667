"""Shared test setup: everything offline, DeepSpeed on the CPU, small thread counts for a 2-core machine."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The venv's bin first, as `make test` does: DeepSpeed JIT-builds its CPU shm op with whichever `ninja` is on PATH,
# and the venv's ninja (1.13) and Debian's (1.11) hash .ninja_log differently, so mixing them rebuilds it every time.
_venv_bin = os.path.dirname(os.path.abspath(__import__("sys").executable))
if not os.environ.get("PATH", "").startswith(_venv_bin + os.pathsep):
    os.environ["PATH"] = _venv_bin + os.pathsep + os.environ.get("PATH", "")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (no hub), saved as an HF tokenizer dir."""
    from of_ds.model.tokenizer import train_bpe_tokenizer

    texts = [
        "a photo of a cat sitting on a red sofa",
        "an astronaut in a white suit stands next to a flag",
        "a cup of coffee on a wooden table",
        "a rocket launches into the blue sky",
        "the dog runs across the green park",
        "a motorcycle parked by the street",
    ] * 20
    return str(train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400))
