"""The MMC4 converter on generated inputs with every bad case: exact report, byte-identical re-runs, layouts."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmc4_inputs import make_doc, photo_jpeg, write_zip
from of_ds.convert import ConvertError, ConvertOptions, convert
from of_ds.convert.cli import main as cli_main
from of_ds.convert.documents import url_hash


def run(fix: dict, out: Path, **kw) -> dict:
    kw.setdefault("min_image_bytes", 1000)
    return convert(ConvertOptions(inputs=fix["zips"], image_dir=fix["images"], output_dir=str(out), progress=False, **kw))


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.mark.parametrize("verify", ["quick", "decode"])
def test_report_is_exact_and_images_keep_their_bytes(mmc4_bad, tmp_path, verify):
    report = run(mmc4_bad, tmp_path / "out", verify=verify)
    exp = mmc4_bad["expected"]
    for k, v in exp.items():
        got = sorted(report[k]) if k == "zips_failed" else report[k]
        assert got == v, k
    assert "not a zip" in next(iter(report["zips_failed"].values()))
    assert report["images_written"] == report["images_found"]
    assert json.loads((tmp_path / "out/convert_report.json").read_text()) == report
    # one shard per readable zip, numbered in input order; the corrupt zip gets none
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    sizes = json.loads((tmp_path / "out/sizes.json").read_text())
    shards = json.loads((tmp_path / "out/shards.json").read_text())
    assert sizes == {"000000.tar": 5, "000001.tar": 5, "000002.tar": 2}
    assert sum(s["images"] for s in shards.values()) == report["images_found"]

    images = Path(mmc4_bad["images"])
    members = dict(tar_members(tmp_path / "out/000001.tar"))
    doc = json.loads(members["docs_shard_1_v2-0000004.json"])
    assert "member" not in doc["image_info"][0] and doc["image_info"][0]["missing"].startswith("corrupt:")
    assert doc["image_info"][1]["missing"].startswith("too_small:")
    assert doc["image_info"][2]["member"] == "002.png"  # named .jpg, but the bytes are a PNG
    assert members["docs_shard_1_v2-0000004.002.png"] == (images / "1/coffee_really_png.jpg").read_bytes()
    assert json.loads(members["docs_shard_1_v2-0000006.json"])["image_info"][1]["missing"] == "not found"
    first = json.loads(members["docs_shard_1_v2-0000000.json"])
    assert [i["member"] for i in first["image_info"]] == ["000.jpg", "001.jpg"]
    assert members["docs_shard_1_v2-0000000.000.jpg"] == (images / "1/astronaut.jpg").read_bytes()
    assert first["similarity_matrix"] == [[0.3, 0.15, 0.15], [0.15, 0.3, 0.15]]
    # every written document is a complete webdataset sample: json first, then its images
    for name in members:
        assert name.split(".", 1)[0].startswith("docs_shard_1_v2-")


def test_reruns_and_worker_counts_give_identical_bytes(mmc4_bad, tmp_path):
    a = run(mmc4_bad, tmp_path / "a", workers=1)
    b = run(mmc4_bad, tmp_path / "b", workers=2)
    assert tar_hashes(tmp_path / "a") == tar_hashes(tmp_path / "b")
    timings = ("seconds", "images_per_second", "shard_cpu_seconds")
    assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}
    before = tar_hashes(tmp_path / "a")
    again = run(mmc4_bad, tmp_path / "a", workers=2)  # resume of a finished run: nothing to do, same report
    assert again["shards_resumed"] == 3 and again["shards_converted"] == 0
    assert again["documents_written"] == a["documents_written"] and again["bytes_out"] == a["bytes_out"]
    assert tar_hashes(tmp_path / "a") == before
    # a lost shard and a truncated one are redone, identical
    (tmp_path / "a/000001.tar").unlink()
    with open(tmp_path / "a/000002.tar", "r+b") as f:
        f.truncate(1024)
    redo = run(mmc4_bad, tmp_path / "a")
    assert redo["shards_converted"] == 2 and tar_hashes(tmp_path / "a") == before
    with pytest.raises(ConvertError, match="other settings.*min_image_bytes"):
        run(mmc4_bad, tmp_path / "a", min_image_bytes=5)


def test_docs_per_shard_groups_documents_across_inputs(mmc4_bad, tmp_path):
    whole = run(mmc4_bad, tmp_path / "whole")
    grouped = run(mmc4_bad, tmp_path / "grouped", docs_per_shard=4)
    # 16 readable documents (skipped ones included) in groups of 4
    assert sorted(p.name for p in (tmp_path / "grouped").glob("*.tar")) == [f"{i:06d}.tar" for i in range(4)]
    flat = lambda out: [m for p in sorted(out.glob("*.tar")) for m in tar_members(p)]  # noqa: E731
    assert flat(tmp_path / "grouped") == flat(tmp_path / "whole")
    assert sum(json.loads((tmp_path / "grouped/sizes.json").read_text()).values()) == whole["documents_written"]


def test_resize_only_large_images(mmc4_bad, tmp_path):
    report = run(mmc4_bad, tmp_path / "out", resize_max_side=100)
    assert report["images_resized"] == report["images_found"]  # every test photo is 160 px
    members = tar_members(tmp_path / "out/000001.tar")
    for name, data in members:
        if not name.endswith(".json"):
            assert name.endswith(".jpg") and max(Image.open(io.BytesIO(data)).size) == 100
    report = run(mmc4_bad, tmp_path / "out2", resize_max_side=1000)
    assert report["images_resized"] == 0


def test_base64_json_is_the_original_layout(mmc4_bad, tmp_path):
    report = run(mmc4_bad, tmp_path / "out", format="base64-json", min_image_bytes=0)
    assert report["images_found"] == mmc4_bad["expected"]["images_found"] + 1  # the tiny image is kept
    members = tar_members(tmp_path / "out/000000.tar")
    assert all(name.endswith(".json") and name.count(".") == 1 for name, _ in members)
    doc = json.loads(dict(members)["docs_shard_0_v2-0000000.json"])
    src = Path(mmc4_bad["images"]) / "0" / doc["image_info"][0]["image_name"]
    # the original: decode, RGB, JPEG at PIL's default quality, base64 in image_info[i].image_base64
    expected = io.BytesIO()
    Image.open(src).convert("RGB").save(expected, format="JPEG")
    assert base64.b64decode(doc["image_info"][0]["image_base64"]) == expected.getvalue()
    assert set(doc) == {"url", "text_list", "image_info", "similarity_matrix"}
    assert all(set(i) <= {"image_name", "raw_url", "matched_text_index", "matched_sim", "image_base64"} for i in doc["image_info"])
    bad = json.loads(dict(members)["docs_shard_0_v2-0000005.json"])
    assert ["image_base64" in i for i in bad["image_info"]] == [True, False, False]
    # serialised the way webdataset's writer serialised the original's documents
    assert dict(members)["docs_shard_0_v2-0000000.json"] == json.dumps(doc).encode()


def test_image_layouts(tmp_path):
    zips, img = tmp_path / "zips", tmp_path / "img"
    zips.mkdir()
    data = photo_jpeg("rocket", side=64)
    for n in (7, 8):
        write_zip(zips / f"docs_shard_{n}_v2.jsonl.zip", [json.dumps(make_doc(1, [f"r{n}.jpg"], str(n))).encode()])
    pattern = str(zips / "docs_shard_{7..8}_v2.jsonl.zip")

    def found(layout_dirs: dict[str, str], **kw) -> int:
        shutil.rmtree(img, ignore_errors=True)
        for name, sub in layout_dirs.items():
            (img / sub).mkdir(parents=True, exist_ok=True)
            (img / sub / name).write_bytes(data)
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        return convert(ConvertOptions(inputs=pattern, image_dir=str(img), output_dir=str(out), progress=False, **kw))["images_found"]

    assert found({"r7.jpg": "7", "r8.jpg": "8"}) == 2  # MMC4's shard numbers
    assert found({"r7.jpg": "0", "r8.jpg": "1"}) == 2  # the original's list positions
    assert found({"r7.jpg": ".", "r8.jpg": "."}) == 2  # flat
    with pytest.raises(ConvertError, match="ambiguous"):
        found({"r7.jpg": "7", "r8.jpg": "0"})
    assert found({"r7.jpg": "7", "r8.jpg": "0"}, image_layout="number") == 1


def test_chatgpt_mode_fills_image_map(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    urls = [f"http://img/{i}.jpg" for i in range(3)]
    (img / (url_hash(urls[0]) + ".jpg")).write_bytes(photo_jpeg("astronaut", side=64))
    (img / url_hash(urls[1])).write_bytes(photo_jpeg("coffee", side=64))
    docs = [
        {"example": "_!_IMAGE1_!_ an astronaut. _!_IMAGE2_!_ coffee.",
         "image_map": {"_!_IMAGE1_!_": {"url": urls[0]}, "_!_IMAGE2_!_": {"url": urls[1]}}},
        {"example": "_!_IMAGE1_!_ gone", "image_map": {"_!_IMAGE1_!_": {"url": urls[2]}}},
        {"example": "_!_IMAGE1_!_ _!_IMAGE2_!_", "image_map": {"_!_IMAGE1_!_": urls[0]}},
        {"no": "example"},
    ]
    src = tmp_path / "gpt_0.jsonl"
    src.write_text("\n".join(json.dumps(d) for d in docs) + "\n{broken\n")
    out = tmp_path / "out"
    rc = cli_main(["--zip-files", str(src), "--image-dir", str(img), "--output-dir", str(out), "--chatgpt", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "convert_report.json").read_text())
    assert report["documents_read"] == 5 and report["documents_written"] == 1
    assert report["documents_skipped"] == {"bad_json": 1, "bad_schema": 1, "image_missing": 1, "placeholder_without_image": 1}
    assert (report["images_referenced"], report["images_found"], report["images_missing"]) == (3, 2, 1)
    (name, data), = tar_members(out / "000000.tar")
    doc = json.loads(data)
    assert name == "gpt_0-0000000.json" and doc["is_gpt"] is True
    assert base64.b64decode(doc["image_map"]["_!_IMAGE2_!_"]["base64_image"]) == (img / url_hash(urls[1])).read_bytes()


def test_cli_errors_name_the_flag(tmp_path, capsys):
    assert cli_main(["--zip-files", str(tmp_path / "nope_{0..2}.zip"), "--image-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--zip-files: not found" in capsys.readouterr().err
    (tmp_path / "a.jsonl").write_text("{}\n")
    assert cli_main(["--zip-files", str(tmp_path / "a.jsonl"), "--image-dir", str(tmp_path / "x"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--image-dir: not a directory" in capsys.readouterr().err


def test_glob_inputs_in_natural_order_and_flat_images(tmp_path):
    zips, img = tmp_path / "zips", tmp_path / "img"
    zips.mkdir()
    img.mkdir()
    (img / "r.jpg").write_bytes(photo_jpeg("rocket", side=64))
    for n in (10, 2):
        write_zip(zips / f"docs_shard_{n}_v2.jsonl.zip", [json.dumps(make_doc(1, ["r.jpg"], str(n))).encode()])
    out = tmp_path / "out"
    report = convert(ConvertOptions(inputs=str(zips / "docs_shard_*_v2.jsonl.zip"), image_dir=str(img), output_dir=str(out), progress=False))
    assert report["images_found"] == 2
    assert [n for n, _ in tar_members(out / "000000.tar")] == ["docs_shard_2_v2-0000000.json", "docs_shard_2_v2-0000000.000.jpg"]
    assert tar_members(out / "000001.tar")[0][0] == "docs_shard_10_v2-0000000.json"
