"""Counts: one `Counts` per output shard (saved as its done record), summed into the conversion report.

Invariants (checked by `check_adds_up`):
- documents_read == documents_written + sum(documents_skipped.values())
- images_referenced == images_found + images_missing + images_corrupt + images_too_small
  (every image looked at: those of written documents, and in ChatGPT mode also those of a sequence skipped for one
  unusable image; a document skipped for its JSON, schema or text has its images never looked at)
- images_written <= images_found (the images in the output shards)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Counts:
    documents_read: int = 0
    documents_written: int = 0
    documents_skipped: dict[str, int] = field(default_factory=dict)
    documents_without_images: int = 0  # written, but no image was found: the loader will skip them
    images_referenced: int = 0
    images_found: int = 0
    images_missing: int = 0
    images_corrupt: int = 0
    images_too_small: int = 0
    images_resized: int = 0
    images_written: int = 0
    bytes_in: int = 0  # document shards read plus image files read
    bytes_out: int = 0  # output tar size

    def skip(self, reason: str) -> None:
        self.documents_read += 1
        self.documents_skipped[reason] = self.documents_skipped.get(reason, 0) + 1

    def add(self, other: "Counts") -> None:
        for f in fields(self):
            if f.name == "documents_skipped":
                self.documents_skipped = dict(Counter(self.documents_skipped) + Counter(other.documents_skipped))
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["documents_skipped"] = dict(sorted(self.documents_skipped.items()))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Counts":
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def check_adds_up(c: Counts) -> None:
    """Raise if a document or an image is unaccounted for (a bug in the converter, never bad input)."""
    skipped = sum(c.documents_skipped.values())
    if c.documents_read != c.documents_written + skipped:
        raise RuntimeError(f"report does not add up: read {c.documents_read} != written {c.documents_written} + skipped {skipped}")
    images = c.images_found + c.images_missing + c.images_corrupt + c.images_too_small
    if c.images_referenced != images:
        raise RuntimeError(f"report does not add up: {c.images_referenced} images referenced != {images} accounted")


def format_report(report: dict) -> str:
    """A short human summary of the report dict."""
    lines = [
        f"documents: {report['documents_read']} read, {report['documents_written']} written, "
        f"{sum(report['documents_skipped'].values())} skipped {report['documents_skipped'] or ''}".rstrip(),
        f"  written without any image (the loader skips them): {report['documents_without_images']}",
        f"images: {report['images_found']} found, {report['images_missing']} missing, {report['images_corrupt']} corrupt, "
        f"{report['images_too_small']} too small, {report['images_resized']} resized",
        f"bytes: {report['bytes_in']:,} in, {report['bytes_out']:,} out",
        f"shards: {report['shards_total']} ({report['shards_converted']} converted now, {report['shards_resumed']} already done)",
        f"time: {report['seconds']:.1f} s ({report['images_per_second']:.0f} images/s this run, "
        f"{report['shard_cpu_seconds']:.1f} CPU s in workers)",
    ]
    if report["zips_failed"]:
        lines.append(f"unreadable input shards ({len(report['zips_failed'])}):")
        lines += [f"  {name}: {why}" for name, why in report["zips_failed"].items()]
    return "\n".join(lines)
