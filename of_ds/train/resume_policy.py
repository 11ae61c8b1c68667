"""What a run does with the run dir and the checkpoint it starts from, decided before the model is built.

- `prepare_run_dir`: a start at step 0 never writes into a run dir that holds another run (`checkpoint.on_existing`).
- `spec_changes` / `compare_with_checkpoint`: a resume diffs this run's resolved spec against the checkpoint's `spec.yaml`, field
  by field; every change is printed with what it does, and those that cannot take effect are one SpecError.
- `apply_schedule`: after the engine loaded the checkpoint, the lr schedule and the optimizer's hyperparameters are
  this spec's (a loaded optimizer and scheduler would otherwise keep the checkpoint's).

The policy per field is `POLICY` (first match wins); the README's resume section is its table.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Union

import torch
import yaml

from ..engines.optim import LrSchedule
from ..runtime import Runtime
from ..spec import RunSpec, SpecError
from .checkpoint import TrainState

EFFECT, REFUSED = "takes effect", "refused"

# -------------------------------------------------------------------------------------------------------- policy
SCHEDULE = "the lr schedule, continued or recomputed as optim.schedule_on_resume says"
STREAM = ("the next samples are prepared so; this epoch's stream goes on from the saved position in the new stream "
          "(a few samples may repeat or be missed until the epoch ends)")
EXECUTION = "how the step is computed, not what it computes"
POSITIONS = "the epoch length and the loader positions saved per rank and worker depend on it"
WEIGHTS_HINT = "start from its weights in a new run dir instead (checkpoint.resume_from=STEP_DIR checkpoint.load_weights_only=true)"

Verdict = Union[tuple[str, str], Callable[[Any, Any, dict], tuple[str, str]]]


def _file_names(v: Union[str, list, None]) -> Optional[list[str]]:
    """The last path components of a path or list of paths (a moved file keeps its name)."""
    if not v:
        return None
    return [PurePosixPath(str(p).rstrip("/")).name for p in ([v] if isinstance(v, str) else v)]


def _shards(old, new, _spec) -> tuple[str, str]:
    if _file_names(old) == _file_names(new):
        return EFFECT, "the same shard files read from their new place"
    return REFUSED, "other shards: the saved loader positions count samples of the old ones"


def _moved(old, new, _spec) -> tuple[str, str]:
    if _file_names(old) is not None and _file_names(old) == _file_names(new):
        return EFFECT, "the same name read from another place (a copy: of_ds does not compare the files)"
    return REFUSED, "other frozen weights or tokenizer: the checkpoint's trainable weights were trained with the old ones"


def _engine_kind(old, new, _spec) -> tuple[str, str]:
    if {old, new} <= {"ddp", "fsdp"}:
        return EFFECT, "DDP and FSDP checkpoints hold full state dicts that load into either"
    return REFUSED, "DeepSpeed and DDP/FSDP checkpoints have different formats"


def _zero_stage(old, new, spec) -> tuple[str, str]:
    if spec["engine"]["kind"] != "deepspeed":
        return EFFECT, "not used by this engine"
    if min(old, new) >= 1 and max(old, new) <= 2:
        return EFFECT, "ZeRO-1 and ZeRO-2 partitions have the same format"
    return REFUSED, (f"saved under ZeRO stage {old} and this run uses stage {new}: DeepSpeed loads ZeRO-3 checkpoints "
                     "only into ZeRO-3, ZeRO-1/2 ones only into ZeRO-1/2, ZeRO-0 ones only into ZeRO-0")


def _offload(what: str) -> Callable[[Any, Any, dict], tuple[str, str]]:
    pronoun = "them" if what == "parameters" else "it"

    def verdict(old, new, _spec) -> tuple[str, str]:
        if "nvme" in (old, new):
            where = {True: "on NVMe", False: "not on NVMe"}
            return REFUSED, (f"saved with the {what} {where[old == 'nvme']}, but this run keeps {pronoun} "
                             f"{where[new == 'nvme']}: NVMe state is saved and loaded only with NVMe offload")
        return EFFECT, f"where DeepSpeed keeps {pronoun}; the saved partitions are the same"

    return verdict


def _precision(old, new, spec) -> tuple[str, str]:
    if spec["engine"]["kind"] == "deepspeed":
        return REFUSED, "DeepSpeed's optimizer state differs per precision"
    return EFFECT, "the autocast dtype from the next step; the fp32 weights and Adam state carry over"


POLICY: list[tuple[str, Verdict]] = [
    # model: the checkpoint holds the trainable weights of this architecture; frozen weights come from their files
    ("model.offline", (EFFECT, "hub access only")),
    ("model.*.cache_dir", (EFFECT, "where hub downloads are cached")),
    ("model.lm.trust_remote_code", (EFFECT, "of_ds builds its model families natively")),
    ("model.lm.attention", (EFFECT, "the attention kernel; " + EXECUTION)),
    ("model.vision.pretrained", _moved),
    ("model.lm.name_or_path", _moved),
    ("model.tokenizer", _moved),
    ("model.*", (REFUSED, "the architecture, the frozen weights or the trainable set: the checkpoint's weights and optimizer state are of the old model")),
    # data, per dataset (datasets added or removed: see spec_changes)
    ("data.datasets.*.kind", (REFUSED, "the dataset's kind decides its samples and loss")),
    ("data.datasets.*.shards", _shards),
    ("data.datasets.*.batch_size", (REFUSED, POSITIONS)),
    ("data.datasets.*.samples_per_epoch", (REFUSED, POSITIONS)),
    ("data.datasets.*.workers", (REFUSED, POSITIONS)),
    ("data.datasets.*.resampled", (REFUSED, "the shard order the saved positions count in")),
    ("data.datasets.*.loss_weight", (EFFECT, "weights the dataset's loss from the next step")),
    ("data.datasets.*", (EFFECT, STREAM)),
    # optimizer
    ("optim.lr", (EFFECT, "the schedule's new peak from the next step: lr = new lr x the schedule's multiplier")),
    ("optim.schedule", (EFFECT, SCHEDULE)),
    ("optim.warmup_steps", (EFFECT, SCHEDULE)),
    ("optim.schedule_on_resume", (EFFECT, SCHEDULE)),
    ("optim.weight_decay", (EFFECT, "set in the optimizer from the next step; Adam's moments carry over")),
    ("optim.betas", (EFFECT, "set in the optimizer from the next step; Adam's moments carry over")),
    ("optim.eps", (EFFECT, "set in the optimizer from the next step; Adam's moments carry over")),
    ("optim.grad_clip", (EFFECT, "clips from the next step")),
    ("optim.fused", (EFFECT, "the AdamW kernel; " + EXECUTION)),
    ("optim.grad_accum_steps", (REFUSED, "the optimizer steps per epoch and the saved loader positions depend on it")),
    # engine
    ("engine.kind", _engine_kind),
    ("engine.zero_stage", _zero_stage),
    ("engine.offload_optimizer", _offload("optimizer state")),
    ("engine.offload_param", _offload("parameters")),
    ("engine.precision", _precision),
    ("engine.*", (EFFECT, EXECUTION)),
    # bookkeeping
    ("checkpoint.*", (EFFECT, "checkpointing from now on")),
    ("logging.*", (EFFECT, "logging from now on")),
    ("run.name", (EFFECT, "the run dir moved")),
    ("run.output_dir", (EFFECT, "the run dir moved")),
    ("run.demo_data", (EFFECT, "the demo data's place")),
    ("run.max_steps", (EFFECT, "where training stops; " + SCHEDULE)),
    ("run.epochs", (EFFECT, "where training stops; " + SCHEDULE)),
    ("run.seed", (REFUSED, "the data stream the saved loader positions count in is seeded by it")),
]
UNKNOWN = (REFUSED, "no resume policy covers this field")


def classify(field: str, old: Any, new: Any, spec: dict) -> tuple[str, str]:
    """(EFFECT or REFUSED, how) for dotted `field` changing from `old` to `new`; `spec` is the new resolved spec dict.
    Dataset fields are named data.datasets.<name>.<field>."""
    for pattern, verdict in POLICY:
        if fnmatchcase(field, pattern):
            return verdict(old, new, spec) if callable(verdict) else verdict
    return UNKNOWN


# ---------------------------------------------------------------------------------------------------------- diff
@dataclass
class Change:
    field: str
    old: Any
    new: Any
    verdict: str
    how: str

    def line(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)} ({self.verdict}: {self.how})"


def _show(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip() if isinstance(v, (dict, list)) else repr(v)


def _dataset_names(spec: dict) -> list:
    return [d.get("name") for d in spec.get("data", {}).get("datasets", [])]


def _diff(old: dict, new: dict, prefix: str = "") -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """(field, old, new) of every differing leaf, a section present on one side only counting as one leaf; and the
    fields only one side has. Datasets are matched by name (data.datasets.<name>.<field>)."""
    differ, unmatched = [], []
    for k in [*old, *(k for k in new if k not in old)]:
        key = f"{prefix}{k}"
        if k not in old or k not in new:
            unmatched.append(key)
        elif key == "data.datasets":
            before = {d.get("name"): d for d in old[k]}
            for d in new[k]:
                if d.get("name") in before:
                    sub_differ, sub_unmatched = _diff(before[d.get("name")], d, f"{key}.{d.get('name')}.")
                    differ += sub_differ
                    unmatched += sub_unmatched
        elif isinstance(old[k], dict) and isinstance(new[k], dict):
            sub_differ, sub_unmatched = _diff(old[k], new[k], key + ".")
            differ += sub_differ
            unmatched += sub_unmatched
        elif old[k] != new[k]:
            differ.append((key, old[k], new[k]))
    return differ, unmatched


def spec_changes(saved: dict, new: dict) -> tuple[list[Change], list[str]]:
    """Every field that differs between the checkpoint's spec dict and this run's, classified; and the fields only
    one of them has (a spec written by another version of of_ds), which are not compared."""
    changes: list[Change] = []
    old_names, new_names = _dataset_names(saved), _dataset_names(new)
    if sorted(old_names) != sorted(new_names):
        changes.append(Change("data.datasets", old_names, new_names, REFUSED,
                              "datasets added or removed: the loader positions and losses are per dataset"))
    differ, unmatched = _diff(saved, new)
    changes += [Change(field, old, value, *classify(field, old, value, new)) for field, old, value in differ]
    return changes, sorted(unmatched)


def saved_spec(path: Path) -> Optional[dict]:
    """The checkpoint's resolved spec as written (not validated: its paths may have moved), or None if it has none."""
    f = Path(path) / "spec.yaml"
    return yaml.safe_load(f.read_text()) if f.is_file() else None


