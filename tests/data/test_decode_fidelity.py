"""Both decode paths against open_clip's own transform on every image of a wide, seeded set (image_corpus: photos,
textures and page text from scikit-image, cropped, rescaled 0.8-3x, JPEG q60-95 / grayscale / CMYK / PNG / WebP):
the exact path (the default) is bit-identical on every image; the fast path (`decode_draft: true`) stays within
the per-image error stated in of_ds/data/README.md on every image, and is bit-identical wherever it does not
decode at a reduced scale. The exact path resizes with `resample.resize_crop` (only the crop's pixels): odd
geometries and modes are checked too."""

import functools
import io

import numpy as np
import open_clip
import pytest
from PIL import Image

from of_ds.data.images import ImageSpec, ImageTransform, jpeg_scale

from .helpers import OPENAI_MEAN, OPENAI_STD
from .image_corpus import image_corpus, sources

LEVEL = 1 / 255 / min(OPENAI_STD)  # one 8-bit level in normalised units (the largest of the three channels)

# The fast path's stated bound, per image, in 8-bit levels of the output: mean |diff|, 99th percentile, max. These
# are the worst images' figures measured on this set (224: 0.56 / 4.0 / 14.2; 64: 1.03 / 9.5 / 24.6), rounded up.
BOUND = {224: dict(mean=0.6, p99=4.0, max=15.0), 64: dict(mean=1.1, p99=10.0, max=25.0)}


@pytest.fixture(scope="module")
def corpus():
    return image_corpus(200, seed=0)


def _transforms(size):
    spec = ImageSpec((size, size), OPENAI_MEAN, OPENAI_STD)
    reference = open_clip.image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    return reference, ImageTransform(spec, draft=False), ImageTransform(spec, draft=True)


# (w, h): 1-2 px sides, exactly-224 sides, upscales, 1:10 and 10:1, tall enough for Pillow's vertical-first order
ODD_SIZES = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 700), (700, 2), (224, 224), (224, 500), (500, 224), (225, 224),
             (100, 80), (150, 1500), (1500, 150), (300, 3000), (3000, 300), (333, 1000), (1000, 333)]
# mode -> format: CMYK, palette and alpha images are converted to RGB first, gray ones resampled as one channel
ODD_MODES = {"RGB": "JPEG", "L": "PNG", "CMYK": "JPEG", "RGBA": "PNG", "P": "PNG", "LA": "PNG", "1": "PNG",
             "I;16": "PNG"}


@functools.lru_cache(maxsize=1)
def _odd_images() -> dict[str, bytes]:
    photo = Image.fromarray(sources()["astronaut"])
    out = {}
    for i, (w, h) in enumerate(ODD_SIZES):
        mode = list(ODD_MODES)[i % len(ODD_MODES)]
        for m in {mode, "RGB"}:  # (gray geometries: tests/data/test_resample.py)
            img = photo.resize((w, h), Image.LANCZOS)
            if m == "RGBA" or m == "LA":
                img.putalpha(Image.linear_gradient("L").resize((w, h)))
            img = img.convert(m) if m != "P" else img.convert("P", palette=Image.ADAPTIVE, colors=64)
            buf = io.BytesIO()
            img.save(buf, ODD_MODES[m], **({"quality": 90} if ODD_MODES[m] == "JPEG" else {"compress_level": 1}))
            out[f"{m}-{w}x{h}"] = buf.getvalue()
    return out


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_exact_path_is_bit_identical_on_odd_sizes_and_modes(interpolation):
    size = 224
    spec = ImageSpec((size, size), OPENAI_MEAN, OPENAI_STD, interpolation)
    reference = open_clip.image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD,
                                          interpolation=interpolation)
    exact = ImageTransform(spec)
    assert exact.path == "exact" and exact.kernel  # resample.resize_crop, not PIL's full resize
    ours = np.empty((3, size, size), dtype=np.float32)
    images = _odd_images()
    assert {name.split("-")[0] for name in images} == set(ODD_MODES)
    for i, (name, data) in enumerate(images.items()):
        ref = reference(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        exact(data, ours, flip=i % 2 == 1)
        assert np.array_equal(ours, ref[:, :, ::-1] if i % 2 else ref), f"exact path differs on {name}"


@pytest.mark.parametrize("size", [224, 64])
def test_exact_path_is_bit_identical_and_the_fast_path_within_its_bound_on_every_image(corpus, size):
    reference, exact, fast = _transforms(size)
    assert exact.path == "exact" and exact.kernel
    ours, approx = (np.empty((3, size, size), dtype=np.float32) for _ in range(2))
    over, reduced, scales = [], 0, set()
    for name, data in corpus.items():
        ref = reference(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
        exact(data, ours, False)
        assert np.array_equal(ours, ref), f"exact path differs from open_clip on {name}"
        fast(data, approx, False)
        img = Image.open(io.BytesIO(data))
        k = jpeg_scale(*img.size, size) if img.format == "JPEG" else 1
        if k == 1:  # not decoded at a reduced scale: the exact path's pixels
            assert np.array_equal(approx, ref), f"fast path differs on {name}, which it decodes at full scale"
            continue
        reduced += 1
        scales.add(k)
        diff = np.abs(approx - ref) / LEVEL
        got = dict(mean=diff.mean(), p99=np.percentile(diff, 99), max=diff.max())
        if any(got[key] > bound + 1e-3 for key, bound in BOUND[size].items()):
            over.append((name, {key: round(float(v), 2) for key, v in got.items()}))
    assert not over, f"{len(over)} images over the fast path's stated bound {BOUND[size]}: {over}"
    # the set exercises the reduced decodes: a quarter of the images at 224 px (1/2 and 1/4), most of them at 64 px
    assert reduced >= (40 if size == 224 else 120) and scales >= ({2, 4} if size == 224 else {2, 4, 8}), (reduced, scales)


def test_the_set_is_wide(corpus):
    kinds = {name.split("-")[2] for name in corpus}
    assert kinds == {"jpeg", "gray", "cmyk", "png", "webp"}
    sizes = [Image.open(io.BytesIO(data)).size for data in corpus.values()]
    assert min(min(s) for s in sizes) < 200 and max(max(s) for s in sizes) >= 2500
    assert len({name.split("-")[1] for name in corpus}) == 18
    assert image_corpus(5, seed=0) == {k: corpus[k] for k in list(corpus)[:5]}  # seeded, reproducible
