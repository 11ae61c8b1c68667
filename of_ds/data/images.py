"""Image decoding and open_clip's evaluation transform, written into preallocated float32 batch slots.

`ImageTransform` reproduces `open_clip.image_transform(size, is_train=False)` (resize the shortest side, center
crop, to-tensor, normalize) without torch. Normalisation is a per-channel 256-entry float32 lookup table whose
entries are computed with the float32 operations of `ToTensor` + `Normalize`, in the same order, so it is
bit-identical to them.

`draft=False`: PIL decode, PIL bicubic resize and crop: bit-identical to open_clip's output.

`draft=True` (the default, "fast"): YCbCr and grayscale JPEGs are decoded by libjpeg-turbo through simplejpeg,
at 1/2 scale when the shortest side stays >= the output, 1/4 when it stays >= 1.5x, 1/8 when it stays >= 2x
(`jpeg_scale`); anything else (PNG, WebP, CMYK JPEGs, and any JPEG simplejpeg refuses: truncated, corrupt, or with
recoverable errors) is decoded by PIL (JPEGs at the same scale), which then decides whether the image is bad. The
decoded image is resized by OpenCV to the exact open_clip geometry (2x2 averaging while the image is at least twice
too large, then bilinear) and center cropped. Against the exact transform at 224 px, per image: mean absolute
difference <= 2.5 8-bit levels, 99% of pixels within 20, max 96 (isolated edge pixels), about 1.2 on average over
photos; at 64 px: 4 / 24 / 96 (tests/data/test_images.py pins these bounds). 3-5x faster per image than the exact
path.
"""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import get_worker_info

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
    """The DCT scale denominator (1, 2, 4 or 8) of a fast decode: the largest whose decoded shortest side is at
    least `size` (1/2), 1.5 x `size` (1/4) or 2 x `size` (1/8). libjpeg's 1/4 and 1/8 decodes are block averages
    (1/8: DC only); they stay close to a proper downscale only when a further reduction follows."""
    short = min(width, height)
    if short >= 16 * size:
        return 8
    if short >= 6 * size:
        return 4
    return 2 if short >= 2 * size else 1


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
            decoded = self._fast_jpeg(data) if self.draft and self._fallback is None else None
            if decoded is None:
                img = Image.open(io.BytesIO(data))
                if self._fallback is not None:
                    pixels = self._fallback(img.convert("RGB")).numpy()
                    out[...] = pixels[:, :, ::-1] if flip else pixels
                    return
                decoded = self._decode_pil(img) if self.draft else None
            pixels = self._fast_resize_crop(*decoded) if decoded is not None else self._resize_crop(img)
        except _IMAGE_ERRORS as e:
            raise DropSample("bad_image", str(e)) from None
        lut_normalize_into(pixels[:, ::-1] if flip else pixels, out, self.lut)

    def _fast_jpeg(self, data: bytes) -> tuple[np.ndarray, int, int] | None:
        """A YCbCr or grayscale JPEG decoded by libjpeg-turbo at 1/k scale -> (pixels, full width, full height);
        None for anything else, or whatever simplejpeg refuses (corrupt, truncated, or merely unusual: PIL then
        decides, and raises if the image is bad)."""
        if data[:3] != _JPEG_MAGIC:
            return None
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace not in _SIMPLEJPEG_COLORSPACES or w < 1 or h < 1:
                return None
            Image._decompression_bomb_check((w, h))  # PIL's own limit, as Image.open would apply it
            k = jpeg_scale(w, h, self.size[0])
            return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // k), min_width=-(-w // k)), w, h
        except ValueError:
            return None

    def _decode_pil(self, img: Image.Image) -> tuple[np.ndarray, int, int]:
        """PIL decode for the fast path (JPEGs at the same 1/k DCT scale) -> (pixels, full width, full height)."""
        w, h = img.size
        k = jpeg_scale(w, h, self.size[0]) if img.format in ("JPEG", "MPO") else 1
        if k > 1:
            img.draft("RGB", (w // k, h // k))
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img), w, h

    def _fast_resize_crop(self, arr: np.ndarray, w: int, h: int) -> np.ndarray:
        """OpenCV resize of a (possibly reduced) decode of a w x h image to open_clip's geometry, center crop."""
        global _cv2_threads_set
        if not _cv2_threads_set:
            cv2.setNumThreads(1)  # one thread per loader process (DataLoader workers are the parallelism)
            _cv2_threads_set = True
        s = self.size[0]
        new_w, new_h, top, left = crop_geometry(w, h, s)
        while arr.shape[0] >= 2 * new_h and arr.shape[1] >= 2 * new_w:  # 2x2 averaging while >= 2x too large
            arr = cv2.resize(arr, (arr.shape[1] // 2, arr.shape[0] // 2), interpolation=cv2.INTER_AREA)
        return cv2.resize(arr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)[top:top + s, left:left + s]

    def _resize_crop(self, img: Image.Image) -> np.ndarray:
        """Exact: resize the shortest side to S (torchvision's rounding), center crop S x S -> uint8 [S, S, 3]."""
        s = self.size[0]
        new_w, new_h, top, left = crop_geometry(*img.size, s)
        img = img.convert("RGB") if img.mode != "RGB" else img  # (convert would copy an RGB image)
        return np.asarray(img.resize((new_w, new_h), self.resample).crop((left, top, left + s, top + s)))
