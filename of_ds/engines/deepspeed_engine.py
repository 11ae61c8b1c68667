"""DeepSpeed engine adapter: ZeRO 0-3, offload, bf16/fp16/fp32 and `torch_autocast`, one backward per micro-step."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..runtime import Runtime
from ..spec import RunSpec
from ..train.optim import build_optimizer, build_scheduler
from .base import Batch, StepStats, weighted_losses
from .deepspeed_config import zero_stage
from .device_skip import found_inf, supports_device_skip

_INPUT_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeepSpeedEngine:
    """Wraps `deepspeed.initialize`. DeepSpeed owns accumulation: it scales each backward by 1/GAS, reduces on
    the boundary and steps optimizer + scheduler there; `step()` is called once per optimizer step."""

    def __init__(self, model: torch.nn.Module, spec: RunSpec, runtime: Runtime, ds_config: dict, total_steps: int):
        import deepspeed

        model.set_activation_checkpointing(spec.engine.activation_checkpointing)
        zero = ds_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if offload and runtime.device.type != "cuda":
            ds_config = {**ds_config, "zero_force_ds_cpu_optimizer": False}  # no CPU Adam kernel needed on a CPU run
        optimizer = build_optimizer(model, spec.optim, device_type=runtime.device.type, cpu_offload=offload)
        self.zero_stage = zero_stage(ds_config)
        bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
        # ZeRO-1/2 bf16 can leave the inf/NaN decision to the fused optimizer: no host sync in the step
        self.device_skip = bf16 and self.zero_stage in (1, 2) and not offload and supports_device_skip(optimizer)
        self._loss_flag: Optional[torch.Tensor] = None
        self._skip: Optional[torch.Tensor] = None
        if self.device_skip:
            skip_on_device(optimizer, self)  # before the scheduler, which wraps optimizer.step too
        scheduler = build_scheduler(optimizer, spec.optim, total_steps)
        ds_config = sync_free_ds_config(ds_config, runtime.world_size, self.device_skip)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        self.module = self.engine.module
        self.sync_free_clip = self.device_skip and install_sync_free_clip(self.optimizer)
        self.overflow_scan_dropped = drop_redundant_overflow_scan(self.optimizer)
        self.grad_accum_steps = self.engine.gradient_accumulation_steps()
        self.input_dtype = _INPUT_DTYPE.get(spec.engine.precision)
        self.device = runtime.device
        self.can_reshape = self.zero_stage == 0  # ZeRO partitions are tied to the world size they were saved with

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def forward(self, batches: Mapping[str, Batch], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return weighted_losses(self.engine, batches, weights, self.device, self.input_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed's contract: step() every micro-step; a no-op off the boundary

    def step(self, nonfinite_loss: Optional[torch.Tensor] = None) -> StepStats:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() called off the accumulation boundary")
        skipped_before, lr = self.engine.skipped_steps, self.lr
        if self.device_skip:
            self._loss_flag, self._skip = nonfinite_loss, None
            self.engine.step()
            self._loss_flag = None
            if self.engine.skipped_steps > skipped_before or self._skip is None:
                skipped = True  # DeepSpeed skipped on its own, before the optimizer ran
            else:
                skipped = self._skip > 0
            return StepStats(grad_norm=self.engine.get_global_grad_norm(), skipped=skipped, lr=lr)
        skip = nonfinite_loss is not None and bool(nonfinite_loss)  # host path: fp16, fp32, ZeRO-0/3, offload
        if skip and self.zero_stage == 0:
            # ZeRO 1-3 skip non-finite gradients themselves; the plain optimizer of stage 0 skips params without grads
            for p in self.module.parameters():
                p.grad = None
        norm = self._stage0_grad_norm() if self.zero_stage == 0 else None
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else None
        skipped = self.engine.skipped_steps > skipped_before or skip or (norm is not None and not _finite(norm))
        return StepStats(grad_norm=norm, skipped=skipped, lr=lr)

    def _stage0_grad_norm(self) -> float:
        """ZeRO-0 does not report the norm; its gradients are already all-reduced here (boundary backward)."""
        grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def save(self, directory: Path, client_state: dict) -> None:
        directory = Path(directory)
        self.engine.save_checkpoint(
            str(directory.parent), tag=directory.name, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
        )

    def load(self, directory: Path, *, weights_only: bool = False) -> dict:
        directory = Path(directory)
        path, client_state = self.engine.load_checkpoint(
            str(directory.parent),
            tag=directory.name,
            load_module_strict=False,  # frozen weights are not in the checkpoint (exclude_frozen_parameters)
            load_optimizer_states=not weights_only,
            load_lr_scheduler_states=not weights_only,
            load_module_only=weights_only,
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint to load")
        return client_state or {}


def drop_redundant_overflow_scan(optimizer) -> bool:
    """ZeRO-1/2 in bf16 first scan every gradient tensor for inf/NaN (about seven small kernels per tensor, then a
    host sync), then compute the global gradient norm and treat a non-finite norm as the same overflow
    (`DeepSpeedZeroOptimizer.step`). A gradient holds inf/NaN exactly when that norm is non-finite, so where the norm
    is computed the scan only costs time: with the 3B recipe's 335 trainable tensors, most of the optimizer step's
    host time on a GPU. Drop it there (not with CPU offload, whose check is already cheap). Returns whether it did."""
    if type(optimizer).__name__ != "DeepSpeedZeroOptimizer":
        return False
    needed = ("check_overflow", "check_grad_overflow", "compute_grad_norm", "cpu_offload", "dtype")
    if not all(hasattr(optimizer, a) for a in needed):
        return False  # a DeepSpeed whose step we do not know: leave it alone
    if optimizer.dtype != torch.bfloat16 or optimizer.cpu_offload or not optimizer.compute_grad_norm or not optimizer.check_grad_overflow:
        return False
    optimizer.check_overflow = lambda partition_gradients=True: None  # the instance attribute shadows the method
    return True


def sync_free_ds_config(ds_config: dict, world_size: int, device_skip: bool) -> dict:
    """Two settings that each cost a host sync per step, where they buy nothing:
    - `overlap_comm` on one rank (nothing to overlap): ZeRO-1/2 then synchronize the device before every gradient
      bucket's reduction, in the middle of the backward;
    - bf16 `check_grad_overflow` where the fused optimizer skips a non-finite update on the device instead."""
    zero = dict(ds_config.get("zero_optimization", {}))
    out = dict(ds_config)
    if world_size == 1 and zero.get("stage") in (1, 2) and zero.get("overlap_comm"):
        out["zero_optimization"] = {**zero, "overlap_comm": False}
    if device_skip:
        out["bf16"] = {**out.get("bf16", {}), "check_grad_overflow": False}
    return out


def install_sync_free_clip(zero_optimizer) -> bool:
    """ZeRO-1/2 with `check_grad_overflow` off still reads the norm on the host to clip (`is_invalid_grad_norm`).
    Clip with tensor ops instead: an invalid norm (inf/NaN, or DeepSpeed's -1) scales the gradients by 0, and the
    fused optimizer skips that step anyway (`skip_on_device`). Returns whether it did (else DeepSpeed's clip stays)."""
    needed = ("unscale_and_clip_grads", "clip_grad", "loss_scale", "check_grad_overflow")
    if type(zero_optimizer).__name__ != "DeepSpeedZeroOptimizer" or not all(hasattr(zero_optimizer, a) for a in needed):
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


def skip_on_device(inner: torch.optim.Optimizer, owner: "DeepSpeedEngine") -> None:
    """Make DeepSpeed's call of the (fused) inner optimizer's step pass `found_inf`: the global gradient norm that
    ZeRO just computed (`owner.optimizer._global_grad_norm`, a device tensor) is not finite, or `owner._loss_flag`.
    The flag is kept in `owner._skip` for StepStats."""
    inner_step = inner.step

    def step(self, *args, **kwargs):
        norm = getattr(owner.optimizer, "_global_grad_norm", None)
        if not torch.is_tensor(norm):
            raise RuntimeError(
                f"DeepSpeed {type(owner.optimizer).__name__} gave no gradient-norm tensor before its optimizer step; "
                f"the on-device skip cannot tell a non-finite gradient (set optim.fused=false to let DeepSpeed decide)"
            )
        device = next(p.device for g in self.param_groups for p in g["params"])
        owner._skip = found_inf(norm, owner._loss_flag, device)
        self.found_inf = owner._skip
        try:
            return inner_step(*args, **kwargs)
        finally:
            del self.found_inf

    inner.step = types.MethodType(step, inner)  # a bound method, as LR schedulers expect to wrap


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
