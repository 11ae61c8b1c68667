"""Image decoding and open_clip's evaluation transform, written into preallocated float32 batch slots.

`ImageTransform` reproduces `open_clip.image_transform(size, is_train=False)` (resize the shortest side, center
crop, to-tensor, normalize) without torch. Normalisation is a per-channel 256-entry float32 lookup table whose
entries are computed with the float32 operations of `ToTensor` + `Normalize`, in the same order, so it is
bit-identical to them.

`draft=False` (the default, exact): PIL decode, then Pillow's bicubic resize computed for the center crop's
pixels only (`resample.resize_crop`, Pillow's fixed-point arithmetic reproduced bit for bit): bit-identical to
open_clip's output. `kernel=False` resizes the whole image with PIL and crops, as open_clip does ('exact-pil').

`draft=True` (opt-in, "fast"): a JPEG whose shortest side is at least 4x the output is decoded by libjpeg at a
reduced DCT scale (1/2, 1/4 or 1/8: `jpeg_scale`), chosen so that at least a 2x reduction is left after it, and
that decode is finished by the same PIL bicubic (antialiased) resize, mapped onto the same region of the image.
Every other image (smaller JPEGs, PNG, WebP...) takes the exact path, so its output is bit-identical. The error
against the exact transform, measured at 224 px over the wide test set of tests/data/test_decode_fidelity.py, is
stated in of_ds/data/README.md and pinned there per image.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from .drops import DropSample
from .pixels import allocate_images_in_one_block, rgb_view
from .resample import FILTERS as RESAMPLE_FILTERS, resize_crop, warm_up

try:
    import cv2
except ImportError:  # pragma: no cover - an install_requires; without it normalisation takes numpy's slower path
    cv2 = None

Image.MAX_IMAGE_PIXELS = 1_000_000_000  # as the original trainer: large web images are legitimate
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
_JPEG_FORMATS = frozenset(("JPEG", "MPO"))


class ImageSpec(NamedTuple):
    """The transform's parameters (the fields of `of_ds.model.vision.ImageProcessorConfig`)."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


def as_image_spec(cfg: Any) -> ImageSpec:
    """Accept an ImageProcessorConfig, a dict, or any object with the same attributes."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    size = get("image_size")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return ImageSpec(size, tuple(get("mean")), tuple(get("std")), get("interpolation", "bicubic") or "bicubic",
                     get("resize_mode", "shortest") or "shortest")


def normalize_into(pixels: np.ndarray, out: np.ndarray, mean: np.ndarray, std: np.ndarray) -> None:
    """uint8 [H, W, 3] -> float32 [3, H, W] in `out`: (v / 255 - mean) / std with the float32 operations of
    torchvision's ToTensor + Normalize, in the same order, so the result is bit-identical."""
    np.divide(pixels.transpose(2, 0, 1), np.float32(255), out=out, dtype=np.float32)
    np.subtract(out, mean, out=out)
    np.divide(out, std, out=out)


def batch_pixels(shape: tuple[int, ...], shared: bool) -> tuple[np.ndarray, torch.Tensor]:
    """A zero-filled float32 batch array and the tensor sharing its memory.

    `shared` (in a DataLoader worker): the memory is allocated shared (zero-filled by the OS), so handing the batch
    to the main process sends a handle instead of copying the whole array into shared memory: the choice for
    interleaved batches, which are mostly zero padding (1.2-1.8x faster on the MMC4 benchmarks). Dense LAION batches are faster in
    ordinary memory: the DataLoader's queue thread copies them into shared memory while the worker decodes the
    next batch, whereas first writes to fresh shared memory cost the worker itself about 0.4 ms per 224 px image.
    """
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if shared and new_shared is not None and get_worker_info() is not None:
        count = int(np.prod(shape))
        tensor = torch.empty(0, dtype=torch.float32).set_(new_shared(count * 4), 0, shape)
        return tensor.numpy(), tensor
    array = np.zeros(shape, dtype=np.float32)
    return array, torch.from_numpy(array)


def normalize_lut(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """[3, 256] float32: entry [c, v] is `normalize_into` of the value v in channel c (bit-identical by construction)."""
    values = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (1, 256, 3))
    lut = np.empty((3, 1, 256), dtype=np.float32)
    normalize_into(values, lut, mean, std)
    return np.ascontiguousarray(lut[:, 0, :])


def lut_normalize_into(pixels: np.ndarray, out: np.ndarray, lut: np.ndarray) -> None:
    """uint8 [H, W, 3] -> float32 [3, H, W] in `out` through the per-channel tables: equal to `normalize_into`."""
    if cv2 is None or not out.flags.c_contiguous:
        for c in range(3):
            np.take(lut[c], pixels[:, :, c], out=out[c])
        return
    if pixels.strides[1] < 0:  # a flipped view: OpenCV wants positive strides
        pixels = cv2.flip(pixels[:, ::-1], 1)
    for c, plane in enumerate(cv2.split(pixels)):
        written = cv2.LUT(plane, lut[c], dst=out[c])
        if not np.shares_memory(written, out):  # OpenCV allocated instead of writing in place
            out[c] = written


