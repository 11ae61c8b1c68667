"""Images match open_clip's own val transform: exactly on the default path (the fast path's per-image error over a
wide image set is pinned in test_decode_fidelity.py)."""

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from of_ds.data.images import ImageSpec, ImageTransform

from .helpers import OPENAI_MEAN, OPENAI_STD, jpeg, photo_arrays



def _reference(data: bytes, size: int) -> np.ndarray:
    """open_clip's transform on the RGB image, as the original trainer applies it."""
    transform = open_clip.image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    return transform(Image.open(io.BytesIO(data)).convert("RGB")).numpy()


def _ours(data: bytes, size: int, draft: bool, flip: bool = False) -> np.ndarray:
    out = np.empty((3, size, size), dtype=np.float32)
    ImageTransform(ImageSpec((size, size), OPENAI_MEAN, OPENAI_STD), draft=draft)(data, out, flip)
    return out


@pytest.fixture(scope="module")
def images():
    """Photos at several sizes and formats."""
    arrays = photo_arrays()
    out = {f"{n}@{s}": jpeg(a, scale=s) for n, a in arrays.items() for s in (0.5, 1.0, 2.0)}
    out["rocket.png"] = jpeg(arrays["rocket"], fmt="PNG")
    out["coffee.webp"] = jpeg(arrays["coffee"], fmt="WEBP")
    gray = io.BytesIO()
    Image.fromarray(arrays["camera"][..., 0]).save(gray, "JPEG")
    out["camera-gray"] = gray.getvalue()
    return out


@pytest.mark.parametrize("size", [64, 224])
def test_without_draft_images_are_bit_identical_to_open_clip(images, size):
    for name, data in images.items():
        assert np.array_equal(_ours(data, size, draft=False), _reference(data, size)), name


@pytest.mark.parametrize("draft", [True, False])
def test_corrupt_and_truncated_jpegs_are_a_drop_reason_not_an_exception(images, draft):
    from of_ds.data.drops import DropSample

    data = images["astronaut@1.0"]
    for bad in (data[: len(data) // 2], data[:200], b"\xff\xd8\xff" + b"\x00" * 300, b"not an image"):
        with pytest.raises(DropSample) as e:
            _ours(bad, 64, draft=draft)
        assert e.value.reason == "bad_image"


def test_jpeg_scale_leaves_at_least_a_2x_reduction_after_the_reduced_decode():
    from of_ds.data.images import jpeg_scale

    assert [jpeg_scale(w, 300, 224) for w in (300, 500, 5000)] == [1, 1, 1]
    assert jpeg_scale(2000, 895, 224) == 1 and jpeg_scale(2000, 896, 224) == 2  # 896 / 2 = 2 x 224
    assert jpeg_scale(1791, 2000, 224) == 2 and jpeg_scale(1792, 2000, 224) == 4
    assert jpeg_scale(3583, 4000, 224) == 4 and jpeg_scale(3584, 4000, 224) == 8
    assert jpeg_scale(256, 300, 64) == 2 and jpeg_scale(1024, 1024, 64) == 8


def test_exact_is_the_default_and_the_fast_path_is_opt_in():
    from of_ds.spec import RunSpec

    spec = ImageSpec((224, 224), OPENAI_MEAN, OPENAI_STD)
    assert ImageTransform(spec).path == "exact" and ImageTransform(spec, draft=True).path == "fast"
    assert ImageTransform(spec, kernel=False).path == "exact-pil"
    assert ImageTransform(spec._replace(interpolation="nearest")).path == "exact-pil"  # Pillow's nearest resize
    run = RunSpec.from_dict({"data": {"datasets": [{"name": "d", "kind": "laion", "shards": "x.tar", "batch_size": 1}]}})
    assert run.data.datasets[0].decode_draft is False and run.data.datasets[0].decode_resize == "crop"


def test_flip_is_the_mirrored_transform(images):
    data = images["astronaut@1.0"]
    assert np.array_equal(_ours(data, 64, draft=False, flip=True), _reference(data, 64)[:, :, ::-1])
    assert torch.equal(torch.from_numpy(_ours(data, 64, draft=False, flip=True)),
                       torch.flip(torch.from_numpy(_reference(data, 64)), dims=[2]))


def test_the_model_engineers_processor_config_and_dicts_are_accepted():
    from of_ds.data.images import as_image_spec
    from of_ds.model.vision import ImageProcessorConfig

    expected = ImageSpec((224, 224), OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest")
    assert as_image_spec(ImageProcessorConfig((224, 224), OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest")) == expected
    assert as_image_spec({"image_size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD}) == expected


def test_the_zero_copy_view_is_the_images_pixels_and_outlives_it():
    import gc

    from of_ds.data.pixels import allocate_images_in_one_block, rgb_view

    arr = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    view = rgb_view(img)
    assert view.shape == (37, 53, 4) and not view.flags.writeable and np.array_equal(view[:, :, :3], arr)
    del img
    gc.collect()
    assert np.array_equal(view[:, :, :3], arr)  # the export holds Pillow's memory
    assert rgb_view(Image.fromarray(arr[:, :, 0])) is None  # gray: np.asarray is already one byte per pixel
    block = Image.core.get_block_size()
    try:
        Image.core.set_block_size(1 << 20)
        assert rgb_view(Image.new("RGB", (600, 600))) is None  # rows in several blocks: np.asarray instead
        allocate_images_in_one_block()  # as an ImageTransform does
        big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), dtype=np.uint8))
        assert np.array_equal(rgb_view(big)[:, :, :3], np.asarray(big))  # 17.6 MB: over Pillow's default block
    finally:
        Image.core.set_block_size(block)
