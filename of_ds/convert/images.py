"""Image bytes: sniff the real format, check that they decode, resize, and the original's JPEG re-encode."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

# Errors PIL raises for bad image data. Anything else (TypeError, AttributeError, ...) is a bug and propagates.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)

RESIZED_EXT = "jpg"
RESIZED_QUALITY = 90


def sniff_ext(data: bytes) -> str | None:
    """The file extension of `data`'s real format from its magic bytes, or None when it is no known image."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return None


def check_structure(data: bytes, ext: str) -> str | None:
    """None if `data` has a parseable header and is complete, else a short reason. Costs microseconds: catches
    HTML error pages saved as images (no magic), truncated downloads (no end marker) and broken headers; damage
    inside the compressed data is left to `check_decodes` (or the loader, which drops and counts such images)."""
    if ext == "jpg":
        last_scan = data.rfind(b"\xff\xda")  # an EXIF thumbnail's end marker comes before the main image's scans
        if last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan:
            return "truncated: no JPEG end marker after the last scan"
    elif ext == "png" and data.rfind(b"IEND\xaeB`\x82") < 0:
        return "truncated: no PNG IEND chunk"
    elif ext == "webp" and int.from_bytes(data[4:8], "little") + 8 > len(data):
        return "truncated: shorter than its RIFF header says"
    elif ext == "gif" and not data.rstrip(b"\x00").endswith(b";"):
        return "truncated: no GIF trailer"
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"[:200]
    if w < 1 or h < 1:
        return f"empty image {w}x{h}"
    return None


def check_decodes(data: bytes, ext: str) -> str | None:
    """None if `data` decodes, else a short reason. JPEGs decode at 1/8 scale (DCT scaling): every entropy-coded
    byte is still read, so truncation and corruption are caught at a fraction of a full decode's cost."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if ext == "jpg":
                im.draft("RGB", (1, 1))
                im.load()
            elif ext == "png":
                im.verify()  # walks every chunk and checks its CRC without inflating the pixels
            else:
                im.load()
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {e}"[:200]
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def resize_to_max_side(data: bytes, max_side: int) -> bytes | None:
    """Re-encode `data` as JPEG with its longer side at `max_side`, or None when it already fits."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if max(w, h) <= max_side:
            return None
        scale = max_side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if im.format == "JPEG":
            im.draft("RGB", size)  # decode at the smallest DCT scale still >= the target
        rgb = im.convert("RGB").resize(size, Image.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=RESIZED_QUALITY)
    return out.getvalue()


def reencode_like_original(data: bytes) -> bytes:
    """The original converter's treatment: decode, convert to RGB, save as JPEG with PIL's defaults (quality 75)."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG")
    return out.getvalue()
