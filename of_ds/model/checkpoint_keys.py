"""Our trainable weights <-> the original OpenFlamingo (main branch) `checkpoint.pt` key layout.

The perceiver and the cross-attention blocks share the original's names (`perceiver.*`,
`lang_encoder.<decoder path>.<i>.gated_cross_attn_layer.*`). The original trained rows of the full input matrix
(`lang_encoder.<embed path>.weight`, resized to the tokenizer's length); we write that matrix with the new-token
rows taken from our decoupled table. For untied LMs we also write the output head (`lang_encoder.<head
path>.weight`), whose new rows we train and the original did not; the original's loader takes it as is.

Loading reads what the original's `save_checkpoint` writes (its `filter_state_dict_to_trainable` keeps the trainable
weights, every frozen parameter whose name contains "embed", and a tied head's duplicate of the input matrix), a
bare released `checkpoint.pt`, and what its DDP / FSDP / activation-checkpointing wrappers add to the names.
Frozen weights in the file are compared with the model's own (any difference is reported, never loaded).

Under ZeRO-3 call these on gathered (full) parameters.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .flamingo import Flamingo
from .language import module_path

log = logging.getLogger(__name__)

# name segments the original's wrappers insert (DDP, FSDP, activation checkpointing, torch.compile)
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# the original's second registrations of the decoder blocks, -> their place inside our FlamingoLayer
ALIASES = {"old_decoder_blocks": "decoder_layer", "gated_cross_attn_layers": "gated_cross_attn_layer"}
# output heads the LM's transformers-4 class named otherwise (GPT-NeoX: `embed_out`, transformers 5: `lm_head`)
OLD_HEAD_NAMES = ("lang_encoder.embed_out.weight",)


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    frozen_differences: dict[str, float] = field(default_factory=dict)  # file key -> max abs difference
    head_absent: bool = False  # untied head not in the file: its new-token rows keep their initialisation

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


@dataclass(frozen=True)
class MatrixKeys:
    embed: str  # the input matrix
    head: str  # the output head (for tied LMs the input matrix's duplicate registration)
    tied: bool


def _matrix_keys(model: Flamingo) -> MatrixKeys:
    lm = model.lang_encoder
    embed = f"lang_encoder.{module_path(lm, lm.get_input_embeddings())}.weight"
    head = f"lang_encoder.{module_path(lm, lm.get_output_embeddings())}.weight"
    return MatrixKeys(embed, head, model.new_tokens.tied)


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
    keys = _matrix_keys(model)
    lm = model.lang_encoder
    out[keys.embed] = _merged(lm.get_input_embeddings().weight.detach(), model.new_tokens.input.weight.detach(), model).cpu()
    if not keys.tied:
        out[keys.head] = _merged(lm.get_output_embeddings().weight.detach(), model.new_tokens.output.weight.detach(), model).cpu()
    return out


# ------------------------------------------------------------------------------------------------- file -> keys
def clean_key(key: str) -> str:
    """A key without DDP's leading `module.` and the FSDP / checkpoint-wrapper / compile segments anywhere."""
    parts = [p for p in key.split(".") if p not in WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def unwrap_checkpoint(obj: dict) -> dict[str, torch.Tensor]:
    """A `checkpoint.pt` dict (with `model_state_dict`) or a bare state dict, with wrapper names removed."""
    sd = obj.get("model_state_dict", obj)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = clean_key(key)
        if name in out and not torch.equal(out[name], value):
            raise ValueError(f"checkpoint: {key} and another key both name {name}, with different values")
        out[name] = value
    return out


def canonical_key(key: str, model: Flamingo, keys: MatrixKeys, names: set[str]) -> str:
    """The model's name for a file key: the original's duplicate registrations of the decoder blocks map into
    our FlamingoLayers, an old head name to the head."""
    m = re.match(r"lang_encoder\.(old_decoder_blocks|gated_cross_attn_layers)\.(\d+)\.(.*)", key)
    if m:
        return f"lang_encoder.{model.decoder_layers_attr}.{m[2]}.{ALIASES[m[1]]}.{m[3]}"
    if key in OLD_HEAD_NAMES and key not in names:
        return keys.head
    return key


def _check_shape(key: str, value: torch.Tensor, shape: tuple) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(shape)} in the model")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max()) if a.numel() else 0.0


