"""One document in, its tar members out: validation, image lookup, and the three output layouts.

- `members` (default): `K.json` without base64, each `image_info[i]` marked `member` or `missing`, and the images
  as `K.{i:03d}.{ext}` with their original bytes (re-encoded only when resized).
- `base64-json`: the original converter's layout: `K.json` with `image_info[i].image_base64` (RGB JPEG re-encode).
- ChatGPT sequences: `K.json` with `image_map[p].base64_image` filled from images named by the sha256 of the URL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from of_ds.convert.images import (
    DECODE_ERRORS,
    check_decodes,
    check_structure,
    reencode_like_original,
    resize_to_max_side,
    sniff_ext,
)
from of_ds.convert.report import Counts

Member = tuple[str, bytes]  # (suffix after the key, data)
PLACEHOLDER = re.compile(r"_!_IMAGE\d+_!_")
# The Flamingo tokens: text that spells one would become that token in training, so such documents are skipped
# (`text_has_special_token`). The LM's own special tokens (eos, pad...) depend on the tokenizer: the loader drops
# those documents by the same rule.
SPECIAL_TOKENS = ("<image>", "<|endofchunk|>")
URL_HASH_EXTS = ("", ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class ImagePolicy:
    min_bytes: int = 0  # images of at most this many bytes are skipped as too small
    resize_max_side: int | None = None
    verify: str = "quick"  # quick: magic, header and end marker; decode: also decode (JPEG at 1/8 scale); none


@dataclass(frozen=True)
class Found:
    ext: str
    data: bytes
    resized: bool


@dataclass(frozen=True)
class NotUsed:
    kind: str  # missing | corrupt | too_small
    reason: str


def load_image(path: Path | None, policy: ImagePolicy, counts: Counts) -> Found | NotUsed:
    """Read one image file and decide whether it is usable; counts bytes read, never the outcome."""
    if path is None:
        return NotUsed("missing", "bad image_name")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return NotUsed("missing", "not found")
    except (IsADirectoryError, PermissionError) as e:
        return NotUsed("missing", f"unreadable: {type(e).__name__}")
    counts.bytes_in += len(data)
    if len(data) <= policy.min_bytes:
        return NotUsed("too_small", f"{len(data)} bytes <= {policy.min_bytes}")
    ext = sniff_ext(data)
    if ext is None:
        return NotUsed("corrupt", "not a known image format")
    why = None
    if policy.verify in ("quick", "decode"):
        why = check_structure(data, ext)
    if why is None and policy.verify == "decode":
        why = check_decodes(data, ext)
    if why:
        return NotUsed("corrupt", why)
    if policy.resize_max_side:
        try:
            small = resize_to_max_side(data, policy.resize_max_side)
        except DECODE_ERRORS as e:
            return NotUsed("corrupt", f"{type(e).__name__}: {e}"[:200])
        if small is not None:
            return Found("jpg", small, True)
    return Found(ext, data, False)


def count_image(result: Found | NotUsed, counts: Counts) -> None:
    counts.images_referenced += 1
    if isinstance(result, Found):
        counts.images_found += 1
        counts.images_resized += result.resized
    else:
        name = {"missing": "images_missing", "corrupt": "images_corrupt", "too_small": "images_too_small"}[result.kind]
        setattr(counts, name, getattr(counts, name) + 1)


def safe_image_path(directory: Path, name: object) -> Path | None:
    """`directory/name`, or None when `name` is not a plain file name (no separators, not `..`)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    return directory / name


# --------------------------------------------------------------------------------------------------- MMC4
def has_special_token(text: str) -> bool:
    return any(t in text for t in SPECIAL_TOKENS)


def mmc4_problem(doc: object) -> str | None:
    """The skip reason for a document the loader could not use, or None. A similarity matrix must be
    [len(image_info)][len(text_list)] finite numbers: the loader pairs images with sentences through it, so a document
    with any other shape is skipped (`bad_similarity_matrix`) rather than written with pairs that mean nothing. A
    document that lists no images is not checked for one (it is written, counted in `documents_without_images`)."""
    if not isinstance(doc, dict):
        return "bad_schema"
    texts, infos = doc.get("text_list"), doc.get("image_info")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return "bad_schema"
    if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
        return "bad_schema"
    if any(has_special_token(t) for t in texts):
        return "text_has_special_token"
    if not infos:
        return None
    sim = doc.get("similarity_matrix")
    if not isinstance(sim, list) or len(sim) != len(infos):
        return "bad_similarity_matrix"
    for row in sim:
        if not isinstance(row, list) or len(row) != len(texts):
            return "bad_similarity_matrix"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row):
            return "bad_similarity_matrix"
    return None


