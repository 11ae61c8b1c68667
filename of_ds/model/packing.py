"""One LM pass for every dataset's micro-batch (`engine.fuse_datasets`).

The step loop feeds each dataset's micro-batch separately: at the 3B recipe 32 MMC4 rows of 256 tokens and 64 LAION
rows of 32 tokens each go through the vision tower, the perceiver and every LM layer, so the LAION pass launches as
many kernels as the MMC4 one for a fifth of the work. `pack_datasets` lays the rows of all datasets out as one batch:
short rows are packed end to end into rows of the longest length (8 LAION rows of 32 tokens per 256-token row), and
the model runs once (`Flamingo.forward(..., layout=...)`):

- self-attention is block-diagonal: a token attends only to earlier tokens of its own original row (its segment),
  with positions counted from the segment's start, so each segment sees what it saw alone;
- each token's image is found in its original row, then shifted to the slot where that row's images sit in the
  packed row (LAION row j of a packed row has its image in slot j); unused slots are zeros no token attends to;
- the first label of each segment is ignored: the previous segment's last token must not predict it (alone, a row's
  first token was never a target either); each dataset's loss is the mean over its own rows' targets.

Losses and gradients equal those of the separate passes up to float rounding (`tests/model/test_packing.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from .cross_attention import token_media_times
from .inputs import check_batch, single_frame
from .labels import IGNORE_INDEX

@dataclass(frozen=True)
class PackedLayout:
    """Where each dataset's rows, tokens and images went; what the model needs besides the token tensors."""

    image_slots: torch.Tensor  # [N] long: flat slot (row x slots_per_row + slot) of each of the N packed images
    slots_per_row: int
    text_time: torch.Tensor  # [B, L] long: 1-based slot of the image a token attends to (0: none)
    has_media: torch.Tensor  # [B, L] bool: that image is real
    segment_ids: torch.Tensor  # [B, L] long: a token attends only within its segment
    position_ids: torch.Tensor  # [B, L] long: position inside the segment
    groups: tuple[tuple[str, int, int, int], ...]  # (dataset, first row, end row, its rows per packed row)


@dataclass(frozen=True)
class PackedBatch:
    images: torch.Tensor  # [N, 3, H, W]: the real images of every dataset, in `layout.image_slots` order
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    layout: PackedLayout


def pack_factor(rows: int, length: int, target: int) -> int:
    """How many rows of `length` tokens share one row of `target`: the largest divisor of `rows` that fits (so no
    packed row is left part empty)."""
    if rows < 1:
        raise ValueError("pack_factor: a micro-batch without rows")
    most = min(rows, max(1, target // length))
    return max(k for k in range(1, most + 1) if rows % k == 0)


def pack_datasets(
    batches: Mapping[str, Mapping[str, torch.Tensor]], media_token_id: int, pad_token_id: int,
    row_lengths: Optional[Mapping[str, int]] = None,
) -> PackedBatch:
    """Lay out every dataset's micro-batch (`pixel_values` [B, T, 3, H, W], `input_ids`, `attention_mask`, `labels`,
    optional host `num_images` [B]) as one packed batch. Token tensors on the device, `num_images` on the host: no
    device sync. Rows are right-padded, as the loaders make them (a left-padded row's padding would sit between the
    segments and its positions would not restart at its first token).

    `row_lengths` (each dataset's `max_tokens`): rows are first padded to it, so the layout is the same every step
    whatever the longest row of a batch (LAION batches are padded to their longest caption): static shapes for
    torch.compile, and the memory plan's slots."""
    if not batches:
        raise ValueError("pack_datasets: no batches")
    parts = {name: _unpack_fields(name, b) for name, b in batches.items()}
    for name, p in parts.items():
        _pad_rows(name, p, (row_lengths or {}).get(name), pad_token_id)
    target = max(p["input_ids"].shape[1] for p in parts.values())
    factors = {name: pack_factor(p["input_ids"].shape[0], p["input_ids"].shape[1], target) for name, p in parts.items()}
    slots = max(factors[name] * p["pixels"].shape[1] for name, p in parts.items())
    tokens: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "attention_mask", "labels", "text_time", "has_media", "segment_ids", "position_ids")}
    images, image_slots, groups = [], [], []
    row0 = 0
    for name, p in parts.items():
        k = factors[name]
        packed = _pack_rows(p, k, target, media_token_id, pad_token_id)
        for key, value in packed.items():
            tokens[key].append(value)
        src, dst = _image_slots(p["num_images"], p["pixels"].shape[1], k, row0, slots)
        flat = p["pixels"].flatten(0, 1)
        images.append(flat if src is None else flat.index_select(0, src.to(flat.device, non_blocking=True)))
        image_slots.append(dst)
        rows = p["input_ids"].shape[0] // k
        groups.append((name, row0, row0 + rows, k))
        row0 += rows
    device = tokens["input_ids"][0].device
    cat = {key: torch.cat(values) for key, values in tokens.items()}
    layout = PackedLayout(
        image_slots=torch.cat(image_slots).to(device, non_blocking=True), slots_per_row=slots,
        text_time=cat["text_time"], has_media=cat["has_media"], segment_ids=cat["segment_ids"],
        position_ids=cat["position_ids"], groups=tuple(groups),
    )
    return PackedBatch(images=torch.cat(images), input_ids=cat["input_ids"], attention_mask=cat["attention_mask"], labels=cat["labels"], layout=layout)