def _matrix_differences(value: torch.Tensor, base: torch.Tensor, model: Flamingo) -> Optional[float]:
    """Max abs difference between the file's matrix and the LM's own on the rows of the LM's own tokens."""
    nt = model.new_tokens
    rows = min(base.shape[0], nt.vocab_size)
    own = torch.ones(rows, dtype=torch.bool)
    own[nt.new_ids[nt.new_ids < rows].cpu()] = False
    diff = _max_diff(value[:rows][own], base[:rows][own])
    return diff if diff > 0 else None


def _pick_matrices(sd: dict, keys: MatrixKeys) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """-> (input matrix, output head) from the file; a tied head's duplicate stands in for a missing input matrix
    (the original filters a frozen input matrix out unless its name contains "embed", not its head's duplicate)."""
    embed, head = sd.get(keys.embed), sd.get(keys.head)
    if keys.tied:
        if embed is not None and head is not None and not torch.equal(embed, head):
            raise ValueError(f"{keys.head}: differs from {keys.embed}, which this LM ties it to")
        return (embed if embed is not None else head), None
    return embed, head


def _report_differences(report: LoadReport) -> None:
    if report.frozen_differences:
        listed = ", ".join(f"{k} (max abs difference {d:.3g})" for k, d in sorted(report.frozen_differences.items()))
        msg = (f"OpenFlamingo checkpoint: {len(report.frozen_differences)} frozen weight(s) differ from the model's own "
               f"(the model keeps its own; is the LM/vision tower the one the checkpoint was trained with?): {listed}")
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)


@torch.no_grad()
def load_openflamingo_state_dict(model: Flamingo, state_dict: dict, *, strict: bool = True) -> LoadReport:
    """Load original-layout weights into `model` (built whole, as it will train).

    Trainable weights are loaded; the input matrix's (and an untied head's) new-token rows go to the decoupled
    tables; frozen weights in the file are compared with the model's own and differences reported. Missing trainable
    keys and keys the model lacks raise KeyError (strict) or are logged and returned; a wrong shape raises ValueError.
    """
    file_sd = unwrap_checkpoint(state_dict)
    keys = _matrix_keys(model)
    own = model.state_dict(keep_vars=True)
    names = set(own)
    sd: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # canonical -> the file's key, for messages
    report = LoadReport()
    for key, value in file_sd.items():
        name = canonical_key(key, model, keys, names)
        if name in sd:
            if not torch.equal(sd[name], value):
                raise ValueError(f"checkpoint: {origin[name]} and {key} are the same weight with different values")
            continue
        if name not in names:
            report.unexpected.append(key)
            continue
        sd[name], origin[name] = value, key
    embed, head = _pick_matrices(sd, keys)
    required = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("new_tokens.")]
    report.missing = sorted(n for n in required if n not in sd)
    if embed is None and model.new_tokens.input.weight.requires_grad:
        report.missing.append(keys.embed)  # trained unless the run set freeze_lm_embeddings
    if report.missing or report.unexpected:
        msg = f"OpenFlamingo checkpoint keys differ: missing {report.missing[:8]}, unexpected {report.unexpected[:8]}"
        if strict:
            raise KeyError(msg + " (a missing key is a trainable weight; an unexpected one maps to nothing in the model)")
        log.warning(msg)

    nt, lm = model.new_tokens, model.lang_encoder
    matrices = [(keys.embed, embed, lm.get_input_embeddings().weight, nt.input)]
    if not keys.tied:
        matrices.append((keys.head, head, lm.get_output_embeddings().weight, nt.output))
        report.head_absent = head is None
    for name, value, base, table in matrices:
        if value is None:
            continue
        _check_shape(origin.get(name, name), value, (nt.vocab_size, base.shape[1]))
        diff = _matrix_differences(value, base, model)
        if diff is not None:
            report.frozen_differences[f"{origin.get(name, name)} (rows of the LM's own tokens)"] = diff
        table.weight.copy_(value[nt.new_ids.cpu()].to(table.weight))
    for name, value in sd.items():
        if name in (keys.embed, keys.head):
            continue
        target = own[name]
        _check_shape(origin[name], value, tuple(target.shape))
        if isinstance(target, torch.nn.Parameter) and target.requires_grad:
            target.copy_(value)
        elif (diff := _max_diff(value, target)) > 0:
            report.frozen_differences[origin[name]] = diff
    if report.head_absent:
        log.info("OpenFlamingo checkpoint: no %s (frozen, filtered out by the original's save); the new tokens' "
                 "output rows keep their initialisation", keys.head)
    _report_differences(report)
    return report


