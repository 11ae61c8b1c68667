"""Run launch/train.py under the deepspeed launcher / torchrun / python, in a directory holding the demo data."""

from __future__ import annotations

import functools
import importlib.util
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

# a short demo run: 4 steps of small batches, no loader workers, a line and a metrics row per step, no validation
# (the runs that test it set logging.eval_every_n_steps)
FAST = [
    "logging.eval_every_n_steps=0",
    "run.max_steps=4", "logging.every_n_steps=1", "checkpoint.every_n_steps=2", "checkpoint.keep_last=2",
    "data.datasets.laion.batch_size=4", "data.datasets.mmc4.batch_size=2",
    "data.datasets.laion.workers=0", "data.datasets.mmc4.workers=0",
]


@functools.lru_cache(maxsize=None)
def train_main():
    """launch/train.py's `main(argv)`, imported from its file, for in-process runs of the entry point."""
    loader = importlib.util.spec_from_file_location("of_ds_launch_train", TRAIN)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.main


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
    cmd = launch_command(how, name, sets, ds_config, nproc, extra)
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def launch_command(how: str, name: str, sets: list[str] = (), ds_config: str | None = None, nproc: int = 2,
                   extra: list[str] = ()) -> list[str]:
    """The command line `launch` runs: launch/train.py on the demo spec with FAST, the run's name and `sets`."""
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
    return cmd


def rows_of(cwd: Path, name: str) -> list[dict]:
    return [json.loads(l) for l in (cwd / "runs" / name / "metrics.jsonl").read_text().splitlines() if l.strip()]


def losses(cwd: Path, name: str) -> dict[int, dict]:
    """step -> the training row."""
    return {r["step"]: r for r in rows_of(cwd, name) if "loss" in r}


def val_losses(cwd: Path, name: str) -> dict[int, dict]:
    """step -> the validation row."""
    return {r["step"]: r for r in rows_of(cwd, name) if "val/loss" in r}


def job(name: str, sets: list[str] = (), ds_config: str | None = None, *, copy: tuple[Path, Path] | None = None,
        expect_error: bool = False) -> dict:
    """One run for `launch_runs`: the argv `launch` would give launch/train.py (demo spec, FAST, the run's name)."""
    argv = ["--spec", str(DEMO_SPEC)]
    if ds_config:
        argv += ["--deepspeed_config", str(REPO / "ds_configs" / ds_config)]
    for s in [*FAST, f"run.name={name}", "engine.heartbeat_timeout_s=0", *sets]:
        argv += ["--set", s]
    out = {"name": name, "argv": argv, "expect_error": expect_error}
    if copy:
        out["copy"] = [str(p) for p in copy]
    return out


def launch_runs(cwd: Path, jobs: list[dict], nproc: int = 2, timeout: int = 1800) -> dict[str, dict]:
    """Every job in one deepspeed launch of tests/engines/runs_driver.py (one process group, start-up paid once).
    -> name -> {"out": its printed output, "err": its error message or None}."""
    out_dir = cwd / f"runs_out_{free_port()}"
    out_dir.mkdir()
    (out_dir / "jobs.json").write_text(json.dumps(jobs))
    driver = REPO / "tests" / "engines" / "runs_driver.py"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), str(driver),
           str(out_dir / "jobs.json"), str(out_dir)]
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not (out_dir / "DONE").is_file():
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    results = {}
    for j in jobs:
        err = out_dir / f"{j['name']}.err"
        results[j["name"]] = {"out": (out_dir / f"{j['name']}.out").read_text(), "err": err.read_text() if err.is_file() else None}
        if j["expect_error"] and results[j["name"]]["err"] is None:
            raise AssertionError(f"{j['name']}: expected an error, the run succeeded")
    return results
