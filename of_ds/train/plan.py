"""`resolve_plan(spec, world_size) -> Plan`: everything a run decides before it builds anything, decided once.

The plan is frozen and holds the spec with the engine settings the DeepSpeed config fixed (one owner: the plan's
spec and its DeepSpeed JSON agree by construction), the final DeepSpeed JSON, the micro-batch, the step budget and
where the run starts from (`ResumePoint`). Resolving reads files (the DeepSpeed JSON, the shards' sizes.json, the
run dir's checkpoints and their spec.yaml) but writes nothing and prints nothing: its messages are in `notes`, which
`build_trainer` prints. A resume whose spec changes cannot take effect raises one SpecError here, before any model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from ..spec import RunSpec
from . import resume_policy
from .checkpoint import UNIVERSAL, find_checkpoint, latest_checkpoint, needs_universal
from .untrusted import check_checkpoint_dir

StartKind = Literal["fresh", "weights_only", "full", "universal"]


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts. `fresh`: step 0 from the spec's weights; `weights_only`: step 0 from a checkpoint's
    weights (an original OpenFlamingo `checkpoint.pt`, or `checkpoint.load_weights_only`), a fresh optimizer;
    `full`: weights, optimizer, schedule, step and loader positions, loaded as saved (the same world size, or an
    engine whose checkpoints reshape); `universal`: the same, through DeepSpeed's universal format (ZeRO partitions
    saved by another world size), converted once into `universal_dir`."""

    kind: StartKind = "fresh"
    path: Optional[Path] = None
    universal_dir: Optional[Path] = None
    saved_spec_json: Optional[str] = None  # the checkpoint's spec.yaml as JSON (a full or universal resume)

    @property
    def original(self) -> bool:
        """An original OpenFlamingo `checkpoint.pt` (a file, not a step folder)."""
        return self.path is not None and self.path.is_file()

    @property
    def saved_spec(self) -> Optional[dict]:
        return None if self.saved_spec_json is None else json.loads(self.saved_spec_json)

    def describe(self) -> str:
        if self.kind == "fresh":
            return "fresh (step 0)"
        if self.kind == "weights_only":
            return f"weights only from {self.path} (a fresh optimizer, step 0)"
        via = f" through its universal conversion {self.universal_dir}" if self.kind == "universal" else ""
        return f"resume {self.path}{via}"


@dataclass(frozen=True)
class Plan:
    """What `build_trainer` builds, resolved from a spec and a world size. `total_steps` and
    `micro_steps_per_epoch` are None only for a plan made without the data (`resolve_plan(..., data=False)`)."""

    spec: RunSpec
    world_size: int
    micro_batch: int  # samples per micro-step on one rank: one micro-batch of every dataset
    micro_steps_per_epoch: Optional[int]
    total_steps: Optional[int]  # optimizer steps of the whole run
    resume: ResumePoint
    deepspeed_json: Optional[str] = None  # the final DeepSpeed config (engine.kind=deepspeed)
    notes: tuple[str, ...] = ()

    @property
    def ds_config(self) -> Optional[dict[str, Any]]:
        """A fresh copy of the final DeepSpeed config (None for the torch engines)."""
        return None if self.deepspeed_json is None else json.loads(self.deepspeed_json)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage the engine runs: DeepSpeed's, 3 for FSDP, 0 for DDP."""
        e = self.spec.engine
        return e.zero_stage if e.kind == "deepspeed" else (3 if e.kind == "fsdp" else 0)

    def with_steps(self, total_steps: int) -> "Plan":
        """The same plan with another step budget (drivers and benchmarks that feed their own batches)."""
        return dataclasses.replace(self, total_steps=total_steps)

    def describe(self) -> str:
        """One line: engine, micro-batch, steps and start."""
        e = self.spec.engine
        engine = f"DeepSpeed ZeRO-{e.zero_stage}" if e.kind == "deepspeed" else e.kind.upper()
        steps = "unknown (no data)" if self.total_steps is None else f"{self.total_steps} ({self.micro_steps_per_epoch} micro-steps an epoch)"
        return (f"[of_ds] plan: {engine}, {self.world_size} rank(s), micro-batch {self.micro_batch} x "
                f"{self.spec.optim.grad_accum_steps} accumulation, optimizer steps {steps}; start: {self.resume.describe()}")