# ------------------------------------------------------------------------------------------- optimizer state
def _names(model: Flamingo) -> set[str]:
    """Every parameter and buffer name (shared ones under each name), without touching a partitioned tensor."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def _original_param_order(model: Flamingo, file_sd: dict, keys: MatrixKeys) -> list[str]:
    """The original's optimizer parameters, in index order, under our names: its `params_to_optimize` (trainable
    parameters in registration order: the file's key order) grouped as its `get_grouped_params` does, the
    `gated_cross_attn` ones first. The input matrix counts when the model trains the new tokens' rows."""
    names = _names(model)
    order: list[str] = []
    for key in file_sd:
        name = canonical_key(key, model, keys, names)
        trained = name.startswith("perceiver.") or ".gated_cross_attn_layer." in name
        if (trained or (name == keys.embed and model.new_tokens.input.weight.requires_grad)) and name not in order:
            order.append(name)
    return [n for n in order if "gated_cross_attn" in n] + [n for n in order if "gated_cross_attn" not in n]


def original_optimizer_state(model: Flamingo, checkpoint: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The original's AdamW state (`optimizer_state_dict`, indexed as its train.py built the optimizer) -> our
    parameter name -> {"step", "exp_avg", "exp_avg_sq"}; the input matrix's new-token rows become the input
    table's. Every state tensor's shape is checked against the parameter its index maps to."""
    if "optimizer_state_dict" not in checkpoint:
        raise KeyError("checkpoint: no optimizer_state_dict (a bare state dict holds weights only)")
    osd, file_sd = checkpoint["optimizer_state_dict"], unwrap_checkpoint(checkpoint)
    keys = _matrix_keys(model)
    if any(isinstance(k, str) for k in osd["state"]):  # FSDP's optim_state_dict: keyed by parameter name
        by_index = {k: clean_key(k) for k in osd["state"]}
    else:
        order = _original_param_order(model, file_sd, keys)
        indices = [i for group in osd["param_groups"] for i in group["params"]]
        if len(indices) != len(order):
            raise ValueError(f"optimizer state: {len(indices)} parameters, but the checkpoint's keys give {len(order)} "
                             f"trainable ones (was it written with another freeze_lm_embeddings?)")
        by_index = dict(zip(indices, order))
    nt, out, names = model.new_tokens, {}, _names(model)
    for index, state in osd["state"].items():
        name = canonical_key(by_index[index], model, keys, names)
        if name not in file_sd:
            raise KeyError(f"optimizer state {index}: {name} is not among the checkpoint's weights")
        for moment in ("exp_avg", "exp_avg_sq"):
            if tuple(state[moment].shape) != tuple(file_sd[name].shape):
                raise ValueError(f"optimizer state {index} ({name}): {moment} has shape {tuple(state[moment].shape)}, "
                                 f"the parameter {tuple(file_sd[name].shape)}")
        moments = {m: state[m].float() for m in ("exp_avg", "exp_avg_sq")}
        if name == keys.embed:
            name, moments = "new_tokens.input.weight", {m: v[nt.new_ids.cpu()] for m, v in moments.items()}
        out[name] = {"step": torch.as_tensor(state["step"], dtype=torch.float32).clone(), **moments}
    return out
