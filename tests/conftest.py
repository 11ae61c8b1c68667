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

import hashlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


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


# One process of the demo data's generation: what it returns tells whether its random states were left alone.
_GENERATE = """
import json, random, sys
sys.path.insert(0, {repo!r})
import numpy as np, torch
from of_ds.demo import ensure_demo_data
random.seed(1), np.random.seed(1), torch.manual_seed(1)
want = random.random(), np.random.rand(), torch.rand(1).item()
random.seed(1), np.random.seed(1), torch.manual_seed(1)
ensure_demo_data({target!r})
print(json.dumps({{"untouched": (random.random(), np.random.rand(), torch.rand(1).item()) == want}}))
"""


@dataclass(frozen=True)
class DemoGeneration:
    """How the session's demo dataset came to be: two processes at once over a killed run's half-written dir."""

    path: Path
    exit_codes: tuple[int, ...]
    stderr: str  # both processes', for a failure's message
    random_states_untouched: tuple[bool, ...]  # per process that exited 0
    stale_bytes: bytes  # what the killed run had left in laion/000000.tar


@pytest.fixture(scope="session")
def shared_demo_data(tmp_path_factory) -> DemoGeneration:
    """The demo dataset, generated once for the whole session (it pretrains two tiny models), the hard way: two
    processes call `ensure_demo_data` at once, as two ranks of a first run would, on a directory that a killed run
    left half-written (no DONE). The tests in tests/demo check what that did; tests that need the data in their own
    folder take `link_demo_data`."""
    target = tmp_path_factory.mktemp("shared_demo") / "demo_data"
    stale = b"half written"
    (target / "laion").mkdir(parents=True)
    (target / "laion" / "000000.tar").write_bytes(stale)
    code = _GENERATE.format(repo=str(REPO), target=str(target))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]  # pretraining two tiny models: minutes on a busy machine
    codes = tuple(p.returncode for p in procs)
    untouched = tuple(json.loads(out.strip().splitlines()[-1])["untouched"] for (out, _), rc in zip(outs, codes) if rc == 0)
    return DemoGeneration(target, codes, "\n".join(err[-3000:] for _, err in outs), untouched, stale)


@pytest.fixture(scope="session")
def demo_data_digest():
    """-> digest(root): sha256 of every file of a demo dataset but the converter's private state and its report's
    timings: equal digests, the same data byte for byte."""
    timing = ("seconds", "images_per_second", "shard_cpu_seconds")

    def digest(root: Path) -> dict[str, str]:
        out = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if not p.is_file() or rel.startswith(("mmc4/.convert/", "mmc4_val/.convert/")):
                continue
            data = p.read_bytes()
            if rel in ("mmc4/convert_report.json", "mmc4_val/convert_report.json"):
                data = json.dumps({k: v for k, v in json.loads(data).items() if k not in timing}).encode()
            out[rel] = hashlib.sha256(data).hexdigest()
        return out

    return digest


@pytest.fixture(scope="session")
def link_demo_data(shared_demo_data):
    """-> link(dest): a copy of the session's demo dataset at `dest` made of hard links (the runs only read it)."""
    import shutil

    def link(dest):
        generation = shared_demo_data
        assert generation.exit_codes == (0, 0), f"generating the demo data failed:\n{generation.stderr}"
        shutil.copytree(generation.path, dest, copy_function=os.link)
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
