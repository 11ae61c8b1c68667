"""DeepSpeed engine adapter: ZeRO 0-3, offload, bf16/fp16/fp32 and `torch_autocast`, one backward per micro-step."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..runtime import Runtime
from ..spec import RunSpec
from ..train.optim import build_optimizer, build_scheduler
from .base import Batch, StepStats, weighted_losses
from .deepspeed_config import zero_stage

_INPUT_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeepSpeedEngine:
    """Wraps `deepspeed.initialize`. DeepSpeed owns accumulation: it scales each backward by 1/GAS, reduces on
    the boundary and steps optimizer + scheduler there; `step()` is called once per optimizer step."""

    def __init__(self, model: torch.nn.Module, spec: RunSpec, runtime: Runtime, ds_config: dict, total_steps: int):
        import deepspeed

        model.set_activation_checkpointing(spec.engine.activation_checkpointing)
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if offload and runtime.device.type != "cuda":
            ds_config = {**ds_config, "zero_force_ds_cpu_optimizer": False}  # no CPU Adam kernel needed on a CPU run
        optimizer = build_optimizer(model, spec.optim, device_type=runtime.device.type, cpu_offload=offload)
        scheduler = build_scheduler(optimizer, spec.optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        self.module = self.engine.module
        self.overflow_scan_dropped = drop_redundant_overflow_scan(self.optimizer)
        self.grad_accum_steps = self.engine.gradient_accumulation_steps()
        self.zero_stage = zero_stage(ds_config)
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

    def step(self, skip: bool = False) -> StepStats:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() called off the accumulation boundary")
        if skip and self.zero_stage == 0:
            # ZeRO 1-3 skip non-finite gradients themselves; the plain optimizer of stage 0 skips params without grads
            for p in self.module.parameters():
                p.grad = None
        skipped_before, lr = self.engine.skipped_steps, self.lr
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


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
