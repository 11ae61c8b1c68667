"""Training labels from token ids, vectorised: the original main branch's masking (its train loop's `labels` construction)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
INTERLEAVED_KINDS = ("mmc4", "chatgpt", "interleaved")


def build_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str, media_id: int, eoc_id: int, pad_id: int
) -> torch.Tensor:
    """[B, L] labels with -100 where not trained.

    laion: pad and `<image>` masked (caption, `<|endofchunk|>` and eos are trained).
    interleaved (mmc4/chatgpt): also everything before the first `<image>`, and the tokens after each
    `<|endofchunk|>` up to the next `<image>`; so each image's following text up to its `<|endofchunk|>` is trained.
    """
    if kind != "laion" and kind not in INTERLEAVED_KINDS:
        raise ValueError(f"build_labels: unknown kind '{kind}' (laion, {', '.join(INTERLEAVED_KINDS)})")
    media = input_ids == media_id
    drop = (input_ids == pad_id) | (attention_mask == 0) | media
    if kind in INTERLEAVED_KINDS:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_media = torch.where(media, pos, -1).cummax(dim=1).values
        last_eoc = torch.where(input_ids == eoc_id, pos, -1).cummax(dim=1).values
        eoc_before = torch.nn.functional.pad(last_eoc[:, :-1], (1, 0), value=-1)  # strictly before each position
        drop |= (last_media < 0) | (eoc_before > last_media)
    return input_ids.masked_fill(drop, IGNORE_INDEX)
