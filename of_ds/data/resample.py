"""Pillow's 8-bit bicubic / bilinear resize, bit for bit, computing only the pixels a crop keeps.

`resize_crop(pixels, new_w, new_h, left, top, size)` equals
`Image.fromarray(pixels).resize((new_w, new_h), BICUBIC).crop((left, top, left + size, top + size))` for a uint8
[H, W, C] array (C = 1 or 3, or 4: RGB plus Pillow's padding byte). Channels are resampled independently, so an
'L' image resized and replicated is its 'RGB' conversion resized. It follows Pillow's `libImaging/Resample.c`:
the filter coefficients of every kept output column and row are computed with the same double operations in the
same order as `precompute_coeffs` (the full-size resize's, with no box), rounded to fixed point as
`normalize_coeffs_8bpc`; the two passes run in Pillow's order (horizontal first; vertical first under Pillow >= 13
where the height shrinks by over twice as many pixels as the width), through a clipped 8-bit intermediate, each
skipped where that side keeps its size. Only the crop's columns are filtered horizontally, only on the input rows
its rows read, and only its rows vertically (the vertical-first order: only the input columns its columns read).

Both passes are written so that the compiler vectorises them: the horizontal pass runs on column-major copies of
blocks of the rows it reads (one tap of one output column then scales a contiguous run of rows x channels), the
vertical pass on rows. Integer arithmetic is Pillow's int32; floating point is never reassociated (no fastmath).
Compiled with numba and cached on disk; `warm_up()` compiles or loads the cache in the calling process, so that
DataLoader workers forked after it do not.
"""

from __future__ import annotations

import numpy as np
import PIL
from numba import njit

PRECISION_BITS = 32 - 8 - 2
FILTERS = {"bilinear": 1, "bicubic": 2}  # filter id = its support
ROW_BLOCK = 128  # input rows per horizontal block (measured: 1.5-1.75x faster than all rows at once on 2-6 MP)
# Pillow 13 runs the vertical pass first where the height shrinks by over twice as many pixels as the width
_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


@njit(cache=True, nogil=True)
def _filter(x: float, support: int) -> float:
    """Pillow's `bilinear_filter` (support 1) or `bicubic_filter` (a = -0.5, support 2), operation for operation."""
    if x < 0.0:
        x = -x
    if support == 1:  # bilinear
        return 1.0 - x if x < 1.0 else 0.0
    a = -0.5  # bicubic, as `bicubic_filter`
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@njit(cache=True, nogil=True)
def _coeffs(in_size: int, out_size: int, first: int, count: int, support_base: int):
    """`precompute_coeffs` + `normalize_coeffs_8bpc` for outputs [first, first + count) of an in_size -> out_size
    resample: (xmin [count], taps [count], int32 coefficients [count, ksize])."""
    scale = np.float64(np.float32(in_size)) / out_size  # (double)(in1 - in0) / outSize, in1 - in0 a float
    filterscale = scale if scale >= 1.0 else 1.0
    support = support_base * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    xmins = np.empty(count, np.int64)
    taps = np.empty(count, np.int64)
    kk = np.zeros((count, ksize), np.int32)
    k = np.empty(ksize, np.float64)
    for i in range(count):
        center = 0.0 + (first + i + 0.5) * scale
        xmin = int(center - support + 0.5)  # C's (int): truncation toward zero
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > in_size:
            xmax = in_size
        xmax -= xmin
        ww = 0.0
        for x in range(xmax):
            w = _filter((x + xmin - center + 0.5) * inv_filterscale, support_base)
            k[x] = w
            ww += w
        for x in range(xmax):
            v = k[x] / ww if ww != 0.0 else k[x]
            if v < 0:
                kk[i, x] = int(-0.5 + v * (1 << PRECISION_BITS))
            else:
                kk[i, x] = int(0.5 + v * (1 << PRECISION_BITS))
        xmins[i] = xmin
        taps[i] = xmax
    return xmins, taps, kk


@njit(cache=True, nogil=True, inline="always")
def _clip8(acc: np.int32) -> np.uint8:
    v = acc >> PRECISION_BITS
    return np.uint8(0 if v < 0 else (255 if v > 255 else v))


@njit(cache=True, nogil=True)
def _horizontal(src, stride, channels, r0, r1, x0, xmins, taps, kk):
    """Rows [r0, r1) of src [H, W * stride] (pixels of `stride` bytes, their first C the channels; column 0 being
    input column x0) filtered to the given output columns -> uint8 [r1 - r0, len(xmins) * C]. Blocks of ROW_BLOCK
    rows at a time, copied column-major (cols[x, r * C + c]) so that one tap of one output column scales a
    contiguous run; a block's copy stays in the L2 cache."""
    c0 = xmins[0]
    c1 = xmins[-1] + taps[-1]
    count = xmins.shape[0]
    out = np.empty((r1 - r0, count * channels), np.uint8)
    cols = np.empty((c1 - c0, ROW_BLOCK * channels), np.uint8)
    acc = np.empty(ROW_BLOCK * channels, np.int32)
    half = np.int32(1 << (PRECISION_BITS - 1))
    for b0 in range(r0, r1, ROW_BLOCK):
        rows = min(r1, b0 + ROW_BLOCK) - b0
        n = rows * channels
        for r in range(rows):
            line = src[b0 + r]
            if channels == 3:  # unrolled: three times faster than the loop over channels
                for x in range(c1 - c0):
                    s = (c0 - x0 + x) * stride
                    cols[x, r * 3] = line[s]
                    cols[x, r * 3 + 1] = line[s + 1]
                    cols[x, r * 3 + 2] = line[s + 2]
            else:
                for x in range(c1 - c0):
                    cols[x, r] = line[c0 - x0 + x]
        for i in range(count):
            for j in range(n):
                acc[j] = half
            base = xmins[i] - c0
            for t in range(taps[i]):
                k = kk[i, t]
                line = cols[base + t]
                for j in range(n):
                    acc[j] += np.int32(line[j]) * k
            for r in range(rows):
                for c in range(channels):
                    out[b0 - r0 + r, i * channels + c] = _clip8(acc[r * channels + c])
    return out


