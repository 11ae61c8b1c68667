"""Shard writers for the data tests: real photos (scikit-image), LAION pairs, MMC4 in both layouts, ChatGPT docs."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import types
from pathlib import Path

import numpy as np
from PIL import Image

from of_ds.data.images import ImageSpec
from of_ds.spec import RunSpec

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SPEC = ImageSpec((64, 64), OPENAI_MEAN, OPENAI_STD, "bicubic", "shortest")
RUNTIME = types.SimpleNamespace(rank=0, world_size=1, local_rank=0)


def photo_arrays() -> dict[str, np.ndarray]:
    """Real RGB photos from scikit-image (no download: they ship with the package)."""
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"):
        arr = getattr(data, name)()
        out[name] = np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]
    return out


def jpeg(arr: np.ndarray, scale: float = 1.0, quality: int = 90, fmt: str = "JPEG") -> bytes:
    img = Image.fromarray(arr)
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def laion_members(key: str, image: bytes | None, caption: str | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    out = []
    if image is not None:
        out.append((f"{key}.{ext}", image))
    if caption is not None:
        out.append((f"{key}.txt", caption.encode()))
    out.append((f"{key}.json", json.dumps({"caption": caption}).encode()))
    return out


def mmc4_doc(sentences: list[str], images: list[bytes | None], sim: list[list[float]]) -> dict:
    """An MMC4 document (without image payloads; see the two writers)."""
    return {"text_list": sentences, "similarity_matrix": sim, "url": "http://example.com",
            "image_info": [{"image_name": f"img{i}.jpg", "raw_url": f"http://example.com/{i}.jpg"} for i in range(len(images))],
            "_images": images}


def mmc4_base64_members(key: str, doc: dict) -> list[tuple[str, bytes]]:
    """The original converter's layout: one `key.json` with image_info[i].image_base64."""
    d = {k: v for k, v in doc.items() if k != "_images"}
    d["image_info"] = [dict(info) for info in d["image_info"]]
    for info, img in zip(d["image_info"], doc["_images"]):
        if img is not None:
            info["image_base64"] = base64.b64encode(img).decode()
    return [(f"{key}.json", json.dumps(d).encode())]


def mmc4_member_members(key: str, doc: dict) -> list[tuple[str, bytes]]:
    """tools/convert_mmc4's layout: `key.json` with image_info[i].member and tar members `key.{i:03d}.jpg`."""
    d = {k: v for k, v in doc.items() if k != "_images"}
    d["image_info"] = [dict(info) for info in d["image_info"]]
    images = []
    for i, (info, img) in enumerate(zip(d["image_info"], doc["_images"])):
        if img is None:
            info["missing"] = "not_found"
        else:
            info["member"] = f"{i:03d}.jpg"
            images.append((f"{key}.{i:03d}.jpg", img))
    return [(f"{key}.json", json.dumps(d).encode())] + images


def gpt_members(key: str, example: str, images: dict[int, bytes]) -> list[tuple[str, bytes]]:
    doc = {"is_gpt": True, "example": example,
           "image_map": {f"_!_IMAGE{k}_!_": {"base64_image": base64.b64encode(v).decode()} for k, v in images.items()}}
    return [(f"{key}.json", json.dumps(doc).encode())]


def make_spec(*datasets: dict, seed: int = 7) -> RunSpec:
    defaults = dict(shuffle_buffer=20, shuffle_initial=5, flip_prob=0.0, workers=0)
    return RunSpec.from_dict({"data": {"datasets": [{**defaults, **d} for d in datasets]}, "run": {"seed": seed}})


def run_dataset(tmp_path: Path, members: list[tuple[str, bytes]], tokenizer, steps: int = 1, **ds):
    """Write one shard, load `steps` batches of one dataset (workers 0, no shuffle) -> (batches, drop counts)."""
    from of_ds.data import build_train_data

    shard = write_tar(tmp_path / f"shard-{len(list(tmp_path.glob('shard-*')))}.tar", members)
    fields = dict(name="d", kind="mmc4", shards=str(shard), batch_size=1, shuffle_buffer=0, shuffle_initial=0,
                  single_image_drop_prob=0.0)
    fields.update(ds)
    fields.setdefault("samples_per_epoch", steps * fields["batch_size"])
    max_drops = fields.pop("max_consecutive_drops", 200)
    data = build_train_data(make_spec(fields), tokenizer, IMAGE_SPEC, RUNTIME, max_consecutive_drops=max_drops)
    batches = [b["d"] for b in data]
    return batches, data.drop_counts()["d"]


def transformed(image: bytes, flip: bool = False, draft: bool = False) -> np.ndarray:
    from of_ds.data.images import ImageTransform

    out = np.zeros((3, *IMAGE_SPEC.image_size), dtype=np.float32)
    ImageTransform(IMAGE_SPEC, draft=draft)(image, out, flip)
    return out