def parse_line(raw: bytes, counts: Counts) -> object | None:
    """The JSON value of one line, or None (counted as `bad_json`)."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        counts.skip("bad_json")
        return None


def mmc4_members(raw: bytes, image_dir: Path, fmt: str, policy: ImagePolicy, counts: Counts) -> list[Member] | None:
    """The tar members of one MMC4 document line (suffixes after the key), or None when it is skipped."""
    doc = parse_line(raw, counts)
    if doc is None:
        return None
    problem = mmc4_problem(doc)
    if problem:
        counts.skip(problem)
        return None
    members: list[Member] = []
    found_any = False
    for i, info in enumerate(doc["image_info"]):
        info.pop("image_base64", None)
        result = load_image(safe_image_path(image_dir, info.get("image_name")), policy, counts)
        if isinstance(result, Found) and fmt == "base64-json":
            result = _as_original_jpeg(result)
        count_image(result, counts)
        if isinstance(result, NotUsed):
            if fmt == "members":
                info["missing"] = result.reason if result.kind == "missing" else f"{result.kind}: {result.reason}"
            continue
        found_any = True
        counts.images_written += 1
        if fmt == "members":
            info["member"] = f"{i:03d}.{result.ext}"
            members.append((info["member"], result.data))
        else:
            info["image_base64"] = base64.b64encode(result.data).decode("ascii")
    counts.documents_read += 1
    counts.documents_written += 1
    counts.documents_without_images += not found_any
    if fmt == "members":
        return [("json", _dumps(doc))] + members
    return [("json", json.dumps(doc).encode("utf-8"))]  # exactly as webdataset's writer encoded the original's


def _as_original_jpeg(found: Found) -> Found | NotUsed:
    try:
        return Found("jpg", reencode_like_original(found.data), found.resized)
    except DECODE_ERRORS as e:
        return NotUsed("corrupt", f"{type(e).__name__}: {e}"[:200])


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ------------------------------------------------------------------------------------------------ ChatGPT
def url_hash(url: str) -> str:
    """The file stem of a pre-downloaded ChatGPT-sequence image: sha256 of the UTF-8 URL, hex."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def find_by_url(image_dir: Path, url: str) -> Path | None:
    """`IMAGE_DIR/<sha256(url)>` with no extension or a common image one; None if none exists."""
    stem = url_hash(url)
    for ext in URL_HASH_EXTS:
        p = image_dir / (stem + ext)
        if os.path.isfile(p):
            return p
    return None


def _entry_url(entry: object) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for k in ("url", "image_url", "raw_url"):
            if isinstance(entry.get(k), str):
                return entry[k]
    return None


def chatgpt_members(raw: bytes, image_dir: Path, policy: ImagePolicy, counts: Counts) -> list[Member] | None:
    """The `K.json` member of one ChatGPT sequence with `image_map[p].base64_image` filled for every placeholder
    `p` of the text, or None when skipped. Every placeholder's image is needed (the text refers to each), so one
    unusable image skips the document, counted as `image_missing` / `image_corrupt` / `image_too_small`. Entries
    no placeholder names are never used: they are left as they are, not looked up or counted."""
    doc = parse_line(raw, counts)
    if doc is None:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("example"), str) or not isinstance(doc.get("image_map"), dict):
        counts.skip("bad_schema")
        return None
    if has_special_token(doc["example"]):
        counts.skip("text_has_special_token")
        return None
    image_map = doc["image_map"]
    named = list(dict.fromkeys(PLACEHOLDER.findall(doc["example"])))  # each placeholder once, in text order
    if any(p not in image_map for p in named):
        counts.skip("placeholder_without_image")
        return None
    failed: str | None = None
    for placeholder in named:
        entry = image_map[placeholder]
        if isinstance(entry, dict) and isinstance(entry.get("base64_image"), str):
            counts.images_referenced += 1  # already filled upstream: kept as it is
            counts.images_found += 1
            continue
        url = _entry_url(entry)
        path = find_by_url(image_dir, url) if url else None
        if path is None:
            result: Found | NotUsed = NotUsed("missing", "not found" if url else "no url")
        else:
            result = load_image(path, policy, counts)
        count_image(result, counts)
        if isinstance(result, NotUsed):
            failed = failed or f"image_{result.kind}"
            continue
        filled = dict(entry) if isinstance(entry, dict) else {"url": url}
        filled["base64_image"] = base64.b64encode(result.data).decode("ascii")
        image_map[placeholder] = filled
    if failed:
        counts.skip(failed)
        return None
    doc.setdefault("is_gpt", True)
    counts.images_written += sum(isinstance(image_map[p], dict) and "base64_image" in image_map[p] for p in named)
    counts.documents_read += 1
    counts.documents_written += 1
    return [("json", _dumps(doc))]