def compare_with_checkpoint(spec: RunSpec, path: Path, notes: list[str]) -> Optional[dict]:
    """Before the model is built: every spec change against checkpoint `path` as a line in `notes`; one SpecError
    listing the refused ones. -> the checkpoint's spec dict (None: the checkpoint has no spec.yaml)."""
    saved = saved_spec(path)
    if saved is None:
        notes.append(f"[of_ds] {path} holds no spec.yaml: this run's spec is not compared with the checkpoint's")
        return None
    changes, unmatched = spec_changes(saved, spec.to_dict())
    refused = [c for c in changes if c.verdict == REFUSED]
    if refused:
        problems = [c.line() for c in refused]
        problems.append(f"resume with the checkpoint's values (its {path / 'spec.yaml'}), or {WEIGHTS_HINT.replace('STEP_DIR', str(path))}")
        raise SpecError(problems, f"(resuming {path})")
    if changes:
        notes.append(f"[of_ds] resuming {path} with {len(changes)} spec change(s) from its spec.yaml:")
        notes += [f"[of_ds]   {c.line()}" for c in changes]
    if unmatched:
        notes.append(f"[of_ds] fields in only one of this spec and {path}'s (another of_ds version), not compared: "
                     f"{', '.join(unmatched)}")
    return saved


