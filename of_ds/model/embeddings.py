"""Decoupled embeddings for the tokens the LM's own matrices do not own (`<image>`, `<|endofchunk|>`, `<PAD>`).

The LM's input matrix and output head stay untouched and frozen; a small input table and output table hold the
new tokens (IDEFICS-style). This is ZeRO-3 safe (under ZeRO-3 a slice of a partitioned weight cannot be made
trainable, nor a weight read outside its module's forward) because every weight is used by calling the module that
owns it. New ids may lie inside the LM
matrix's padding rows (MPT: 50432 rows for 50277 tokens) or beyond it; both are routed to the tables.

Only the rows of `trainable_ids` (`<image>` and `<|endofchunk|>`) learn, as the original's gradient mask
(`train_utils.py`: every embedding row's gradient but those two zeroed): `<PAD>` and any other id past the LM's
matrix keep their initial rows, in both tables. The tables' other rows get an exact zero gradient (so AdamW,
without weight decay on them, never moves them), applied inside the modules' own forwards.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RowGradientMask:
    """Mixin for a module with a `weight`: which of its rows receive gradients (a bool buffer, and a host flag so
    that the forward never reads the device)."""

    def set_trainable_rows(self, trainable: Sequence[bool]) -> None:
        self.all_rows_trainable = all(trainable)
        self.register_buffer("trainable_rows", torch.tensor(list(trainable), dtype=torch.bool), persistent=False)

    def masked_weight(self) -> torch.Tensor:
        """`weight`, with the rows outside `trainable_rows` cut off from autograd (same values)."""
        w = self.weight
        return w if self.all_rows_trainable else torch.where(self.trainable_rows[:, None], w, w.detach())


class PartlyTrainableEmbedding(nn.Embedding, RowGradientMask):
    """An embedding table in which only the rows of `trainable` receive gradients."""

    def __init__(self, num: int, dim: int, trainable: Sequence[bool]):
        super().__init__(num, dim)
        self.set_trainable_rows(trainable)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.masked_weight())


class PartlyTrainableLinear(nn.Linear, RowGradientMask):
    """A bias-free output table in which only the rows (output columns) of `trainable` receive gradients."""

    def __init__(self, dim: int, num: int, trainable: Sequence[bool]):
        super().__init__(dim, num, bias=False)
        self.set_trainable_rows(trainable)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.masked_weight())


class NewTokenEmbeddings(nn.Module):
    """Input table `input` [K, D] and output table `output` (Linear D->K, sharing `input.weight` when tied); only
    the rows of `trainable_ids` learn."""

    def __init__(self, new_token_ids: Sequence[int], base_vocab_size: int, vocab_size: int, dim: int, *, tied: bool,
                 trainable_ids: Sequence[int]):
        super().__init__()
        ids = sorted(set(int(i) for i in new_token_ids))
        if ids[-1] >= vocab_size:
            raise ValueError(f"new token id {ids[-1]} is outside the tokenizer's vocabulary ({vocab_size})")
        wanted = set(trainable_ids)
        if not wanted <= set(ids):
            raise ValueError(f"trainable ids {sorted(wanted - set(ids))} are not among the new ids {ids}")
        self.base_vocab_size = int(base_vocab_size)
        self.vocab_size = int(vocab_size)  # the tokenizer's; the LM matrix may have more (padding) rows or fewer
        self.tied = tied
        slot = torch.full((self.vocab_size,), -1, dtype=torch.long)
        slot[ids] = torch.arange(len(ids))
        self.register_buffer("new_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.register_buffer("slot_of_id", slot, persistent=False)
        # all new ids appended right after the matrix: logits are a plain concat
        self._appended = ids == list(range(self.base_vocab_size, self.vocab_size))
        trainable = [i in wanted for i in ids]
        self.input = PartlyTrainableEmbedding(len(ids), dim, trainable)
        self.output = PartlyTrainableLinear(dim, len(ids), trainable)
        if tied:
            self.output.weight = self.input.weight

    @torch.no_grad()
    def init_from(self, base_input: nn.Embedding, base_output: Optional[nn.Module]) -> None:
        """Start each new row from the LM's own row when the id is a padding row of the matrix, else from its mean row."""
        for table, base in ((self.input, base_input), (None if self.tied else self.output, base_output)):
            if table is None or base is None:
                continue
            w = base.weight
            rows = w.mean(dim=0, keepdim=True).expand(len(self.new_ids), -1).clone()
            inside = self.new_ids < w.shape[0]
            rows[inside] = w[self.new_ids[inside]]
            table.weight.copy_(rows.to(table.weight.dtype))

    def is_new(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.slot_of_id[input_ids] >= 0

    def embed(self, input_ids: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """[B, L] ids -> [B, L, D]: new ids from `input`, all others from the LM's own embedding module `base`."""
        slot = self.slot_of_id[input_ids]
        is_new = slot >= 0
        old = base(input_ids.masked_fill(is_new, 0))
        new = self.input(slot.clamp(min=0)).to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)

    def logits(self, hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """[..., D] -> [..., vocab_size]: the LM head's logits (cut or padded to the tokenizer's size, as the
        original's resize) with the new ids' columns from `output`."""
        return self.combine(*self.logit_parts(hidden, head))

    def logit_parts(self, hidden: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The two matmuls: the LM head's logits [..., rows of its matrix] and the new tokens' [..., K]."""
        base = head(hidden)
        return base, self.output(hidden).to(base.dtype)

    def combine(self, base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """`logit_parts` -> [..., vocab_size] logits."""
        if self._appended:
            return torch.cat((base, new), dim=-1)
        extra = self.vocab_size - base.shape[-1]
        base = F.pad(base, (0, extra)) if extra > 0 else base[..., : self.vocab_size]
        return base.index_copy(-1, self.new_ids, new)
