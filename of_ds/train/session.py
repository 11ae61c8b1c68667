"""What launch/train.py strings together: argument parsing, step budget, resume, dry-run report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from ..runtime import Runtime, seed_everything  # noqa: F401  (seed_everything: run.py and drivers call it here)
from ..spec import RunSpec
from .checkpoint import (
    UNIVERSAL,
    CheckpointManager,
    TrainState,
    convert_to_universal,
    find_checkpoint,
    needs_universal,
    require_complete,
)
from .untrusted import check_checkpoint_dir, load_untrusted


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train an OpenFlamingo-style model from a run spec.")
    p.add_argument("--spec", required=True, help="a launch/specs/*.yaml run spec")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a spec field (repeatable)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", help="ds_configs/*.json; sets engine.kind=deepspeed")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print the resolved spec, configs, parameter counts, memory plan; exit")
    p.add_argument("--gpu-memory", "--gpu_memory", default=None, help="per-GPU memory for the dry-run recommendation (e.g. 24GiB)")
    p.add_argument("--world-size", "--world_size", type=int, default=None, metavar="N",
                   help="dry run: plan for N GPUs in all (default: WORLD_SIZE from the environment, else 1)")
    p.add_argument("--nodes", type=int, default=1, metavar="M", help="dry run: the N GPUs are on M nodes (for the printed command)")
    p.add_argument("--no-preflight", "--no_preflight", dest="preflight", action="store_false",
                   help="dry run only: plan without checking the spec's paths (a template whose data is not there yet)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args, unknown = p.parse_known_args(argv)
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.dry_run and (args.world_size is not None or args.nodes != 1 or not args.preflight):
        p.error("--world-size, --nodes and --no-preflight are for --dry-run (a launched run takes its ranks from the launcher)")
    if args.world_size is not None and args.world_size < 1:
        p.error("--world-size: must be at least 1")
    if args.nodes < 1:
        p.error("--nodes: must be at least 1")
    return args


def world_size_of(args: argparse.Namespace) -> int:
    """Ranks to plan and resolve for: --world-size (dry run), else the launcher's WORLD_SIZE, else 1."""
    import os

    return args.world_size if getattr(args, "world_size", None) else int(os.environ.get("WORLD_SIZE", "1"))


def load_spec(args: argparse.Namespace) -> RunSpec:
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides += ["engine.kind=deepspeed", f"engine.deepspeed_config={args.deepspeed_config}"]
    return RunSpec.from_yaml(args.spec, overrides)


def maybe_make_demo_data(spec: RunSpec) -> None:
    if spec.run.demo_data:
        from ..demo import ensure_demo_data

        ensure_demo_data(spec.run.demo_data)


def total_optimizer_steps(spec: RunSpec, micro_steps_per_epoch: int) -> int:
    from .loop import optimizer_steps_per_epoch

    steps = optimizer_steps_per_epoch(micro_steps_per_epoch, spec.optim.grad_accum_steps) * spec.run.epochs
    return min(steps, spec.run.max_steps) if spec.run.max_steps else steps


def step_flops(spec: RunSpec) -> Optional[float]:
    """FLOPs of one micro-step on one rank, counted on a meta copy of the model; None if counting fails."""
    try:
        from ..model import build_flamingo
        from ..model.flops import batch_shapes, count_step_flops

        from ..model.vision import tower_image_size

        meta, _, _ = build_flamingo(spec.model, meta=True)
        return float(count_step_flops(meta, batch_shapes(spec, tower_image_size(meta))))
    except Exception as e:  # noqa: BLE001 - the estimate is optional; say why it is missing
        print(f"[of_ds] FLOP count unavailable ({type(e).__name__}: {e}); MFU will not be logged", flush=True)
        return None


def prefer_own_checkpoint(spec: RunSpec, checkpoints: CheckpointManager) -> RunSpec:
    """With `resume: auto`, this run's own newest checkpoint wins over a `checkpoint.resume_from` outside the run
    dir (another run's step, an original `checkpoint.pt`, weights only or not): the same command started again (a
    scheduler's requeue after a preemption) continues the run instead of starting it over. A `resume_from` inside
    the run dir (going back to an earlier step) is read as given. -> the spec the run continues with."""
    src = spec.checkpoint.resume_from
    if not src or spec.checkpoint.resume != "auto":
        return spec
    run_dir, path = spec.run.run_dir.resolve(), Path(src).resolve()
    own = checkpoints.latest()
    if own is None or path == run_dir or run_dir in path.parents:
        return spec
    if checkpoints.runtime.is_main:
        print(f"[of_ds] checkpoint.resume_from={src} is not read: the run dir holds this run's own checkpoint {own.name}, "
              f"which continues it (checkpoint.resume=never with checkpoint.on_existing starts over)", flush=True)
    update = {"resume_from": None, "load_weights_only": False}
    return spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update=update)})


