"""Through the converter and then the loader, on seeded random documents: source text spelling `<image>` or
`<|endofchunk|>` is skipped by the converter, the LM's own special tokens (eos, pad, bos) by the loader, each
counted by reason; documents listing no images are written and counted as such, then dropped as `no_images`; every
row the loader keeps pairs its k-th `<image>` token with the image its text placed k-th."""

from __future__ import annotations

import json
import random
import tarfile
import pytest

from data.pairing import (FLAMINGO_LITERALS, Row, check_row, gpt_doc, mmc4_doc, run_stages, stage_plan, truncated)
from mmc4_inputs import write_zip
from of_ds.convert import ConvertOptions, convert
from of_ds.convert.cli import main as cli_main
from of_ds.convert.documents import url_hash

N_DOCS = 160


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from of_ds.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir, offline=True)


def has_flamingo_literal(text: str) -> bool:
    return any(t in text for t in FLAMINGO_LITERALS)


def check_tags(tags: list[str | None], placed: list[str], key: str) -> None:
    assert len(tags) <= len(placed), (key, tags, placed)
    for k, tag in enumerate(tags):
        assert tag == placed[k] or (tag is None and k == len(tags) - 1), (key, k, tags, placed)


def test_chatgpt_through_convert_mmc4_keeps_every_pairing(tmp_path, tokenizer):
    rng = random.Random(4000)
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    docs, lines, omitted = [], [], set()
    for i in range(N_DOCS):
        doc, d, files = gpt_doc(rng, f"g{i:04d}", urls=True, is_gpt=False)
        for url, png in files.items():
            if rng.random() < 0.05:
                omitted.add(url)  # never downloaded
            else:
                (image_dir / (url_hash(url) + rng.choice(["", ".png"]))).write_bytes(png)
        docs.append((doc, d))
        lines.append(json.dumps(doc))
    (tmp_path / "gpt_0.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli_main(["--zip-files", str(tmp_path / "gpt_0.jsonl"), "--image-dir", str(image_dir), "--output-dir",
                     str(out), "--chatgpt", "--no-progress"]) == 0
    report = json.loads((out / "convert_report.json").read_text())

    def url(doc, k):
        entry = doc["image_map"][f"_!_IMAGE{k}_!_"]
        return entry if isinstance(entry, str) else entry["url"]

    expected_skips, written = {}, {}
    for line, (doc, d) in enumerate(docs):
        order = d.meta["order"]
        if has_flamingo_literal(doc["example"]):
            reason = "text_has_special_token"
        elif any(k not in d.meta["mapped"] for k in order):
            reason = "placeholder_without_image"
        elif any(url(doc, k) in omitted for k in order):  # unreferenced entries are never looked up
            reason = "image_missing"
        else:
            written[f"gpt_0-{line:07d}"] = (doc, d)
            continue
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert report["documents_skipped"] == dict(sorted(expected_skips.items()))
    assert report["documents_written"] == len(written) >= 60 and expected_skips["text_has_special_token"] >= 10

    for max_images, max_tokens in ((3, 24), (6, 256)):
        plan = stage_plan(tmp_path, tokenizer, "chatgpt", max_images=max_images, max_tokens=max_tokens)
        results = run_stages(plan, out / "000000.tar")
        assert set(results) == set(written)
        kept = 0
        for key, got in results.items():
            doc, d = written[key]
            if d.literal is not None:  # only the LM's own tokens get here: </s>, <PAD>, <s>
                assert got == "text_has_special_token", (key, got)
            elif isinstance(got, str):
                assert got == "too_few_images", (key, got)
            else:
                assert isinstance(got, Row)
                tags = check_row(tokenizer, got, d.colour_of, key)
                check_tags(tags, [f"p{k}" for k in d.meta["order"][:max_images]], key)
                if not truncated(tokenizer, got):
                    assert got.num_images == min(len(d.meta["order"]), max_images)
                kept += 1
        assert kept >= 50
    # what the converter wrote: every placeholder's entry filled, entries no placeholder names left as they were
    doc, d = next(iter(written.values()))
    with tarfile.open(out / "000000.tar") as tf:
        first = json.loads(tf.extractfile(tf.getmembers()[0]).read())
    for p, entry in first["image_map"].items():
        assert ("base64_image" in entry) == (int(p[len("_!_IMAGE"):-3]) in d.meta["order"]), p
    assert first["is_gpt"] is True


