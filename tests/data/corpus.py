"""A small mixed corpus on disk: LAION shards and MMC4 shards (with 1- and multi-image documents)."""

from __future__ import annotations

from pathlib import Path

from .helpers import jpeg, laion_members, mmc4_base64_members, mmc4_doc, mmc4_member_members, photo_arrays, write_tar

WORDS = ["cat", "dog", "cup", "rocket", "park", "sofa", "flag", "street"]


def caption(i: int) -> str:
    return f"a photo of the {WORDS[i % 8]} number {i}"


def build_corpus(root: Path, laion_shards: int = 3, per_shard: int = 10) -> dict[str, str]:
    """Write the corpus; returns dataset kind -> brace pattern. Some images are flipped-sensitive (asymmetric)."""
    arrays = photo_arrays()
    names = sorted(arrays)
    images = [jpeg(arrays[n], scale=s) for n in names for s in (0.5, 1.0)]
    images = [im for im in images if len(im) > 10_000]
    i = 0
    for s in range(laion_shards):
        members = []
        for _ in range(per_shard):
            members += laion_members(f"l{s}-{i:05d}", images[i % len(images)], caption(i))
            i += 1
        write_tar(root / "laion" / f"{s:06d}.tar", members)
    j = 0
    for s in range(laion_shards):
        b64, mem = [], []
        for _ in range(per_shard):
            n_img = 1 + j % 3
            sentences = [f"the {WORDS[(j + k) % 8]} sentence {k} of doc {j}." for k in range(4)]
            imgs = [images[(j + k) % len(images)] for k in range(n_img)]
            sim = [[0.2 + 0.1 * ((k + t + j) % 3) for t in range(4)] for k in range(n_img)]
            doc = mmc4_doc(sentences, imgs, sim)
            b64 += mmc4_base64_members(f"m{s}-{j:07d}", doc)
            mem += mmc4_member_members(f"m{s}-{j:07d}", doc)
            j += 1
        write_tar(root / "mmc4" / f"{s:06d}.tar", b64)
        write_tar(root / "mmc4_members" / f"{s:06d}.tar", mem)
    top = f"{{000000..{laion_shards - 1:06d}}}.tar"
    return {"laion": str(root / "laion" / top), "mmc4": str(root / "mmc4" / top), "mmc4_members": str(root / "mmc4_members" / top)}