def _unpack_fields(name: str, b: Mapping[str, torch.Tensor]) -> dict:
    ids, labels, num = b["input_ids"], b.get("labels"), b.get("num_images")
    if labels is None:
        raise ValueError(f"{name}: labels are needed to pack datasets (each dataset's loss)")
    mask = b.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    try:
        check_batch(b["pixel_values"], ids, mask, labels, num)
        pixels = single_frame(b["pixel_values"])
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if num is None:
        num = torch.full((ids.shape[0],), pixels.shape[1], dtype=torch.long)  # every slot holds an image
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixels=pixels, num_images=num)


def _pad_rows(name: str, p: dict, length: Optional[int], pad_token_id: int) -> None:
    """Right-pad a dataset's token tensors to `length` (in place in `p`)."""
    have = p["input_ids"].shape[1]
    if length is None or have == length:
        return
    if have > length:
        raise ValueError(f"{name}: rows of {have} tokens, longer than its max_tokens {length}")
    for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        p[key] = F.pad(p[key], (0, length - have), value=fill)


def _pack_rows(p: dict, k: int, target: int, media_token_id: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One dataset's token tensors as [B/k, target] rows of k segments, padded at the end."""
    ids = p["input_ids"]
    b, length = ids.shape
    t_img = p["pixels"].shape[1]
    text_time, has_media = token_media_times(ids, media_token_id, t_img, p["num_images"])
    # segment j of a packed row keeps its images in slots j*T .. j*T+T-1
    shift = (torch.arange(k, device=ids.device) * t_img).view(1, k, 1)
    grouped = text_time.view(b // k, k, length)
    text_time = torch.where(grouped > 0, grouped + shift, 0).view(b, length)
    labels = F.pad(p["labels"][:, 1:], (1, 0), value=IGNORE_INDEX)  # a segment's first token is nobody's target
    segment = torch.arange(k, device=ids.device).repeat_interleave(length)
    position = torch.arange(length, device=ids.device).repeat(k)
    pad = target - k * length
    out = {}
    for key, value, fill in (
        ("input_ids", ids, pad_token_id), ("attention_mask", p["attention_mask"], 0), ("labels", labels, IGNORE_INDEX),
        ("text_time", text_time, 0), ("has_media", has_media, False),
    ):
        value = value.reshape(b // k, k * length)
        out[key] = F.pad(value, (0, pad), value=fill) if pad else value
    if pad:  # the tail belongs to the last segment; its tokens are padding, masked as keys
        segment = torch.cat([segment, segment.new_full((pad,), k - 1)])
        position = torch.cat([position, torch.arange(length, length + pad, device=ids.device)])
    out["segment_ids"] = segment.expand(b // k, target)
    out["position_ids"] = position.expand(b // k, target)
    return out


def _image_slots(num_images: torch.Tensor, t_img: int, k: int, row0: int, slots: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Host index tensors: which of the dataset's flattened [B*T] images are real (None: all of them) and the flat
    slot each lands in (row0 + i//k, (i%k)*T + t)."""
    real = torch.arange(t_img)[None, :] < num_images.cpu()[:, None]  # [B, T]
    i, t = real.nonzero(as_tuple=True)
    dst = (row0 + i // k) * slots + (i % k) * t_img + t
    src = None if bool(real.all()) else i * t_img + t
    return src, dst


def describe_packing(packed: PackedBatch) -> str:
    """One line: which dataset's rows went where."""
    lay = packed.layout
    b, length = packed.input_ids.shape
    parts = ", ".join(f"{name} rows {r0}-{r1 - 1} ({k} a row)" for name, r0, r1, k in lay.groups)
    return f"one pass of {b} rows x {length} tokens, {lay.slots_per_row} image slots a row: {parts}"
