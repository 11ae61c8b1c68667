"""Shard lists, shard sizes, and reading tar shards into grouped samples (files and `pipe:` commands).

Stream types: shard spec -> list of urls -> (per url) tar members -> `{"__key__", "__url__", ext: bytes}` samples.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import subprocess
import tarfile
import tempfile
import zlib
from typing import Callable, Iterator, Union

from braceexpand import braceexpand

from .drops import DropCounter

log = logging.getLogger(__name__)

_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's grouping: key = path up to the first dot of the name


def expand_shards(shards: Union[str, list[str]], field: str) -> list[str]:
    """Brace patterns, globs, lists and `pipe:` commands -> urls; `s3://...` becomes `pipe:aws s3 cp ... -`.

    Local shards must exist (the error names `field` and the missing files); commands are checked when read.
    """
    patterns = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if url.startswith("s3://"):
                url = f"pipe:aws s3 cp {url} -"
            if url.startswith("pipe:"):
                urls.append(url)
            elif glob.has_magic(url):
                found = sorted(glob.glob(url))
                if not found:
                    missing.append(url)
                urls.extend(found)
            else:
                (urls if os.path.isfile(url) else missing).append(url)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{field}: {len(missing)} shard(s) not found: {shown}")
    if not urls:
        raise ValueError(f"{field}: the shard list {shards!r} is empty")
    return urls


def read_shard_sizes(urls: list[str], field: str) -> int:
    """Total samples of `urls` from the `sizes.json` beside them (open_clip's `{shard_name: count}`)."""
    by_dir: dict[str, dict] = {}
    total = 0
    for url in urls:
        if url.startswith("pipe:"):
            raise ValueError(f"{field}: shard sizes are unknown for command shards ({url}); set samples_per_epoch")
        folder, name = os.path.split(url)
        if folder not in by_dir:
            path = os.path.join(folder, "sizes.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{field}: samples_per_epoch is null (a real pass) but {path} does not exist; "
                                        "write it or set samples_per_epoch")
            try:
                by_dir[folder] = json.loads(open(path).read())
            except json.JSONDecodeError as e:
                raise ValueError(f"{field}: {path} is not valid JSON ({e})") from None
        sizes = by_dir[folder]
        if name not in sizes:
            raise KeyError(f"{field}: {os.path.join(folder, 'sizes.json')} has no entry for shard {name}")
        total += int(sizes[name])
    return total


class ShardStream:
    """A binary stream of one shard: a file, or the stdout of a `pipe:` command (its exit status checked on close)."""

    def __init__(self, url: str):
        self.url = url
        self.proc = None
        if url.startswith("pipe:"):
            self.err = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE, stderr=self.err, bufsize=1 << 20)
            self.file = self.proc.stdout
        else:
            self.file = open(url, "rb", buffering=1 << 20)

    def close(self, complete: bool) -> None:
        """Release the shard; for a command read to the end (`complete`), raise OSError if it failed."""
        self.file.close()
        if self.proc is None:
            return
        if not complete:
            self.proc.kill()  # the reader stopped early: the rest is not needed
        rc = self.proc.wait()
        self.err.seek(0)
        tail = self.err.read()[-300:].decode("utf-8", "replace").strip()
        self.err.close()
        if complete and rc != 0:
            raise OSError(f"command exited with status {rc}: {tail}")


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`); None for names without an extension."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: tarfile's own stream reader
_SPECIAL_TYPES = frozenset((tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE,
                            tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE))
_SKIP_CHUNK = 1 << 20


class _Prepended:
    """A read-only stream: `head`, then the rest of `file` (hands a partly read shard over to tarfile)."""

    def __init__(self, head: bytes, file):
        self.head, self.file = head, file

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.file.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.file.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + self.file.read(n - len(out)) if len(out) < n else out


def _tarfile_members(stream) -> Iterator[tuple[tuple[str, str] | None, Callable[[], bytes]]]:
    """`tar_members` through the standard library (compressed shards, GNU long names, pax headers, sparse files)."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            parts = split_member_name(member.name) if member.isreg() else None
            yield parts, lambda: tar.extractfile(member).read()


def tar_members(file) -> Iterator[tuple[tuple[str, str] | None, Callable[[], bytes]]]:
    """For each member of a tar stream, in order: (key, ext), or None for members that are not regular files or
    have no extension, and a function that reads the member's bytes (call it before advancing, or not at all).

    The standard library's semantics (tarfile's header parsing, member sizes, end-of-archive rules: an invalid or
    truncated header ends the archive unless it is the first; data cut short raises ReadError when read), without
    its stream reader: member data is read straight from the (buffered) file, and data not read is skipped by
    seeking when the file allows it. Compressed shards and special headers (GNU long names, pax, sparse) go to
    tarfile itself from that header on.
    """
    seekable = file.seekable()
    offset = 0
    while True:
        header = file.read(tarfile.BLOCKSIZE)
        if offset == 0 and header.startswith(_COMPRESSED_MAGIC):
            yield from _tarfile_members(_Prepended(header, file))
            return
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.EOFHeaderError:
            return
        except tarfile.HeaderError as e:
            if offset == 0:
                raise tarfile.ReadError(str(e)) from None
            return  # as tarfile: a bad or truncated header after the first ends the archive
        if info.type in _SPECIAL_TYPES:
            yield from _tarfile_members(_Prepended(header, file))
            return
        size = info.size if info.isreg() or info.type not in tarfile.SUPPORTED_TYPES else 0
        padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        offset += tarfile.BLOCKSIZE + padded
        read = [0]

        def data(size=size, read=read) -> bytes:
            out = file.read(size)
            read[0] = len(out)
            if len(out) != size:
                raise tarfile.ReadError("unexpected end of data")
            return out

        yield (split_member_name(info.name) if info.isreg() else None), data
        skip = padded - read[0]
        if skip and seekable:
            file.seek(skip, 1)  # past the end of a truncated file: the next header read is empty and ends the archive
        else:
            while skip > 0:
                chunk = file.read(min(skip, _SKIP_CHUNK))
                if not chunk:
                    break
                skip -= len(chunk)


def iter_tar_samples(url: str, counter: DropCounter, wanted: Callable[[str], bool]) -> Iterator[dict]:
    """Group consecutive tar members by key into samples holding the `wanted` extensions' bytes.

    An unopenable shard counts `shard_open_failed`; a truncated or corrupt one counts `tar_corrupt` and the rest of
    the shard (including the sample being read) is skipped. Both are logged with the shard's name.
    """
    try:
        shard = ShardStream(url)
    except OSError as e:
        log.warning("shard %s cannot be opened: %s", url, e)
        counter.drop("shard_open_failed")
        return
    current: dict | None = None
    complete = False
    members = 0
    try:
        for parts, data in tar_members(shard.file):
            members += 1
            if parts is None:
                continue
            key, ext = parts
            if current is None or key != current["__key__"] or ext in current:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            if wanted(ext):
                current[ext] = data()
        complete = True
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if shard.proc is not None and members == 0:  # a command that wrote nothing: it failed to open the shard
            log.warning("shard %s produced no tar data (%s: %s)", url, type(e).__name__, e)
            counter.drop("shard_open_failed")
        else:
            log.warning("shard %s is truncated or corrupt (%s: %s); skipping the rest of it", url, type(e).__name__, e)
            counter.drop("tar_corrupt")
        current = None
    finally:
        try:
            shard.close(complete)
        except OSError as e:
            log.warning("shard %s could not be read: %s", url, e)
            counter.drop("shard_open_failed")
            current = None
    if current is not None:
        yield current
