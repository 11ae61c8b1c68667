"""Helpers that write MMC4-layout inputs (zips of JSON lines, image dirs) from scikit-image photos."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo_jpeg(name: str, side: int = 160, quality: int = 90, fmt: str = "JPEG") -> bytes:
    import skimage.data

    arr = getattr(skimage.data, name)()
    im = Image.fromarray(np.asarray(arr)).convert("RGB")
    im.thumbnail((side, side))
    out = io.BytesIO()
    im.save(out, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return out.getvalue()


def make_doc(n_sent: int, names: list[str], url: str) -> dict:
    sim = [[0.3 if j == i % n_sent else 0.15 for j in range(n_sent)] for i in range(len(names))]
    return {
        "url": url,
        "text_list": [f"sentence {j} of {url}" for j in range(n_sent)],
        "image_info": [
            {"image_name": n, "raw_url": f"http://x/{n}", "matched_text_index": i % n_sent, "matched_sim": 0.3}
            for i, n in enumerate(names)
        ],
        "similarity_matrix": sim,
    }


def write_zip(path: Path, lines: list[bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo(path.name[: -len(".zip")], date_time=(2023, 1, 1, 0, 0, 0))
        zf.writestr(info, b"\n".join(lines) + b"\n", zipfile.ZIP_DEFLATED)
