"""DeepSpeed engine adapter: ZeRO 0-3, offload, bf16/fp16/fp32 and `torch_autocast`, one backward per micro-step."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from ..runtime import Runtime
from ..spec import RunSpec
from .optim import build_optimizer, build_scheduler, reapply_fused, step_schedule
from .base import Batch, PackingReport, StepStats, weighted_losses
from .deepspeed_config import zero_stage
from .deepspeed_patches import (
    NVME_STATE,
    applied,
    drop_redundant_overflow_scan,
    install_foreach_grad_norm,
    install_sync_free_clip,
    load_with_nvme_optimizer_state,
    save_swapped_fp32_weights,
    sync_free_ds_config,
    why_not_patched,
)
from .device_skip import found_inf, guard_step, supports_device_skip

_INPUT_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeepSpeedEngine:
    """Wraps `deepspeed.initialize`. DeepSpeed owns accumulation: it scales each backward by 1/GAS, reduces on
    the boundary and steps optimizer + scheduler there; `step()` is called once per optimizer step."""

    def __init__(self, model: torch.nn.Module, spec: RunSpec, runtime: Runtime, ds_config: dict, total_steps: int,
                 fuse_datasets: Optional[dict[str, int]] = None):
        import deepspeed

        self.fuse_datasets = fuse_datasets  # None: a pass per dataset (prepare.prepare_model decided)
        zero = ds_config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if offload and runtime.device.type != "cuda":
            ds_config = {**ds_config, "zero_force_ds_cpu_optimizer": False}  # no CPU Adam kernel needed on a CPU run
        optimizer = build_optimizer(model, spec.optim, device_type=runtime.device.type, cpu_offload=offload)
        self.zero_stage = zero_stage(ds_config)
        bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
        # ZeRO-1/2 bf16 can leave the inf/NaN decision to the fused optimizer: no host sync in the step
        self.device_skip = (
            bf16 and self.zero_stage in (1, 2) and not offload and zero.get("compute_grad_norm", True) is not False
            and supports_device_skip(optimizer)
        )
        self._loss_flag: Optional[torch.Tensor] = None  # this step's non-finite-loss flag (device path)
        self._host_skip = False  # this step's skip, decided on the host (other paths)
        self._skip = None  # what the guard decided: a device flag, or a bool
        if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("torch."):
            guard_step(optimizer, self._skip_decision)  # before the scheduler, which wraps optimizer.step too
        scheduler = build_scheduler(optimizer, spec.optim, total_steps)
        ds_config = sync_free_ds_config(ds_config, runtime.world_size, self.device_skip)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        self.module = self.engine.module
        self.inner_optimizer = optimizer
        self._fused = [g.get("fused") for g in optimizer.param_groups]
        self.sync_free_clip = self.device_skip and install_sync_free_clip(self.optimizer)
        self.overflow_scan_dropped = drop_redundant_overflow_scan(self.optimizer)
        self.foreach_grad_norm = not offload and install_foreach_grad_norm(self.optimizer)
        nvme = bool(getattr(self.optimizer, "swap_optimizer", False)) and why_not_patched() is None
        # what of_ds changed inside DeepSpeed for this run (checkpoint meta.json: "deepspeed_patches")
        self.applied_patches = applied([("overflow_scan", self.overflow_scan_dropped), ("sync_free_clip", self.sync_free_clip),
                                        ("foreach_grad_norm", self.foreach_grad_norm), ("nvme_optimizer_state", nvme)])
        self.grad_accum_steps = self.engine.gradient_accumulation_steps()
        self.input_dtype = _INPUT_DTYPE.get(spec.engine.precision)
        self.device = runtime.device
        self._pack_report = PackingReport(runtime.rank)
        self.can_reshape = self.zero_stage == 0  # ZeRO partitions are tied to the world size they were saved with

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def forward(self, batches: Mapping[str, Batch], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        return weighted_losses(self.engine, batches, weights, self.device, self.input_dtype, fuse=self.fuse_datasets, on_pack=self._pack_report)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed's contract: step() every micro-step; a no-op off the boundary

    def step(self, nonfinite_loss: Optional[torch.Tensor] = None) -> StepStats:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() called off the accumulation boundary")
        skipped_before, lr = self.engine.skipped_steps, self.lr
        self._skip = None
        if self.device_skip:
            self._loss_flag = nonfinite_loss
            norm = None
        else:  # host path (fp16, fp32, ZeRO-0/3, offload, an unfused optimizer): DeepSpeed checks the gradients
            # itself except on ZeRO-0, whose norm we read here; the guard adds the loss flag
            norm = self._stage0_grad_norm() if self.zero_stage == 0 else None
            self._host_skip = (nonfinite_loss is not None and bool(nonfinite_loss)) or (norm is not None and not _finite(norm))
        try:
            self.engine.step()
        finally:
            self._loss_flag, self._host_skip = None, False
        if self.engine.skipped_steps > skipped_before:
            step_schedule(self.scheduler)  # DeepSpeed does not step it on its own skips; the schedule counts every step
            skipped = True
        elif self._skip is None:
            skipped = True  # the optimizer was not reached
        else:
            skipped = self._skip if torch.is_tensor(self._skip) else bool(self._skip)
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if not self.device_skip and torch.is_tensor(norm):
            norm = float(norm)
        return StepStats(grad_norm=norm, skipped=skipped, lr=lr)

    def _skip_decision(self, optimizer: torch.optim.Optimizer):
        """Called by the inner optimizer's step (`guard_step`): a 0-dim device flag (device path: DeepSpeed's global
        norm is not finite, or the loss flag) or a host bool."""
        if self.device_skip:
            norm = getattr(self.optimizer, "_global_grad_norm", None)
            if not torch.is_tensor(norm):
                raise RuntimeError(
                    f"DeepSpeed {type(self.optimizer).__name__} gave no gradient-norm tensor before its optimizer step; "
                    f"the on-device skip cannot tell a non-finite gradient (set optim.fused=false to let DeepSpeed decide)"
                )
            device = next(p.device for g in optimizer.param_groups for p in g["params"])
            self._skip = found_inf(norm, self._loss_flag, device)
        else:
            self._skip = self._host_skip
        return self._skip

    def _stage0_grad_norm(self) -> float:
        """ZeRO-0 does not report the norm; its gradients are already all-reduced here (boundary backward)."""
        grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def save(self, directory: Path, client_state: dict) -> None:
        directory = Path(directory)
        self.engine.save_checkpoint(
            str(directory.parent), tag=directory.name, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
        )
        save_swapped_fp32_weights(self.engine, str(directory.parent), directory.name)

    def load(self, directory: Path) -> dict:
        directory = Path(directory)
        nvme_then, nvme_now = (directory / NVME_STATE).is_dir(), getattr(self.optimizer, "swap_optimizer", False)
        if nvme_then != nvme_now:
            where = {True: "on NVMe", False: "not on NVMe"}
            raise ValueError(
                f"{directory}: saved with the optimizer state {where[nvme_then]}, but this run keeps it "
                f"{where[nvme_now]}: DeepSpeed cannot carry the state across; resume with engine.offload_optimizer "
                f"as when it was saved, or start from its weights only (checkpoint.load_weights_only: true)"
            )
        path, client_state = load_with_nvme_optimizer_state(
            self.engine,
            str(directory.parent),
            directory.name,
            # frozen weights are not in the checkpoint (exclude_frozen_parameters)
            lambda: self.engine.load_checkpoint(str(directory.parent), tag=directory.name, load_module_strict=False),
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: DeepSpeed found no checkpoint to load")
        reapply_fused(self.inner_optimizer, self._fused)  # the spec's kernel choice, not the checkpoint's
        return client_state or {}


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
