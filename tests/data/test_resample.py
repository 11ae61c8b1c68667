"""`resample.resize_crop` against Pillow's own resize + crop, pixel for pixel, over random geometries: sizes 1 to
3000 px on either side (the images small in area), down- and upscales, one dimension kept, tall images (which
Pillow 13 resamples vertically first), random crops, bicubic and bilinear, gray, RGB and RGB plus a padding
byte (Pillow's own layout)."""

import numpy as np
import pytest
from PIL import Image

from of_ds.data.images import crop_geometry
from of_ds.data.resample import resize_crop

PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _geometry(rng: np.random.Generator) -> tuple[int, int, int]:
    """(w, h, crop size): mostly small, one side up to 3000 px at times, the area kept under ~250k pixels."""
    w, h = (int(v) for v in rng.integers(1, 400, size=2))
    side = rng.random()
    if side < 0.15:
        w = int(rng.integers(1, 3001))
    elif side < 0.3:
        h = int(rng.integers(1, 3001))
    while w * h > 250_000:
        w, h = max(1, w // 2), h
    return w, h, int(rng.choice([1, 2, 3, 7, 64, 224, int(rng.integers(1, 400))]))


def _pil(img: Image.Image, new_w: int, new_h: int, left: int, top: int, s: int, interpolation: str) -> np.ndarray:
    return np.asarray(img.resize((new_w, new_h), PIL_FILTERS[interpolation]).crop((left, top, left + s, top + s)))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_random_geometries_are_pixel_identical_to_pillow(interpolation):
    rng = np.random.default_rng(7)
    kinds = {"vertical_first": 0, "upscale": 0, "kept_side": 0, "wide": 0}
    for _ in range(300):
        w, h, s = _geometry(rng)
        gray = rng.random() < 0.25
        pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
        if rng.random() < 0.5:  # smooth content too (random noise clips at 0 / 255 more than photos do)
            pixels = np.cumsum(pixels, axis=0, dtype=np.uint32).astype(np.uint8)
        img = Image.fromarray(pixels)
        if rng.random() < 0.7:  # open_clip's geometry
            new_w, new_h, top, left = crop_geometry(w, h, s)
        else:  # any resize and any crop inside it
            new_w, new_h = (int(v) for v in rng.integers(1, 500, size=2))
            keep = rng.random()  # one side kept: Pillow skips that pass
            new_w, new_h = (w, new_h) if keep < 0.2 else (new_w, h) if keep < 0.4 else (new_w, new_h)
            s = int(rng.integers(1, min(new_w, new_h) + 1))
            left, top = int(rng.integers(0, new_w - s + 1)), int(rng.integers(0, new_h - s + 1))
        got = resize_crop(np.asarray(img), new_w, new_h, left, top, s, interpolation)
        want = _pil(img, new_w, new_h, left, top, s, interpolation)
        assert np.array_equal(got[:, :, 0] if gray else got, want), (w, h, new_w, new_h, left, top, s, gray)
        if not gray:  # Pillow's own layout: RGB plus a padding byte, which must not leak into the result
            padded = np.dstack([pixels, rng.integers(0, 256, (h, w), dtype=np.uint8)])
            assert np.array_equal(resize_crop(padded, new_w, new_h, left, top, s, interpolation), want)
        kinds["vertical_first"] += 0 < h - new_h and 2 * (w - new_w) < h - new_h and new_w != w
        kinds["upscale"] += new_w > w or new_h > h
        kinds["kept_side"] += new_w == w or new_h == h
        kinds["wide"] += max(w, h) >= 1000
    assert min(kinds.values()) >= 5, kinds  # every branch of the kernel is exercised


def test_crop_outside_the_resize_or_odd_channels_are_refused():
    pixels = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="outside"):
        resize_crop(pixels, 8, 8, 1, 0, 8)
    with pytest.raises(ValueError, match="channels"):
        resize_crop(np.zeros((10, 10, 2), np.uint8), 8, 8, 0, 0, 8)
