"""What of_ds changes inside DeepSpeed, written for and tested against DeepSpeed 0.19.x
(`tests/engines/test_engines_e2e.py`, `tests/engines/test_deepspeed_patches.py`):
- in the ZeRO-1/2 optimizer, host syncs and per-tensor work that a step does not need (`overflow_scan`,
  `sync_free_clip`, `foreach_grad_norm`); without them DeepSpeed's own step runs, slower and the same;
- in ZeRO-3 with the optimizer on NVMe, the state a resume loses (`nvme_optimizer_state`); without it such a resume
  is refused.

Each patch is gated: it applies only on the DeepSpeed versions in `SUPPORTED`, only while `OF_DS_DEEPSPEED_PATCHES`
is not `0` (the off switch: DeepSpeed unpatched), and only after every DeepSpeed attribute it touches has been found
(`require`: a missing one is an error that names it, never a silent partial patch). The engine records the patches
it applied (`DeepSpeedEngine.applied_patches`) in each checkpoint's `meta.json`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

import torch

T = TypeVar("T")

NVME_STATE = "offloaded_tensors"  # in a step folder: DeepSpeed's copy of the swap files of an optimizer on NVMe

SUPPORTED = ("0.19",)  # DeepSpeed major.minor versions the patches were written for
OFF_SWITCH = "OF_DS_DEEPSPEED_PATCHES"  # "0": apply none of them

# patch -> the DeepSpeed attributes it reads, calls or replaces (of the ZeRO optimizer; "engine." of DeepSpeed's engine)
NEEDS: dict[str, tuple[str, ...]] = {
    "overflow_scan": ("check_overflow", "check_grad_overflow", "compute_grad_norm", "cpu_offload", "dtype"),
    "sync_free_clip": ("unscale_and_clip_grads", "clip_grad", "loss_scale", "check_grad_overflow"),
    "foreach_grad_norm": ("get_grad_norm_direct", "dp_process_group", "model_parallel_group", "model_parallel_rank", "device"),
    "nvme_optimizer_state": (
        "loss_scaler", "dynamic_loss_scale", "overflow", "optimizer", "fp32_partitioned_groups_flat",
        "_swappable_optimizer_subgroup", "_set_fp32_optimizer_param_groups", "_clear_fp32_optimizer_param_groups",
        "_optimizer_states_and_gradient_swap_in", "_optimizer_states_and_gradient_swap_out", "_release_swap_buffers",
        "_reassign_or_swap_out_partitioned_parameters", "_partition_all_parameters", "checkpoint_event_epilogue",
        "engine._get_zero_ckpt_name",
    ),
}


class DeepSpeedPatchError(RuntimeError):
    """DeepSpeed lacks what a patch relies on, or a resume needs a patch that is off."""


def deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def version_supported(version: str) -> bool:
    """Whether `version` (e.g. `0.19.3`, `0.19.3+abc`) is one of the `SUPPORTED` major.minor series."""
    parts = version.split("+", 1)[0].split(".")
    return ".".join(parts[:2]) in SUPPORTED


def patches_enabled() -> bool:
    return os.environ.get(OFF_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def why_not_patched() -> Optional[str]:
    """None where the patches may apply, else why not (the off switch, or a DeepSpeed they were not written for)."""
    if not patches_enabled():
        return f"{OFF_SWITCH}={os.environ.get(OFF_SWITCH)}"
    version = deepspeed_version()
    if not version_supported(version):
        return f"DeepSpeed {version} (the patches were written for {', '.join(s + '.x' for s in SUPPORTED)})"
    return None


def missing_attributes(patch: str, optimizer, engine=None) -> list[str]:
    """The attributes of `NEEDS[patch]` that `optimizer` (and `engine`, for "engine." ones) lack."""
    missing = []
    for name in NEEDS[patch]:
        owner, attr = (engine, name[len("engine."):]) if name.startswith("engine.") else (optimizer, name)
        if owner is None or not hasattr(owner, attr):
            missing.append(name)
    return missing


def require(patch: str, optimizer, engine=None) -> None:
    """Raise DeepSpeedPatchError naming every attribute `patch` relies on that this DeepSpeed lacks."""
    missing = missing_attributes(patch, optimizer, engine)
    if missing:
        raise DeepSpeedPatchError(
            f"of_ds's DeepSpeed patch '{patch}' relies on {', '.join(missing)} ({type(optimizer).__name__}), which "
            f"DeepSpeed {deepspeed_version()} lacks; run with {OFF_SWITCH}=0 for "
            f"DeepSpeed's own behaviour, or use DeepSpeed {', '.join(s + '.x' for s in SUPPORTED)}"
        )


def applies(patch: str, optimizer, target: str, engine=None) -> bool:
    """The gate of one patch: `optimizer` is DeepSpeed's `target` class, the patches are on and written for this
    DeepSpeed; then every attribute the patch touches must be there (else DeepSpeedPatchError)."""
    if type(optimizer).__name__ != target or why_not_patched() is not None:
        return False
    require(patch, optimizer, engine)
    return True


def applied(patches: Iterable[tuple[str, bool]]) -> list[str]:
    """The names of the (patch, applied) pairs that applied, for `meta.json`."""
    return [name for name, on in patches if on]


def drop_redundant_overflow_scan(optimizer) -> bool:
    """ZeRO-1/2 in bf16 first scan every gradient tensor for inf/NaN (about seven small kernels per tensor, then a
    host sync), then compute the global gradient norm and treat a non-finite norm as the same overflow
    (`DeepSpeedZeroOptimizer.step`). A gradient holds inf/NaN exactly when that norm is non-finite, so where the norm
    is computed the scan only costs time: with the 3B recipe's 335 trainable tensors, most of the optimizer step's
    host time on a GPU. Drop it there (not with CPU offload, whose check is already cheap). Returns whether it did."""
    if not applies("overflow_scan", optimizer, "DeepSpeedZeroOptimizer"):
        return False
    if optimizer.dtype != torch.bfloat16 or optimizer.cpu_offload or not optimizer.compute_grad_norm or not optimizer.check_grad_overflow:
        return False
    optimizer.check_overflow = lambda partition_gradients=True: None  # the instance attribute shadows the method
    return True


def sync_free_ds_config(ds_config: dict, world_size: int, device_skip: bool) -> dict:
    """Settings that cost work a step does not need:
    - `overlap_comm` on one rank (nothing to overlap): ZeRO-1/2 then synchronize the device before every gradient
      bucket's reduction, in the middle of the backward;
    - `reduce_scatter` on one rank, unless the config sets it or scales the gradients before or after averaging:
      its path divides every gradient bucket by the world size (1), a pass over the bf16 gradients (2 bytes read and
      2 written per trainable parameter) that the all-reduce path skips at a divisor of 1; the same bits either way;
    - bf16 `check_grad_overflow` where the fused optimizer skips a non-finite update on the device instead (a host
      sync)."""
    zero = dict(ds_config.get("zero_optimization", {}))
    out = dict(ds_config)
    if world_size == 1 and zero.get("stage") in (1, 2):
        zero["overlap_comm"] = False
        plain_average = ds_config.get("gradient_predivide_factor", 1.0) == 1.0 and not ds_config.get("prescale_gradients", False)
        if "reduce_scatter" not in zero and plain_average:
            zero["reduce_scatter"] = False
        out["zero_optimization"] = zero
    if device_skip:
        out["bf16"] = {**out.get("bf16", {}), "check_grad_overflow": False}
    return out


def install_sync_free_clip(zero_optimizer) -> bool:
    """ZeRO-1/2 with `check_grad_overflow` off still reads the norm on the host to clip (`is_invalid_grad_norm`).
    Clip with tensor ops instead: an invalid norm (inf/NaN, or DeepSpeed's -1) scales the gradients by 0, and the
    fused optimizer skips that step anyway (`DeepSpeedEngine._skip_decision`). Returns whether it did (else
    DeepSpeed's clip stays)."""
    if not applies("sync_free_clip", zero_optimizer, "DeepSpeedZeroOptimizer"):
        return False
    if zero_optimizer.check_grad_overflow:
        return False
    host_clip = zero_optimizer.unscale_and_clip_grads

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        if not torch.is_tensor(total_norm):
            return host_clip(grad_groups_flat, total_norm)
        clip, scale = float(zero_optimizer.clip_grad), float(zero_optimizer.loss_scale)
        if clip == 0.0 and scale == 1.0:
            return None
        combined = torch.full_like(total_norm, scale, dtype=torch.float32)
        if clip > 0.0:
            valid = torch.isfinite(total_norm) & (total_norm >= 0)
            norm = torch.where(valid, total_norm.float(), torch.full_like(combined, float("inf")))
            combined = torch.clamp((norm / scale + 1e-6) / clip, min=1.0) * scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_((1.0 / combined).to(g.dtype))
        return None

    zero_optimizer.unscale_and_clip_grads = unscale_and_clip_grads  # the instance attribute shadows the method
    return True


def install_foreach_grad_norm(zero_optimizer) -> bool:
    """ZeRO-1/2 compute the global gradient norm tensor by tensor (`get_grad_norm_direct`): per trainable tensor a
    cast to fp64 (8 bytes per element written, then read again) and a norm kernel, about 700 kernels and 16 GB of
    memory traffic at the 3B recipe. One `torch._foreach_norm` over the same gradients, accumulating in fp32, gives
    the same norm to fp32 rounding in a few multi-tensor kernels. Only where DeepSpeed's loop reduces to that: the
    L2 norm, no tensor or pipeline parallelism. Returns whether it did."""
    if not applies("foreach_grad_norm", zero_optimizer, "DeepSpeedZeroOptimizer"):
        return False
    from deepspeed import comm as dist
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    if pg_utils.is_parallel(zero_optimizer.model_parallel_group) or zero_optimizer.model_parallel_rank != 0:
        return False
    per_tensor = zero_optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return per_tensor(gradients, params, norm_type)
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        grads = [g.detach() for g, p in zip(grads, params) if not getattr(p, "ds_pipe_replicated", False)]
        if grads:
            total = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=zero_optimizer.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=zero_optimizer.dp_process_group)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=zero_optimizer.device)  # DeepSpeed's -1 for inf/NaN
        return total

    zero_optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


