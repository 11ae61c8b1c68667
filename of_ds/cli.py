"""launch/train.py's command line: arguments, the spec they name, and the dry run (the plan, parameter counts,
memory plan and recommended command, with no process group, weights or data reads beyond sizes.json)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from .spec import RunSpec, SpecError
from .train.plan import Plan, resolve_plan, with_start


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
    return args.world_size if getattr(args, "world_size", None) else int(os.environ.get("WORLD_SIZE", "1"))


def load_spec(args: argparse.Namespace) -> RunSpec:
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides += ["engine.kind=deepspeed", f"engine.deepspeed_config={args.deepspeed_config}"]
    return RunSpec.from_yaml(args.spec, overrides)


def dry_run_report(plan: Plan, gpu_memory: Optional[str], args: Optional[argparse.Namespace] = None,
                   explicit: frozenset = frozenset()) -> str:
    """The plan: resolved spec and DeepSpeed config, where it starts, parameter counts, memory plan and
    recommendation (meta model: no weights). With `args` (the command line) the recommendation is printed as a
    command to run; `explicit`: the engine fields the spec or --set gave (before the DeepSpeed config was resolved)."""
    from .model import build_flamingo
    from .perf.memory import estimate, format_table, model_dims, parse_size, recommend

    spec, ds_config, world_size = plan.spec, plan.ds_config, plan.world_size
    model, _, _ = build_flamingo(spec.model, meta=True)
    dims = model_dims(model, spec)
    e = spec.engine
    chosen = estimate(dims, spec, world_size, plan.zero_stage, e.offload_optimizer, e.offload_param)
    lines = ["# resolved spec", spec.to_yaml().rstrip(), "# " + plan.describe().removeprefix("[of_ds] ")]
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
    from .spec import EngineSpec

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
    """`--dry-run`: no process group, no weights, no data reads beyond the demo tokenizer and sizes.json. The
    caller ran the preflight (unless --no-preflight, which also plans without the data and the run dir)."""
    from .engines.deepspeed_config import resolved_engine_line

    world = world_size_of(args)
    if world % args.nodes:
        raise SpecError([f"--nodes: {args.nodes} node(s) do not divide the world size {world} (--world-size)"])
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    explicit = frozenset(spec.engine.model_fields_set)
    if spec.run.demo_data:
        from .demo import ensure_demo_data

        ensure_demo_data(spec.run.demo_data)
    plan = resolve_plan(spec, world, data=args.preflight, run_dir=False)  # the spec's own problems: exit 2
    refused = None
    if args.preflight:
        try:  # where a launch now would start: the run dir's checkpoint, an original's, or nothing
            plan = with_start(plan)
        except SpecError as e:  # a resume that refuses this spec's changes: said, and the plan is a fresh start's
            refused = e
    for note in plan.notes:
        print(note, flush=True)
    if refused is not None:
        print(f"# a launch with this spec now would stop before building anything: {refused}".replace("\n", "\n#   "), flush=True)
        print("# (the plan below is a fresh start's: another run.name, or checkpoint.resume=never with checkpoint.on_existing)", flush=True)
    print(dry_run_report(plan, args.gpu_memory, args, explicit), flush=True)
    if plan.spec.engine.kind == "deepspeed":
        print(resolved_engine_line(plan.spec), flush=True)
    return 0