def find_resume_point(spec: RunSpec, checkpoints: CheckpointManager) -> Optional[Path]:
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
        return checkpoints.latest()
    return None


def load_original_checkpoint(model, path: Path, allow_pickle: bool = False) -> None:
    """Continue from an original OpenFlamingo `checkpoint.pt` (weights only; a fresh optimizer and step 0)."""
    from ..model.checkpoint_keys import load_openflamingo_state_dict

    load_openflamingo_state_dict(model, load_untrusted(path, allow_pickle=allow_pickle), strict=True)


def _set_zero3_moment(param, value: torch.Tensor, key: str) -> None:
    """This rank's slice of a ZeRO-3 parameter's Adam moment. DeepSpeed's `safe_set_full_optimizer_state` cuts a
    rank's slice from the unpadded tensor, which fails where a rank holds only padding (a 1-element gate on 2 ranks)."""
    z3 = param._z3_optimizer
    part, _ = z3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    per_rank = param.ds_tensor.ds_numel
    rank = z3._get_param_partition_rank(param)
    padded = torch.nn.functional.pad(value.flatten(), (0, max(0, per_rank * (rank + 1) - value.numel())))
    part.data.copy_(padded[rank * per_rank: rank * per_rank + part.numel()])


# DeepSpeed internals the carry writes the moments through, per ZeRO optimizer class (DeepSpeed 0.19)
_CARRY_NEEDS = {
    "DeepSpeedZeroOptimizer": ("optimizer", "_lazy_init_hp_params_optimizer_state", "_hp_optimizer_states_linked"),
    "DeepSpeedZeroOptimizer_Stage3": ("optimizer", "fp32_partitioned_groups_flat", "_get_fp32_opt_state_partition",
                                      "_get_param_partition_rank"),
}


def _require_zero_internals(zero, path: Path) -> None:
    """Refuse, naming them, when this DeepSpeed's ZeRO optimizer lacks what the carry relies on."""
    import deepspeed

    kind = type(zero).__name__
    missing = [a for a in _CARRY_NEEDS.get(kind, ("optimizer",)) if not hasattr(zero, a)]
    if missing:
        raise RuntimeError(
            f"checkpoint.original_optimizer: carry ({path}) relies on {', '.join(missing)} of DeepSpeed's {kind}, which "
            f"DeepSpeed {deepspeed.__version__} lacks; use original_optimizer: fresh, or DeepSpeed 0.19.x"
        )


def carry_original_optimizer(engine, path: Path, spec: RunSpec) -> int:
    """`checkpoint.original_optimizer: carry`: the original checkpoint's Adam moments and step counts into the
    engine's optimizer, before its first step (every rank; ZeRO partitions take their own part). -> parameters set."""
    from ..model.checkpoint_keys import original_optimizer_state

    state = original_optimizer_state(engine.module, load_untrusted(path, allow_pickle=spec.checkpoint.allow_pickle))
    params = dict(engine.module.named_parameters())
    if spec.engine.kind == "deepspeed":
        from deepspeed.utils import safe_set_full_optimizer_state

        steps = {float(m["step"]) for m in state.values()}
        if len(steps) != 1:
            raise ValueError(f"{path}: the original's parameters have different step counts {sorted(steps)}; "
                             "DeepSpeed keeps one per parameter group")
        zero = engine.optimizer
        _require_zero_internals(zero, path)
        # the torch AdamW over DeepSpeed's fp32 partitions (ZeRO-3: one per sub-group) has no state before its
        # first step: create it, zero, for the moments to be written into
        partitions = getattr(zero, "fp32_partitioned_groups_flat", None) or [p for g in zero.optimizer.param_groups for p in g["params"]]
        for p in partitions:
            adam = zero.optimizer.state[p]
            adam.setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device))
            for key in ("exp_avg", "exp_avg_sq"):
                adam.setdefault(key, torch.zeros_like(p))
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link the moments at their first step
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        for name, moments in state.items():
            p = params[name]
            for key in ("exp_avg", "exp_avg_sq"):
                value = moments[key].to(engine.device)
                if hasattr(p, "ds_id"):
                    _set_zero3_moment(p, value, key)
                else:
                    safe_set_full_optimizer_state(p, value, key)
        (step,) = steps
        for adam_state in zero.optimizer.state.values():
            if "step" in adam_state:
                old = adam_state["step"]
                adam_state["step"] = torch.full_like(old, step) if torch.is_tensor(old) else step
        return len(state)
    if spec.engine.kind != "ddp":
        raise ValueError(f"checkpoint.original_optimizer: carry is supported under deepspeed and ddp, not {spec.engine.kind}")
    for name, moments in state.items():
        p = params[name]
        engine.optimizer.state[p] = {"step": moments["step"].to(p.device), **{k: moments[k].to(p) for k in ("exp_avg", "exp_avg_sq")}}
    from ..engines.optim import reapply_fused

    reapply_fused(engine.optimizer, [g.get("fused") for g in engine.optimizer.param_groups])
    return len(state)


