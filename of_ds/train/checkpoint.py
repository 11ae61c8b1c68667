"""Step checkpoints: `RUN_DIR/checkpoints/step-{N:08d}/`, COMPLETE written last, newest K kept, auto-resume.

A folder holds the engine's own files (DeepSpeed shards, or the torch engine's full state dicts), one
`rank_state/rank{R:05d}.pt` per rank (loader position, drop counts, RNG: DeepSpeed saves client_state from rank 0
only), `spec.yaml` (the resolved spec) and `meta.json` (step, world size, engine; under DeepSpeed also the patches
of_ds applied to it; the validation loss where the step was evaluated). `COMPLETE` is written by rank 0 after a barrier that every rank reaches only once its files
are written, so a crash mid-save leaves a folder without it, which resume ignores and the next save removes.
With `checkpoint.keep_best` the folder with the lowest validation loss is kept besides the newest K, and
`checkpoints/best` names it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..engines.deepspeed_patches import NVME_STATE
from ..runtime import Runtime
from ..spec import RunSpec

COMPLETE = "COMPLETE"
BEST = "best"  # checkpoints/best: the name of the kept folder with the lowest validation loss (checkpoint.keep_best)
UNIVERSAL = "universal"  # RUN_DIR/universal/step-N: a ZeRO checkpoint converted to DeepSpeed's universal format


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
    samples_seen_by_dataset: dict[str, int] = field(default_factory=dict)  # every rank's, since step 0
    tokens_seen_by_dataset: dict[str, int] = field(default_factory=dict)  # real (attention-mask) tokens, every rank's


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


def require_complete(path: Path) -> None:
    """Raises CheckpointError unless `path` holds a complete checkpoint."""
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and is_complete(p))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete step folder of a run dir, or None."""
    found = complete_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


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


