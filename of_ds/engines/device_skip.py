"""Skipping a bad update on the device, so that an optimizer step needs no host sync.

A step is skipped when the loss was non-finite on any rank or the global gradient norm is not finite. Deciding
that on the host (`bool(...)`, `.item()`) makes the host wait for the whole backward before it can queue the
optimizer step, and the device then idles while the host catches up. Torch's fused Adam/AdamW take a `found_inf`
tensor instead (the mechanism GradScaler uses): with `found_inf == 1` the kernel leaves weights, moments and the
step count untouched. Flags stay on the device; they reach the host only at log steps (`StepStats`).
"""

from __future__ import annotations

from typing import Optional

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
        bad = bad | ~torch.isfinite(grad_norm.detach().to(device).reshape(()))
    if nonfinite_loss is not None:
        bad = bad | nonfinite_loss.to(device).reshape(()).bool()
    return bad.float()


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, applied only where `skip` (0-dim float, on the parameters' device) is 0."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
