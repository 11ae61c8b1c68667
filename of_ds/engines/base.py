"""The Engine protocol: the only verbs the step loop uses, whatever wraps the model (DeepSpeed, DDP, FSDP2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Union

import torch
from torch import nn

from ..model.packing import PackedBatch, describe_packing, pack_datasets
from ..spec import SpecError

Batch = Mapping[str, torch.Tensor]


Flag = Union[bool, torch.Tensor]


@dataclass
class StepStats:
    """What one optimizer step reports. `grad_norm` and `skipped` may be device tensors (0-dim), so that reading
    them is a host sync the caller makes only when it logs (`host_float`, `bool`)."""

    grad_norm: Optional[Union[float, torch.Tensor]]  # global norm before clipping; None where the engine does not report it
    skipped: Flag  # the update was not applied (non-finite loss or gradients, fp16 overflow)
    lr: float


def host_float(x: Optional[Union[float, torch.Tensor]]) -> Optional[float]:
    """A StepStats value on the host (a device sync when it is a device tensor)."""
    return None if x is None else float(x)


class Engine(Protocol):
    module: nn.Module  # the plain Flamingo (unwrapped)
    grad_accum_steps: int

    def forward(self, batches: Mapping[str, Batch], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """One micro-step: a loss per dataset and `loss`, their weighted sum (the one thing `backward` gets)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of one micro-step (scaled by 1/accumulation; reduced across ranks on the last)."""

    def step(self, nonfinite_loss: Optional[torch.Tensor] = None) -> StepStats:
        """After the last micro-step: clip, optimizer and scheduler step, zero grads. `nonfinite_loss` (a 0-dim
        device flag, equal on every rank) makes it skip the update; so does a non-finite gradient norm."""

    def save(self, directory: Path, client_state: dict) -> None:
        """Write trainable weights, optimizer and scheduler state into `directory` (collective)."""

    def load(self, directory: Path) -> dict:
        """Restore what `save` wrote; returns its client_state (collective)."""

    @property
    def lr(self) -> float: ...


def move_batch(batch: Batch, device: torch.device, float_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """To the device; only floating tensors (pixels) are cast, never token ids (the original's bug B3).

    `num_images` stays on the host: the model reads it to pick the real images, which would otherwise be a
    device-to-host sync every step."""
    out = {}
    for k, v in batch.items():
        if k == "num_images":
            out[k] = v if v is None or isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.long)
            continue
        if not isinstance(v, torch.Tensor):
            continue
        v = v.to(device, non_blocking=True)
        out[k] = v.to(float_dtype) if float_dtype is not None and v.is_floating_point() else v
    return out


def weighted_losses(
    model: nn.Module, batches: Mapping[str, Batch], weights: Mapping[str, float], device, float_dtype=None, *,
    fuse: Optional[Mapping[str, int]] = None, on_pack: Optional[Callable[[PackedBatch], None]] = None,
) -> dict[str, torch.Tensor]:
    """Forward every dataset's micro-batch; `loss` = sum of weight x dataset loss (one graph, one backward). With
    `fuse` (engine.fuse_datasets: each dataset's row length, its max_tokens), all datasets go through the model as
    one packed batch, shown to `on_pack`."""
    moved = {name: move_batch(batch, device, float_dtype) for name, batch in batches.items()}
    if fuse is not None and len(moved) > 1:
        flamingo = getattr(model, "module", model)  # DeepSpeed and DDP wrap it
        packed = pack_datasets(moved, flamingo.media_token_id, flamingo.pad_token_id, fuse)
        if on_pack is not None:
            on_pack(packed)
        losses = dict(model(packed.images, packed.input_ids, packed.attention_mask, labels=packed.labels, layout=packed.layout).group_losses)
    else:
        losses = {
            name: model(b["pixel_values"], b["input_ids"], b.get("attention_mask"), labels=b["labels"], num_images=_as_ints(b.get("num_images"))).loss
            for name, b in moved.items()
        }
    total = None
    for name, loss in losses.items():
        term = loss * float(weights.get(name, 1.0))
        total = term if total is None else total + term
    losses["loss"] = total
    return losses


def _as_ints(counts: Optional[torch.Tensor]) -> Optional[tuple[int, ...]]:
    """The loader's host `num_images` as ints, which DDP and FSDP leave where they are (they move tensor arguments
    to the GPU, where the model's read of them would wait for the device)."""
    return None if counts is None else tuple(counts.tolist())


def fused_row_lengths(model: nn.Module, spec) -> Optional[dict[str, int]]:
    """With engine.fuse_datasets, each dataset's row length (its max_tokens) for `weighted_losses(fuse=...)`, after
    checking that the LM can take packed rows (a clear error before training starts); else None."""
    if not spec.engine.fuse_datasets or len(spec.data.datasets) < 2:
        return None
    lengths = {d.name: d.effective_max_tokens() for d in spec.data.datasets}
    problem = model.packing_problem(max(lengths.values()))
    if problem:
        raise SpecError([f"engine.fuse_datasets: {problem}; set engine.fuse_datasets: false for this LM"])
    return lengths


class PackingReport:
    """`on_pack` for the engines: prints the first packed layout once, on rank 0."""

    def __init__(self, rank: int) -> None:
        self.pending = rank == 0

    def __call__(self, packed: PackedBatch) -> None:
        if self.pending:
            self.pending = False
            print(f"[of_ds] engine.fuse_datasets: {describe_packing(packed)}", flush=True)
