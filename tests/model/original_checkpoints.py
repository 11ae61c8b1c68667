"""Checkpoints written by the original trainer's own `save_checkpoint`, for the loading tests.

The original Flamingo is built at tiny size as `test_vs_original.py` builds it (our LM's weights, our vision tower,
the original's perceiver/cross-attention sizes), frozen as its factory freezes it, trained a step with the AdamW
groups of its train.py (weight decay on `gated_cross_attn` only) and its embedding-gradient mask, and saved by
its `train_utils.save_checkpoint` through a DDP-like wrapper (keys `module.*`), as its train.py calls it.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path

import torch
from transformers import get_constant_schedule_with_warmup

from of_ds.model.build import build_flamingo
from of_ds.model.checkpoint_keys import to_openflamingo_state_dict
from of_ds.spec import CrossAttnSpec, ModelSpec, PerceiverSpec
from of_ds.runtime import seed_everything

from .conftest import encode, lm_config, tiny_spec
from .test_build import bare_lm_like

# family -> (LM_CONFIGS entry, config overrides)
FAMILIES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "gpt_neox": ("gpt_neox", {}),
    "opt": ("opt", {}),
    "mpt": ("mpt", {}),
    "mosaic_gpt": ("mosaic_gpt", {}),
}
LR, WD = 1e-2, 0.1


def model_spec(tokenizer_dir: str, family: str, **overrides) -> ModelSpec:
    base, extra = FAMILIES[family]
    spec = tiny_spec(tokenizer_dir, base, every_n_layers=2, **overrides)
    # the original's fixed sizes
    return spec.updated({"lm.config": {**lm_config(tokenizer_dir, base), **extra}, "perceiver": PerceiverSpec(),
                         "cross_attn": CrossAttnSpec(every_n_layers=2)})


def build_ours(spec: ModelSpec, seed: int = 0):
    seed_everything(seed)
    model, _, tok = build_flamingo(spec)
    return model.eval(), tok


class DDPLike(torch.nn.Module):
    """What the original's train.py hands `save_checkpoint`: the model under `.module`."""

    def __init__(self, model):
        super().__init__()
        self.module = model


def build_original(original, ours, lm_cfg: dict):
    """The original's Flamingo holding `ours`' weights (its new-token rows are ours at init), frozen as its
    factory does (freeze_lm_embeddings=False)."""
    OriginalFlamingo, FlamingoLMMixin, extend_instance = original
    lm = bare_lm_like(ours, lm_cfg)
    lm.resize_token_embeddings(ours.new_tokens.vocab_size, mean_resizing=False)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(ours.decoder_layers_attr)
    clip = types.SimpleNamespace(visual=copy.deepcopy(ours.vision_encoder))
    theirs = OriginalFlamingo(clip, lm, ours.eoc_token_id, ours.media_token_id, vis_dim=ours.vis_dim, cross_attn_every_n_layers=2)
    result = theirs.load_state_dict(to_openflamingo_state_dict(ours), strict=False)
    assert result.unexpected_keys == []
    theirs.requires_grad_(False)
    for part in (theirs.perceiver, theirs.lang_encoder.gated_cross_attn_layers, theirs.lang_encoder.get_input_embeddings()):
        part.requires_grad_(True)
    return theirs.eval()


def batch(tok, seed: int = 0):
    ids, mask = encode(tok, ["a cat <image>a photo of a cat<|endofchunk|> the dog<image>a rocket launches<|endofchunk|>",
                             "<image>a cup of coffee<|endofchunk|>"])
    px = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return px, ids, mask


def train_original(theirs, tok, steps: int = 2):
    """Open gates and perturb, then `steps` AdamW steps as the original's loop takes them. -> (wrapper, opt, sched)"""
    media, eoc = theirs.media_token_id, theirs.eoc_token_id
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad and "embed" not in n and "wte" not in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for layer in theirs.lang_encoder.gated_cross_attn_layers:
            if layer is not None:
                layer.attn_gate.fill_(0.8), layer.ff_gate.fill_(0.6)
    model = DDPLike(theirs)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not getattr(p, "exclude_from_optimizer", False)]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in params if "gated_cross_attn" in n], "weight_decay": WD},
                                   {"params": [p for n, p in params if "gated_cross_attn" not in n], "weight_decay": 0.0}], lr=LR)
    scheduler = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=1)
    theirs.train()
    for step in range(steps):
        px, ids, mask = batch(tok, step)
        labels = ids.masked_fill(mask == 0, -100)
        model.module(vision_x=px[:, :, None], lang_x=ids, attention_mask=mask, labels=labels)[0].backward()
        grad = theirs.lang_encoder.get_input_embeddings().weight.grad  # the original's mask: only the two new rows
        keep = torch.zeros_like(grad)
        keep[media], keep[eoc] = 1, 1
        grad.mul_(keep)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
    theirs.eval()
    return model, optimizer, scheduler


def save_original_checkpoint(train_utils, wrapped, optimizer, scheduler, out_dir: Path, epoch: int = 0) -> Path:
    """The original's `save_checkpoint`, rank 0, no FSDP. -> the checkpoint_{epoch}.pt it wrote."""
    args = types.SimpleNamespace(fsdp=False, fsdp_use_orig_params=False, rank=0, run_name=str(out_dir),
                                 report_to_wandb=False, save_checkpoints_to_wandb=False, delete_previous_checkpoint=False)
    train_utils.save_checkpoint(wrapped, optimizer, scheduler, epoch, args)
    return Path(out_dir) / f"checkpoint_{epoch}.pt"


def load_train_utils(original_tree: Path):
    """The original's train_utils.py as a module (self-contained)."""
    path = original_tree / "open_flamingo/train/train_utils.py"
    module = types.ModuleType("open_flamingo_train_utils_ckpt")
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


def logits_of(model, tok, original: bool = False) -> torch.Tensor:
    px, ids, mask = batch(tok, 99)
    with torch.no_grad():
        if original:
            return model(vision_x=px[:, :, None], lang_x=ids, attention_mask=mask).logits
        return model(px, ids, mask, num_images=torch.tensor([2, 1])).logits


def write_original_checkpoint(original, train_utils, tokenizer_dir: str, family: str, out_dir: Path, seed: int = 0, steps: int = 2):
    """-> (path of the original's checkpoint, the original model after training, our model spec)."""
    spec = model_spec(tokenizer_dir, family)
    ours, tok = build_ours(spec, seed)
    theirs = build_original(original, ours, spec.lm.config)
    wrapped, optimizer, scheduler = train_original(theirs, tok, steps)
    return save_original_checkpoint(train_utils, wrapped, optimizer, scheduler, out_dir), theirs, spec
