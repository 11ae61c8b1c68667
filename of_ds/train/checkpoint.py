"""Step checkpoints: `RUN_DIR/checkpoints/step-{N:08d}/`, COMPLETE written last, newest K kept, auto-resume.

A folder holds the engine's own files (DeepSpeed shards, or the torch engine's full state dicts), one
`rank_state/rank{R:05d}.pt` per rank (loader position, drop counts, RNG: DeepSpeed saves client_state from rank 0
only), `spec.yaml` (the resolved spec) and `meta.json` (step, world size, engine). `COMPLETE` is written by rank 0
after a barrier that every rank reaches only once its files are written, so a crash mid-save leaves a folder
without it, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..runtime import Runtime
from ..spec import RunSpec

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    """Where training stands, in optimizer steps."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    samples_seen: int = 0


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and is_complete(p))


def find_checkpoint(path: str | Path) -> Path:
    """A complete step folder, or the newest complete one under a run dir or its checkpoints dir."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{path}: no complete checkpoint (a step-*/ folder with COMPLETE) here or under checkpoints/")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, every_n_steps: int, runtime: Runtime):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last, self.every_n_steps, self.runtime = keep_last, every_n_steps, runtime
        self.last_saved: Optional[int] = None

    def should_save(self, step: int, total_steps: int) -> bool:
        return step != self.last_saved and (step % self.every_n_steps == 0 or step >= total_steps)

    def latest(self) -> Optional[Path]:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, engine, state: TrainState, spec: RunSpec, rank_state: dict) -> Path:
        """Collective: every rank calls it at the same step."""
        rt = self.runtime
        path = self.root / step_dir_name(state.step)
        if rt.is_main:
            if path.exists():  # a torn save of this step from a crashed run
                shutil.rmtree(path)
            path.mkdir(parents=True)
        rt.barrier()
        client_state = {"train_state": asdict(state), "world_size": rt.world_size, "spec": spec.to_dict()}
        engine.save(path, client_state)
        ranks = path / "rank_state"
        ranks.mkdir(exist_ok=True)
        torch.save({**rank_state, "rng": rng_state()}, ranks / f"rank{rt.rank:05d}.pt")
        if rt.is_main:
            (path / "spec.yaml").write_text(spec.to_yaml())
            meta = {"step": state.step, "world_size": rt.world_size, "engine": spec.engine.kind,
                    "zero_stage": spec.engine.zero_stage if spec.engine.kind == "deepspeed" else None,
                    "train_state": asdict(state)}
            (path / "meta.json").write_text(json.dumps(meta, indent=1))
        rt.barrier()  # every rank's files are on disk
        if rt.is_main:
            _write_atomic(path / COMPLETE, f"{state.step}\n")
            _write_atomic(self.root / "latest", path.name + "\n")
            self._prune()
        rt.barrier()
        self.last_saved = state.step
        return path

    def _prune(self) -> None:
        complete = complete_checkpoints(self.root)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for p in self.root.glob("step-*"):  # torn saves of a crashed run (no save is in flight here)
            if p.is_dir() and not is_complete(p):
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, path: Path, *, weights_only: bool = False) -> tuple[TrainState, Optional[dict]]:
        """Collective. -> (train state, this rank's rank_state or None when positions cannot carry over)."""
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
        meta = json.loads((path / "meta.json").read_text())
        saved_world, world = meta["world_size"], self.runtime.world_size
        if saved_world != world and not getattr(engine, "can_reshape", False):
            raise CheckpointError(
                f"{path} was written by {saved_world} ranks but this run has {world}; {meta['engine']} "
                f"(ZeRO stage {meta.get('zero_stage')}) partitions cannot be reshaped here. Resume with {saved_world} "
                f"ranks, or convert it with DeepSpeed's ds_to_universal.py and load it as a universal checkpoint."
            )
        client_state = engine.load(path, weights_only=weights_only)
        if weights_only:
            return TrainState(), None
        ts = client_state.get("train_state") if client_state else None
        state = TrainState(**(ts or meta["train_state"]))
        own = path / "rank_state" / f"rank{self.runtime.rank:05d}.pt"
        if saved_world != world or not own.is_file():
            return state, None
        rank_state = torch.load(own, map_location="cpu", weights_only=False)
        set_rng_state(rank_state["rng"])
        return state, rank_state
