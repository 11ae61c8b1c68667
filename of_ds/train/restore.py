"""What a run starts from, restored: an original OpenFlamingo `checkpoint.pt`'s weights (and, with
`checkpoint.original_optimizer: carry`, its Adam state), a checkpoint's weights only, or a full resume (engine,
schedule, step and loader positions). `plan.resume` (`ResumePoint`) says which."""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime import Runtime
from ..spec import RunSpec
from .checkpoint import CheckpointManager, TrainState, convert_to_universal, require_complete
from .plan import ResumePoint
from .untrusted import load_untrusted


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


def load_start_weights(model, start: ResumePoint, spec: RunSpec) -> None:
    """Before the engine wraps the model, where the run starts from weights only (a fresh optimizer and step 0): an
    original OpenFlamingo `checkpoint.pt`, or with `checkpoint.load_weights_only` a checkpoint of any engine, ZeRO
    stage or number of ranks (consolidated like tools/export_checkpoint does)."""
    from .export import load_weights_into

    if start.kind != "weights_only":
        return
    if start.original:
        load_original_checkpoint(model, start.path, spec.checkpoint.allow_pickle)
    else:
        require_complete(start.path)
        load_weights_into(model, start.path, spec.checkpoint.allow_pickle)


def restore(engine, data, checkpoints: CheckpointManager, start: ResumePoint, spec: RunSpec, runtime: Runtime) -> TrainState:
    """After the engine is built: the train state the run continues from (step 0 for a fresh or weights-only start;
    an original checkpoint's Adam state goes into the engine here). A universal resume converts the checkpoint
    first (once; collective)."""
    path = start.path
    if start.kind == "fresh":
        return TrainState()
    if start.original and spec.checkpoint.original_optimizer == "carry":
        n = carry_original_optimizer(engine, path, spec)
        if runtime.is_main:
            print(f"[of_ds] started from {path}: its weights and the Adam state of {n} parameters (step 0)", flush=True)
        return TrainState()
    if start.kind == "weights_only":  # the weights are in (load_start_weights)
        if runtime.is_main:
            print(f"[of_ds] started from the weights of {path} (a fresh optimizer, step 0)", flush=True)
        return TrainState()
    universal = convert_to_universal(path, start.universal_dir, runtime) if start.kind == "universal" else None
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