def resolve_plan(spec: RunSpec, world_size: int, *, data: bool = True, run_dir: bool = True) -> Plan:
    """Resolve `spec` for `world_size` ranks. `data=False`: no step budget (the shards need not exist);
    `run_dir=False`: a fresh start whatever the run dir holds (benchmarks, dry runs of a template)."""
    from ..engines.deepspeed_config import micro_batch_size, resolve_deepspeed_config

    ds_config = None
    if spec.engine.kind == "deepspeed":
        ds_config, spec = resolve_deepspeed_config(spec, world_size)
    per_epoch = micro_steps_per_epoch(spec, world_size) if data else None
    total = None if per_epoch is None else total_optimizer_steps(spec, per_epoch)
    plan = Plan(spec=spec, world_size=world_size, micro_batch=micro_batch_size(spec), micro_steps_per_epoch=per_epoch,
                total_steps=total, resume=ResumePoint(), deepspeed_json=None if ds_config is None else json.dumps(ds_config))
    return with_start(plan) if run_dir else plan


def with_start(plan: Plan) -> Plan:
    """`plan` (a fresh start's) starting where the run dir and `checkpoint.*` say; a resume's refused spec changes
    raise one SpecError, the accepted ones are notes."""
    spec, note = prefer_own_checkpoint(plan.spec)
    notes = [*plan.notes, *([note] if note else [])]
    resume = start_point(spec, plan.world_size, notes)
    ds_config = plan.ds_config
    if resume.kind == "universal":
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return dataclasses.replace(plan, spec=spec, resume=resume, notes=tuple(notes),
                               deepspeed_json=None if ds_config is None else json.dumps(ds_config))


def micro_steps_per_epoch(spec: RunSpec, world_size: int) -> int:
    """Micro-steps per epoch on every rank: the shortest dataset's (one micro-batch of every dataset per step)."""
    from ..data import epoch_steps

    return min(epoch_steps(spec, world_size).values())


def total_optimizer_steps(spec: RunSpec, micro_steps: int) -> int:
    """Optimizer steps of the run: epochs x steps per epoch, capped by run.max_steps."""
    from .loop import optimizer_steps_per_epoch

    steps = optimizer_steps_per_epoch(micro_steps, spec.optim.grad_accum_steps) * spec.run.epochs
    return min(steps, spec.run.max_steps) if spec.run.max_steps else steps


def prefer_own_checkpoint(spec: RunSpec) -> tuple[RunSpec, Optional[str]]:
    """With `resume: auto`, this run's own newest checkpoint wins over a `checkpoint.resume_from` outside the run
    dir (another run's step, an original `checkpoint.pt`, weights only or not): the same command started again (a
    scheduler's requeue after a preemption) continues the run instead of starting it over. A `resume_from` inside
    the run dir (going back to an earlier step) is read as given. -> the spec the run continues with, and a note."""
    src = spec.checkpoint.resume_from
    if not src or spec.checkpoint.resume != "auto":
        return spec, None
    run_dir, path = spec.run.run_dir.resolve(), Path(src).resolve()
    own = latest_checkpoint(spec.run.run_dir)
    if own is None or path == run_dir or run_dir in path.parents:
        return spec, None
    note = (f"[of_ds] checkpoint.resume_from={src} is not read: the run dir holds this run's own checkpoint {own.name}, "
            f"which continues it (checkpoint.resume=never with checkpoint.on_existing starts over)")
    return spec.updated({"checkpoint.resume_from": None, "checkpoint.load_weights_only": False}), note


def find_resume_point(spec: RunSpec) -> Optional[Path]:
    """An explicit `checkpoint.resume_from` (step folder, run dir), else the newest complete one in this run."""
    src = spec.checkpoint.resume_from
    if src:
        path = Path(src)
        if path.is_file():
            return path  # an original OpenFlamingo checkpoint.pt: loaded into the model before the engine wraps it
        try:
            step = find_checkpoint(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"checkpoint.resume_from: {e}") from None
        if not spec.checkpoint.load_weights_only:  # the engine will unpickle its files fully (a weights-only start checks its own reads)
            check_checkpoint_dir(step, allow_pickle=spec.checkpoint.allow_pickle)
        return step
    if spec.checkpoint.resume == "auto":
        return latest_checkpoint(spec.run.run_dir)
    return None


def start_point(spec: RunSpec, world_size: int, notes: list[str]) -> ResumePoint:
    """Where the run starts, and (a resume) the spec diff against the checkpoint's: refused changes raise one
    SpecError; the others go to `notes`."""
    path = find_resume_point(spec)
    if path is None:
        return ResumePoint()
    if path.is_file() or spec.checkpoint.load_weights_only:
        return ResumePoint("weights_only", path)
    saved = resume_policy.compare_with_checkpoint(spec, path, notes)
    saved_json = None if saved is None else json.dumps(saved, default=str)
    if spec.engine.kind == "deepspeed" and needs_universal(path, spec.engine.zero_stage, world_size):
        return ResumePoint("universal", path, spec.run.run_dir / UNIVERSAL / path.name, saved_json)
    return ResumePoint("full", path, None, saved_json)
