"""Which documents go into which output shard: a pure function of the inputs, so re-runs agree.

Every input is read once to count its documents (and to find unreadable ones before any index is given out), then
output shards are numbered 000000, 000001, ... in input order: one per readable, non-empty input by default, or
consecutive groups of `docs_per_shard` documents that may span inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from of_ds.convert.inputs import InputShard, UnreadableInput, read_document_lines


@dataclass(frozen=True)
class Slice:
    source: InputShard
    start: int  # document ordinal (non-blank line) range within the input
    stop: int


@dataclass(frozen=True)
class ShardTask:
    index: int
    slices: tuple[Slice, ...]

    @property
    def name(self) -> str:
        return f"{self.index:06d}.tar"


def count_documents(path: str) -> int | str:
    """Number of documents (non-blank lines) in one input, or why it cannot be read."""
    try:
        return len(read_document_lines(path))
    except UnreadableInput as e:
        return str(e)


def build_plan(inputs: list[InputShard], doc_counts: list[int | str], docs_per_shard: int | None) -> list[ShardTask]:
    """Assign documents to numbered output shards; inputs whose count is a string (unreadable) get none."""
    readable = [(s, n) for s, n in zip(inputs, doc_counts) if isinstance(n, int) and n > 0]
    if docs_per_shard is None:
        return [ShardTask(i, (Slice(s, 0, n),)) for i, (s, n) in enumerate(readable)]
    tasks: list[ShardTask] = []
    current: list[Slice] = []
    room = docs_per_shard
    for source, n in readable:
        start = 0
        while start < n:
            take = min(room, n - start)
            current.append(Slice(source, start, start + take))
            start += take
            room -= take
            if room == 0:
                tasks.append(ShardTask(len(tasks), tuple(current)))
                current, room = [], docs_per_shard
    if current:
        tasks.append(ShardTask(len(tasks), tuple(current)))
    return tasks


def input_fingerprint(inputs: list[InputShard]) -> list[list]:
    """Path, size and mtime of every input: a cached document count is reused only while these match."""
    out = []
    for s in inputs:
        st = os.stat(s.path)
        out.append([s.path, st.st_size, st.st_mtime_ns])
    return out


def load_cached_counts(path: Path, fingerprint: list[list]) -> list[int | str] | None:
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return cached["counts"] if cached.get("inputs") == fingerprint else None


def save_counts(path: Path, fingerprint: list[list], counts: list[int | str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"inputs": fingerprint, "counts": counts}))
    os.replace(tmp, path)
