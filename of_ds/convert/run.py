"""Drive a conversion: plan, convert the shards not yet done (in N processes), write the indexes and the report.

Resume: a shard is done when `OUT/{index:06d}.tar` and its record `OUT/.convert/{index:06d}.done.json` both exist.
A shard is written to `OUT/.convert/{index:06d}.tar.partial`, renamed into place, and only then recorded, so a
killed run leaves no half shard under a final name; the next run redoes unfinished shards from scratch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from of_ds.convert.documents import ImagePolicy, chatgpt_members, mmc4_members
from of_ds.convert.inputs import (
    ConvertError,
    UnreadableInput,
    choose_image_layout,
    expand_inputs,
    image_subdir,
    read_document_lines,
)
from of_ds.convert.plan import (
    ShardTask,
    build_plan,
    count_documents,
    input_fingerprint,
    load_cached_counts,
    save_counts,
)
from of_ds.convert.report import Counts, check_adds_up, format_report
from of_ds.convert.tarwriter import DeterministicTar

STATE_DIR = ".convert"


@dataclass(frozen=True)
class ConvertOptions:
    """Everything a conversion depends on; all but `workers` and `progress` must match when resuming."""

    inputs: str  # brace pattern / glob of document shards (.jsonl.zip or .jsonl)
    image_dir: str
    output_dir: str
    format: Literal["members", "base64-json"] = "members"
    chatgpt: bool = False
    docs_per_shard: int | None = None  # None: one output shard per input
    resize_max_side: int | None = None
    min_image_bytes: int = 0
    image_layout: Literal["auto", "number", "position", "flat"] = "auto"
    verify: Literal["quick", "decode", "none"] = "quick"
    workers: int = 1
    progress: bool = True

    def policy(self) -> ImagePolicy:
        return ImagePolicy(self.min_image_bytes, self.resize_max_side, self.verify)


def convert(opts: ConvertOptions) -> dict:
    """Convert `opts.inputs` into shards under `opts.output_dir`; returns the report (also written as
    `convert_report.json` and printed)."""
    t0 = time.perf_counter()
    _validate(opts)
    out = Path(opts.output_dir)
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    inputs = expand_inputs(opts.inputs)
    layout = "flat" if opts.chatgpt else choose_image_layout(Path(opts.image_dir), inputs, opts.image_layout)
    fingerprint = input_fingerprint(inputs)
    _check_same_options(out, opts, layout, fingerprint)
    for stale in state.glob("*.partial"):
        stale.unlink()

    with _pool(opts.workers) as pool:
        doc_counts = load_cached_counts(state / "doc_counts.json", fingerprint)
        if doc_counts is None:
            doc_counts = list(_map(pool, count_documents, [s.path for s in inputs]))
            save_counts(state / "doc_counts.json", fingerprint, doc_counts)
        plan = build_plan(inputs, doc_counts, opts.docs_per_shard)
        todo = [t for t in plan if not _is_done(out, t)]
        work = partial(convert_shard, opts=opts, layout=layout)
        bar = _progress(opts, total=len(plan), initial=len(plan) - len(todo))
        images_now, cpu_now = 0, 0.0
        for record in _map(pool, work, todo, ordered=False):
            images_now += record["counts"]["images_referenced"]
            cpu_now += record["cpu_seconds"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(images_per_s=f"{images_now / (time.perf_counter() - t0):.0f}")
        if bar is not None:
            bar.close()

    failed = {s.path: n for s, n in zip(inputs, doc_counts) if isinstance(n, str)}
    seconds = time.perf_counter() - t0
    report = finalize(out, plan, failed, {
        "shards_converted": len(todo),
        "shards_resumed": len(plan) - len(todo),
        "seconds": round(seconds, 3),
        "images_per_second": round(images_now / seconds, 1),  # images looked at by this run
        "shard_cpu_seconds": round(cpu_now, 3),  # CPU time inside this run's shard conversions, all workers
    })
    print(format_report(report), file=sys.stderr)
    return report


def convert_shard(task: ShardTask, opts: ConvertOptions, layout: str) -> dict:
    """Write one output shard and its done record; returns the record."""
    cpu0 = time.process_time()
    out = Path(opts.output_dir)
    counts = Counts()
    policy = opts.policy()
    partial_path = out / STATE_DIR / f"{task.name}.partial"
    with DeterministicTar(partial_path) as tar:
        for sl in task.slices:
            try:
                lines = read_document_lines(sl.source.path)
            except UnreadableInput as e:  # readable when planned: the file changed underneath us
                raise ConvertError(f"{sl.source.path}: became unreadable during the conversion: {e}") from None
            if sl.start == 0:
                counts.bytes_in += os.path.getsize(sl.source.path)
            image_dir = image_subdir(Path(opts.image_dir), sl.source, layout)
            for line_no, raw in lines[sl.start : sl.stop]:
                key = f"{sl.source.stem}-{line_no:07d}"
                if opts.chatgpt:
                    members = chatgpt_members(raw, image_dir, policy, counts)
                else:
                    members = mmc4_members(raw, image_dir, opts.format, policy, counts)
                for suffix, data in members or ():
                    tar.add(f"{key}.{suffix}", data)
    counts.bytes_out = partial_path.stat().st_size
    check_adds_up(counts)
    record = {
        "shard": task.name,
        "sources": [[sl.source.path, sl.start, sl.stop] for sl in task.slices],
        "counts": counts.to_dict(),
        "cpu_seconds": round(time.process_time() - cpu0, 3),
    }
    os.replace(partial_path, out / task.name)
    _write_json(out / STATE_DIR / f"{task.index:06d}.done.json", record)
    return record


def finalize(out: Path, plan: list[ShardTask], failed: dict[str, str], this_run: dict) -> dict:
    """Sum the done records into `sizes.json`, `shards.json` and `convert_report.json` (with `this_run`'s
    timings appended); returns the report."""
    total = Counts()
    sizes, shards = {}, {}
    for task in plan:
        c = Counts.from_dict(json.loads((out / STATE_DIR / f"{task.index:06d}.done.json").read_text())["counts"])
        total.add(c)
        sizes[task.name] = c.documents_written
        shards[task.name] = {"documents": c.documents_written, "images": c.images_written, "bytes": c.bytes_out}
    check_adds_up(total)
    report = total.to_dict() | {"zips_failed": dict(sorted(failed.items())), "shards_total": len(plan)} | this_run
    _write_json(out / "sizes.json", sizes)
    _write_json(out / "shards.json", shards)
    _write_json(out / "convert_report.json", report)
    return report


# ------------------------------------------------------------------------------------------------- helpers
def _validate(opts: ConvertOptions) -> None:
    problems = []
    if not Path(opts.image_dir).is_dir():
        problems.append(f"--image-dir: not a directory: {opts.image_dir}")
    if opts.workers < 1:
        problems.append(f"--workers: must be >= 1, got {opts.workers}")
    if opts.docs_per_shard is not None and opts.docs_per_shard < 1:
        problems.append(f"--docs-per-shard: must be >= 1, got {opts.docs_per_shard}")
    if opts.resize_max_side is not None and opts.resize_max_side < 1:
        problems.append(f"--resize-max-side: must be >= 1, got {opts.resize_max_side}")
    if opts.min_image_bytes < 0:
        problems.append(f"--min-image-bytes: must be >= 0, got {opts.min_image_bytes}")
    if opts.format not in ("members", "base64-json"):
        problems.append(f"--format: members or base64-json, got {opts.format!r}")
    if opts.verify not in ("quick", "decode", "none"):
        problems.append(f"--verify: quick, decode or none, got {opts.verify!r}")
    if opts.image_layout not in ("auto", "number", "position", "flat"):
        problems.append(f"--image-layout: auto, number, position or flat, got {opts.image_layout!r}")
    if problems:
        raise ConvertError("; ".join(problems))


def _check_same_options(out: Path, opts: ConvertOptions, layout: str, fingerprint: list[list]) -> None:
    """Refuse to mix shards made with different settings, or from changed inputs, in one output directory."""
    current = {k: v for k, v in asdict(opts).items() if k not in ("workers", "progress", "output_dir")}
    current |= {"image_layout_resolved": layout, "inputs_path_size_mtime": fingerprint}
    path = out / STATE_DIR / "options.json"
    if path.is_file():
        before = json.loads(path.read_text())
        diff = sorted(k for k in current.keys() | before.keys() if current.get(k) != before.get(k))
        if diff:
            raise ConvertError(
                f"--output-dir {out}: already holds shards converted with other settings ({', '.join(diff)}); "
                "use a fresh output directory, or the same settings to resume"
            )
    elif any(out.glob("*.tar")):
        raise ConvertError(f"--output-dir {out}: already holds .tar files not written by this converter")
    _write_json(path, current)


def _is_done(out: Path, task: ShardTask) -> bool:
    """The shard's tar and done record exist and agree on its size (a truncated copy is redone)."""
    tar, record = out / task.name, out / STATE_DIR / f"{task.index:06d}.done.json"
    if not (tar.is_file() and record.is_file()):
        return False
    try:
        return json.loads(record.read_text())["counts"]["bytes_out"] == tar.stat().st_size
    except (json.JSONDecodeError, KeyError):
        return False


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class _InProcess:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers == 1:
        return _InProcess()
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)


def _map(pool, fn, items, ordered: bool = True):
    if pool is None:
        return map(fn, items)
    return (pool.imap if ordered else pool.imap_unordered)(fn, items, chunksize=1)


def _progress(opts: ConvertOptions, total: int, initial: int):
    if not opts.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="shard", desc="convert", file=sys.stderr)