def needs_universal(path: Path, zero_stage: int, world_size: int) -> bool:
    """Whether resuming DeepSpeed checkpoint `path` under ZeRO stage `zero_stage` with `world_size` ranks needs
    DeepSpeed's universal format: its ZeRO partitions (stage >= 1) were saved by another world size. Raises
    CheckpointError for a change between ZeRO-3, ZeRO-1/2 and ZeRO-0, which DeepSpeed loads in no format."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    saved_stage = meta.get("zero_stage") or 0
    if meta.get("engine") != "deepspeed":
        return False
    if (saved_stage >= 1) != (zero_stage >= 1) or (saved_stage == 3) != (zero_stage == 3):
        raise CheckpointError(
            f"{path} was saved under ZeRO stage {saved_stage} and this run uses stage {zero_stage}: DeepSpeed loads "
            f"ZeRO-3 checkpoints only into ZeRO-3, ZeRO-1/2 ones only into ZeRO-1/2, ZeRO-0 ones only into ZeRO-0. Resume with "
            f"engine.zero_stage={saved_stage} (and its ds_configs file), or start from its weights with "
            f"checkpoint.resume_from={path} and checkpoint.load_weights_only=true."
        )
    if saved_stage >= 1 and meta["world_size"] != world_size and (Path(path) / NVME_STATE).is_dir():
        raise CheckpointError(
            f"{path} was saved by {meta['world_size']} ranks with the optimizer state on NVMe ({NVME_STATE}), "
            f"which DeepSpeed's universal format cannot carry to {world_size} ranks. Resume with {meta['world_size']} "
            f"ranks, or start from its weights with checkpoint.resume_from={path} and checkpoint.load_weights_only=true."
        )
    return saved_stage >= 1 and meta["world_size"] != world_size


def convert_to_universal(path: Path, out: Path, runtime: Runtime) -> Path:
    """Collective: rank 0 converts ZeRO checkpoint `path` to DeepSpeed's universal format at `out` with DeepSpeed's
    `ds_to_universal` (once: `out/COMPLETE` marks a finished conversion; its output goes to `out.log`). Raises
    CheckpointError on every rank when it fails."""
    path, out = Path(path).resolve(), Path(out)
    log = out.with_name(out.name + ".log")
    failed = False
    if runtime.is_main and not (is_complete(out) and (out / COMPLETE).read_text().strip() == str(path)):
        try:
            shutil.rmtree(out, ignore_errors=True)  # a conversion a crash interrupted, or one of another folder
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"[of_ds] {path}: saved by another number of ranks; converting it to DeepSpeed's universal format "
                  f"in {out}", flush=True)
            # --inject_missing_state: only Megatron-style trainers record the universal_checkpoint_info it asserts on
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                   "--output_folder", str(out), "--inject_missing_state"]
            with open(log, "w") as sink:
                failed = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT).returncode != 0
            if not failed:
                _write_atomic(out / COMPLETE, f"{path}\n")  # which folder it converts: another one is converted anew
        except OSError as e:  # the other ranks wait in the all-reduce below: tell them, then fail together
            failed = True
            print(f"[of_ds] {path}: converting to {out} failed: {e}", flush=True)
    if bool(runtime.any_rank(torch.tensor(failed))):
        raise CheckpointError(f"{path}: DeepSpeed's ds_to_universal could not convert it (its output: {log})")
    return out


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, every_n_steps: int, runtime: Runtime, keep_best: bool = False):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last, self.every_n_steps, self.runtime, self.keep_best = keep_last, every_n_steps, runtime, keep_best
        self.last_saved: Optional[int] = None

    def should_save(self, step: int, total_steps: int) -> bool:
        return step != self.last_saved and (step % self.every_n_steps == 0 or step >= total_steps)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.run_dir)

    def save(self, engine, state: TrainState, spec: RunSpec, rank_state: dict, val_loss: Optional[float] = None) -> Path:
        """Collective: every rank calls it at the same step. `val_loss`: this step's validation loss, if evaluated."""
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
                    "train_state": asdict(state), "val_loss": val_loss}
            if spec.engine.kind == "deepspeed":  # what of_ds changed inside DeepSpeed (engines/deepspeed_patches.py)
                meta["deepspeed_patches"] = list(getattr(engine, "applied_patches", []))
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
        # a universal conversion served one resume at a new world size; this run now has its own checkpoint
        shutil.rmtree(self.run_dir / UNIVERSAL, ignore_errors=True)
        complete = complete_checkpoints(self.root)
        best = self.best(complete) if self.keep_best else None
        if best is not None:
            _write_atomic(self.root / BEST, best.name + "\n")
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != best:
                shutil.rmtree(old, ignore_errors=True)
        for p in self.root.glob("step-*"):  # torn saves of a crashed run (no save is in flight here)
            if p.is_dir() and not is_complete(p):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def best(complete: list[Path]) -> Optional[Path]:
        """The folder with the lowest finite validation loss in its meta.json (the oldest of equals), or None."""
        scored = []
        for p in complete:
            loss = json.loads((p / "meta.json").read_text()).get("val_loss")
            if isinstance(loss, (int, float)) and loss == loss and loss != float("inf"):
                scored.append((loss, p))
        return min(scored, key=lambda x: x[0])[1] if scored else None

    def load(self, engine, path: Path, *, universal: Optional[Path] = None) -> tuple[TrainState, Optional[dict]]:
        """Collective. -> (train state, this rank's rank_state or None when positions cannot carry over). With
        `universal` (`convert_to_universal` of `path`; the engine built to load it) the engine state comes from there."""
        path = Path(path)
        require_complete(path)
        meta = json.loads((path / "meta.json").read_text())
        saved_world, world = meta["world_size"], self.runtime.world_size
        if saved_world != world and universal is None and not getattr(engine, "can_reshape", False):
            raise CheckpointError(
                f"{path} was written by {saved_world} ranks but this run has {world}; {meta['engine']} "
                f"(ZeRO stage {meta.get('zero_stage')}) partitions cannot be reshaped by this engine. Resume with "
                f"{saved_world} ranks, or under DeepSpeed ZeRO 1-3, which converts it to DeepSpeed's universal format."
            )
        client_state = engine.load(universal or path)
        ts = client_state.get("train_state") if client_state else None
        state = TrainState(**(ts or meta["train_state"]))
        own = path / "rank_state" / f"rank{self.runtime.rank:05d}.pt"
        if saved_world != world or not own.is_file():
            return state, None
        rank_state = torch.load(own, map_location="cpu", weights_only=False)
        set_rng_state(rank_state["rng"])
        return state, rank_state
