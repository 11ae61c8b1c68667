"""Run launch/train.py under the deepspeed launcher / torchrun / python, in a directory holding the demo data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"
TRAIN = REPO / "launch" / "train.py"
DEMO_SPEC = REPO / "launch" / "specs" / "demo.yaml"

# a short demo run: 4 steps of small batches, no loader workers, a line and a metrics row per step
FAST = [
    "run.max_steps=4", "logging.every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
    "data.datasets.laion.batch_size=4", "data.datasets.mmc4.batch_size=2",
    "data.datasets.laion.workers=0", "data.datasets.mmc4.workers=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
             PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return e


def launch(cwd: Path, how: str, name: str, sets: list[str] = (), ds_config: str | None = None, nproc: int = 2,
           timeout: int = 600, check: bool = True, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """how: deepspeed | torchrun | python."""
    args = ["--spec", str(DEMO_SPEC)]
    if ds_config:
        args += ["--deepspeed_config", str(REPO / "ds_configs" / ds_config)]
    for s in [*FAST, f"run.name={name}", *sets]:
        args += ["--set", s]
    args += list(extra)
    if how == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(TRAIN), *args]
    elif how == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), str(TRAIN), *args]
    else:
        cmd = [sys.executable, str(TRAIN), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def losses(cwd: Path, name: str) -> dict[int, dict]:
    rows = [json.loads(l) for l in (cwd / "runs" / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r for r in rows}
