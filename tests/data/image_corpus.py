"""A wide, seeded set of encoded images for the decode-fidelity tests: scikit-image's photos, textures and page text
(no download), randomly cropped, rescaled 0.8-3x, encoded as JPEG (quality 60-95, 4:2:0 / 4:2:2 / 4:4:4, some
progressive), grayscale JPEG, CMYK JPEG, PNG and WebP, 150 to 3000 px."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "logo")
GRAY = ("brick", "grass", "gravel", "text", "page", "coins", "camera", "moon")  # textures, page text, photos
MAX_SIDE = 3000


@lru_cache(maxsize=1)
def sources() -> dict[str, np.ndarray]:
    """name -> uint8 [H, W, 3] (the gray ones replicated to three channels)."""
    from skimage import data

    out = {}
    for name in PHOTOS + GRAY:
        arr = getattr(data, name)()
        out[name] = np.ascontiguousarray(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3])
    return out


def _draw(rng: np.random.Generator, arr: np.ndarray, large: bool) -> Image.Image:
    """A random crop of `arr`, rescaled 0.8-3x (`large`: 2-3x of a crop of at least 70%), long side <= 3000."""
    h, w = arr.shape[:2]
    lo = 0.7 if large else 0.3
    ch, cw = max(32, int(h * rng.uniform(lo, 1))), max(32, int(w * rng.uniform(lo, 1)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = Image.fromarray(np.ascontiguousarray(arr[y:y + ch, x:x + cw]))
    f = rng.uniform(2.0, 3.0) if large else rng.uniform(0.8, 3.0)
    f = min(f, MAX_SIDE / max(cw, ch))
    resample = (Image.BICUBIC, Image.LANCZOS, Image.BILINEAR)[int(rng.integers(0, 3))]
    return img.resize((max(16, round(cw * f)), max(16, round(ch * f))), resample)


def _encode(rng: np.random.Generator, img: Image.Image, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, "PNG", compress_level=1)
    elif kind == "webp":
        img.save(buf, "WEBP", quality=int(rng.integers(60, 96)))
    else:
        if kind == "gray":
            img = img.convert("L")
        elif kind == "cmyk":
            img = img.convert("CMYK")
        img.save(buf, "JPEG", quality=int(rng.integers(60, 96)), subsampling=int(rng.integers(0, 3)),
                 progressive=bool(rng.random() < 0.2))
    return buf.getvalue()


def image_corpus(count: int = 200, seed: int = 0) -> dict[str, bytes]:
    """`count` encoded images: name (source, format, size) -> bytes. About 45% are large enough (shortest side
    >= 896 px) for the fast path's reduced JPEG decode at 224 px; 75% RGB JPEGs, the rest grayscale and CMYK JPEGs,
    PNG and WebP."""
    rng = np.random.default_rng(seed)
    srcs = sources()
    names = sorted(srcs)
    kinds = ["jpeg"] * 15 + ["gray", "cmyk", "png", "webp", "gray"]
    out = {}
    for i in range(count):
        name = names[i % len(names)]
        img = _draw(rng, srcs[name], large=bool(rng.random() < 0.5))
        kind = kinds[int(rng.integers(0, len(kinds)))]
        out[f"{i:03d}-{name}-{kind}-{img.width}x{img.height}"] = _encode(rng, img, kind)
    return out