def jpeg_scale(width: int, height: int, size: int) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) of a fast decode: the largest k that still leaves a reduction of at
    least 2x after the reduced decode (shortest side / k >= 2 x `size`). libjpeg's reduced decodes are close to
    block averages; a bicubic reduction of 2x or more after them smooths what they differ in from a bicubic
    reduction of the full image."""
    short = min(width, height)
    for k in (8, 4, 2):
        if short >= 2 * k * size:
            return k
    return 1


def crop_geometry(w: int, h: int, s: int) -> tuple[int, int, int, int]:
    """open_clip's shortest-side resize of a w x h image to S (torchvision's rounding) and its S x S center crop
    -> (new_w, new_h, top, left)."""
    new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    return new_w, new_h, int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))


def open_image(data: bytes) -> Image.Image:
    """Parse an image header (cheap; pixels are decoded later). Raises DropSample('bad_image') on garbage."""
    try:
        return Image.open(io.BytesIO(data))
    except _IMAGE_ERRORS as e:
        raise DropSample("bad_image", str(e)) from None


class ImageTransform:
    """Decode bytes and write open_clip's eval transform of the image into a `[3, H, W]` float32 slot."""

    def __init__(self, spec: ImageSpec, draft: bool = False, kernel: bool = True):
        self.spec = spec
        self.size = spec.image_size
        self.mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
        self.lut = normalize_lut(self.mean, self.std)
        if spec.interpolation not in _RESAMPLE:
            raise ValueError(f"image interpolation '{spec.interpolation}' is not supported ({', '.join(_RESAMPLE)})")
        self.resample = _RESAMPLE[spec.interpolation]
        self.draft = draft and spec.interpolation != "nearest"  # reduced decodes approximate bicubic/bilinear only
        self._fallback = None
        if spec.resize_mode != "shortest" or self.size[0] != self.size[1]:
            import open_clip  # the rare modes go through open_clip itself (torch), exact by construction

            self._fallback = open_clip.image_transform(self.size, is_train=False, mean=spec.mean, std=spec.std,
                                                       resize_mode=spec.resize_mode, interpolation=spec.interpolation)
        self.kernel = kernel and spec.interpolation in RESAMPLE_FILTERS and self._fallback is None
        if self.kernel:
            warm_up()  # here, in the process that forks the loader workers: they inherit the compiled kernels
            allocate_images_in_one_block()  # so that `rgb_view` reads every decoded image in place

    @property
    def path(self) -> str:
        """'exact', 'exact-pil' or 'fast': the decode path this transform takes (the fast one only for large
        JPEGs; 'exact-pil' resizes the whole image with PIL, as open_clip, instead of `resample.resize_crop`)."""
        if self._fallback is not None:
            return "exact"
        return "fast" if self.draft else "exact" if self.kernel else "exact-pil"

    def __call__(self, data: bytes, out: np.ndarray, flip: bool) -> None:
        """Fill `out` ([3, H, W] float32) from encoded image bytes; DropSample('bad_image') if they do not decode."""
        try:
            img = Image.open(io.BytesIO(data))
            if self._fallback is not None:
                pixels = self._fallback(img.convert("RGB")).numpy()
                out[...] = pixels[:, :, ::-1] if flip else pixels
                return
            pixels = self._resize_crop(img, self.draft)
        except _IMAGE_ERRORS as e:
            raise DropSample("bad_image", str(e)) from None
        lut_normalize_into(pixels[:, ::-1] if flip else pixels, out, self.lut)

    def _resize_crop(self, img: Image.Image, draft: bool = False) -> np.ndarray:
        """Resize the shortest side to S (torchvision's rounding), center crop S x S -> uint8 [S, S, 3].

        Exact: Pillow's resize of the decoded image, as open_clip, computed by `resize_crop` for the crop only
        (bicubic and bilinear; 'nearest' and `kernel=False` take PIL's resize and crop). With `draft`, a large JPEG
        is first decoded at 1/k scale (`jpeg_scale`) and PIL's resize maps the same region of that decode (box =
        the full image in reduced coordinates), so only the decode differs."""
        s = self.size[0]
        w, h = img.size
        new_w, new_h, top, left = crop_geometry(w, h, s)
        box = None
        if draft and img.format in _JPEG_FORMATS:
            k = jpeg_scale(w, h, s)
            if k > 1:
                drafted = img.draft(None, (w // k, h // k))  # -> (mode, the full image's box in the decode)
                box = drafted[1] if drafted is not None and img.size != (w, h) else None
        if box is None and self.kernel:
            # 'L' -> 'RGB' replicates the channel, so the gray channel is resampled once and replicated
            img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
            view = rgb_view(img)  # Pillow's own 4-byte pixels, no copy; None for gray (and over 64 megapixels)
            pixels = resize_crop(np.asarray(img) if view is None else view, new_w, new_h, left, top, s,
                                 self.spec.interpolation)
            return np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
        img = img.convert("RGB") if img.mode != "RGB" else img  # (convert would copy an RGB image)
        resized = img.resize((new_w, new_h), self.resample, box=box)
        return np.asarray(resized.crop((left, top, left + s, top + s)))