def load_start_weights(model, path: Optional[Path], spec: RunSpec) -> None:
    """Before the engine wraps the model, where the run starts from weights only (a fresh optimizer and step 0): an
    original OpenFlamingo `checkpoint.pt`, or with `checkpoint.load_weights_only` a checkpoint of any engine, ZeRO
    stage or number of ranks (consolidated like tools/export_checkpoint does)."""
    from .export import load_weights_into

    if path is None:
        return
    if path.is_file():
        load_original_checkpoint(model, path, spec.checkpoint.allow_pickle)
    elif spec.checkpoint.load_weights_only:
        require_complete(path)
        load_weights_into(model, path, spec.checkpoint.allow_pickle)


def universal_resume(path: Optional[Path], spec: RunSpec, ds_config: Optional[dict], runtime: Runtime) -> Optional[Path]:
    """Before the engine is built: a DeepSpeed ZeRO checkpoint saved by another number of ranks is converted (once) to
    DeepSpeed's universal format under RUN_DIR/universal/, and `ds_config` set to load that. Returns the converted
    folder, or None when `path` resumes as it is."""
    if path is None or path.is_file() or ds_config is None or spec.checkpoint.load_weights_only:
        return None  # weights only: consolidated from any number of ranks without a conversion
    if not needs_universal(path, spec.engine.zero_stage, runtime.world_size):
        return None
    out = convert_to_universal(path, spec.run.run_dir / UNIVERSAL / path.name, runtime)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return out


def resume(engine, data, checkpoints: CheckpointManager, path: Optional[Path], spec: RunSpec, runtime: Runtime,
           universal: Optional[Path] = None) -> TrainState:
    if path is None:
        return TrainState()
    if path.is_file() and spec.checkpoint.original_optimizer == "carry":
        n = carry_original_optimizer(engine, path, spec)
        if runtime.is_main:
            print(f"[of_ds] started from {path}: its weights and the Adam state of {n} parameters (step 0)", flush=True)
        return TrainState()
    if path.is_file() or spec.checkpoint.load_weights_only:  # the weights are in (load_start_weights)
        if runtime.is_main:
            print(f"[of_ds] started from the weights of {path} (a fresh optimizer, step 0)", flush=True)
        return TrainState()
    state, rank_state = checkpoints.load(engine, path, universal=universal)
    if rank_state is not None:
        data.set_epoch(state.epoch)
        data.load_state_dict(rank_state["data"])
    elif runtime.is_main:
        print(f"[of_ds] {path}: no loader positions for this world size; the data restarts epoch {state.epoch}", flush=True)
    if runtime.is_main:
        via = f" (through its universal conversion {universal})" if universal is not None else ""
        print(f"[of_ds] resumed from {path} at step {state.step} (epoch {state.epoch}){via}", flush=True)
    return state