def test_mmc4_through_convert_mmc4_keeps_every_pairing_and_counts_imageless_documents(tmp_path, tokenizer):
    rng = random.Random(5000)
    image_dir, zips = tmp_path / "img", tmp_path / "zips"
    image_dir.mkdir()
    zips.mkdir()
    docs, lines = [], []
    for i in range(N_DOCS):
        key = f"m{i:04d}"
        if rng.random() < 0.08:  # no images: MMC4's empty matrix, or none at all
            doc = {"text_list": ["@s0# a cat.", "b."], "image_info": []}
            if rng.random() < 0.5:
                doc["similarity_matrix"] = []
            d = None
        else:
            doc, d, images = mmc4_doc(rng, key)
            for info, png in zip(doc["image_info"], images):
                (image_dir / info["image_name"]).write_bytes(png)
        docs.append((doc, d))
        lines.append(json.dumps(doc).encode())
    write_zip(zips / "docs_shard_0_v2.jsonl.zip", lines)
    report = convert(ConvertOptions(inputs=str(zips / "docs_shard_0_v2.jsonl.zip"), image_dir=str(image_dir),
                                    output_dir=str(tmp_path / "out"), image_layout="flat", progress=False))
    literal = sum(has_flamingo_literal(" ".join(doc["text_list"])) for doc, _ in docs)
    imageless = sum(d is None for _, d in docs)
    assert report["documents_skipped"] == {"text_has_special_token": literal} and literal >= 10
    assert report["documents_written"] == N_DOCS - literal
    assert report["documents_without_images"] == imageless >= 5

    written = {f"docs_shard_0_v2-{line:07d}": (doc, d) for line, (doc, d) in enumerate(docs)
               if not has_flamingo_literal(" ".join(doc["text_list"]))}
    for max_images, max_tokens in ((3, 24), (6, 256)):
        plan = stage_plan(tmp_path, tokenizer, "mmc4", max_images=max_images, max_tokens=max_tokens)
        results = run_stages(plan, tmp_path / "out" / "000000.tar")
        assert set(results) == set(written)
        kept = 0
        for key, got in results.items():
            doc, d = written[key]
            if d is None:
                assert got == "no_images", (key, got)
                continue
            placed = [f"s{j}" for j in d.meta["kept_sentences"]]
            if d.literal is not None:
                assert got == "text_has_special_token", (key, got)
            elif not placed:
                assert got == "no_images_above_threshold", (key, got)
            elif isinstance(got, str):
                assert got in ("too_few_images", "single_image_at_end"), (key, got)
            else:
                tags = check_row(tokenizer, got, d.colour_of, key)
                check_tags(tags, placed[:max_images], key)
                if not truncated(tokenizer, got):
                    assert got.num_images == min(len(placed), max_images)
                kept += 1
        assert kept >= 60


def test_converter_never_reports_an_imageless_document_as_a_bad_matrix(tmp_path):
    zips = tmp_path / "zips"
    zips.mkdir()
    docs = [
        {"text_list": ["a.", "b."], "image_info": [], "similarity_matrix": []},
        {"text_list": ["a.", "b."], "image_info": []},
        {"text_list": ["a.", "b."], "image_info": [], "similarity_matrix": [[0.1, 0.2]]},
        {"text_list": ["a.", "b."], "image_info": [{"image_name": "x.jpg"}], "similarity_matrix": []},  # bad
        {"text_list": ["an <|endofchunk|> here."], "image_info": [], "similarity_matrix": []},
    ]
    write_zip(zips / "docs_shard_0_v2.jsonl.zip", [json.dumps(d).encode() for d in docs])
    (tmp_path / "img").mkdir()
    report = convert(ConvertOptions(inputs=str(zips / "docs_shard_0_v2.jsonl.zip"), image_dir=str(tmp_path / "img"),
                                    output_dir=str(tmp_path / "out"), image_layout="flat", progress=False))
    assert report["documents_skipped"] == {"bad_similarity_matrix": 1, "text_has_special_token": 1}
    assert report["documents_written"] == 3 and report["documents_without_images"] == 3

