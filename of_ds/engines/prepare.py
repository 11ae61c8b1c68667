"""The training features, applied to the plain model in one place and one order before an engine wraps it."""

from __future__ import annotations

from typing import Optional

from ..spec import RunSpec
from .base import fused_row_lengths


def prepare_model(model, spec: RunSpec) -> Optional[dict[str, int]]:
    """Train mode (an LM loaded with `from_pretrained` comes in eval mode, and its dropout, OPT's 0.1, would
    otherwise be off for the whole run, as the original's loop avoids), the packed-row check
    (`engine.fuse_datasets`: a clear error before training), activation checkpointing, loss chunking, then
    `torch.compile` of `engine.compile_targets` in place (lazy: it traces the modules as the settings above leave
    them, before any wrapper sees them). -> each dataset's packed row length, or None (a pass per dataset)."""
    model.train()
    fuse = fused_row_lengths(model, spec)
    model.set_activation_checkpointing(spec.engine.activation_checkpointing)
    model.set_loss_chunking(spec.engine.loss_chunk_tokens)
    e = spec.engine
    if e.compile:
        model.compile_parts(e.compile_targets, **({} if e.compile_mode == "default" else {"mode": e.compile_mode}))
    return fuse
