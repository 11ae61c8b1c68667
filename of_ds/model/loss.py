"""The next-token loss: fp32 cross-entropy over the LM head's logits, whole, per position, in chunks, or fused.

Every path takes the targets by shifting the labels (`next_token_targets`), never the [B, L, V] logits, and
averages over the labels that are not -100 (`IGNORE_INDEX`), as the original's `CrossEntropyLoss` on shifted
logits did.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .labels import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] the label each position predicts (the next one; -100 at the end). The labels are shifted, not the
    logits: slicing the [B, L, V] logits would copy them."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (fp32), mean over labels != -100; 0 (not NaN) when nothing is labelled."""
    target = next_token_targets(labels).reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (target != IGNORE_INDEX).sum().clamp(min=1)


def _chunk_loss(hidden: torch.Tensor, target: torch.Tensor, logits_fn, reduction: str) -> torch.Tensor:
    return F.cross_entropy(logits_fn(hidden).float(), target, ignore_index=IGNORE_INDEX, reduction=reduction)


def position_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L] fp32 next-token cross-entropy per position, 0 where the target is -100."""
    target = next_token_targets(labels).reshape(-1)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(labels.shape)


def mean_loss(per_position: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean of `position_losses` over the targets (0 when there is none): `causal_lm_loss`."""
    return per_position.sum() / (next_token_targets(labels) != IGNORE_INDEX).sum().clamp(min=1)


def group_means(per_position: torch.Tensor, labels: torch.Tensor, groups) -> dict[str, torch.Tensor]:
    """Each (name, first row, end row) group's mean over its targets (0 when it has none), as `causal_lm_loss`."""
    counted = next_token_targets(labels) != IGNORE_INDEX
    return {name: per_position[r0:r1].sum() / counted[r0:r1].sum().clamp(min=1) for name, r0, r1, *_ in groups}


class ChunkedLMLoss(nn.Module):
    """`causal_lm_loss(logits_fn(hidden), labels)` without the [B·L, V] logits: per chunk of `chunk_tokens`
    positions the logits and the fp32 cross-entropy sum, recomputed in backward (non-reentrant checkpoint). Equal
    to the one-pass loss up to the order of the fp32 sum.

    A module (no parameters) rather than a function so that its output is a tensor DeepSpeed ZeRO-3 hooks: while
    its backward runs, ZeRO-3 keeps the LM head it gathers for the recomputation."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk_tokens = 0

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, logits_fn, per_position: bool = False) -> torch.Tensor:
        """The mean loss, or with `per_position` each position's [B, L] (0 where not a target)."""
        target = next_token_targets(labels).reshape(-1)
        reduction = "none" if per_position else "sum"
        parts = [
            checkpoint(_chunk_loss, h, t, logits_fn, reduction, use_reentrant=False)
            for h, t in zip(hidden.reshape(-1, hidden.shape[-1]).split(self.chunk_tokens), target.split(self.chunk_tokens))
        ]
        if per_position:
            return torch.cat(parts).view(labels.shape)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total / (target != IGNORE_INDEX).sum().clamp(min=1)
