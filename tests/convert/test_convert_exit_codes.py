"""tools/convert_mmc4's exit status: a conversion that found no image at all, or skipped more than
--max-skipped-share of its documents, exits 1 with its report written; a healthy one exits 0."""

from __future__ import annotations

import json

from mmc4_inputs import make_doc, photo_jpeg, write_zip
from of_ds.convert.cli import main as cli_main


def inputs(tmp_path, n_docs: int = 4, bad_lines: int = 0):
    """One zip of `n_docs` documents with one image each (r{i}.jpg) plus `bad_lines` unparsable lines."""
    src = tmp_path / "docs_shard_0_v2.jsonl.zip"
    lines = [json.dumps(make_doc(2, [f"r{i}.jpg"], f"u{i}")).encode() for i in range(n_docs)] + [b"{broken"] * bad_lines
    write_zip(src, lines)
    images = tmp_path / "images"
    images.mkdir()
    return src, images


def cli(src, images, out, *extra):
    return cli_main(["--zip-files", str(src), "--image-dir", str(images), "--output-dir", str(out), "--no-progress", *extra])


def test_no_image_found_exits_1_with_the_report_written(tmp_path, capsys):
    src, images = inputs(tmp_path)  # the image dir is empty
    out = tmp_path / "out"
    assert cli(src, images, out) == 1
    report = json.loads((out / "convert_report.json").read_text())
    assert report["images_referenced"] == 4 and report["images_found"] == 0
    err = capsys.readouterr().err
    assert "convert_mmc4: error: no image found: 0 of 4 images" in err and "--image-dir" in err


def test_found_images_exit_0(tmp_path):
    src, images = inputs(tmp_path)
    for i in range(4):
        (images / f"r{i}.jpg").write_bytes(photo_jpeg("rocket", side=64))
    assert cli(src, images, tmp_path / "out") == 0


def test_too_many_skipped_documents_exit_1_at_the_share_given(tmp_path, capsys):
    src, images = inputs(tmp_path, n_docs=2, bad_lines=2)  # half the documents are unparsable
    for i in range(2):
        (images / f"r{i}.jpg").write_bytes(photo_jpeg("coffee", side=64))
    assert cli(src, images, tmp_path / "a") == 0  # 50% skipped: under the default 0.9
    assert cli(src, images, tmp_path / "b", "--max-skipped-share", "0.4") == 1
    report = json.loads((tmp_path / "b" / "convert_report.json").read_text())
    assert report["documents_read"] == 4 and report["documents_written"] == 2
    err = capsys.readouterr().err
    assert "2 of 4 documents skipped (50% > --max-skipped-share 0.4): bad_json: 2" in err
