"""Image decoding and open_clip's evaluation transform, written into preallocated float32 batch slots.

`ImageTransform` reproduces `open_clip.image_transform(size, is_train=False)` (resize the shortest side, center
crop, to-tensor, normalize) without torch. Normalisation is a per-channel 256-entry float32 lookup table whose
entries are computed with the float32 operations of `ToTensor` + `Normalize`, in the same order, so it is
bit-identical to them.

`draft=False`: PIL decode, PIL bicubic resize and crop: bit-identical to open_clip's output.

`draft=True` (the default, "fast"): JPEGs (YCbCr or grayscale) are decoded by libjpeg-turbo through simplejpeg,
at 1/2, 1/4 or 1/8 scale (DCT scaling) while the shortest side stays >= the output; anything else (PNG, WebP,
CMYK JPEGs, and any JPEG simplejpeg refuses, e.g. truncated or with recoverable errors) is decoded by PIL, which
then decides whether the image is bad. The decoded image is resized by OpenCV to the exact open_clip geometry
(bilinear below a 1.5x reduction, area averaging from 1.5x) and center cropped. Per image, against the exact
transform at 224 px: mean absolute difference <= 2.5 8-bit levels, 99% of pixels within 20, max 96 (isolated
edge pixels), about 1.2 on average over photos (tests/data/test_images.py pins these bounds). 3-6x faster per
image than the exact path.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .drops import DropSample

try:
    import cv2
    import simplejpeg
except ImportError:  # pragma: no cover - both are install_requires; without them only draft=False works
    cv2 = simplejpeg = None

Image.MAX_IMAGE_PIXELS = 1_000_000_000  # as the original trainer: large web images are legitimate
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
_JPEG_MAGIC = b"\xff\xd8\xff"
_SIMPLEJPEG_COLORSPACES = frozenset(("YCbCr", "Gray"))  # CMYK/YCCK: PIL's own conversion (as open_clip sees them)
_cv2_threads_set = False


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
    """The DCT scale denominator (1, 2, 4 or 8) of a fast decode: the largest whose decoded shortest side is at
    least `size` (1/2), 1.5 x `size` (1/4) or 2 x `size` (1/8). libjpeg's 1/4 and 1/8 decodes are block averages
    (1/8: DC only); they stay close to a proper downscale only when a further reduction follows."""
    short = min(width, height)
    if short >= 16 * size:
        return 8
    if short >= 6 * size:
        return 4
    return 2 if short >= 2 * size else 1


def open_image(data: bytes) -> Image.Image:
    """Parse an image header (cheap; pixels are decoded later). Raises DropSample('bad_image') on garbage."""
    try:
        return Image.open(io.BytesIO(data))
    except _IMAGE_ERRORS as e:
        raise DropSample("bad_image", str(e)) from None


class ImageTransform:
    """Decode bytes and write open_clip's eval transform of the image into a `[3, H, W]` float32 slot."""

    def __init__(self, spec: ImageSpec, draft: bool = True):
        self.spec = spec
        self.size = spec.image_size
        self.mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
        self.lut = normalize_lut(self.mean, self.std)
        if draft and (cv2 is None or simplejpeg is None):
            raise ImportError("decode_draft needs opencv-python-headless and simplejpeg (pip install -e .)")
        if spec.interpolation not in _RESAMPLE:
            raise ValueError(f"image interpolation '{spec.interpolation}' is not supported ({', '.join(_RESAMPLE)})")
        self.resample = _RESAMPLE[spec.interpolation]
        self.draft = draft and spec.interpolation != "nearest"  # the fast path approximates bicubic/bilinear
        self._fallback = None
        if spec.resize_mode != "shortest" or self.size[0] != self.size[1]:
            import open_clip  # the rare modes go through open_clip itself (torch), exact by construction

            self._fallback = open_clip.image_transform(self.size, is_train=False, mean=spec.mean, std=spec.std,
                                                       resize_mode=spec.resize_mode, interpolation=spec.interpolation)

    def __call__(self, data: bytes, out: np.ndarray, flip: bool) -> None:
        """Fill `out` ([3, H, W] float32) from encoded image bytes; DropSample('bad_image') if they do not decode."""
        try:
            img = Image.open(io.BytesIO(data))
            if self._fallback is not None:
                pixels = self._fallback(img.convert("RGB")).numpy()
                out[...] = pixels[:, :, ::-1] if flip else pixels
                return
            pixels = self._fast(data, img) if self.draft else self._resize_crop(img)
        except _IMAGE_ERRORS as e:
            raise DropSample("bad_image", str(e)) from None
        lut_normalize_into(pixels[:, ::-1] if flip else pixels, out, self.lut)

    def _fast(self, data: bytes, img: Image.Image) -> np.ndarray:
        """The fast path: scaled libjpeg-turbo decode (or PIL), OpenCV resize to open_clip's geometry, crop."""
        global _cv2_threads_set
        if not _cv2_threads_set:
            cv2.setNumThreads(1)  # one thread per loader process (DataLoader workers are the parallelism)
            _cv2_threads_set = True
        w, h = img.size
        arr = None
        jpeg = img.format in ("JPEG", "MPO")  # MPO: camera JPEGs with extra frames after the first image
        if jpeg and data[:3] == _JPEG_MAGIC:
            try:
                sh, sw, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                if colorspace in _SIMPLEJPEG_COLORSPACES and (sw, sh) == (w, h):
                    k = jpeg_scale(w, h, self.size[0])
                    arr = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // k), min_width=-(-w // k))
            except ValueError:  # corrupt, truncated or merely unusual: PIL decides (and raises if it is bad)
                arr = None
        if arr is None:
            k = jpeg_scale(w, h, self.size[0]) if jpeg else 1
            if k > 1:
                img.draft("RGB", (w // k, h // k))  # PIL's libjpeg DCT scaling, to the same 1/k
            arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
        s = self.size[0]
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        reduction = min(arr.shape[0] / new_h, arr.shape[1] / new_w)
        interpolation = cv2.INTER_AREA if reduction >= 1.5 else cv2.INTER_LINEAR
        return cv2.resize(arr, (new_w, new_h), interpolation=interpolation)[top:top + s, left:left + s]

    def _resize_crop(self, img: Image.Image) -> np.ndarray:
        """Exact: resize the shortest side to S (torchvision's rounding), center crop S x S -> uint8 [S, S, 3]."""
        s = self.size[0]
        w, h = img.size
        new_w, new_h = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        img = img.convert("RGB") if img.mode != "RGB" else img  # (convert would copy an RGB image)
        return np.asarray(img.resize((new_w, new_h), self.resample).crop((left, top, left + s, top + s)))
