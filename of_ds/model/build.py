"""`build_flamingo(model_spec)`: tokenizer, vision tower, LM and Flamingo from one ModelSpec."""

from __future__ import annotations

import contextlib

import torch

from ..spec import LMSpec, ModelSpec
from .flamingo import Flamingo, TokenIds
from .language import build_language_model, find_decoder_layers_path
from .tokenizer import EOC_TOKEN, MEDIA_TOKEN, PAD_TOKEN, add_flamingo_tokens, load_tokenizer
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

    `meta=True` builds on the meta device (no memory, no weights) for counting; a released OpenFlamingo LM whose
    files are not available locally is then counted from its published config (`published_release_stand_ins`)."""
    lm_spec, tokenizer = published_release_stand_ins(model_spec) if meta else (model_spec.lm, None)
    if tokenizer is None:
        tok_name = model_spec.tokenizer or model_spec.lm.name_or_path
        with naming_field("model.tokenizer" if model_spec.tokenizer else "model.lm.name_or_path", tok_name):
            tokenizer = load_tokenizer(
                tok_name,
                offline=model_spec.offline,
                trust_remote_code=model_spec.lm.trust_remote_code,
                cache_dir=model_spec.lm.cache_dir,
            )
    device = torch.device("meta" if meta else device)
    with device if device.type != "cpu" else contextlib.nullcontext():
        visual, image_processor, vis_dim = build_vision_encoder(model_spec.vision, load_weights=not meta, device=device)
        with naming_field("model.lm.name_or_path", lm_spec.name_or_path):
            lm = build_language_model(lm_spec, offline=model_spec.offline, load_weights=not meta)
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


@contextlib.contextmanager
def naming_field(field: str, value):
    """Files that cannot be found (not cached offline, a wrong path or name) fail naming the spec field."""
    try:
        yield
    except OSError as e:
        raise OSError(f"{field} '{value}': {e}") from e


def published_release_stand_ins(model_spec: ModelSpec) -> tuple[LMSpec, object]:
    """For meta builds (dry runs, counts) only: (LM spec, tokenizer or None). Where `model.lm.name_or_path` is the LM
    of a released OpenFlamingo model (`releases.LM_CONFIGS`) and its config.json is not available locally (a local
    dir or the HF cache; nothing is downloaded), the LM spec carries that release's published config; where the
    tokenizer is such an LM's and not available locally, a stand-in with GPT-NeoX's token count (every release's
    tokenizer) is returned, to which the Flamingo tokens are added as to the real one. The counts are the release's.
    Says so in one line. Real builds never come here: missing files fail there, naming the field."""
    from .releases import GPT_NEOX_TOKENS, LM_CONFIGS, fp32_lm_config

    lm = model_spec.lm
    tok_name = model_spec.tokenizer or lm.name_or_path
    cache = lm.cache_dir
    lm_missing = lm.config is None and lm.name_or_path in LM_CONFIGS and not _local_file(lm.name_or_path, "config.json", cache)
    tok_missing = tok_name in LM_CONFIGS and not any(_local_file(tok_name, f, cache) for f in ("tokenizer.json", "tokenizer_config.json"))
    if not (lm_missing or tok_missing):
        return lm, None
    said = []
    if lm_missing:
        lm = lm.model_copy(update={"config": fp32_lm_config(LM_CONFIGS[lm.name_or_path]), "trust_remote_code": False})
        said.append(f"{model_spec.lm.name_or_path}'s published config.json")
    tokenizer = None
    if tok_missing:
        tokenizer = stand_in_tokenizer(GPT_NEOX_TOKENS)
        said.append(f"GPT-NeoX's tokenizer size ({GPT_NEOX_TOKENS:,} tokens + {len(tokenizer) - GPT_NEOX_TOKENS} Flamingo tokens) for {tok_name}")
    print(f"[of_ds] not available locally: counting from {' and '.join(said)}", flush=True)
    return lm, tokenizer


def stand_in_tokenizer(n_tokens: int):
    """A tokenizer of `n_tokens` entries with GPT-NeoX's eos (id 0) and no pad, plus the Flamingo tokens (as
    `load_tokenizer` adds them to a tokenizer whose files name no pad token): for counting only."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    vocab = {eos: 0, **{f"t{i}": i for i in range(1, n_tokens)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=eos)), eos_token=eos, unk_token=eos)
    add_flamingo_tokens(tok, pad_in_files=False)
    return tok


def _local_file(name_or_path: str, filename: str, cache_dir: str | None) -> bool:
    from transformers.utils import cached_file

    return cached_file(
        name_or_path, filename, cache_dir=cache_dir, local_files_only=True,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
    ) is not None


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
