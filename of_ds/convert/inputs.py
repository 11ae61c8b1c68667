"""Input side: expand the document-shard pattern, read one shard's JSON lines, find the image directory layout."""

from __future__ import annotations

import glob
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import braceexpand


class ConvertError(ValueError):
    """Bad arguments or inputs that stop the whole conversion (a single bad document or image never does)."""


class UnreadableInput(Exception):
    """A document shard that cannot be read at all (corrupt zip, no jsonl member, I/O error)."""


@dataclass(frozen=True)
class InputShard:
    """One input document file and where its images live."""

    path: str
    position: int  # index in the expanded input list (the original's image sub-directory)
    number: int | None  # shard number parsed from the file name (MMC4's own image sub-directory)

    @property
    def stem(self) -> str:
        """Key prefix: the file name without .zip/.jsonl, dots replaced (webdataset splits keys at the first dot)."""
        name = Path(self.path).name
        for suffix in (".zip", ".jsonl", ".json"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def expand_inputs(pattern: str) -> list[InputShard]:
    """Brace-expand `pattern`, then glob each part; keep the order given (natural order within one glob, so
    `shard_2` comes before `shard_10`). A brace-listed file that does not exist is an error (use a glob to take
    whatever is there)."""
    paths: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        if any(c in part for c in "*?["):
            paths.extend(sorted(glob.glob(part), key=_natural_key))
        else:
            paths.append(part)
    if not paths:
        raise ConvertError(f"--zip-files: '{pattern}' matches no files")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ConvertError(f"--zip-files: not found: {', '.join(missing[:3])}{more}")
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    if dupes:
        raise ConvertError(f"--zip-files: listed more than once: {', '.join(dupes[:3])}")
    return [InputShard(p, i, shard_number(p)) for i, p in enumerate(paths)]


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def shard_number(path: str) -> int | None:
    """MMC4's shard number: `docs_shard_{i}_v2.jsonl.zip` -> i (else the last number in the name, else None)."""
    name = Path(path).name
    m = re.search(r"shard_(\d+)", name) or re.search(r"(\d+)(?!.*\d)", name)
    return int(m.group(1)) if m else None


def read_document_lines(path: str) -> list[tuple[int, bytes]]:
    """(0-based line number, raw line) of every non-blank line of a `.jsonl` file or of the jsonl inside a zip.

    The whole member is read at once so a corrupt zip (bad CRC, truncated) fails here, before anything is written.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                jsonl = [n for n in names if n.endswith((".jsonl", ".json"))] or names
                if not jsonl:
                    raise UnreadableInput("zip holds no files")
                data = zf.read(jsonl[0])
        elif path.endswith(".zip"):
            raise UnreadableInput("not a zip file (corrupt or truncated)")
        else:
            data = Path(path).read_bytes()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, NotImplementedError) as e:
        raise UnreadableInput(f"{type(e).__name__}: {e}") from None
    return [(i, line) for i, line in enumerate(data.split(b"\n")) if line.strip()]


def choose_image_layout(image_dir: Path, shards: list[InputShard], layout: str) -> str:
    """Resolve `auto` to `number` (IMAGE_DIR/<shard number>/), `position` (IMAGE_DIR/<list position>/, the
    original's) or `flat` (IMAGE_DIR/<image_name>). Raises when both numbered layouts fit and differ."""
    if layout != "auto":
        return layout
    by_number = by_position = same = 0
    for s in shards:
        num_dir = s.number is not None and (image_dir / str(s.number)).is_dir()
        pos_dir = (image_dir / str(s.position)).is_dir()
        if s.number == s.position:
            same += num_dir
        else:
            by_number += num_dir
            by_position += pos_dir
    if by_number and by_position:
        raise ConvertError(
            f"--image-dir {image_dir}: ambiguous layout: sub-directories exist both for shard numbers from the file "
            f"names ({by_number} shards) and for positions in the --zip-files list ({by_position} shards); "
            "pass --image-layout number or --image-layout position"
        )
    if by_number or (same and not by_position):
        return "number"
    if by_position:
        return "position"
    return "flat"


def image_subdir(image_dir: Path, shard: InputShard, layout: str) -> Path:
    """The directory that holds `shard`'s images under `layout` (flat: the image dir itself)."""
    if layout == "number" and shard.number is not None:
        return image_dir / str(shard.number)
    if layout in ("number", "position"):
        return image_dir / str(shard.position)
    return image_dir
