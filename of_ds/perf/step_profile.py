"""Where one training step's time goes: timestamps at module boundaries, forward and backward, summed by part.

Marks are CUDA events on the current stream (CPU clock reads on a CPU run) taken by forward hooks on the model's
parts and by gradient hooks on their input/output tensors. Each mark names the part that runs *next*, so the time
between consecutive marks belongs to the earlier mark's part and the parts add up to the whole step (launch gaps
included, where the GPU waited for the host). Backward order: head + loss, then for each layer from the last the
decoder layer and its cross-attention block, then the embeddings and the perceiver (which receives its gradient
from every block), then the engine's own epilogue (gradient reduction).

Not for activation-checkpointed models: recomputation would be counted under backward parts it does not belong to.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

PARTS = (
    "inputs", "vision_fwd", "perceiver_fwd", "cross_attn_fwd", "lm_layers_fwd", "lm_other_fwd", "head_loss_fwd",
    "head_loss_bwd", "lm_layers_bwd", "cross_attn_bwd", "embed_perceiver_bwd", "optimizer",
)


class _Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1000.0
        return b - a


class StepBreakdown:
    """Attach to a plain Flamingo; call `mark(part)` around the step phases the model cannot see (inputs,
    backward start, optimizer, end) and read `seconds()` after a synchronize."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.clock = _Clock(device)
        self.marks: list[tuple[str, object]] = []
        self.enabled = False
        self._handles: list = []
        self._attach(model)

    # ----------------------------------------------------------------------------------------------- recording
    def mark(self, part: str) -> None:
        if self.enabled:
            self.marks.append((part, self.clock.mark()))

    def _grad_mark(self, tensor, part: str) -> None:
        if self.enabled and isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda _g: self.mark(part))

    def _fwd(self, module: nn.Module, before: str, after: str, grad_out: Optional[str] = None, grad_in: Optional[str] = None) -> None:
        def pre(_m, args, kwargs):
            self.mark(before)
            if grad_in is not None:
                self._grad_mark(args[0] if args else kwargs.get("hidden_states"), grad_in)

        def post(_m, _args, _kwargs, out):
            self.mark(after)
            if grad_out is not None:
                self._grad_mark(out[0] if isinstance(out, (tuple, list)) else out, grad_out)

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _attach(self, model: nn.Module) -> None:
        self._fwd(model.vision_encoder, "vision_fwd", "lm_other_fwd")
        self._fwd(model.perceiver, "perceiver_fwd", "lm_other_fwd")
        for i, layer in enumerate(model.flamingo_layers()):
            below = "lm_layers_bwd" if i > 0 else "embed_perceiver_bwd"  # what backward runs after this layer's
            xattn = layer.gated_cross_attn_layer
            if xattn is not None:
                self._fwd(xattn, "cross_attn_fwd", "lm_other_fwd", grad_out="cross_attn_bwd", grad_in=below)
            # decoder input: when a block sits before the layer, that input is the block's output (same tensor)
            self._fwd(layer.decoder_layer, "lm_layers_fwd", "lm_other_fwd", grad_out="lm_layers_bwd",
                      grad_in="cross_attn_bwd" if xattn is not None else below)
        self._fwd(model.lang_encoder.base_model, "lm_other_fwd", "head_loss_fwd")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def recording(self) -> Iterator["StepBreakdown"]:
        """Marks are taken only inside; `mark("inputs")` first and `mark("end")` last are the caller's."""
        self.marks.clear()
        self.enabled = True
        try:
            yield self
        finally:
            self.enabled = False

    # --------------------------------------------------------------------------------------------------- result
    def seconds(self) -> dict[str, float]:
        """Seconds per part over the recorded step (call after `torch.cuda.synchronize()`)."""
        out: dict[str, float] = defaultdict(float)
        for (part, a), (_, b) in zip(self.marks, self.marks[1:]):
            out[part] += self.clock.elapsed(a, b)
        return {p: out[p] for p in (*PARTS, *sorted(set(out) - set(PARTS))) if p in out}


def run_profiled_step(breakdown: StepBreakdown, step: Callable[[Callable[[str], None]], None], sync: Callable[[], None]) -> dict[str, float]:
    """Run `step(mark)` once with marks recorded; `step` calls `mark("head_loss_bwd")` before backward and
    `mark("optimizer")` before the optimizer step. Returns seconds per part, plus `total`."""
    sync()
    with breakdown.recording():
        breakdown.mark("inputs")
        step(breakdown.mark)
        breakdown.mark("end")
    sync()
    parts = breakdown.seconds()
    parts["total"] = sum(parts.values())
    return parts
