"""Our trainable weights <-> the original OpenFlamingo (main branch) `checkpoint.pt` key layout.

The perceiver and the cross-attention blocks share the original's names (`perceiver.*`,
`lang_encoder.<decoder path>.<i>.gated_cross_attn_layer.*`). The original trained rows of the full input matrix
(`lang_encoder.<embed path>.weight`, resized to the tokenizer's length); we write that matrix with the new-token
rows taken from our decoupled table. For untied LMs we also write the output head (`lang_encoder.<head
path>.weight`), whose new rows we train and the original did not; the original's loader takes it as is.

Under ZeRO-3 call these on gathered (full) parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .flamingo import Flamingo
from .language import module_path

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


def _matrix_keys(model: Flamingo) -> tuple[str, str | None]:
    lm = model.lang_encoder
    embed = f"lang_encoder.{module_path(lm, lm.get_input_embeddings())}.weight"
    head = None if model.new_tokens.tied else f"lang_encoder.{module_path(lm, lm.get_output_embeddings())}.weight"
    return embed, head


def _merged(base: torch.Tensor, table: torch.Tensor, model: Flamingo) -> torch.Tensor:
    """The base matrix cut/padded to the tokenizer's size with the new-token rows written in."""
    nt = model.new_tokens
    rows = min(base.shape[0], nt.vocab_size)
    out = base.new_zeros(nt.vocab_size, base.shape[1])
    out[:rows] = base[:rows]
    out[nt.new_ids] = table.to(out.dtype)
    return out


def to_openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """The trainable weights under the original main-branch `model_state_dict` keys (CPU tensors)."""
    out = {k: v.detach().cpu() for k, v in model.trainable_state_dict().items() if not k.startswith("new_tokens.")}
    embed_key, head_key = _matrix_keys(model)
    lm = model.lang_encoder
    out[embed_key] = _merged(lm.get_input_embeddings().weight.detach(), model.new_tokens.input.weight.detach(), model).cpu()
    if head_key is not None:
        out[head_key] = _merged(lm.get_output_embeddings().weight.detach(), model.new_tokens.output.weight.detach(), model).cpu()
    return out


def unwrap_checkpoint(obj: dict) -> dict[str, torch.Tensor]:
    """A `checkpoint.pt` dict (with `model_state_dict`) or a bare state dict, without DDP's `module.` prefix."""
    sd = obj.get("model_state_dict", obj)
    return {k.removeprefix("module."): v for k, v in sd.items()}


@torch.no_grad()
def load_openflamingo_state_dict(model: Flamingo, state_dict: dict, *, strict: bool = True) -> LoadReport:
    """Load original-layout weights; missing/unexpected keys raise (strict) or are logged and returned."""
    sd = unwrap_checkpoint(state_dict)
    embed_key, head_key = _matrix_keys(model)
    params = dict(model.named_parameters())
    expected = {k for k in model.trainable_state_dict() if not k.startswith("new_tokens.")} | {embed_key} | ({head_key} if head_key else set())
    report = LoadReport(missing=sorted(expected - set(sd)), unexpected=sorted(set(sd) - expected))
    if report.unexpected or report.missing:
        msg = f"OpenFlamingo checkpoint keys differ: missing {report.missing[:8]}, unexpected {report.unexpected[:8]}"
        if strict:
            raise KeyError(msg)
        log.warning(msg)
    nt = model.new_tokens
    for key, value in sd.items():
        if key in (embed_key, head_key):
            if value.shape[0] != nt.vocab_size or value.shape[1] != nt.input.weight.shape[1]:
                raise ValueError(f"{key}: shape {tuple(value.shape)}, expected ({nt.vocab_size}, {nt.input.weight.shape[1]}) for this tokenizer")
            table = nt.input if key == embed_key else nt.output
            table.weight.copy_(value[nt.new_ids.cpu()].to(table.weight))
        elif key in expected:
            if params[key].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {tuple(params[key].shape)}")
            params[key].copy_(value)
    return report
