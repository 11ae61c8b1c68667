"""Greedy and beam-search decoding for Flamingo with a KV cache and cached image latents.

A small own loop rather than HF `generate`: the new tokens' logits come from the decoupled head, which HF's
loop would not see. Decoded tokens attend to the last image of their row (the prompt's image count is carried as
a text-time offset). Prompts must be left-padded.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cross_attention import build_media_context


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _step(model, latents, ids, attention_mask, num_images, offset, cache, position_ids):
    media = build_media_context(latents, ids, model.media_token_id, num_images, time_offset=offset)
    hidden, cache = model.run_lm(ids, attention_mask, media, cache=cache, position_ids=position_ids, use_cache=True)
    logits = model.compute_logits(hidden[:, -1]).float()
    return logits, cache, offset + (ids == model.media_token_id).sum(-1)


def greedy_search(model, latents, input_ids, attention_mask, num_images: Optional[torch.Tensor], max_new_tokens: int, eos: int) -> torch.Tensor:
    b = input_ids.shape[0]
    offset = torch.zeros(b, dtype=torch.long, device=input_ids.device)
    positions = _positions(attention_mask)
    logits, cache, offset = _step(model, latents, input_ids, attention_mask, num_images, offset, None, positions)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    out = []
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1).masked_fill(done, model.pad_token_id)
        out.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        attention_mask = torch.cat((attention_mask, attention_mask.new_ones(b, 1)), dim=1)
        positions = positions[:, -1:] + 1
        logits, cache, offset = _step(model, latents, nxt[:, None], attention_mask, num_images, offset, cache, positions)
    return torch.cat((input_ids, torch.stack(out, dim=1)), dim=1) if out else input_ids


def beam_search(
    model, latents, input_ids, attention_mask, num_images, max_new_tokens: int, eos: int, num_beams: int, length_penalty: float
) -> torch.Tensor:
    """Standard beam search; a finished hypothesis scores sum(logp) / len**length_penalty; rows stop once no live beam can win."""
    b, k = input_ids.shape[0], num_beams
    rep = lambda t: None if t is None else t.repeat_interleave(k, dim=0)  # noqa: E731
    latents, ids, mask, num_images = rep(latents), rep(input_ids), rep(attention_mask), rep(num_images)
    offset = torch.zeros(b * k, dtype=torch.long, device=ids.device)
    positions = _positions(mask)
    logits, cache, offset = _step(model, latents, ids, mask, num_images, offset, None, positions)
    scores = torch.full((b, k), float("-inf"), device=ids.device)
    scores[:, 0] = 0.0  # identical beams at the start: keep one
    generated = ids.new_zeros(b * k, 0)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(b)]
    row_done = [False] * b
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits, -1).view(b, k, -1) + scores[:, :, None]
        top, idx = logp.view(b, -1).topk(2 * k, dim=-1)
        vocab = logp.shape[-1]
        beam_src, token = idx // vocab, idx % vocab
        new_scores = torch.full((b, k), float("-inf"), device=ids.device)
        pick_beam = torch.zeros(b, k, dtype=torch.long, device=ids.device)
        pick_tok = torch.full((b, k), model.pad_token_id, dtype=torch.long, device=ids.device)
        for r in range(b):
            if row_done[r]:
                continue
            n = 0
            for s, src, tok in zip(top[r].tolist(), beam_src[r].tolist(), token[r].tolist()):
                if tok == eos:
                    seq = torch.cat((generated[r * k + src], generated.new_tensor([tok])))
                    finished[r].append((s / (step + 1) ** length_penalty, seq))
                    continue
                new_scores[r, n], pick_beam[r, n], pick_tok[r, n] = s, src, tok
                n += 1
                if n == k:
                    break
            finished[r].sort(key=lambda x: -x[0])
            del finished[r][k:]
            best_live = new_scores[r, 0].item() / (step + 1) ** length_penalty
            if len(finished[r]) == k and finished[r][-1][0] >= best_live:
                row_done[r] = True
        if all(row_done):
            break
        beam_idx = (torch.arange(b, device=ids.device)[:, None] * k + pick_beam).view(-1)
        generated = torch.cat((generated[beam_idx], pick_tok.view(-1, 1)), dim=1)
        scores = new_scores
        cache.reorder_cache(beam_idx)
        mask = torch.cat((mask[beam_idx], mask.new_ones(b * k, 1)), dim=1)
        positions = positions[beam_idx, -1:] + 1
        offset = offset[beam_idx]
        logits, cache, offset = _step(model, latents, pick_tok.view(-1, 1), mask, num_images, offset, cache, positions)
    rows = []
    for r in range(b):
        if not row_done[r]:  # ran out of tokens: live beams compete with finished ones
            for j in range(k):
                if scores[r, j] > float("-inf"):
                    finished[r].append((scores[r, j].item() / max(generated.shape[1], 1) ** length_penalty, generated[r * k + j]))
        rows.append(max(finished[r], key=lambda x: x[0])[1])
    width = max(len(s) for s in rows)
    new = input_ids.new_full((b, width), model.pad_token_id)
    for r, s in enumerate(rows):
        new[r, : len(s)] = s
    return torch.cat((input_ids, new), dim=1)
