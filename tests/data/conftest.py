"""Fixtures for the data tests: the shared local tokenizer with the Flamingo tokens, real photos."""

import pytest

from .helpers import jpeg, photo_arrays


@pytest.fixture(scope="session")
def tokenizer(tiny_tokenizer_dir):
    from of_ds.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir, offline=True)


@pytest.fixture(scope="session")
def photos():
    """name -> JPEG bytes (all above the 10 KB floor)."""
    return {name: jpeg(arr) for name, arr in photo_arrays().items()}