def _swapped_subgroups(opt) -> list[int]:
    """The ZeRO-3 optimizer sub-groups that live in swap files (the others are under aio's 1 MiB minimum)."""
    return [i for i in range(len(opt.fp32_partitioned_groups_flat)) if opt._swappable_optimizer_subgroup(i)]


def load_with_nvme_optimizer_state(engine, checkpoint_dir: str, tag: str, load: Callable[[], T]) -> T:
    """Run `load` (DeepSpeed's `load_checkpoint`) so that ZeRO-3 with the optimizer offloaded to NVMe resumes exactly.

    DeepSpeed 0.19 restores such a run from the swap files the checkpoint holds (`offloaded_tensors`) and skips this
    rank's `*_optim_states.pt`, which loses the loss scaler, each group's learning rate (the next step runs at the
    optimizer's initial one) and state two ways:
    - a sub-group large enough to swap (aio's 1 MiB minimum) gets its fp32 weights back, but not its Adam moments:
      the swapper only knows state tensors that exist, and Adam creates them at its first step, after the load;
    - a smaller sub-group is never swapped: the load leaves its fp32 weights and moments as freshly built (biases,
      norms and gates back at their initial values).
    So before the load the swappable sub-groups get state tensors of the saved names (the swap-in that follows then
    reads the saved moments), and after it the others are restored from the file and their working weights
    refreshed. Without NVMe optimizer offload this is just `load()`. Raises where DeepSpeed lacks what it needs, or
    the patches are off: a resume that silently loses state would be worse than none."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, LOSS_SCALER, OPTIMIZER_STATE_DICT

    opt = engine.optimizer
    if not getattr(opt, "swap_optimizer", False):
        return load()
    why = why_not_patched()
    if why is not None:
        raise DeepSpeedPatchError(
            f"resuming ZeRO-3 with offload_optimizer on NVMe needs of_ds's patch 'nvme_optimizer_state' to restore the "
            f"optimizer state exactly, and it is off here ({why}); resume under DeepSpeed "
            f"{', '.join(s + '.x' for s in SUPPORTED)} with the patches on, or start from the weights only "
            f"(checkpoint.load_weights_only: true)"
        )
    require("nvme_optimizer_state", opt, engine)
    saved = torch.load(engine._get_zero_ckpt_name(checkpoint_dir, tag), map_location="cpu", weights_only=False)
    saved = saved[OPTIMIZER_STATE_DICT]
    opt._set_fp32_optimizer_param_groups()  # the base optimizer's numbering of its state, as state_dict() made it
    try:
        index = {id(p): n for n, p in enumerate(p for g in opt.optimizer.param_groups for p in g["params"])}
    finally:
        opt._clear_fp32_optimizer_param_groups()
    flats = opt.fp32_partitioned_groups_flat
    state_of = {i: saved[OPTIMIZER_STATE_DICT]["state"].get(index[id(flat)], {}) for i, flat in enumerate(flats)}
    swapped = _swapped_subgroups(opt)

    def restored(state: dict, like: torch.Tensor) -> dict:
        """Saved state for `like`: a swapped tensor (saved as an empty placeholder) as zeros the swap-in fills."""
        return {k: (torch.zeros_like(like) if not v.numel() else v.to(like.device).clone()) if torch.is_tensor(v) else v
                for k, v in state.items()}

    for i in swapped:
        opt._optimizer_states_and_gradient_swap_in(i)
        opt.optimizer.state[flats[i]] = restored(state_of[i], flats[i])
        opt._optimizer_states_and_gradient_swap_out(i)  # registers the state tensors with the swapper
    result = load()
    # what DeepSpeed's skipped `_rigid_load_state_dict` would have set: the loss scaler (fp16) and each group's
    # hyperparameters (the learning rate the schedule had set for the next step, among them)
    opt.loss_scaler, opt.dynamic_loss_scale = saved[LOSS_SCALER], saved["dynamic_loss_scale"]
    opt.overflow = saved["overflow"]
    for group, saved_group in zip(opt.optimizer.param_groups, saved[OPTIMIZER_STATE_DICT]["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    opt._partition_all_parameters()  # no stale gathered copy outlives the partitions restored below
    for i in sorted(set(range(len(flats))) - set(swapped)):
        flats[i].data.copy_(saved[FP32_FLAT_GROUPS][i])
        opt.optimizer.state[flats[i]] = restored(state_of[i], flats[i])
        opt._reassign_or_swap_out_partitioned_parameters(i)  # the working partition from the restored master copy
    opt.checkpoint_event_epilogue()  # persistent parameters gathered again, from the restored partitions
    return result


def save_swapped_fp32_weights(engine, checkpoint_dir: str, tag: str) -> int:
    """After DeepSpeed saved a ZeRO-3 checkpoint with the optimizer on NVMe: put the fp32 weights of the sub-groups
    that live in swap files into this rank's `*_optim_states.pt`, where DeepSpeed left empty placeholders. Then the
    checkpoint's weights read like any ZeRO-3 checkpoint's (`zero_to_fp32`: tools/export_checkpoint, a weights-only
    start); the Adam moments stay in `offloaded_tensors` only. Returns how many sub-groups it filled."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    opt = engine.optimizer
    if not getattr(opt, "swap_optimizer", False) or why_not_patched() is not None:
        return 0  # DeepSpeed's own checkpoint: empty placeholders for the swapped sub-groups' fp32 weights
    require("nvme_optimizer_state", opt, engine)
    swapped = _swapped_subgroups(opt)
    path = Path(engine._get_zero_ckpt_name(checkpoint_dir, tag))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    for i in swapped:
        opt._optimizer_states_and_gradient_swap_in(i)
        flat = opt.fp32_partitioned_groups_flat[i]
        saved[OPTIMIZER_STATE_DICT][FP32_FLAT_GROUPS][i] = flat.detach().to("cpu", copy=True)
        opt._release_swap_buffers(i)  # unchanged: nothing to write back
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)
    return len(swapped)
