"""AdamW parameter groups and warmup schedules, both counted in optimizer steps."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from ..spec import OptimSpec

DECAY_MARKER = "gated_cross_attn_layer"


def should_decay(name: str) -> bool:
    """Weight decay on the gated cross-attention blocks only, as the original (perceiver, tables: none)."""
    return DECAY_MARKER in name


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups over the trainable parameters; frozen ones never enter the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if should_decay(name) else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, spec: OptimSpec, *, device_type: str = "cpu", cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW (DeepSpeed's CPU Adam when the optimizer step runs on the host under ZeRO-Offload on a GPU)."""
    groups = build_param_groups(model, spec.weight_decay)
    kw = dict(lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps)
    if cpu_offload and device_type == "cuda":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    # the fused kernel (CUDA and CPU) also skips a bad update on the device (engines/device_skip.py)
    fused = spec.fused and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, fused=fused or None, **kw)


def reapply_fused(optimizer: torch.optim.Optimizer, fused: list) -> None:
    """After loading a checkpoint: the loaded param groups carry the saving run's `fused` flag (an older or unfused
    run's None/False); put back this run's (`fused`: one per group, as built), and move Adam's step counters where
    the fused kernel wants them (on the parameters' device, fp32)."""
    for group, flag in zip(optimizer.param_groups, fused):
        group["fused"] = flag
        if not flag:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(p.device, torch.float32)


def step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """`scheduler.step()` for an optimizer step that was skipped: torch warns when the first scheduler step comes
    before any optimizer step (a first step skipped for a non-finite loss, an fp16 overflow); here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
        scheduler.step()


class LrSchedule:
    """Multiplier of the peak lr at optimizer step `s`: HF's constant/linear/cosine with warmup; or, with `anchor`
    [a, m] (a resume that changed the schedule's horizon or shape), the same shape continued from multiplier `m` at
    step `a`: on up to 1 at the end of warmup if `a` is inside it, then from there down to 0 at `total_steps`
    (constant: held). A callable object, not a closure: LambdaLR checkpoints its attributes, so a continued schedule
    survives later resumes. `checkpointed` is set before the first step; a schedule loaded from a checkpoint that
    predates schedule state keeps False (of_ds/train/resume_policy.py rebuilds it from that checkpoint's spec)."""

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int, anchor: Optional[list] = None):
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps
        self.anchor = list(anchor) if anchor is not None else None
        self.checkpointed = False

    def same_shape(self, other: "LrSchedule") -> bool:
        return (self.schedule, self.warmup_steps, self.total_steps) == (other.schedule, other.warmup_steps, other.total_steps)

    def describe(self) -> str:
        shape = f"{self.schedule}, warmup {self.warmup_steps}, {self.total_steps} steps"
        return shape if self.anchor is None else f"{shape}, continued from {self.anchor[1]:.4g} at step {self.anchor[0]}"

    def __call__(self, s: int) -> float:
        w, total = self.warmup_steps, self.total_steps
        if self.anchor is None:
            if s < w:
                return s / max(1, w)
            start, m = w, 1.0
        else:
            a, m = self.anchor
            if s < w:  # the anchor is inside warmup: ramp on from it
                return m + (1.0 - m) * max(0, s - a) / max(1, w - a)
            start, m = (a, m) if a >= w else (w, 1.0)
        if self.schedule == "constant":
            return m
        progress = max(0, s - start) / max(1, total - start)
        if self.schedule == "linear":
            return m * max(0.0, 1.0 - progress)
        return m * max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `s` (HF's constant/linear/cosine with warmup)."""
    return LrSchedule(schedule, warmup_steps, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimSpec, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`total_steps` is in optimizer steps (accumulation already divided out: the original's bug B5). One schedule
    object per parameter group, as LambdaLR checkpoints one state per group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [LrSchedule(spec.schedule, spec.warmup_steps, total_steps) for _ in optimizer.param_groups]
    )
