"""Checks of the model's input tensors, shared by `Flamingo.forward` and the packing of several datasets."""

from __future__ import annotations

import torch


def check_batch(pixel_values, input_ids, attention_mask, labels, num_images) -> None:
    """Shapes that must agree, with a message naming the tensor (a mismatch would otherwise broadcast or fail deep inside)."""
    b, length = input_ids.shape
    if pixel_values.ndim not in (5, 6) or pixel_values.shape[0] != b:
        raise ValueError(f"pixel_values: expected [B={b}, T, 3, H, W], got {tuple(pixel_values.shape)}")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != (b, length):
            raise ValueError(f"{name}: expected shape {(b, length)} like input_ids, got {tuple(t.shape)}")
    if num_images is not None and tuple(num_images.shape) != (b,):
        raise ValueError(f"num_images: expected shape ({b},), got {tuple(num_images.shape)}")


def single_frame(pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W], also from the original's [B, T, F=1, 3, H, W]."""
    if pixel_values.ndim == 6:
        if pixel_values.shape[2] != 1:
            raise ValueError(f"pixel_values: only single-frame media are supported, got F={pixel_values.shape[2]}")
        pixel_values = pixel_values.squeeze(2)
    return pixel_values
