"""The data loaders read the converter's default layout and give the same training batches as from the original's
base64-JSON layout (same documents, same keys, same order): token tensors and image counts exactly; pixels within
the error of the JPEG re-encode that the original layout forces."""

from __future__ import annotations

import types

import torch

from of_ds.convert import ConvertOptions, convert
from of_ds.spec import RunSpec

RUNTIME = types.SimpleNamespace(rank=0, world_size=1, local_rank=0)
N_BATCHES = 4


def batches(shards: list[str], tokenizer_dir: str) -> list[dict]:
    from of_ds.data import build_stream_plan
    from of_ds.data.images import ImageSpec
    from of_ds.data.stream import worker_batches
    from of_ds.model.tokenizer import load_tokenizer

    spec = RunSpec.from_dict({"data": {"datasets": [dict(
        name="mmc4", kind="mmc4", shards=shards, batch_size=2, max_images=3, max_tokens=48, min_image_bytes=0,
        shuffle_buffer=4, shuffle_initial=2, workers=1)]}, "run": {"seed": 7}})
    image_spec = ImageSpec((64, 64), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711), "bicubic", "shortest")
    tok = load_tokenizer(tokenizer_dir, offline=True)
    plan = build_stream_plan(spec.dataset("mmc4"), spec.run.seed, tok, image_spec, RUNTIME)
    return list(worker_batches(plan, 0, 0, 0, N_BATCHES))


def test_loaders_give_the_same_batches_from_both_layouts(mmc4_bad, tmp_path, tiny_tokenizer_dir):
    got = {}
    for fmt in ("members", "base64-json"):
        out = tmp_path / fmt
        convert(ConvertOptions(inputs=mmc4_bad["zips"], image_dir=mmc4_bad["images"], output_dir=str(out),
                               format=fmt, min_image_bytes=1000, progress=False))
        got[fmt] = batches(sorted(str(p) for p in out.glob("*.tar")), tiny_tokenizer_dir)
    assert len(got["members"]) == len(got["base64-json"]) == N_BATCHES
    images = 0
    for a, b in zip(got["members"], got["base64-json"]):
        for key in ("input_ids", "attention_mask", "labels", "num_images"):
            assert torch.equal(a[key], b[key]), key
        assert a["pixel_values"].shape == b["pixel_values"].shape
        diff = (a["pixel_values"] - b["pixel_values"]).abs()
        assert diff.mean() < 0.05, diff.mean()  # JPEG q75 re-encode noise, not a different image
        images += int(a["num_images"].sum())
        for row, n in enumerate(a["num_images"].tolist()):  # the same images in the same slots
            for k in range(n):
                same = (a["pixel_values"][row, k] - b["pixel_values"][row, k]).abs().mean()
                others = [(a["pixel_values"][row, k] - b["pixel_values"][row, j]).abs().mean() for j in range(n) if j != k]
                assert all(same < o for o in others)
    assert images >= N_BATCHES * 2


def test_loader_reads_chatgpt_output(tmp_path):
    import json
    import tarfile

    from mmc4_inputs import photo_jpeg
    from of_ds.convert.documents import url_hash
    from of_ds.data.drops import DropCounter
    from of_ds.data.interleaved import DocumentRules, prepare_document

    img = tmp_path / "img"
    img.mkdir()
    urls = ["http://a/1.jpg", "http://a/2.png"]
    photos = [photo_jpeg("rocket", side=80), photo_jpeg("coffee", side=80, fmt="PNG")]
    for url, data in zip(urls, photos):
        (img / url_hash(url)).write_bytes(data)
    doc = {"example": "A rocket. _!_IMAGE1_!_ Then coffee _!_IMAGE2_!_ after.",
           "image_map": {"_!_IMAGE1_!_": {"url": urls[0]}, "_!_IMAGE2_!_": urls[1]}}
    (tmp_path / "gpt.jsonl").write_text(json.dumps(doc) + "\n")
    convert(ConvertOptions(inputs=str(tmp_path / "gpt.jsonl"), image_dir=str(img), output_dir=str(tmp_path / "out"),
                           chatgpt=True, progress=False))
    with tarfile.open(tmp_path / "out/000000.tar") as tf:
        (m,) = tf.getmembers()
        sample = {"__key__": m.name.split(".")[0], "json": tf.extractfile(m).read()}
    from of_ds.data.tokens import TokenInfo

    rules = DocumentRules("chatgpt", 3, 1, 0.24, 0, 0.0, 0.0, 64)
    got = prepare_document(sample, rules, TokenInfo(0, 1, 2, "</s>"), DropCounter("gpt", 10))
    assert got.images == photos and got.text.count("<image>") == 2