@njit(cache=True, nogil=True)
def _vertical(rows, r0, j0, j1, ymins, taps, kk):
    """Columns [j0, j1) of rows [H, N] (its row 0 being input row r0) filtered to the given output rows
    -> uint8 [len(ymins), j1 - j0]."""
    n = j1 - j0
    acc = np.empty(n, np.int32)
    out = np.empty((ymins.shape[0], n), np.uint8)
    half = np.int32(1 << (PRECISION_BITS - 1))
    for i in range(ymins.shape[0]):
        acc[:] = half
        base = ymins[i] - r0
        for t in range(taps[i]):
            k = kk[i, t]
            line = rows[base + t, j0:j1]
            for j in range(n):
                acc[j] += np.int32(line[j]) * k
        for j in range(n):
            out[i, j] = _clip8(acc[j])
    return out


@njit(cache=True, nogil=True)
def _axis(n, new_n, offset, size, support):
    """One axis: the kept outputs' filter windows and weights, and the span [lo, hi) of inputs they read; no
    filter (empty windows) where the axis keeps its size, as Pillow skips that pass."""
    if new_n != n:
        mins, taps, kk = _coeffs(n, new_n, offset, size, support)
        return mins, taps, kk, mins[0], mins[-1] + taps[-1]
    return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 1), np.int32), np.int64(offset), np.int64(offset + size)


@njit(cache=True, nogil=True)
def _resize_crop(src, stride, channels, new_w, new_h, left, top, size, support, vertical_first):
    """src [H, W * stride] -> [size, size * C] (see `resize_crop`)."""
    h, w = src.shape[0], src.shape[1] // stride
    need_h, need_v = new_w != w, new_h != h
    ymins, ytaps, ykk, r0, r1 = _axis(h, new_h, top, size, support)
    xmins, xtaps, xkk, c0, c1 = _axis(w, new_w, left, size, support)
    if need_v and need_h and vertical_first:  # Pillow >= 13 when the height shrinks over twice what the width does
        rows = _vertical(src, 0, c0 * stride, c1 * stride, ymins, ytaps, ykk)
        return _horizontal(rows, stride, channels, 0, size, c0, xmins, xtaps, xkk)
    if need_h:
        rows = _horizontal(src, stride, channels, r0, r1, 0, xmins, xtaps, xkk)
    else:
        rows = np.empty((r1 - r0, size * channels), np.uint8)
        for r in range(r1 - r0):
            for x in range(size):
                for c in range(channels):
                    rows[r, x * channels + c] = src[r0 + r, (left + x) * stride + c]
    if need_v:
        return _vertical(rows, r0, 0, size * channels, ymins, ytaps, ykk)
    return rows


def resize_crop(pixels: np.ndarray, new_w: int, new_h: int, left: int, top: int, size: int,
                interpolation: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [size, size, C]: Pillow's resize to (new_w, new_h), then the crop at (left, top).
    C = 1 or 3; C = 4 is RGB plus a padding byte (Pillow's own layout), resampled to [size, size, 3]."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    h, w, stride = pixels.shape
    if not (0 <= left and left + size <= new_w and 0 <= top and top + size <= new_h):
        raise ValueError(f"crop ({left}, {top}) + {size} lies outside the {new_w}x{new_h} resize")
    if stride not in (1, 3, 4):
        raise ValueError(f"resize_crop takes 1, 3 or 4 (RGB + padding) channels, not {stride}")
    channels = min(stride, 3)
    vertical_first = _VERTICAL_FIRST and 0 < h - new_h and (w - new_w) * 2 < h - new_h
    out = _resize_crop(pixels.reshape(h, w * stride), stride, channels, new_w, new_h, left, top, size,
                       FILTERS[interpolation], vertical_first)
    return out.reshape(size, size, channels)


def warm_up() -> None:
    """Compile the kernels (or load them from numba's cache) in this process, on a tiny image of each path."""
    for channels in (3, 4):
        tiny = np.zeros((6, 5, channels), np.uint8)
        tiny.setflags(write=False)  # as np.asarray of a PIL image, and `pixels.rgb_view`
        for interpolation in FILTERS:
            resize_crop(tiny, 4, 4, 0, 0, 4, interpolation)
            resize_crop(tiny, 5, 3, 0, 0, 3, interpolation)
