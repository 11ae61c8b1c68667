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
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
