"""Skipping a bad update on the device, so that an optimizer step needs no host sync.

A step is skipped when the loss was non-finite on any rank or the global gradient norm is not finite. Deciding
that on the host (`bool(...)`, `.item()`) makes the host wait for the whole backward before it can queue the
optimizer step, and the device then idles while the host catches up. Torch's fused Adam/AdamW take a `found_inf`
tensor instead (the mechanism GradScaler uses): with `found_inf == 1` the kernel leaves weights, moments and the
step count untouched. Flags stay on the device; they reach the host only at log steps (`StepStats`).
"""

from __future__ import annotations

import types
from typing import Callable, Optional, Union

import torch


def supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True for torch optimizers whose every group runs the fused kernel (they read `optimizer.found_inf`)."""
    return (
        isinstance(optimizer, torch.optim.Optimizer)
        and bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        and all(g.get("fused") for g in optimizer.param_groups)
    )


def found_inf(grad_norm: Optional[torch.Tensor], nonfinite_loss: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-dim float32 on `device`: 1.0 where the update must be skipped, else 0.0 (no host sync)."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    if grad_norm is not None:
        norm = grad_norm.detach().to(device).reshape(())
        bad = bad | ~torch.isfinite(norm) | (norm < 0)  # DeepSpeed marks an invalid norm -1
    if nonfinite_loss is not None:
        bad = bad | nonfinite_loss.to(device).reshape(()).bool()
    return bad.float()


def _run_unless(optimizer: torch.optim.Optimizer, skip: Union[bool, torch.Tensor], run: Callable[[], object]):
    """`run()` (the optimizer's step) unless `skip`: a device flag goes to the fused kernel as `found_inf`; a host
    bool, or a flag for an optimizer that is not (or no longer) fused, is decided on the host."""
    if torch.is_tensor(skip) and supports_device_skip(optimizer):
        optimizer.found_inf = skip
        try:
            return run()
        finally:
            del optimizer.found_inf
    return None if bool(skip) else run()


def step_unless(optimizer: torch.optim.Optimizer, skip: Union[bool, torch.Tensor]) -> None:
    """`optimizer.step()` unless `skip` (see `_run_unless`)."""
    _run_unless(optimizer, skip, optimizer.step)


def guard_step(optimizer: torch.optim.Optimizer, decide: Callable[[torch.optim.Optimizer], Union[bool, torch.Tensor]]) -> None:
    """Make every `optimizer.step()` (DeepSpeed calls it) ask `decide(optimizer)` first and skip as `step_unless`
    does. Install before an LR scheduler is built: schedulers wrap `step` too, and expect a bound method."""
    inner_step = optimizer.step

    def step(self, *args, **kwargs):
        return _run_unless(self, decide(self), lambda: inner_step(*args, **kwargs))

    optimizer.step = types.MethodType(step, optimizer)
