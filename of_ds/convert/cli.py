"""`tools/convert_mmc4` / `of-convert-mmc4`: MMC4 (or ChatGPT-sequence) document shards + images -> training shards."""

from __future__ import annotations

import argparse
import json
import sys

from of_ds.convert.inputs import ConvertError
from of_ds.convert.run import ConvertOptions, convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_mmc4",
        description="Convert MMC4 document shards (docs_shard_{i}_v2.jsonl.zip) and their downloaded images into "
        "webdataset tar shards for of_ds. Re-running with the same arguments resumes and gives identical shards.",
    )
    p.add_argument("--zip-files", required=True, help="Brace pattern or glob of document shards (.jsonl.zip or .jsonl)")
    p.add_argument("--image-dir", required=True, help="Downloaded images: IMAGE_DIR/<shard>/<image_name> or flat")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--workers", type=int, default=1, help="Processes (parallel over output shards)")
    p.add_argument("--docs-per-shard", type=int, default=None, help="Documents per output shard (default: one shard per input)")
    p.add_argument("--resize-max-side", type=int, default=None, help="Re-encode (JPEG) images whose longer side exceeds this")
    p.add_argument("--format", choices=["members", "base64-json"], default="members",
                   help="members: images as their own tar members, original bytes (default); base64-json: the original's layout")
    p.add_argument("--min-image-bytes", type=int, default=0, help="Skip (and count) images of at most this many bytes")
    p.add_argument("--image-layout", choices=["auto", "number", "position", "flat"], default="auto",
                   help="Image sub-directory per input: shard number from the file name, position in the list, or none")
    p.add_argument("--verify", dest="verify", choices=["quick", "decode", "none"], default="quick",
                   help="quick: format magic, header and end marker (truncation); decode: also decode each image "
                   "(JPEG at 1/8 scale, ~5x slower); none: trust the files")
    p.add_argument("--chatgpt", action="store_true",
                   help="Inputs are ChatGPT sequences (example + image_map); images are IMAGE_DIR/<sha256(url) hex>[.ext]")
    p.add_argument("--max-skipped-share", type=float, default=0.9, metavar="F",
                   help="Exit 1 (the shards and report written) when more than this share of the documents read was "
                   "skipped (default 0.9; 1 never); no image found at all is always exit 1")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def report_problems(report: dict, max_skipped_share: float) -> list[str]:
    """What makes a finished conversion a failure: no image found at all, or too many documents skipped."""
    problems = []
    if report.get("images_referenced", 0) > 0 and report.get("images_found", 0) == 0:
        problems.append(f"no image found: 0 of {report['images_referenced']} images referenced by the documents are "
                        "under --image-dir (check the path and --image-layout)")
    read = report.get("documents_read", 0)
    skipped = sum((report.get("documents_skipped") or {}).values())
    if read and skipped / read > max_skipped_share:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted((report.get("documents_skipped") or {}).items(), key=lambda kv: -kv[1]))
        problems.append(f"{skipped} of {read} documents skipped ({100 * skipped / read:.0f}% > --max-skipped-share "
                        f"{max_skipped_share:g}): {reasons}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not 0.0 <= a.max_skipped_share <= 1.0:
        parser.error("--max-skipped-share: a share between 0 and 1")
    opts = ConvertOptions(
        inputs=a.zip_files, image_dir=a.image_dir, output_dir=a.output_dir, format=a.format, chatgpt=a.chatgpt,
        docs_per_shard=a.docs_per_shard, resize_max_side=a.resize_max_side, min_image_bytes=a.min_image_bytes,
        image_layout=a.image_layout, verify=a.verify, workers=a.workers, progress=a.progress,
    )
    if opts.chatgpt and opts.format != "members":
        print("convert_mmc4: error: --chatgpt always writes base64 into image_map; drop --format", file=sys.stderr)
        return 2
    try:
        report = convert(opts)
    except ConvertError as e:
        print(f"convert_mmc4: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    problems = report_problems(report, a.max_skipped_share)
    for problem in problems:
        print(f"convert_mmc4: error: {problem} (report: {a.output_dir}/convert_report.json)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