# ------------------------------------------------------------------------------------------------------ run dir
def holds_run(run_dir: Path) -> list[str]:
    """What in `run_dir` belongs to a run: checkpoints (complete or torn) and a non-empty metrics.jsonl."""
    found = []
    ckpt = run_dir / "checkpoints"
    steps = sorted(p.name for p in ckpt.glob("step-*")) if ckpt.is_dir() else []
    if steps:
        found.append(f"checkpoints ({', '.join(steps)})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        rows = sum(1 for line in metrics.read_text().splitlines() if line.strip())
        found.append(f"metrics.jsonl ({rows} rows)")
    return found


def continues_run_dir(path: Optional[Path], spec: RunSpec) -> bool:
    """Whether starting from `path` continues this run dir's own history (its own checkpoint, optimizer and step)."""
    if path is None or path.is_file() or spec.checkpoint.load_weights_only:
        return False
    return spec.run.run_dir.resolve() in Path(path).resolve().parents


def prepare_run_dir(spec: RunSpec, resume_path: Optional[Path], runtime: Runtime) -> None:
    """Collective, before anything is written into the run dir. A start that does not continue this run dir's own
    history finds it free of another run, or moves/deletes that run as `checkpoint.on_existing` says (rank 0 does it;
    every rank decides alike and waits). A plain start (`resume: auto`) that finds no checkpoint but an earlier
    attempt's metrics moves them aside by itself: that attempt left nothing to resume."""
    run_dir = spec.run.run_dir
    if continues_run_dir(resume_path, spec):
        return
    found = holds_run(run_dir)
    action = spec.checkpoint.on_existing
    plain = spec.checkpoint.resume == "auto" and resume_path is None  # no complete checkpoint to continue
    if found and action == "refuse" and plain:
        action = "move_aside"
    if found and action == "refuse":
        start = "a start from step 0" if resume_path is None else f"a start from {resume_path} (checkpoint.resume_from)"
        raise SpecError([
            f"checkpoint.resume={spec.checkpoint.resume}: the run dir {run_dir} already holds a run "
            f"({'; '.join(found)}); {start} there would mix the two runs' metrics and checkpoints",
            "checkpoint.on_existing: set move_aside (rename it to RUN_DIR.old-<UTC time>) or delete, or give another "
            f"run.name; or continue that run: {'drop checkpoint.resume=never' if resume_path is None else 'drop checkpoint.resume_from'}",
        ])
    if found and resume_path is not None and run_dir.resolve() in Path(resume_path).resolve().parents:
        raise SpecError([f"checkpoint.resume_from: {resume_path} is inside the run dir {run_dir}, which "
                         f"checkpoint.on_existing={action} would {'delete' if action == 'delete' else 'move'}; copy it elsewhere first"])
    if not found:
        return
    runtime.barrier()  # every rank has looked before rank 0 moves anything
    failed = None
    if runtime.is_main:
        try:
            if action == "delete":
                shutil.rmtree(run_dir)
                print(f"[of_ds] deleted the earlier run in {run_dir} ({'; '.join(found)}; checkpoint.on_existing=delete)", flush=True)
            else:
                aside = _aside_name(run_dir)
                run_dir.rename(aside)
                why = "checkpoint.on_existing=move_aside" if spec.checkpoint.on_existing == "move_aside" else "no checkpoint to resume"
                print(f"[of_ds] moved the earlier run in {run_dir} ({'; '.join(found)}) aside to {aside} ({why})", flush=True)
        except OSError as e:  # the other ranks wait in the all-reduce below: tell them, then fail together
            failed = e
    if bool(runtime.any_rank(torch.tensor(failed is not None))):
        raise OSError(f"checkpoint.on_existing={action}: rank 0 could not {'delete' if action == 'delete' else 'move'} "
                      f"{run_dir}{f': {failed}' if failed else ''}")


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside, n = run_dir.with_name(f"{run_dir.name}.old-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    return aside


# ----------------------------------------------------------------------------------------------- lr schedule
def saved_total_steps(saved: dict, micro_steps_per_epoch: int) -> int:
    """The optimizer steps the checkpoint's spec trained to (its data and accumulation are this run's: a change of
    them is refused)."""
    from .loop import optimizer_steps_per_epoch

    run = saved["run"]
    steps = optimizer_steps_per_epoch(micro_steps_per_epoch, saved["optim"]["grad_accum_steps"]) * run["epochs"]
    return min(steps, run["max_steps"]) if run.get("max_steps") else steps


def resumed_schedule(old: LrSchedule, new: LrSchedule, step: int, how: str) -> tuple[LrSchedule, str]:
    """The schedule from `step` on: the checkpoint's `old` where the spec did not change its shape (and, with `how`=
    recompute, `old` is not a continued one), else `new` (recompute) or `new`'s shape continued from the multiplier
    of the last step taken (continue). -> it and a sentence for the log."""
    if old.same_shape(new) and (old.anchor is None or how == "continue"):
        return old, f"unchanged ({old.describe()})"
    if how == "recompute" or step == 0:
        return new, (f"the spec's schedule anew ({new.describe()}; optim.schedule_on_resume=recompute): the next "
                     f"step's multiplier {old(step):.4g} -> {new(step):.4g}")
    a = step - 1
    out = LrSchedule(new.schedule, new.warmup_steps, new.total_steps, anchor=[a, old(a)])
    return out, (f"continues from the last step's multiplier {old(a):.4g} (step {step}) to {new.total_steps} steps "
                 f"({new.schedule}, warmup {new.warmup_steps}; optim.schedule_on_resume=recompute would give the "
                 f"next step {new(step):.4g})")


def apply_schedule(engine, spec: RunSpec, saved: Optional[dict], state: TrainState, total_steps: int,
                   micro_steps_per_epoch: int, runtime: Runtime) -> None:
    """run()'s one call after the engine loaded the checkpoint (every run; every rank): the schedule as
    `resumed_schedule` decides, the peak lr, weight decay, betas and eps of this spec in the optimizer's parameter
    groups (a loaded optimizer and scheduler carry the checkpoint's), and the lr of the next step set from them."""
    scheduler = engine.scheduler
    fns = scheduler.lr_lambdas
    if saved is not None:
        o = saved["optim"]
        old = fns[0] if fns[0].checkpointed else LrSchedule(o["schedule"], o["warmup_steps"], saved_total_steps(saved, micro_steps_per_epoch))
        new = LrSchedule(spec.optim.schedule, spec.optim.warmup_steps, total_steps)
        chosen, said = resumed_schedule(old, new, state.step, spec.optim.schedule_on_resume)
        for fn in fns:
            fn.__dict__.update(vars(chosen), anchor=None if chosen.anchor is None else list(chosen.anchor))
    for fn in fns:
        fn.checkpointed = True
    peak, o = spec.optim.lr, spec.optim
    old_peak = scheduler.base_lrs[0]
    for group, fn in zip(scheduler.optimizer.param_groups, fns):
        group.update(initial_lr=peak, lr=peak * fn(state.step), betas=tuple(o.betas), eps=o.eps)
        if group.get("name") in ("decay", "no_decay"):
            group["weight_decay"] = o.weight_decay if group["name"] == "decay" else 0.0
    scheduler.base_lrs = [peak] * len(fns)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]  # what get_last_lr() reports
    if saved is not None and runtime.is_main:
        peak_said = f"peak {old_peak:.4g} -> {peak:.4g}" if old_peak != peak else f"peak {peak:.4g}"
        print(f"[of_ds] lr schedule at step {state.step}: {said}; {peak_said}; the next step's lr "
              f"{scheduler._last_lr[0]:.4g}", flush=True)