def dry_run_report(spec: RunSpec, ds_config: Optional[dict], world_size: int, gpu_memory: Optional[str],
                   args: Optional[argparse.Namespace] = None, explicit: frozenset = frozenset()) -> str:
    """Resolved spec and DeepSpeed config, parameter counts, memory plan and recommendation (meta model: no weights).
    With `args` (the command line) the recommendation is printed as a command to run; `explicit`: the engine fields
    the spec or --set gave (before the DeepSpeed config was resolved)."""
    from ..perf.memory import estimate, format_table, model_dims, parse_size, recommend
    from ..model import build_flamingo

    model, _, _ = build_flamingo(spec.model, meta=True)
    dims = model_dims(model, spec)
    e = spec.engine
    stage = e.zero_stage if e.kind == "deepspeed" else (3 if e.kind == "fsdp" else 0)
    chosen = estimate(dims, spec, world_size, stage, e.offload_optimizer, e.offload_param)
    lines = ["# resolved spec", spec.to_yaml().rstrip()]
    if ds_config is not None:
        lines += ["# resolved DeepSpeed config", json.dumps(ds_config, indent=1)]
    lines += [
        f"# parameters: total {dims.total_params:,}, trainable {dims.trainable_params:,} ({100 * dims.trainable_params / dims.total_params:.1f}%), frozen {dims.total_params - dims.trainable_params:,}",
        f"# memory per GPU, {world_size} rank(s), precision {e.precision} (estimate)",
        format_table([chosen]),
    ]
    if gpu_memory:
        rec = recommend(dims, spec, world_size, parse_size(gpu_memory))
        lines += [f"# all plans, {world_size} rank(s)", format_table(rec.considered), "# " + rec.describe()]
        if world_size == 1:
            lines.append("# (one rank: ZeRO has nothing to shard across, so the stages differ only by their communication "
                         "buckets; --world-size N plans for N GPUs)")
        if rec.fits is not None and args is not None:
            lines.append("# run: " + recommended_command(rec.fits, args, spec, explicit, world_size))
    return "\n".join(lines)


_PLAN_FIELDS = ("zero_stage", "offload_optimizer", "offload_param")
_SHIPPED = {(0, "none", "none"): "zero0", (1, "none", "none"): "zero1", (2, "none", "none"): "zero2",
            (3, "none", "none"): "zero3", (2, "cpu", "none"): "zero2_offload", (3, "cpu", "cpu"): "zero3_offload"}


def recommended_command(plan, args: argparse.Namespace, spec: RunSpec, explicit: frozenset, world_size: int) -> str:
    """The launch command for `plan` (a MemoryEstimate): this command line's spec and --set overrides, the shipped
    ds_configs file of the plan's stage and offload (else zero<stage>.json and --set for the offload), and a --set
    for each stage/offload field the spec itself sets (so that it agrees with the file)."""
    import shlex

    key = (plan.zero_stage, plan.offload_optimizer, plan.offload_param)
    config = _SHIPPED.get(key) or f"zero{plan.zero_stage}"
    engine_keys = {f"engine.{f}" for f in (*_PLAN_FIELDS, "kind", "deepspeed_config")}
    sets = [o for o in args.overrides if o.split("=", 1)[0].strip() not in engine_keys]
    for f, value in zip(_PLAN_FIELDS, key):
        if f in explicit or (key not in _SHIPPED and f != "zero_stage" and value != "none"):
            sets.append(f"engine.{f}={value}")
    from ..spec import EngineSpec

    if "precision" not in explicit and spec.engine.precision != EngineSpec.model_fields["precision"].default:
        sets.append(f"engine.precision={spec.engine.precision}")  # the precision a custom config decided
    if plan.activation_checkpointing and not spec.engine.activation_checkpointing:
        sets.append("engine.activation_checkpointing=true")
    nodes = args.nodes
    launcher = ["deepspeed"] + (["--hostfile", "launch/hostfile", "--num_nodes", str(nodes)] if nodes > 1 else [])
    launcher += ["--num_gpus", str(world_size // nodes)]
    words = launcher + ["launch/train.py", "--deepspeed_config", f"ds_configs/{config}.json", "--spec", args.spec]
    for o in sets:
        words += ["--set", o]
    return " ".join(shlex.quote(w) for w in words)


def dry_run_main(spec: RunSpec, args: argparse.Namespace) -> int:
    """`--dry-run`: no process group, no weights, no data reads beyond the demo tokenizer. The caller ran the
    preflight (unless --no-preflight)."""
    import os

    from ..engines.deepspeed_config import resolve_deepspeed_config, resolved_engine_line
    from ..spec import SpecError

    world = world_size_of(args)
    if world % args.nodes:
        raise SpecError([f"--nodes: {args.nodes} node(s) do not divide the world size {world} (--world-size)"])
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    explicit = frozenset(spec.engine.model_fields_set)
    ds_config = None
    if spec.engine.kind == "deepspeed":
        ds_config, spec = resolve_deepspeed_config(spec, world)
    maybe_make_demo_data(spec)
    print(dry_run_report(spec, ds_config, world, args.gpu_memory, args, explicit), flush=True)
    if spec.engine.kind == "deepspeed":
        print(resolved_engine_line(spec), flush=True)
    return 0
