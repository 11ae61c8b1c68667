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


def pytest_collection_modifyitems(items):
    """Tests marked `async_io` (NVMe offload, through DeepSpeed's async_io op) run last: in a fresh venv DeepSpeed
    builds that op on first use, and .ci/run starts the build beside the suite at the lowest priority, where it
    takes the cycles the other tests leave idle instead of holding one of them up."""
    items.sort(key=lambda item: item.get_closest_marker("async_io") is not None)  # stable: the order otherwise kept


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


@pytest.fixture(scope="session")
def shared_demo_data(tmp_path_factory):
    """The demo dataset, generated once for the whole session (it pretrains two tiny models: minutes), with the
    generation's one promise about randomness recorded: -> (path, whether the caller's random states were left
    alone). Tests that need it in their own folder take `link_demo_data`."""
    import random

    import numpy as np
    import torch

    from of_ds.demo import ensure_demo_data

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    want = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = ensure_demo_data(tmp_path_factory.mktemp("shared_demo") / "demo_data")
    untouched = (random.random(), np.random.rand(), torch.rand(1).item()) == want
    return path, untouched


@pytest.fixture(scope="session")
def link_demo_data(shared_demo_data):
    """-> link(dest): a copy of the session's demo dataset at `dest` made of hard links (the runs only read it)."""
    import shutil

    def link(dest):
        shutil.copytree(shared_demo_data[0], dest, copy_function=os.link)
        return dest

    return link


SHM = "/dev/shm"
DS_SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _ds_shm_buffers() -> set:
    try:
        return {n for n in os.listdir(SHM) if n.startswith(DS_SHM_PREFIX)}
    except OSError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def _session_shm_baseline():
    return _ds_shm_buffers()


def _mapped_shm_files() -> set:
    """Names of /dev/shm files that some live process has mapped (from /proc/*/maps)."""
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                names.update(line.rsplit("/", 1)[-1].strip() for line in f if f"{SHM}/{DS_SHM_PREFIX}" in line)
        except OSError:
            continue
    return names


@pytest.fixture(autouse=True)
def _remove_deepspeed_shm_buffers(_session_shm_baseline):
    """DeepSpeed's CPU shm all-reduce leaves two ~66 MB /dev/shm files per multi-rank launch and never removes
    them; /dev/shm is RAM. After each test, remove those made since this session began that no live process maps
    (so not a concurrent session's, whose ranks map theirs while they run)."""
    yield
    leftovers = _ds_shm_buffers() - _session_shm_baseline
    if not leftovers:
        return
    for name in leftovers - _mapped_shm_files():
        try:
            os.remove(os.path.join(SHM, name))
        except OSError:
            pass
