"""`build_flamingo(model_spec)`: tokenizer, vision tower, LM and Flamingo from one ModelSpec."""

from __future__ import annotations

import contextlib

import torch

from ..spec import ModelSpec
from .flamingo import Flamingo, TokenIds
from .language import build_language_model, find_decoder_layers_path
from .tokenizer import EOC_TOKEN, MEDIA_TOKEN, PAD_TOKEN, load_tokenizer
from .vision import build_vision_encoder


def resolve_token_ids(tokenizer, base_vocab_size: int) -> TokenIds:
    """`<image>`, `<|endofchunk|>`, an added `<PAD>`, and any id past the LM's matrix go to the decoupled tables."""
    media, eoc, pad = (tokenizer.convert_tokens_to_ids(t) for t in (MEDIA_TOKEN, EOC_TOKEN, tokenizer.pad_token))
    new = {media, eoc} | set(range(base_vocab_size, len(tokenizer)))
    if tokenizer.pad_token == PAD_TOKEN:
        new.add(pad)
    return TokenIds(media=media, eoc=eoc, pad=pad, new=tuple(sorted(new)))


def build_flamingo(model_spec: ModelSpec, *, device: str | torch.device = "cpu", meta: bool = False):
    """-> (Flamingo, image_processor, tokenizer), built directly on `device` (random init runs there too).

    `meta=True` builds on the meta device (no memory, no weights) for counting."""
    tokenizer = load_tokenizer(
        model_spec.tokenizer or model_spec.lm.name_or_path,
        offline=model_spec.offline,
        trust_remote_code=model_spec.lm.trust_remote_code,
        cache_dir=model_spec.lm.cache_dir,
    )
    device = torch.device("meta" if meta else device)
    with device if device.type != "cpu" else contextlib.nullcontext():
        visual, image_processor, vis_dim = build_vision_encoder(model_spec.vision, load_weights=not meta, device=device)
        lm = build_language_model(model_spec.lm, offline=model_spec.offline, load_weights=not meta)
        token_ids = resolve_token_ids(tokenizer, lm.get_output_embeddings().weight.shape[0])
        model = Flamingo(
            visual,
            lm,
            vis_dim=vis_dim,
            decoder_layers_attr=find_decoder_layers_path(lm, model_spec.lm.decoder_layers_attr),
            token_ids=token_ids,
            vocab_size=len(tokenizer),
            perceiver=model_spec.perceiver,
            cross_attn=model_spec.cross_attn,
            freeze_new_token_embeddings=model_spec.freeze_lm_embeddings,
            init_new_tokens=not meta,
        )
    if not meta:
        model.to(device)
    return model, image_processor, tokenizer


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (shared tensors counted once); works on meta models."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable}
