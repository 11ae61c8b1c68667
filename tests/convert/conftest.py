"""MMC4-layout inputs made from scikit-image photos, with every kind of bad input the converter must survive."""

from __future__ import annotations

import json

import pytest

from mmc4_inputs import PHOTOS, make_doc, photo_jpeg, write_zip


@pytest.fixture(scope="session")
def mmc4_bad(tmp_path_factory) -> dict:
    """Three zips (shards 0-2, images in IMAGE_DIR/<shard>/) + one corrupt zip, with every bad case.

    Returns the paths and the exact counts a correct conversion must report.
    """
    root = tmp_path_factory.mktemp("mmc4_bad")
    zips, images = root / "zips", root / "images"
    zips.mkdir()
    photos = {n: photo_jpeg(n) for n in PHOTOS}
    png = photo_jpeg("coffee", fmt="PNG")
    for shard in range(3):
        d = images / str(shard)
        d.mkdir(parents=True)
        for n, data in photos.items():
            (d / f"{n}.jpg").write_bytes(data)
        (d / "coffee_really_png.jpg").write_bytes(png)  # misnamed: the extension must come from the bytes
        (d / "garbage.jpg").write_bytes(b"this is not an image at all" * 50)
        (d / "truncated.jpg").write_bytes(photos["astronaut"][: len(photos["astronaut"]) // 2])
        (d / "tiny.jpg").write_bytes(photo_jpeg("chelsea", side=8, quality=30))
    good = lambda s, k: make_doc(3, ["astronaut.jpg", "coffee.jpg"], f"http://doc/{s}/{k}")  # noqa: E731
    lines = {
        0: [json.dumps(good(0, k)).encode() for k in range(4)]
        + [b"{not json", json.dumps(make_doc(2, ["rocket.jpg", "missing.jpg", "garbage.jpg"], "u")).encode()],
        1: [json.dumps(good(1, k)).encode() for k in range(3)]
        + [
            json.dumps({**make_doc(2, ["chelsea.jpg"], "v"), "similarity_matrix": [[0.1, 0.2, 0.3]]}).encode(),
            json.dumps(make_doc(2, ["truncated.jpg", "tiny.jpg", "coffee_really_png.jpg"], "w")).encode(),
            b"",  # a blank line is no document
            json.dumps(make_doc(1, ["missing1.jpg", "missing2.jpg"], "all-missing")).encode(),
        ],
        2: [json.dumps(good(2, k)).encode() for k in range(2)]
        + [
            json.dumps(["not", "a", "doc"]).encode(),
            json.dumps({**make_doc(2, ["rocket.jpg"], "nan"), "similarity_matrix": [[float("nan"), 0.3]]}).encode(),
        ],
    }
    for shard, ls in lines.items():
        write_zip(zips / f"docs_shard_{shard}_v2.jsonl.zip", ls)
    whole = (zips / "docs_shard_0_v2.jsonl.zip").read_bytes()
    (zips / "docs_shard_3_v2.jsonl.zip").write_bytes(whole[: len(whole) // 2])  # truncated download
    expected = {
        "documents_read": 6 + 6 + 4,
        "documents_written": 5 + 5 + 2,
        "documents_skipped": {"bad_json": 1, "bad_similarity_matrix": 2, "bad_schema": 1},
        "documents_without_images": 1,
        "images_referenced": 8 + 3 + 6 + 3 + 2 + 4,
        "images_found": 8 + 1 + 6 + 1 + 4,
        "images_missing": 1 + 2,
        "images_corrupt": 1 + 1,
        "images_too_small": 1,
        "zips_failed": [str(zips / "docs_shard_3_v2.jsonl.zip")],
    }
    return {"zips": str(zips / "docs_shard_{0..3}_v2.jsonl.zip"), "images": str(images), "expected": expected,
            "root": root}
